"""Long context: the presets pretrain with plain RoPE and record L0, `dsv2 extend` writes V2's YaRN settings and
its model matches transformers 4x past L0, the needle lands at its token depth, loss by position equals a direct
computation, and chunked long prefill equals one-shot prefill."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model_from, hub_config, randomize_, require

import dsv2
from dsv2.cli import main
from dsv2.config import ConfigError, ModelConfig, preset, yarn_v2
from dsv2.data import longctx
from dsv2.data.shards import TokenShards, document_windows
from dsv2.eval import long_context
from dsv2.infer.engine import LLMEngine
from dsv2.model import mla
from dsv2.tokenizer import Tokenizer
from dsv2.train.extend import ExtendConfig, WithRetrieval, extension_overrides
from dsv2.train.pretrain import PackedText, PretrainConfig, train

L0, FACTOR, SEQ = 32, 4, 64  # pretrain at L0, extend by FACTOR training at SEQ: context FACTOR * L0 = 128


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A nano pretrained at L0 (plain RoPE), then extended with `dsv2 extend` (pass-key documents in the mix)."""
    root = tmp_path_factory.mktemp("long")
    train(PretrainConfig(out=str(root / "base"), steps=2, batch_size=2, seq_len=L0, max_documents=120,
                         tokenizer_documents=40, progress=False))
    shutil.copytree(root / "base" / "data", root / "ext" / "data")  # the same shards: no second tokenizing
    shutil.copyfile(root / "base" / "tokenizer.json", root / "ext" / "tokenizer.json")
    assert main(["extend", str(root / "base" / "model"), "--out", str(root / "ext"), "--seq-len", str(SEQ),
                 "--factor", str(FACTOR), "--steps", "2", "--batch-size", "2", "--retrieval", "0.5",
                 "--max-documents", "120", "--eval-every", "2", "--no-progress"]) == 0
    return root


def test_presets_pretrain_with_plain_rope():
    for name in ("nano", "small"):
        config = preset(name)
        assert config.rope_scaling is None and config.softmax_scale == config.qk_head_dim**-0.5
    # DeepSeek-V2's own settings are what an extension writes (paper §3.1.4)
    assert yarn_v2(40, 4096) == preset("deepseek-v2").rope_scaling
    with pytest.raises(ConfigError, match="`original_max_position_embeddings`: 64 .* disagrees with rope_scaling's 32"):
        ModelConfig.from_dict({**hub_config("v2_like"), "original_max_position_embeddings": 64,
                               "rope_scaling": yarn_v2(4.0, 32)})


