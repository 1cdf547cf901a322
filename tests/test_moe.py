"""DeepSeekMoE: the grouped expert path equals the per-expert loop; routing follows DeepSeek's rules."""

from __future__ import annotations

import pytest
import torch
from conftest import hub_config

from dsv2 import ModelConfig, load_model
from dsv2.model.moe import MoE


def make_moe(case: str = "v2_like", dtype=torch.float32, **overrides) -> MoE:
    cfg = ModelConfig.from_dict({**hub_config(case), **overrides})
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


@pytest.mark.parametrize("case", ["v2_like", "lite_like", "dense2_groups_yarn_ratio"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [37, 300])  # 300: slabs past RoutedExperts.ROW_BUCKET rows run padded in bf16
@torch.no_grad()
def test_grouped_equals_loop(case, dtype, n_tokens):
    """On the CPU both paths run each expert's GEMMs on the same rows in the same order and form the same fp32
    products w_k·FFN_k(x), so they differ only in the order each token's K products are summed in fp32: slot
    order here, expert order in the loop. For K = 2 order cannot matter (fp32 addition is commutative), so
    the results are bit-identical. For K = 3 each order's sum is within (K-1)u/(1-(K-1)u) < K·u of the exact
    one times Σ_k |w_k·FFN_k(x)| (u = 2^-24, fp32's unit roundoff), and each side is then rounded once to
    the output dtype, by at most its unit roundoff (2^-8 for bf16, none for fp32) times its own magnitude."""
    moe = make_moe(case, dtype)
    x = torch.randn(n_tokens, moe.gate.weight.shape[1], dtype=dtype)
    w, idx, _ = moe.gate(x)
    grouped = moe.experts(x, w, idx)
    loop = moe.experts.loop_experts(x, w, idx)
    top_k = idx.shape[1]
    if top_k <= 2:
        assert torch.equal(grouped, loop)
        return
    # Σ_k |w_k·FFN_k(x)|, one slot at a time: the other slots' weights are zero, so they add exact zeros
    magnitude = sum(moe.experts.loop_experts(x, w * (torch.arange(top_k) == k), idx).float().abs()
                    for k in range(top_k))
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    bound = 2 * top_k * 2.0**-24 * magnitude + rounding * (grouped.float().abs() + loop.float().abs())
    assert ((grouped.float() - loop.float()).abs() <= bound).all()


def test_grouped_gradients_equal_loop():
    moe = make_moe()
    x = torch.randn(16, moe.gate.weight.shape[1], requires_grad=True)
    w, idx, _ = moe.gate(x)
    grads = []
    for run in (moe.experts, moe.experts.loop_experts):
        moe.zero_grad()
        x.grad = None
        run(x, w, idx).square().sum().backward(retain_graph=True)
        grads.append((x.grad.clone(), moe.experts.w1.grad.clone(), moe.gate.weight.grad.clone()))
    # the same fp32 products summed in other orders (over a token's slots, over an expert's tokens): a few fp32
    # ulps of the largest entry apart (measured ≤ 4·2^-24 of it over 50 seeds); allowed 16
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2.0**-20 * b.abs().max().item())


def test_unchosen_experts_are_never_read():
    """Poison every expert no token picked: the grouped path must not touch them."""
    moe = make_moe(n_routed_experts=16, n_group=4)
    x = torch.randn(3, moe.gate.weight.shape[1])
    w, idx, _ = moe.gate(x)
    unused = sorted(set(range(16)) - set(idx.flatten().tolist()))
    assert unused, "test needs at least one unused expert"
    with torch.no_grad():
        for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            p[unused] = float("nan")
    assert torch.isfinite(moe.experts(x, w, idx)).all()
    assert torch.isfinite(moe(x.unsqueeze(0))[0]).all()


@torch.no_grad()
def test_grouped_cpu_path_with_dropped_slots_and_unchosen_experts():
    """The CPU's grouped GEMMs (bf16, a prefill-sized batch: `uses_grouped_mm`) pad each expert's rows to
    ROW_BUCKET: dropped slots (id -1) still add nothing, NaN experts nobody chose are never read, and the result
    is the loop's (K = 2: bit-identical)."""
    moe = make_moe("lite_like", torch.bfloat16)
    experts = moe.experts
    x = torch.randn(200, moe.gate.weight.shape[1], dtype=torch.bfloat16)
    w, idx, _ = moe.gate(x)
    idx = torch.where(torch.rand(idx.shape) < 0.2, -1, idx.remainder(experts.n_experts - 2))  # last two unchosen
    assert experts.uses_grouped_mm(x, idx.numel())
    for p in (experts.w1, experts.w2, experts.w3):
        p[-2:] = float("nan")
    grouped = experts.dispatch(x, w, idx)  # not `experts(...)`: on a CPU without AMX that is the bf16 kernel
    assert torch.equal(grouped, experts.loop_experts(x, w, idx))
    assert torch.isfinite(grouped).all()


def test_group_limited_routing_stays_within_top_groups():
    moe = make_moe(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    x = torch.randn(200, moe.gate.weight.shape[1])
    w, idx, scores = moe.gate(x)
    group_score = scores.view(200, 4, 4).amax(-1)  # group score = its best expert's score
    best_groups = group_score.topk(2, dim=-1).indices
    chosen_groups = idx // 4
    assert (chosen_groups.unsqueeze(-1) == best_groups.unsqueeze(1)).any(-1).all()
    # within the allowed experts, the chosen ones are the top-3 by score
    allowed = torch.zeros(200, 4, dtype=torch.bool).scatter_(1, best_groups, True).repeat_interleave(4, dim=1)
    expected = scores.masked_fill(~allowed, 0).topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.sort(-1).values, expected)
    torch.testing.assert_close(w, scores.gather(1, idx) * moe.gate.scale)


def test_greedy_weights_scaled_and_normalized_rule():
    moe = make_moe("lite_like", routed_scaling_factor=3.0)
    x = torch.randn(10, moe.gate.weight.shape[1])
    w, idx, scores = moe.gate(x)
    torch.testing.assert_close(idx.sort(-1).values, scores.topk(2, -1).indices.sort(-1).values)
    torch.testing.assert_close(w, scores.gather(1, idx) * 3.0)
    # DeepSeek-V2's rule: with norm_topk_prob the weights are renormalised and *not* scaled
    moe = make_moe("lite_like", routed_scaling_factor=3.0, norm_topk_prob=True)
    w, _, _ = moe.gate(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))


def test_moe_layer_placement():
    cfg = ModelConfig.from_dict({**hub_config("v2_like"), "num_hidden_layers": 6, "first_k_dense_replace": 2,
                                 "moe_layer_freq": 2})
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    dense = ModelConfig.from_dict({**hub_config("v2_like"), "n_routed_experts": None})
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))


def test_router_stays_fp32_under_bf16_autocast():
    """`--bf16` trains under autocast, which would run the router GEMM in bf16: its scores must equal the
    fp32 ones exactly (measured before the fix: max |Δscore| 6e-4 on nano, enough to flip near-tie choices)."""
    model = load_model("nano", seed=0).train()
    gate = next(layer.ffn.gate for layer in model.layers if hasattr(layer.ffn, "gate"))
    x = torch.randn(64, model.config.hidden_size)
    weights, indices, scores = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights_ac, indices_ac, scores_ac = gate(x)
    assert scores_ac.dtype == weights_ac.dtype == torch.float32
    assert torch.equal(scores_ac, scores) and torch.equal(indices_ac, indices) and torch.equal(weights_ac, weights)
