"""Model-level invariants that do not need the reference: RoPE layout, batching, causality, positions."""

from __future__ import annotations

import torch
from conftest import random_model

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
