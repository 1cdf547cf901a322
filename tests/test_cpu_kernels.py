"""dsv2's CPU experts kernel (`dsv2.model.cpu_kernels`) against the eager dispatch it stands in for, and what
happens where it cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv2.model import cpu_kernels, quant
from dsv2.model.moe import RoutedExperts

needs_kernel = pytest.mark.skipif(not cpu_kernels.supported(),
                                  reason="the kernels need a CPU with AVX2 or AVX-512 BF16")
needs_bf16_kernel = pytest.mark.skipif(not cpu_kernels.supported() or cpu_kernels.build() != "avx512",
                                       reason="the bf16 kernels need a CPU with AVX-512 BF16")


@needs_bf16_kernel
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


@needs_bf16_kernel
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


@pytest.mark.skipif(cpu_kernels.build() != "avx512" or torch.cpu._is_amx_tile_supported(),
                    reason="AVX-512 BF16 without AMX")
@torch.no_grad()
def test_eager_experts_take_the_kernel_while_the_slots_per_expert_are_few():
    """Without AMX an eager forward runs the experts on the kernel (a prefill chunk's, an eager decode step's) up
    to KERNEL_MAX_SLOTS slots per expert: the kernel's output exactly,
    within bf16 rounding of `dispatch`; past the limit, or recording gradients, or in fp32, `dispatch` exactly."""
    assert cpu_kernels.load()
    torch.manual_seed(0)
    experts = RoutedExperts(8, 64, 32).to(torch.bfloat16)
    for w in (experts.w1, experts.w2, experts.w3):
        w.normal_(0, 0.3)
    top_k = 2
    fits = experts.KERNEL_MAX_SLOTS * experts.n_experts // top_k  # tokens at the limit
    x = torch.randn(fits + 1, 64, dtype=torch.bfloat16)
    weights = torch.rand(fits + 1, top_k)
    indices = torch.stack([torch.randperm(8)[:top_k] for _ in range(fits + 1)])
    n = 40
    kernel = cpu_kernels.routed_experts(x[:n], weights[:n], indices[:n], experts.w1, experts.w2, experts.w3)
    assert experts.kernel_runs(x[:fits], fits * top_k) and not experts.kernel_runs(x, (fits + 1) * top_k)
    assert torch.equal(experts(x[:n], weights[:n], indices[:n]), kernel)
    dispatched = experts.dispatch(x[:n], weights[:n], indices[:n])
    assert (kernel.float() - dispatched.float()).abs().max() <= 2e-2 * dispatched.float().abs().max()
    assert torch.equal(experts(x, weights, indices), experts.dispatch(x, weights, indices))
    assert not experts.float().kernel_runs(x.float(), 2)
    with torch.enable_grad():
        assert not experts.kernel_runs(x, 2)


@needs_bf16_kernel
@torch.no_grad()
def test_experts_too_large_for_cache_take_the_tiled_products_with_the_same_bits():
    """Past 4 slots an expert whose matrices hold 2^20 weights or more runs its products in tiles of 4 rows x 6
    tokens (rows_dot_tiled): each token's output is bit for bit what it is alone (one slot an expert, rows_dot),
    with widths and row counts that leave tails (1000 = 31·32 + 8, 1050 = 262·4 + 2) and 13 tokens an expert (tiles
    of 5, 5 and 3); and within bf16 rounding of `dispatch`."""
    assert cpu_kernels.load()
    torch.manual_seed(0)
    experts = RoutedExperts(2, 1000, 1050).to(torch.bfloat16)
    assert experts.w1[0].numel() >= 1 << 20
    for w in (experts.w1, experts.w2, experts.w3):
        w.normal_(0, 0.05)
    n = 13
    x = torch.randn(n, 1000, dtype=torch.bfloat16)
    weights = torch.rand(n, 2)
    indices = torch.stack([torch.randperm(2) for _ in range(n)])
    together = cpu_kernels.routed_experts(x, weights, indices, experts.w1, experts.w2, experts.w3)
    alone = torch.cat([cpu_kernels.routed_experts(x[i:i + 1], weights[i:i + 1], indices[i:i + 1], experts.w1,
                                                  experts.w2, experts.w3) for i in range(n)])
    assert torch.equal(together, alone)
    dispatched = experts.dispatch(x, weights, indices)
    assert (together.float() - dispatched.float()).abs().max() <= 2e-2 * dispatched.float().abs().max()


def test_a_kernel_that_does_not_build_leaves_the_graphs_as_they_were(tmp_path, monkeypatch):
    """A failed build warns, says why, and leaves `loaded()` false, so the compiled graphs keep PyTorch's paths."""
    broken = tmp_path / "broken_kernel.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_amx", False)
    monkeypatch.setattr(cpu_kernels, "_bf16", False)
    monkeypatch.setattr(cpu_kernels, "supported", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.load()
    assert any("did not build" in str(w.message) and "broken_kernel.cpp" in str(w.message) for w in caught)
    assert not cpu_kernels.loaded()
    one_row, weight = torch.randn(1, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    assert not cpu_kernels.takes_linear(one_row, weight) and not cpu_kernels.takes_linear_int8(one_row.float())
    assert not RoutedExperts(4, 32, 16).to(torch.bfloat16).takes_kernel(torch.randn(1, 32, dtype=torch.bfloat16))


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DSV2_CPU_KERNELS", "0")
    assert not cpu_kernels.supported()


needs_amx = pytest.mark.skipif(not (cpu_kernels.supported() and torch.cpu._is_amx_tile_supported()),
                               reason="the bf16 linear kernel needs a CPU with AMX")


@needs_amx
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 512, 1024), (8, 288, 1024), (16, 1000, 96), (3, 33, 32), (5, 7, 64)])
@torch.no_grad()
def test_the_linear_kernel_equals_f_linear(rows, n, k):
    """Rows from one to a tile's 16, weights of every row count (a last block of 1-31 rows padded, fewer rows
    than one block): within a bf16 rounding of F.linear (both sum in fp32), the leading dims kept."""
    assert cpu_kernels.load()
    torch.manual_seed(rows * n)
    x, weight = torch.randn(2, rows, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    reference = F.linear(x.double(), weight.double())
    ours = cpu_kernels.linear(x[1], weight)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, n)
    error = (ours.double() - reference[1]).abs().max()
    assert error <= 2 ** -8 * reference[1].abs().max()
    assert error <= 2 * (F.linear(x[1], weight).double() - reference[1]).abs().max()
    assert cpu_kernels.linear(x[:, :1], weight).shape == (2, 1, n)


