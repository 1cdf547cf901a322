"""Tokenizer: tokenizer.json from a folder, BOS added once, DeepSeek-V2-Chat template, byte fallback."""

from __future__ import annotations

import itertools

import pytest
from conftest import require
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

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
    with pytest.raises(TokenizerError, match=r"messages\[1\]\.content must be a string, got int"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}])


# A BPE that has learned the template's pieces, "\n\n" among them: at the end of a string "\n\n" is one
# token, but before "User" the pre-tokenizer cuts it in two, so encoding the pieces apart gives other ids.
CHAT_TEXT = ["User: What is 12+30?\n\nAssistant: 42.\n\n", "User: héllo 世界\n\nAssistant: ok ✓\n\n"] * 30
SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "héllo 世界"},
    {"role": "assistant", "content": "héllo 世界 ✓\n\nbye"},
]
REPLIES = [" 42.", " héllo 世界 ✓\n\nbye"]
PROMPTS = ["User: What is 12+30?\n\nAssistant:", "User: héllo 世界\n\nAssistant:"]  # what precedes each reply


def chat_bpe() -> Tokenizer:
    return Tokenizer(train_bpe(CHAT_TEXT, vocab_size=320, special_tokens=SPECIALS), bos_id=0, eos_id=1)


@pytest.fixture(params=["bpe", "bytes"])
def chat_tok(request) -> Tokenizer:
    return chat_bpe() if request.param == "bpe" else Tokenizer.byte_level(dsv2.preset("nano"))


def specials(tok: Tokenizer) -> tuple[str, str]:
    return tok.hf.id_to_token(tok.bos_id), tok.hf.id_to_token(tok.eos_id)


def conversation(system: bool) -> tuple[str, list[dict[str, str]]]:
    """The rendered text before the first user turn, and the messages."""
    return ("Be brief.\n\n", [SYSTEM, *CHAT]) if system else ("", CHAT)


@pytest.mark.parametrize("system", [False, True])
def test_chat_ids_are_the_whole_conversation_encoded_at_once(chat_tok, system):
    bos, eos = specials(chat_tok)
    head, messages = conversation(system)
    text = f"{bos}{head}{PROMPTS[0]}{REPLIES[0]}{eos}{PROMPTS[1]}{REPLIES[1]}{eos}"
    # the tokenizer's own HF object splits at the special tokens, as the template must
    assert chat_tok.encode_chat(messages)[0] == chat_tok.hf.encode(text, add_special_tokens=False).ids
    prompt = f"{bos}{head}{PROMPTS[0]}{REPLIES[0]}{eos}{PROMPTS[1]}"
    assert chat_tok.apply_chat_template(messages[:-1]) == chat_tok.hf.encode(prompt, add_special_tokens=False).ids


def test_encoding_the_template_pieces_apart_would_give_other_ids():
    tok = chat_bpe()
    assert "ĊĊ" in tok.hf.get_vocab()  # "\n\n" is one token at the end of a piece, two before "User" or "Assistant"
    apart = [0, *tok.encode("User: What is 12+30?\n\n", add_bos=False), *tok.encode("Assistant:", add_bos=False)]
    assert tok.apply_chat_template(CHAT[:1]) != apart


@pytest.mark.parametrize("system", [False, True])
def test_chat_mask_is_true_exactly_on_replies_and_their_eos(chat_tok, system):
    head, messages = conversation(system)
    ids, mask = chat_tok.encode_chat(messages)
    assert len(mask) == len(ids)
    bos, eos = specials(chat_tok)
    # the runs of target tokens decode to the replies, each with its EOS; the other tokens to the rest
    runs = [(target, chat_tok.hf.decode([i for i, _ in run], skip_special_tokens=False))
            for target, run in itertools.groupby(zip(ids, mask, strict=True), key=lambda pair: pair[1])]
    assert runs == [(False, f"{bos}{head}{PROMPTS[0]}"), (True, REPLIES[0] + eos),
                    (False, PROMPTS[1]), (True, REPLIES[1] + eos)]


@pytest.mark.parametrize("system", [False, True])
def test_byte_level_chat_mask_token_by_token(system):
    head, messages = conversation(system)
    _, mask = Tokenizer.byte_level(dsv2.preset("nano")).encode_chat(messages)
    expected = [False]  # BOS, then one token per byte, and an EOS after each reply
    for piece, target in [(head + PROMPTS[0], False), (REPLIES[0], True), (PROMPTS[1], False), (REPLIES[1], True)]:
        expected += [target] * len(piece.encode()) + ([True] if target else [])
    assert mask == expected


@pytest.mark.parametrize("system", [False, True])
def test_generation_prompt_is_the_prefix_before_each_reply(chat_tok, system):
    _, messages = conversation(system)
    ids, mask = chat_tok.encode_chat(messages)
    previous_end = 0  # just after the previous reply's EOS
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = chat_tok.apply_chat_template(messages[:k], add_generation_prompt=True)
        end = ids.index(chat_tok.eos_id, len(prompt)) + 1  # this reply's EOS, inclusive
        assert ids[: len(prompt)] == prompt
        assert not any(mask[previous_end: len(prompt)]) and all(mask[len(prompt): end])
        previous_end = end
    assert previous_end == len(ids)


def test_chat_mask_ignores_a_trimming_post_processor_and_text_cannot_inject_eos(chat_tok):
    bos, eos = specials(chat_tok)
    messages = [{"role": "user", "content": f"say {eos} twice"}, {"role": "assistant", "content": f"  \n\n{eos}x"}]
    ids, mask = chat_tok.encode_chat(messages)
    assert ids.count(chat_tok.eos_id) == 1 and ids[-1] == chat_tok.eos_id
    trimming = Tokenizer(HFTokenizer.from_str(chat_tok.hf.to_str()), chat_tok.bos_id, chat_tok.eos_id)
    trimming.hf.post_processor = processors.ByteLevel(trim_offsets=True)
    offsets = trimming.hf.encode("Assistant:  \n\nx", add_special_tokens=False).offsets
    assert any(start == end for start, end in offsets)  # whitespace-only tokens come back empty
    assert trimming.encode_chat(messages) == (ids, mask)
    prompt = chat_tok.apply_chat_template(messages[:1])
    assert mask == [False] * len(prompt) + [True] * (len(ids) - len(prompt))


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


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_saved_folder_gives_transformers_the_same_ids(kind, tmp_path):
    """tokenizer_config.json beside tokenizer.json: AutoTokenizer encodes as `encode` (BOS once) and its
    apply_chat_template, from the DeepSeek-V2-Chat template saved there, gives dsv2's chat ids."""
    transformers = require("transformers")
    tok = chat_bpe() if kind == "bpe" else Tokenizer.byte_level(dsv2.preset("nano"))
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in ["héllo wörld ✓", "User: What is 12+30?\n\nAssistant: 42."]:
        assert theirs(text)["input_ids"] == tok.encode(text)
    for messages in [[SYSTEM, *CHAT[:1]], CHAT[:3], [SYSTEM, *CHAT]]:
        for prompt in (True, False):
            ids = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)["input_ids"]
            assert ids == tok.apply_chat_template(messages, add_generation_prompt=prompt), (messages, prompt)
    assert Tokenizer.from_folder(tmp_path, dsv2.preset("nano")).encode("abc") == tok.encode("abc")  # still dsv2's
