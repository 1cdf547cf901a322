"""dtype="auto": bf16 where the CPU multiplies bf16 natively, fp32 elsewhere, whatever CPU runs the tests."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2 import LLM, SamplingParams, hardware


@pytest.mark.parametrize(("capability", "expected"), [
    ("AMX", torch.bfloat16), ("AVX-512 BF16", torch.bfloat16), ("AVX-512", torch.float32), ("AVX2", torch.float32),
])
def test_auto_dtype_follows_native_bf16(monkeypatch, capability, expected):
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    assert hardware.resolve_dtype("auto") == expected
    assert hardware.resolve_dtype("auto", "cuda") == torch.bfloat16  # a GPU computes in bf16 whatever the host
    assert hardware.resolve_dtype("float32") == torch.float32
    assert hardware.resolve_dtype(torch.bfloat16) == torch.bfloat16


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="'float8'"):
        hardware.resolve_dtype("float8")


def test_capability_is_one_of_the_named_levels():
    levels = ("AMX", "AVX-512 BF16", "AVX-512", "AVX2", torch.backends.cpu.get_cpu_capability())
    assert hardware.cpu_capability() in levels
    assert hardware.cpu_capability() in hardware.describe()


@pytest.mark.parametrize(("capability", "expected"), [("AVX2", "float32"), ("AMX", "bfloat16")])
def test_llm_loads_in_the_auto_dtype_and_reports_it(monkeypatch, tmp_path, capability, expected):
    dsv2.save_model(dsv2.load_model("nano", seed=0), tmp_path)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    llm = LLM(tmp_path, skip_tokenizer_init=True)  # dtype="auto" is the default
    assert llm.model.embed.weight.dtype == getattr(torch, expected)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert llm.stats()["dtype"] == expected