@needs_amx
def test_the_linear_kernel_refuses_what_it_cannot_run():
    assert cpu_kernels.load()
    weight = torch.randn(64, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        cpu_kernels.linear(torch.randn(17, 96, dtype=torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.linear(torch.randn(2, 40, dtype=torch.bfloat16), torch.randn(64, 40, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="must be bf16"):
        cpu_kernels.linear(torch.randn(2, 96), weight)
    with pytest.raises(RuntimeError, match=r"x \[M,K\] and a weight \[N,K\]"):
        cpu_kernels.linear(torch.randn(2, 64, dtype=torch.bfloat16), weight)
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    assert cpu_kernels.takes_linear(x, weight) and not cpu_kernels.takes_linear(x.float(), weight.float())
    assert not cpu_kernels.takes_linear(torch.randn(cpu_kernels.BF16_MAX_ROWS + 1, 96, dtype=torch.bfloat16), weight)
    assert not cpu_kernels.takes_linear(torch.randn(1, 40, dtype=torch.bfloat16), weight[:, :40])


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row of x on 127 levels of its own absmax, the sum exact (int64), scaled back as the kernel does."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inverse = torch.full_like(amax, 127) / amax  # as the kernel divides (127 / amax is 1/amax times 127)
    xq = torch.round(x * torch.where(amax > 0, inverse, 0)).long()
    return (xq @ q.long().t()).float() * (amax / 127) * scale.float()


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k", "dtype"), [(1, 512, 1024, torch.bfloat16), (8, 288, 2816, torch.bfloat16),
                                                       (16, 100, 64, torch.float32), (3, 33, 128, torch.float32),
                                                       (37, 40, 64, torch.float32), (1, 70, 320, torch.float32)])
def test_the_int8_kernel_is_w8a8_exactly(rows, n, k, dtype):
    """The integer sums are exact (AMX tiles or VNNI, whichever this CPU has), so the kernel equals its
    definition up to x's last rounding; a zero row is zero; past 16 rows each row is what it is alone; the int8
    module's w8a8 forward takes it, within the activations' rounding of the float product."""
    assert cpu_kernels.load()
    torch.manual_seed(n)
    weight = torch.randn(n, k)
    module = quant.Int8Linear.quantize(weight.to(dtype))
    x = torch.randn(rows, k, dtype=dtype)
    x[-1] = 0 if rows > 1 else x[-1]
    ours = cpu_kernels.linear_int8(x, module.weight, module.scale)
    assert ours.dtype == dtype and ours.shape == (rows, n)
    assert torch.equal(ours, w8a8_reference(x, module.weight, module.scale).to(dtype))
    assert torch.equal(ours[-2:], cpu_kernels.linear_int8(x[-2:], module.weight, module.scale))
    other = torch.float32 if module.scale.dtype == torch.bfloat16 else torch.bfloat16  # scales read in either dtype
    assert torch.equal(cpu_kernels.linear_int8(x, module.weight, module.scale.to(other)),
                       w8a8_reference(x, module.weight, module.scale.to(other)).to(dtype))
    module.int8_activations = True
    assert torch.equal(module(x[None]), ours[None])
    exact = F.linear(x.double(), module.dequantized().double())
    assert (ours.double() - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.skipif(cpu_kernels.build() != "avx512" or torch.cpu._is_amx_tile_supported(),
                    reason="AVX-512 BF16 without AMX")
def test_without_amx_the_bf16_linear_kernel_is_refused_and_never_taken():
    """Without tiles ATen's bf16 kernel reads as fast (layers.linear): the bf16 kernel says so and no graph takes it."""
    assert cpu_kernels.load()
    x, weight = torch.randn(1, 96, dtype=torch.bfloat16), torch.randn(64, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="needs AMX tiles"):
        cpu_kernels.linear(x, weight)
    assert not cpu_kernels.takes_linear(x, weight)


@needs_kernel
def test_the_int8_kernel_refuses_what_it_cannot_run():
    assert cpu_kernels.load()
    q, scale = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_kernels.linear_int8(torch.randn(2, 32), q[:, :32], scale)
    with pytest.raises(RuntimeError, match="must be int8"):
        cpu_kernels.linear_int8(torch.randn(2, 64), q.float(), scale)
    with pytest.raises(RuntimeError, match="one scale per output row"):
        cpu_kernels.linear_int8(torch.randn(2, 64), q, scale[:4])
    with pytest.raises(RuntimeError, match="fp32 or bf16, got Half"):
        cpu_kernels.linear_int8(torch.randn(2, 64, dtype=torch.float16), q, scale)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.dsv2_cpu.linear_int8(torch.randn(17, 64), q, scale)
    wide = torch.zeros(8, 65536 + 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="K at most 65536"):
        cpu_kernels.linear_int8(torch.zeros(1, wide.shape[1]), wide, scale)
    assert not cpu_kernels.takes_linear_int8(torch.zeros(1, wide.shape[1]))
    assert cpu_kernels.takes_linear_int8(torch.randn(40, 64)) and not cpu_kernels.takes_linear_int8(torch.randn(2, 96))


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 512, 1024), (2, 130, 136), (5, 64, 8), (6, 67, 264), (8, 288, 2816),
                                              (16, 100, 64), (37, 40, 64), (quant.BF16_KERNEL_MAX_ROWS + 3, 72, 96)])
