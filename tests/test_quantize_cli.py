"""Quantized inference end to end: `dsv2 quantize` writes checkpoints that load back without quantizing again,
`LLM(quantization=...)` equals the same format loaded from disk, `--quantization` on the commands, and bad
requests refused before a checkpoint loads."""

from __future__ import annotations

import pytest
import torch

from dsv2 import LLM, SamplingParams
from dsv2.cli import main
from dsv2.config import preset
from dsv2.model import quant
from dsv2.tokenizer import Tokenizer
from dsv2.weights import load_model, random_model, save_model

PROMPTS = [[5, 17, 99], list(range(30, 50))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "model"
    model = random_model(preset("nano").replace(moe_intermediate_size=128), seed=0)  # K = 128 fits int4 groups
    save_model(model, path, progress=False)
    Tokenizer.byte_level(model.config).save(path)
    return path


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_loads_as_saved(folder, fmt, monkeypatch, tmp_path):
    out = tmp_path / fmt
    assert main(["quantize", str(folder), "--out", str(out), "--format", fmt, "--dtype", "float32"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    in_memory = LLM(folder, dtype="float32", quantization=fmt)
    monkeypatch.setattr(quant, "quantize_model", lambda *a, **k: pytest.fail("quantized again at load"))
    loaded = load_model(out, dtype=torch.float32, progress=False)
    assert loaded.config.quantization_config["quant_method"] == quant.METHODS[fmt]
    x = torch.tensor([PROMPTS[1]])
    assert torch.equal(loaded(x), in_memory.model(x))
    from_disk = LLM(out, dtype="float32", quantization=fmt)  # asking for the stored format is fine
    assert [o.token_ids for o in from_disk.generate(PROMPTS, GREEDY)] == \
        [o.token_ids for o in in_memory.generate(PROMPTS, GREEDY)]


def test_fp8_checkpoint_kept_or_dequantized(folder, tmp_path):
    out = tmp_path / "fp8"
    assert main(["quantize", str(folder), "--out", str(out), "--format", "fp8", "--block-size", "32"]) == 0
    kept = LLM(out, dtype="float32", quantization="fp8")
    assert any(type(m).__name__ == "FP8Linear" for m in kept.model.modules())
    plain = LLM(out, dtype="float32")
    assert plain.config.quantization_config is None  # dequantized: a plain model, which int8 may quantize
    x = torch.tensor([PROMPTS[1]])
    assert torch.allclose(kept.model(x), plain.model(x), atol=1e-5)
    assert quant.for_inference(load_model(out, progress=False), "int8").config.quantization_config


def test_bad_quantization_requests(folder, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(folder, quantization="int3")
    with pytest.raises(ValueError, match="block-FP8 checkpoint"):
        LLM(folder, quantization="fp8")  # not an FP8 checkpoint
    assert main(["quantize", str(folder), "--out", str(folder), "--format", "int8"]) == 2
    assert "another folder" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "int8"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    out = tmp_path / "int4"
    assert main(["quantize", str(folder), "--out", str(out), "--format", "int4"]) == 0
    with pytest.raises(ValueError, match="stored as dsv2_int4"):
        LLM(out, quantization="int8")
    with pytest.raises(SystemExit):
        main(["generate", str(folder), "--quantization", "int2"])


def test_generate_with_quantization_and_cache_dtype(folder, capsys):
    assert main(["generate", str(folder), "--prompt", "ab", "--max-tokens", "4", "--temperature", "0",
                 "--quantization", "int8", "--kv-cache-dtype", "6bit", "-v"]) == 0
    assert "4 generated" in capsys.readouterr().err
