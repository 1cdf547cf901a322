"""CUDA paths (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from conftest import hub_config, randomize_

import dsv2
from dsv2.infer.cache import LatentCache
from dsv2.infer.generate import generate
from dsv2.model.moe import MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_grouped_mm_experts_equal_loop_and_skip_unused():
    cfg = dsv2.ModelConfig.from_dict({**hub_config("v2_like"), "hidden_size": 128, "moe_intermediate_size": 64})
    moe = MoE(cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16)
        w, idx, _ = moe.gate(x)
        unused = sorted(set(range(cfg.n_routed_experts)) - set(idx.flatten().tolist()))
        torch.testing.assert_close(moe.experts(x, w, idx), moe.experts.loop_experts(x, w, idx), rtol=2e-2, atol=2e-2)
        for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            p[unused] = float("nan")
        assert torch.isfinite(moe.experts(x, w, idx)).all()


@torch.no_grad()
def test_cuda_cached_decoding_and_engine():
    model = dsv2.random_model(dsv2.ModelConfig.from_dict(hub_config("v2_like")), device="cuda")
    randomize_(model)
    x = torch.randint(0, 320, (2, 60), device="cuda")
    full = model(x)
    cache = LatentCache(model.config, 2, 80, device="cuda")
    chunks = [model(x[:, :40], cache=cache)]
    cache.advance(40)
    for t in range(40, 60):
        chunks.append(model(x[:, t : t + 1], cache=cache))
        cache.advance(1)
    inc = torch.cat(chunks, 1)
    assert ((inc - full).abs().max() / full.abs().max()).item() <= 1e-4
    llm = dsv2.LLM(model, skip_tokenizer_init=True)
    params = dsv2.SamplingParams(max_tokens=8, temperature=0)
    prompts = [[5, 6, 7], list(range(20, 45))]
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        assert out.token_ids == generate(model, prompt, params, eos_id=1)