@torch.no_grad()
def test_the_bf16_weight_kernel_is_the_fp32_product(rows, n, k):
    """fp32 x times a bf16 weight widened exactly: the fp32 product of the rounded weight, but for the order of the
    fp32 sums; a row's result is the same in any batch (past 16 rows, each as it is alone); `Bf16Linear` takes the
    kernel up to BF16_KERNEL_MAX_ROWS rows and F.linear on the widened weight above."""
    assert cpu_kernels.load()
    torch.manual_seed(n)
    module = quant.Bf16Linear(torch.randn(n, k))
    assert module.weight.dtype == torch.bfloat16 and module.traces()
    x = torch.randn(rows, k)
    ours = cpu_kernels.linear_bf16_fp32(x, module.weight)
    assert ours.dtype == torch.float32 and ours.shape == (rows, n)
    exact = x.double() @ module.weight.double().t()
    assert (ours.double() - exact).abs().max() <= 1e-6 * k ** 0.5 * exact.abs().max()
    for i in (0, rows - 1):
        assert torch.equal(ours[i], cpu_kernels.linear_bf16_fp32(x[i:i + 1], module.weight)[0])
    y = module(x[None])
    assert y.shape == (1, rows, n)
    if rows <= quant.BF16_KERNEL_MAX_ROWS:
        assert torch.equal(y[0], ours)
    else:
        torch.testing.assert_close(y[0], F.linear(x, module.weight.float()))