def test_train_records_l0_and_extend_writes_v2_yarn(runs):
    base = ModelConfig.from_json(runs / "base" / "model" / "config.json")
    assert base.rope_scaling is None and base.original_max_position_embeddings == L0
    ext = ModelConfig.from_json(runs / "ext" / "model" / "config.json")
    assert ext.rope_scaling == {"type": "yarn", "factor": float(FACTOR), "original_max_position_embeddings": L0,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert ext.max_position_embeddings == FACTOR * L0 and ext.original_max_position_embeddings == L0
    assert ext.softmax_scale == pytest.approx(ext.qk_head_dim**-0.5 * (0.0707 * math.log(FACTOR) + 1) ** 2, rel=1e-3)
    rows = [json.loads(line) for line in (runs / "ext" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "val_loss" in rows[-1] and rows[-1]["balance_loss"] > 0  # balance losses on
    started = dsv2.load_model(runs / "base" / "model", progress=False)
    extended = dsv2.load_model(runs / "ext" / "model", progress=False)
    assert not torch.equal(started.layers[0].attn.wq_b.weight, extended.layers[0].attn.wq_b.weight)  # trained on


def test_extended_model_matches_transformers_4x_past_l0(runs, tmp_path):
    require("transformers")
    x = torch.randint(0, 1024, (2, 4 * L0), generator=torch.Generator().manual_seed(0))
    ours = dsv2.load_model(runs / "ext" / "model", progress=False)
    sharp = tmp_path / "sharp"  # the same config with large weights: attention far from uniform
    randomize_(ours)
    dsv2.save_model(ours, sharp, progress=False)
    for folder in (runs / "ext" / "model", sharp):
        ours, theirs = dsv2.load_model(folder, progress=False), hf_model_from(folder)
        with torch.no_grad():
            a, b = ours(x), theirs(x).logits
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, folder


def test_extension_settings_are_checked(runs, tmp_path):
    base = str(runs / "base" / "model")
    assert extension_overrides(ExtendConfig(model=base, seq_len=96))["rope_scaling"]["factor"] == 3.0  # L / L0
    with pytest.raises(ValueError, match="seq_len: 256 is past the extended context .* 128"):
        extension_overrides(ExtendConfig(model=base, seq_len=256, factor=4))
    with pytest.raises(ValueError, match="factor: must be a number > 1"):
        extension_overrides(ExtendConfig(model=base, seq_len=32, factor=1))
    with pytest.raises(ConfigError, match="pretrained at 32 tokens .* not 64"):
        extension_overrides(ExtendConfig(model=base, original_length=64))
    assert main(["init", "nano", str(tmp_path / "fresh")]) == 0  # a folder that records no L0
    with pytest.raises(ConfigError, match="records no pretraining length .*--original-length"):
        extension_overrides(ExtendConfig(model=str(tmp_path / "fresh")))
    assert extension_overrides(ExtendConfig(model=str(tmp_path / "fresh"), original_length=128, seq_len=512,
                                            factor=8))["max_position_embeddings"] == 1024


def test_long_windows_lie_inside_one_document(runs):
    shards = TokenShards(runs / "ext" / "data", "train")
    starts, bos = document_windows(shards, SEQ), shards.manifest["bos_id"]
    docs = shards.document_starts()
    lengths = np.diff(np.append(docs, shards.num_tokens))
    assert len(starts) == sum(n // SEQ if n % SEQ else n // SEQ - 1 for n in lengths if n > SEQ)
    for s in starts[:: max(1, len(starts) // 200)]:
        window = shards.read(int(s), SEQ + 1)
        assert not (window[1:] == bos).any()  # no later document starts inside it


def test_retrieval_rows_hold_a_passkey_document(runs):
    model_dir = runs / "ext" / "model"
    tokenizer = Tokenizer.from_folder(model_dir, ModelConfig.from_json(model_dir / "config.json"))
    shards = TokenShards(runs / "ext" / "data", "train")

    def source() -> WithRetrieval:
        return WithRetrieval(PackedText(shards, SEQ, within_documents=True), tokenizer, 0.5, seed=0)

    data = source()
    first, second = data.next_batch(4), data.next_batch(4)
    text = "".join(tokenizer.decode(row.tolist()) for row in second.inputs[:2])
    assert text.count("Remember it.") == 2 and second.inputs.shape == (4, SEQ)
    assert torch.equal(second.inputs[:, 1:], second.targets[:, :-1])
    row = tokenizer.decode([*second.inputs[0].tolist(), int(second.targets[0, -1])])
    key = re.search(r"The pass key is (\d{5})\. Remember it\.", row).group(1)
    assert row.endswith(f"What is the pass key? The pass key is {key}")  # it ends with the key it asks for
    plain = PackedText(shards, SEQ, within_documents=True)
    plain.next_batch(4)
    assert torch.equal(plain.next_batch(4).inputs[2:], second.inputs[2:])  # the rest is the text itself
    resumed = source()
    resumed.next_batch(4)
    state = resumed.state_dict()
    again = source()
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(4).inputs, second.inputs) and not torch.equal(first.inputs, second.inputs)


def test_needle_lands_at_the_requested_depth(runs):
    model_dir = runs / "ext" / "model"
    tokenizer = Tokenizer.from_folder(model_dir, ModelConfig.from_json(model_dir / "config.json"))
    hay = longctx.haystack(TokenShards(runs / "ext" / "data", "val"), tokenizer, 500)
    assert tokenizer.bos_id not in hay and tokenizer.eos_id not in hay
    needle = tokenizer.encode(longctx.NEEDLE.format(key="31415"), add_bos=False)
    question = tokenizer.encode(longctx.QUESTION, add_bos=False)
    for length in (120, 333):
        room = length - 1 - len(needle) - len(question)
        for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
            p = longctx.needle_prompt(tokenizer, hay, length, depth, "31415")
            assert len(p.prompt) == length and p.prompt[0] == tokenizer.bos_id
            assert p.needle_at == 1 + round(depth * room)
            assert p.prompt[p.needle_at : p.needle_at + len(needle)] == needle
            assert p.prompt[-len(question) :] == question
            assert p.prompt[1 : p.needle_at] + p.prompt[p.needle_at + len(needle) : -len(question)] == hay[:room]
            assert tokenizer.decode(p.answer).strip() == "31415"
    with pytest.raises(ValueError, match="haystack: 500 tokens"):
        longctx.needle_prompt(tokenizer, hay, 900, 0.5, "31415")


class Oracle(torch.nn.Module):
    """A fake model whose logits at each position put the top score on `offset` tokens ahead of it: with
    offset 1 it "knows" every next token, with 0 it repeats the input."""

    def __init__(self, config: ModelConfig, offset: int):
        super().__init__()
        self.config, self.offset, self.w = config, offset, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ahead = torch.roll(ids, -self.offset, dims=1)
        return F.one_hot(ahead, self.config.vocab_size).float()


def test_needle_scoring_reads_the_answer_positions(runs):
    config = ModelConfig.from_json(runs / "ext" / "model" / "config.json")
    tokenizer = Tokenizer.from_folder(runs / "ext" / "model", config)
    hay = longctx.haystack(TokenShards(runs / "ext" / "data", "val"), tokenizer, 300)
    args = (tokenizer, hay, [100, 250], [0.0, 0.5, 1.0])
    assert long_context.needle_accuracy(Oracle(config, 1), *args, trials=2, progress=False)["accuracy"] == [
        [1.0] * 3] * 2
    assert long_context.needle_accuracy(Oracle(config, 0), *args, trials=2, progress=False)["accuracy"] == [
        [0.0] * 3] * 2


def test_loss_by_position_equals_a_direct_computation(runs):
    model = dsv2.load_model(runs / "ext" / "model", progress=False)
    source = PackedText(TokenShards(runs / "ext" / "data", "val"), 4 * L0, shuffle=False, within_documents=True)
    batches = [source.next_batch(2) for _ in range(2)]
    got = long_context.loss_by_position(model, batches)
    positions = [0, 1, L0 - 1, L0, 2 * L0 + 5, 4 * L0 - 1]
    with torch.no_grad():  # each position's loss from a forward over its own prefix only
        direct = torch.tensor([[F.cross_entropy(model(b.inputs[r : r + 1, : p + 1])[0, p], b.targets[r, p])
                                for p in positions] for b in batches for r in range(len(b))]).mean(0)
    assert got.shape == (4 * L0,)
    torch.testing.assert_close(got[positions], direct, rtol=1e-5, atol=1e-5)
    pieces = long_context.cut(batches[0], L0)  # the second L0 tokens of row 0
    assert torch.equal(pieces.inputs[1], batches[0].inputs[0, L0 : 2 * L0])
    assert torch.equal(pieces.targets[1], batches[0].targets[0, L0 : 2 * L0])
    bins = long_context.position_bins(got, 4)
    assert [(b["start"], b["end"]) for b in bins] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert bins[1]["loss"] == pytest.approx(float(got[32:64].mean()))


def test_eval_cli_writes_needle_and_ppl_files(runs, tmp_path, capsys):
    ext, base = str(runs / "ext"), str(runs / "base")
    assert main(["eval", ext, "--needle", "--lengths", "64,128", "--depths", "0,0.5,1", "--trials", "1",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "needle.json").read_text())
    assert result["lengths"] == [64, 128] and np.array(result["accuracy"]).shape == (2, 3)
    assert main(["eval", ext, "--ppl-by-position", "--seq-len", "128", "--batches", "1", "--batch-size", "2",
                 "--bins", "8", "--baseline", base, "--out", str(tmp_path)]) == 0
    curves = json.loads((tmp_path / "ppl_by_position.json").read_text())["models"]
    assert len(curves) == 2 and all(len(c["bins"]) == 8 and "cut_to_l0" in c for c in curves.values())
    for png in ("needle.png", "ppl_by_position.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", ext, "--needle", "--lengths", "64,x"]) == 2
    assert "--lengths '64,x': expected comma-separated numbers" in capsys.readouterr().err


def long_prompt_logprobs(model: dsv2.Transformer, prompt: list[int], chunk: int) -> tuple[list[int], list[float]]:
    engine = LLMEngine(model, max_running=1, prefill_chunk=chunk, max_prefill_tokens=chunk)
    params = dsv2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    request = engine.make_request(prompt, params)
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    return request.out.token_ids, request.out.logprobs


@pytest.mark.parametrize("length", [3000, pytest.param(16384, marks=pytest.mark.slow)])
def test_chunked_long_prefill_equals_one_shot(length, monkeypatch):
    """A prompt 45x past YaRN's original length, prefilled in 512-token chunks (queries against the latent
    cache, the cheaper MLA path per chunk, keys in tiles past KEY_TILE) or in one forward: the same greedy
    tokens and log-probabilities."""
    monkeypatch.setattr(mla, "KEY_TILE", 1024 if length < 8192 else mla.KEY_TILE)  # 3000: tiles of 1024 too
    config = ModelConfig.from_dict({**hub_config("v2_like"), "max_position_embeddings": length + 8})
    model = dsv2.random_model(config)
    randomize_(model)
    prompt = torch.randint(2, config.vocab_size, (length,), generator=torch.Generator().manual_seed(3)).tolist()
    chunked = long_prompt_logprobs(model, prompt, 512)
    one_shot = long_prompt_logprobs(model, prompt, length)
    assert chunked[0] == one_shot[0]
    np.testing.assert_allclose(chunked[1], one_shot[1], rtol=0, atol=1e-4)
