"""dsv2's CPU experts kernel (`dsv2.model.cpu_kernels`) against the eager dispatch it stands in for, and what
happens where it cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch

from dsv2.model import cpu_kernels
from dsv2.model.moe import RoutedExperts

needs_kernel = pytest.mark.skipif(not cpu_kernels.supported(), reason="the kernel needs a CPU with AVX-512 BF16")


@needs_kernel
@pytest.mark.parametrize(("n_experts", "dim", "inner", "top_k", "n_tokens"),
                         [(32, 1024, 256, 4, 1), (6, 72, 40, 2, 9), (4, 48, 24, 3, 20), (8, 33, 17, 8, 2)])
@torch.no_grad()
def test_the_kernel_equals_the_dispatched_experts(n_experts, dim, inner, top_k, n_tokens):
    """Shapes of `small` and odd ones (widths that are no multiple of 32: masked tails), an expert chosen by more
    than the 8 tokens one pass takes, every expert chosen, and dropped slots (id -1): the same bf16 rounding as
    `dispatch`, so equal up to the order of the fp32 sums."""
    assert cpu_kernels.load()
    torch.manual_seed(n_tokens)
    experts = RoutedExperts(n_experts, dim, inner).to(torch.bfloat16)
    for w in (experts.w1, experts.w2, experts.w3):
        w.normal_(0, 0.3)
    x = torch.randn(n_tokens, dim, dtype=torch.bfloat16)
    weights = torch.rand(n_tokens, top_k)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    if n_tokens > 2:
        indices[1, 0] = indices[2, top_k - 1] = -1
    ours = cpu_kernels.routed_experts(x, weights, indices, experts.w1, experts.w2, experts.w3)
    dispatched = experts.dispatch(x, weights, indices)
    assert ours.dtype == torch.bfloat16 and ours.shape == dispatched.shape
    scale = dispatched.float().abs().max()
    assert (ours.float() - dispatched.float()).abs().max() <= 2e-2 * scale
    assert (ours == dispatched).float().mean() >= 0.9  # mostly the very same bits


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_run():
    assert cpu_kernels.load()
    experts = RoutedExperts(4, 32, 16).to(torch.bfloat16)
    x, weights, indices = torch.randn(2, 32, dtype=torch.bfloat16), torch.rand(2, 2), torch.tensor([[0, 4], [1, 2]])
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        cpu_kernels.routed_experts(x, weights, indices, experts.w1, experts.w2, experts.w3)
    with pytest.raises(RuntimeError, match="must be bf16"):
        cpu_kernels.routed_experts(x.float(), weights, indices.clamp(max=3), *(w.float() for w in
                                                                             (experts.w1, experts.w2, experts.w3)))
    assert experts.takes_kernel(x) and not experts.takes_kernel(x.float())
    assert not experts.float().takes_kernel(x.float())


def test_a_kernel_that_does_not_build_leaves_the_graphs_as_they_were(tmp_path, monkeypatch):
    """A failed build warns, says why, and leaves `loaded()` false, so the compiled graphs keep PyTorch's paths."""
    broken = tmp_path / "broken_kernel.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "supported", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.load()
    assert any("did not build" in str(w.message) and "broken_kernel.cpp" in str(w.message) for w in caught)
    assert not cpu_kernels.loaded()
    assert not RoutedExperts(4, 32, 16).to(torch.bfloat16).takes_kernel(torch.randn(1, 32, dtype=torch.bfloat16))


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DSV2_CPU_KERNELS", "0")
    assert not cpu_kernels.supported()