@needs_kernel
def test_the_bf16_weight_kernels_refuse_what_they_cannot_run():
    assert cpu_kernels.load()
    weight = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be fp32, got BFloat16"):
        cpu_kernels.linear_bf16_fp32(torch.randn(2, 64, dtype=torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match=r"the weight must be bf16 \[N, K\]"):
        cpu_kernels.linear_bf16_fp32(torch.randn(2, 64), weight.float())
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cpu_kernels.linear_bf16_fp32(torch.randn(2, 12), weight[:, :12])
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.dsv2_cpu.linear_bf16_fp32(torch.randn(17, 64), weight)
    with pytest.raises(RuntimeError, match=r"x \[M,K\] and a weight \[N,K\]"):
        cpu_kernels.linear_bf16_fp32(torch.randn(2, 64), weight[:, :32])
    assert cpu_kernels.takes_bf16_fp32(136) and not cpu_kernels.takes_bf16_fp32(12)
    experts = quantized_experts(4, 128, 64, torch.float32, "bf16")
    (w1,), w3, w2 = experts.fused_operands()
    x, weights = torch.randn(2, 128), torch.rand(2, 2)
    with pytest.raises(RuntimeError, match="x must be fp32"):
        cpu_kernels.routed_experts_bf16_fp32(x.bfloat16(), weights, torch.tensor([[0, 1], [1, 2]]), (w1,), w3, w2)
    with pytest.raises(RuntimeError, match=r"\(w2\): the weight must be bf16"):
        cpu_kernels.routed_experts_bf16_fp32(x, weights, torch.tensor([[0, 1], [1, 2]]), (w1,), w3, (w2[0].float(),))
    assert experts.fused_kernel(x.bfloat16()) is None


def w4a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """Each row of x on 127 levels of its own absmax, times (q - z)·s, in float64 (the kernel's sums are exact in
    int32 per group; only its fp32 scaling rounds)."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inverse = torch.full_like(amax, 127) / amax
    xq = torch.round(x * torch.where(amax > 0, inverse, 0)).double()
    weight = (q.double() - zero.double().repeat_interleave(group_size, 1)) * scale.double().repeat_interleave(
        group_size, 1)
    return xq @ weight.t() * (amax.double() / 127)


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "k", "group_size", "dtype"),
                         [(1, 512, 1024, 128, torch.bfloat16), (2, 96, 1408, 64, torch.float32),
                          (9, 48, 192, 64, torch.float32), (16, 112, 256, 128, torch.bfloat16),
                          (37, 32, 320, 64, torch.float32)])
def test_the_w4a8_kernel_is_its_definition(rows, n, k, group_size, dtype):
    """Up to fp32 scaling, the kernel is w4a8's definition (K an odd number of 64-input chunks included); a zero
    row is zero; a row's result is the same in any batch; the int4 module in w4a8 takes it, with the same
    checkpoint as plain int4 and within the activations' rounding of the float product."""
    assert cpu_kernels.load()
    torch.manual_seed(n)
    weight = torch.randn(n, k).to(dtype)
    module = quant.Int4Linear.quantize(weight, group_size, int8_activations=True)
    plain = quant.Int4Linear.quantize(weight, group_size)
    assert module.layout == "w4a8" and plain.layout == "cpu"
    q, scale, zero = quant.quantize_int4(weight, group_size, dtype)
    assert torch.equal(module.nibbles(), q) and torch.equal(cpu_kernels.unpack_w4a8(module.weight), q)
    stored, plain_stored = module.checkpoint_tensors(), plain.checkpoint_tensors()
    assert all(torch.equal(stored[name], plain_stored[name]) for name in plain_stored)
    x = torch.randn(rows, k, dtype=dtype)
    x[-1] = 0 if rows > 1 else x[-1]
    ours = cpu_kernels.linear_w4a8(x, module.weight, module.w4a8_scale, module.zero_point, group_size)
    assert ours.dtype == dtype and ours.shape == (rows, n)
    if rows > 1:
        assert not ours[-1].any()
    reference = w4a8_reference(x, q, scale, zero, group_size)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8  # fp32 scaling; bf16: the output's own rounding
    assert (ours.double() - reference).abs().max() <= tolerance * reference.abs().max()
    for one in range(0, rows, 7):
        assert torch.equal(ours[one:one + 1], cpu_kernels.linear_w4a8(x[one:one + 1], module.weight, module.w4a8_scale,
                                                                      module.zero_point, group_size))
    assert torch.equal(module(x[None]), ours[None])
    groups_wide = [t.float().repeat_interleave(group_size, 1) for t in (zero, scale)]
    spelled = (q.float() - groups_wide[0]) * groups_wide[1]
    assert torch.equal(module.dequantized(), spelled.to(dtype))  # the prefill's weight, computed in fp32, rounded once
    exact = F.linear(x.double(), module.dequantized().double())
    assert (ours.double() - exact).abs().max() <= 0.03 * exact.abs().max()


@needs_kernel
def test_the_w4a8_kernel_refuses_what_it_cannot_run():
    assert cpu_kernels.load()
    packed, scale, zero = torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        cpu_kernels.linear_w4a8(torch.randn(2, 96), packed[:, :48], scale, zero, 96)
    with pytest.raises(RuntimeError, match="group size must be 64 or 128"):
        cpu_kernels.linear_w4a8(torch.randn(2, 128), packed, scale.expand(8, 4), zero.expand(8, 4), 32)
    with pytest.raises(RuntimeError, match=r"packed weight must be uint8 \[N, K/2\]"):
        cpu_kernels.linear_w4a8(torch.randn(2, 64), packed, scale, zero, 64)
    with pytest.raises(RuntimeError, match="scales and zero points must be"):
        cpu_kernels.linear_w4a8(torch.randn(2, 128), packed, scale.expand(8, 2), zero, 64)
    with pytest.raises(RuntimeError, match="fp32 or bf16, got Half"):
        cpu_kernels.linear_w4a8(torch.randn(2, 128, dtype=torch.float16), packed, scale, zero, 128)
    with pytest.raises(RuntimeError, match="M <= 16"):
        torch.ops.dsv2_cpu.linear_w4a8(torch.randn(17, 128), packed, scale, zero, 128)
    with pytest.raises(RuntimeError, match="fp32 scales and uint8 zero points"):
        cpu_kernels.dequantize_w4a8(packed, scale.expand(8, 2), zero, 64, torch.float32)
    with pytest.raises(RuntimeError, match="fp32 or bf16 out"):
        cpu_kernels.dequantize_w4a8(packed, scale, zero, 128, torch.float16)
    assert cpu_kernels.takes_w4a8(1344, 64) and not cpu_kernels.takes_w4a8(1344, 128)
    assert not cpu_kernels.takes_w4a8(256, 32)


def quantized_experts(n_experts: int, dim: int, inner: int, dtype: torch.dtype,
                      layout: str = "w4a8") -> quant.QuantizedRoutedExperts:
    """Random experts quantized to w4a8 (groups of 128 where they divide the width, else 64) or w8a8, or stored in
    bf16 (an fp32 layer's)."""
    experts = RoutedExperts(n_experts, dim, inner).to(dtype)
    for w in (experts.w1, experts.w2, experts.w3):
        w.data.normal_(0, 0.05)

    def quantized(w: torch.Tensor) -> nn.Module:
        if layout == "w4a8":
            return quant.Int4Linear.quantize(w, 128 if w.shape[1] % 128 == 0 else 64, int8_activations=True)
        if layout == "bf16":
            return quant.Bf16Linear(w)
        module = quant.Int8Linear.quantize(w)
        module.int8_activations = True
        return module

    projections = {name: [quantized(w) for w in getattr(experts, name)] for name in ("w1", "w2", "w3")}
    return quant.QuantizedRoutedExperts(**projections)


@needs_kernel
@pytest.mark.parametrize("layout", ["w4a8", "w8a8", "bf16"])
@pytest.mark.parametrize(("n_experts", "dim", "inner", "top_k", "n_tokens", "dtype"),
                         [(16, 256, 192, 4, 1, torch.bfloat16), (8, 128, 64, 2, 9, torch.float32),
                          (6, 192, 320, 3, 20, torch.bfloat16), (4, 256, 128, 4, 40, torch.float32)])
@torch.no_grad()
def test_the_fused_experts_kernels_are_the_dispatched_experts(n_experts, dim, inner, top_k, n_tokens, dtype, layout):
    """One expert pass of 1 row, groups of 64 on one side and 128 on the other (w4a8), an expert with more slots
    than one pass takes (16), dropped slots, fp32 and bf16 (bf16 weights: fp32 x only): each projection is the
    linear kernel's, so the layer equals `dispatch` up to silu's exp and the order of the gates' fp32 sum; a compiled
    graph takes it."""
    if layout == "bf16" and dtype != torch.float32:
        pytest.skip("bf16 weights are an fp32 model's format")
    assert cpu_kernels.load()
    torch.manual_seed(n_tokens)
    experts = quantized_experts(n_experts, dim, inner, dtype, layout)
    x = torch.randn(n_tokens, dim, dtype=dtype)
    weights = torch.rand(n_tokens, top_k)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    if n_tokens > 2:
        indices[1, 0] = indices[2, top_k - 1] = -1
    kernel = experts.fused_kernel(x)
    assert kernel is {"w4a8": cpu_kernels.routed_experts_w4a8, "w8a8": cpu_kernels.routed_experts_int8,
                      "bf16": cpu_kernels.routed_experts_bf16_fp32}[layout]
    ours = kernel(x, weights, indices, *experts.fused_operands())
    dispatched = experts.dispatch(x, weights, indices)
    assert ours.dtype == dtype and ours.shape == dispatched.shape
    torch.testing.assert_close(ours, dispatched, rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-5)
    if dtype == torch.bfloat16:  # fp32 keeps silu's last bits, which differ from torch's
        assert (ours == dispatched).float().mean() >= 0.9  # mostly the very same bits
    torch._dynamo.reset()  # each case's experts are a graph of their own: past dynamo's limit of recompiles
    compiled = torch.compile(experts, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, weights, indices), ours)


