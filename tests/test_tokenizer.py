"""Tokenizer: tokenizer.json from a folder, BOS added once, DeepSeek-V2-Chat template, byte fallback."""

from __future__ import annotations

import pytest

import dsv2
from dsv2.tokenizer import Tokenizer, TokenizerError, train_bpe

TEXT = ["def add(a, b):\n    return a + b\n", "User and Assistant talk.\n\n", "héllo wörld — ünïcode ✓"] * 20
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]


@pytest.fixture
def tok():
    return Tokenizer(train_bpe(TEXT, vocab_size=400, special_tokens=SPECIALS), bos_id=0, eos_id=1)


def test_encode_adds_bos_once_and_round_trips(tok):
    ids = tok.encode("héllo wörld ✓")
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tok.decode(ids) == "héllo wörld ✓"
    assert tok.encode("x", add_bos=False)[0] != 0


def test_chat_template_renders_deepseek_v2_format(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    ids = tok.apply_chat_template(messages)
    bos, eos = SPECIALS
    assert tok.hf.decode(ids, skip_special_tokens=False) == (
        f"{bos}Be brief.\n\nUser: Hi\n\nAssistant: Hello!{eos}User: 2+2?\n\nAssistant:"
    )
    with pytest.raises(TokenizerError, match=r"messages\[0\]\.role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_folder_tokenizer_and_errors(tok, tmp_path):
    cfg = dsv2.ModelConfig.from_dict({**dsv2.PRESETS["nano"], "vocab_size": 400})
    model = dsv2.random_model(cfg, seed=0)
    dsv2.save_model(model, tmp_path)
    tok.save(tmp_path)
    llm = dsv2.LLM(tmp_path, dtype="float32")
    out = llm.generate("def add(", dsv2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == tok.encode("def add(")
    assert out.text == tok.decode(out.token_ids)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer file"):
        dsv2.LLM(tmp_path)


def test_byte_level_fallback_is_deterministic():
    cfg = dsv2.preset("nano")
    a, b = Tokenizer.byte_level(cfg), Tokenizer.byte_level(cfg)
    text = "naïve café\n\tx"
    assert a.encode(text) == b.encode(text) and a.decode(a.encode(text)) == text
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.byte_level(cfg.replace(vocab_size=100))
