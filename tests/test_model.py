"""Model-level invariants that do not need the reference: RoPE layout, batching, causality, positions."""

from __future__ import annotations

import pytest
import torch
from conftest import random_model

from dsv2.model import layers
from dsv2.model.rope import apply_rope


def test_interleaved_rope_equals_permuted_rotate_half():
    """DeepSeek's original code de-interleaves then uses rotate_half; scores must be identical (spec §7)."""
    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 16)
    angles = torch.rand(1, 5, 8) * 10
    cos, sin = angles.cos(), angles.sin()
    ours = torch.einsum("bshd,btd->bsht", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    def permuted(x):  # [x0,x2,...,x1,x3,...] then x·cos + rotate_half(x)·sin
        x = x.unflatten(-1, (8, 2)).transpose(-1, -2).flatten(-2)
        c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        if x.dim() == 4:
            c, s = c.unsqueeze(2), s.unsqueeze(2)
        return x * c + torch.cat([-x[..., 8:], x[..., :8]], -1) * s

    theirs = torch.einsum("bshd,btd->bsht", permuted(q), permuted(k))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batched_equals_one_at_a_time():
    m = random_model()
    x = torch.randint(0, 256, (3, 40))
    batched = m(x)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], m(x[i : i + 1]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_causal_prefix_logits_do_not_see_the_future():
    m = random_model("lite_like")
    x = torch.randint(0, 256, (1, 60))
    torch.testing.assert_close(m(x)[:, :25], m(x[:, :25]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_explicit_positions_match_default_and_shift_changes_output():
    m = random_model()
    x = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(m(x, torch.arange(30)), m(x))
    torch.testing.assert_close(m(x, torch.arange(30).expand(2, 30)), m(x))
    # a uniform position shift keeps RoPE's relative angles, so logits barely move; a permutation does not
    torch.testing.assert_close(m(x, torch.arange(30) + 100), m(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(m(x, torch.arange(30).flip(0)), m(x), atol=1e-3)


def test_training_backward_reaches_every_parameter():
    m = random_model()
    m.train()
    x = torch.randint(0, 256, (4, 64))
    torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # every routed expert is used by 4×64 tokens × top-3 over 16 experts, so all get gradients
    assert no_grad == []


@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 64, 128),  # one row, small matrix: ATen's own kernel, oneDNN off for the call
    (1, 1024, 1024),  # one row, matrix >= MV_MIN_ELEMENTS: torch.mv on an AMX CPU, else ATen
    (4, 64, 128),  # a few rows of a small matrix: ATen's kernel
    (64, 512, 512),  # up to WEIGHT_LEFT_MAX_ROWS rows: W @ xᵀ on an AMX CPU, else F.linear
    (256, 512, 512),  # more rows: F.linear
])
@pytest.mark.parametrize("mkldnn_on", [True, False])
@pytest.mark.parametrize("amx", [True, False])
def test_linear_paths_equal_fp32_and_restore_onednn(rows, out_features, in_features, mkldnn_on, amx, monkeypatch):
    """Every kernel `layers.linear` picks for bf16 on the CPU (either CPU's rule, whichever this one is) computes
    x @ Wᵀ as an fp32-accumulated product rounded once to bf16 (so within one bf16 rounding of the fp32 product),
    keeps the leading dims, and leaves oneDNN's process-wide switch as it found it."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", mkldnn_on)
    monkeypatch.setattr(layers, "AMX", amx)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, in_features, generator=g).bfloat16()
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    got = layers.linear(x, w)
    exact = x.float() @ w.float().t()
    assert got.shape == (rows, 1, out_features) and got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-3 * exact.abs().max().item())
    assert torch.backends.mkldnn.enabled is mkldnn_on


@pytest.mark.parametrize("amx", [True, False])
def test_linear_chooses_by_size_and_cpu(amx, monkeypatch):
    """The size rule: small products go to ATen's kernel (oneDNN's per-call floor is ~20 us); on an AMX CPU one
    row of a big matrix to torch.mv, a few rows to W @ xᵀ; without AMX every row to ATen's kernel, more rows to
    F.linear; many rows always to F.linear, fp32 always to F.linear."""
    monkeypatch.setattr(layers, "AMX", amx)
    taken = []
    monkeypatch.setattr(layers, "aten_linear", lambda x, w: taken.append(("aten", x.shape[0])) or x @ w.t())
    monkeypatch.setattr(torch, "mv", lambda w, x: taken.append(("mv", 1)) or w @ x)
    monkeypatch.setattr(torch, "mm", lambda w, x: taken.append(("weight left", x.shape[1])) or w @ x)
    w_small, w_big = torch.randn(64, 128).bfloat16(), torch.randn(1024, 1024).bfloat16()
    for rows in (1, 8, 64):
        layers.linear(torch.randn(rows, 128).bfloat16(), w_small)
    for rows in (1, 8, 200):
        layers.linear(torch.randn(rows, 1024).bfloat16(), w_big)
    layers.linear(torch.randn(1, 128), w_small.float())
    if amx:
        assert taken == [("aten", 1), ("aten", 8), ("weight left", 64), ("mv", 1), ("weight left", 8)]
    else:
        assert taken == [("aten", 1), ("aten", 8), ("aten", 1)]