@needs_kernel
@pytest.mark.parametrize("layout", ["w4a8", "w8a8", "bf16"])
@torch.no_grad()
def test_prepared_experts_hold_their_operands_once_stacked(layout):
    """prepare_for_inference stacks each operand over the experts and makes the modules' tensors views of the
    stack (no second copy); the layer computes what it did before, on both paths."""
    assert cpu_kernels.load()
    torch.manual_seed(0)
    experts = quantized_experts(4, 128, 64, torch.float32, layout)
    x, weights, indices = torch.randn(3, 128), torch.rand(3, 2), torch.tensor([[0, 1], [3, 1], [2, -1]])
    kernel = experts.fused_kernel(x)
    fused, dispatched = kernel(x, weights, indices, *experts.fused_operands()), experts.dispatch(x, weights, indices)
    experts.prepare_for_inference()
    stacked = experts.fused_operands()
    assert stacked is experts.stacked_operands
    for projection, operands in zip((experts.w1, experts.w3, experts.w2), stacked, strict=True):
        for e, module in enumerate(projection):
            for name, operand in zip(experts.FUSED_OPERANDS[layout], operands, strict=True):
                assert getattr(module, name).data_ptr() == operand[e].data_ptr()
                assert torch.equal(getattr(module, name), operand[e])
    assert torch.equal(kernel(x, weights, indices, *stacked), fused)
    assert torch.equal(experts.dispatch(x, weights, indices), dispatched)
    torch._dynamo.reset()  # the tests above traced this forward up to dynamo's limit
    assert torch.equal(torch.compile(experts, backend="eager", fullgraph=True)(x, weights, indices), fused)


@needs_kernel
def test_the_fused_experts_kernels_refuse_what_they_cannot_run():
    assert cpu_kernels.load()
    experts = quantized_experts(4, 128, 64, torch.float32)
    x, weights = torch.randn(2, 128), torch.rand(2, 2)
    (p1, s1, z1), w3, w2 = experts.fused_operands()
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        cpu_kernels.routed_experts_w4a8(x, weights, torch.tensor([[0, 4], [1, 2]]), (p1, s1, z1), w3, w2)
    with pytest.raises(RuntimeError, match=r"every operand stacked \[E, \.\.\.\] for the same E"):
        cpu_kernels.routed_experts_w4a8(x, weights, torch.tensor([[0, 1], [1, 2]]), (p1, s1[:3], z1), w3, w2)
    strided = p1.transpose(0, 1).contiguous().transpose(0, 1)  # p1's shape and values, not contiguous
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.routed_experts_w4a8(x, weights, torch.tensor([[0, 1], [1, 2]]), (strided, s1, z1), w3, w2)
    with pytest.raises(RuntimeError, match=r"\(w1\): the packed weight must be uint8 \[N, K/2\]"):
        cpu_kernels.routed_experts_w4a8(torch.randn(2, 192), weights, torch.tensor([[0, 1], [1, 2]]), (p1, s1, z1),
                                        w3, w2)
    with pytest.raises(RuntimeError, match="gates and indices"):
        cpu_kernels.routed_experts_w4a8(x, weights[:1], torch.tensor([[0, 1], [1, 2]]), (p1, s1, z1), w3, w2)
    assert experts.fused_kernel(torch.randn(quant.INT8_KERNEL_MAX_ROWS + 1, 128)) is None
    assert experts.fused_kernel(x.half()) is None

    int8 = quantized_experts(4, 128, 64, torch.float32, "w8a8")
    (q1, c1), u3, u2 = int8.fused_operands()
    with pytest.raises(RuntimeError, match=r"\(w1\): one scale per output row"):
        cpu_kernels.routed_experts_int8(x, weights, torch.tensor([[0, 1], [1, 2]]), (q1, c1[:, :3].contiguous()),
                                        u3, u2)
    with pytest.raises(RuntimeError, match=r"\(w2\): the weight must be int8 \[N, K\]"):
        cpu_kernels.routed_experts_int8(x, weights, torch.tensor([[0, 1], [1, 2]]), (q1, c1), u3,
                                        (u2[0].float(), u2[1]))
    with pytest.raises(RuntimeError, match="x's width must be a multiple of 64"):
        cpu_kernels.routed_experts_int8(torch.randn(2, 96), weights, torch.tensor([[0, 1], [1, 2]]), (q1, c1), u3, u2)
    int8.w2[0].int8_activations = False  # weight-only int8 for one projection: the layer stays on `dispatch`
    assert int8.fused_kernel(x) is None
