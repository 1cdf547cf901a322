"""CPU kernels of dsv2's own: the routed experts of a decode step, each chosen expert's weights read once; and
x Wᵀ for a few rows on AMX tiles, bf16 and w8a8 int8; and w4a8 (int4 weights, int8 rows) on VNNI or AVX2.

Why: a decode step is a few tokens, and its routed experts are most of the bytes it reads. Of the ways PyTorch
offers to run them inside a compiled graph, none reads only the distinct experts the tokens chose at the
machine's bandwidth: `RoutedExperts.gathered` reads one expert per (token, k) slot (at batch 8 `small`'s 32
slots for ~21 distinct experts) through reductions inductor generates, which are bound by their arithmetic
even when the weights sit in cache; the opaque `dispatch` op reads each expert once but pays a host sync and
three kernel launches per expert. `cpu_kernels.cpp` groups the slots by expert on the host side of one call
and streams each chosen expert's three matrices once, for all of its tokens, with AVX-512 BF16 dot products
(`vdpbf16ps`), one expert per thread.

It is built on first use with torch's C++ extension loader (`torch.utils.cpp_extension.load`: the C++ compiler
and ninja that `torch.compile` on a CPU needs anyway) into torch's extension cache, and the bf16 experts are used
only inside compiled decode graphs on a CPU with AVX-512 BF16 (`dsv2.infer.compiled` calls `load()` before it
traces). On any other machine, or if the build fails (a warning says why), the graphs keep `gathered` and the
`dispatch` op. `DSV2_CPU_KERNELS=0` turns the kernels off.

The same source builds one of two ways (`build`): with AVX-512 BF16 (and VNNI, AMX where present) every kernel here;
with AVX2 and FMA only (no native bf16: AMD Zen 3, Intel before Ice Lake) the int8 and w4a8 ones (linear_int8,
linear_w4a8, their fused experts, dequantize_w4a8), whose exact int32 sums come from vpmaddubsw and vpmaddwd (both
int8 factors in [-127, 127], so no pair sum saturates): the same integers as on VNNI, so a w8a8 product is the same
on both kinds of machine, where fbgemm on such a CPU runs on 7-bit activations (`reduce_range`).

The linear kernels exist because PyTorch's products for a few rows read the weight well below the machine's
bandwidth: oneDNN re-lays the weight out per call or pays a ~20 us floor, inductor's packed GEMMs read small's
one-row matrices at 7-14 GB/s, and for w8a8 fbgemm quantizes activations per tensor and reads int8 at ~10-18 GB/s.
On a CPU with AMX a tile of 16 weight rows (64 bytes each, as they lie in memory) multiplies all of x at once, so
the weight is read in place at the rate memory gives it; only x is re-laid out. The bf16 one runs a compiled
one-row graph's linears on such a CPU (`dsv2.model.layers.linear`; without AMX, ATen's own kernel reads bf16 as
fast, 27-30 GB/s on a 2-core Zen 4, so there is no fallback), the int8 one `Int8Linear`'s w8a8 forward, eager or
compiled; without AMX the int8 one makes the same exact sums with VNNI (`vpdpbusd`), 25-30 GB/s on that Zen 4
at one row against fbgemm's 15-27.

The w4a8 kernel exists because torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) reads V2-Lite's experts at ~8 GB/s
of packed weight at one row, below llama.cpp's Q4_0: it multiplies the nibbles by the rows quantized to int8 with
`vpdpbusd` (exact per group), from a packed layout of its own (`pack_w4a8`), 12-16 GB/s (cpp file: why not AMX).

The bf16-weight kernel (`linear_bf16_fp32`, fp32 x times a bf16 weight widened exactly, and its fused experts
`routed_experts_bf16_fp32`; AVX2 + FMA, in both builds) exists for quant's "bf16" format on CPUs without native bf16,
where `dtype="auto"` is fp32: an fp32 weight is twice the bytes, and ATen's products for a few rows there are slow in
either dtype (Zen 3, 2 threads, V2-Lite's 102400 x 2048 LM head at one row: 15-19 ms against F.linear's 46 in fp32
and 38 in bf16; 8 rows: 54-60 against 283 and 170). From 5 rows up it runs K in blocks, so that x's block stays in L1
for all the task's weight rows (an expert's 1408 x 2048 at 8 rows: 0.44-0.66 ms against 1.05 unblocked).

The fused experts (`routed_experts_w4a8`, `routed_experts_int8`) exist because a compiled graph's opaque
`dsv2::routed_experts` runs a layer's experts one projection after another with Python around each (2.3 ms a
V2-Lite layer at one row in w4a8): one call per layer spreads all chosen experts' rows over the threads (1.4 ms),
each projection still the linear kernel's, bit for bit.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# each build's compiler flags (cpu_kernels.cpp: the AVX2 build holds the int8, w4a8 and bf16-weight kernels, not the
# bf16 ones). Both name FMA: the bf16-weight kernels are AVX2 + FMA in either, and gcc's -mavx512f does not imply it.
# -fopenmp: at::parallel_for is inline, and without it runs on one thread (torch's own libgomp serves it)
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_FLAGS = {"avx512": ["-O3", *_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
                     "-mamx-tile", "-mamx-bf16", "-mamx-int8", "-fopenmp"],
          "avx2": ["-O3", *_AVX2, "-fopenmp"]}
# rows at most that a graph sends to the bf16 AMX kernel, measured on the 2-core AMX Xeon (torch 2.13;
# docs/benchmarks.md, eighth session): at one row it read small's matrices at 16-22 GB/s against inductor's packed
# GEMMs' 7-14; at 8 and 16 rows the two were within ~10% either way
BF16_MAX_ROWS = 1
TILE_ROWS = 16  # the most rows one call of a kernel takes: the columns of one B tile
_loaded = False  # a plain global, so a traced graph reads it as a constant (checked by a guard)
_bf16 = False  # the bf16 kernels loaded too (the AVX-512 BF16 build)
_amx = False  # loaded on a CPU with AMX tiles (asked once in `load`: the query itself does not trace)
_tried = False


def build() -> str | None:
    """The build this CPU takes: "avx512" (AVX-512 BF16, and so VNNI: every kernel), "avx2" (AVX2 and FMA, e.g. AMD
    Zen 3: the int8 and w4a8 kernels), or None (no kernels)."""
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512"
    return "avx2" if torch.cpu._is_avx2_supported() else None


def supported() -> bool:
    """Whether this machine can run the kernels (a `build` exists for its CPU), and they are not turned off by the
    user."""
    return os.environ.get("DSV2_CPU_KERNELS", "1") != "0" and build() is not None


def load() -> bool:
    """Build (once per source version, cached by torch) and load the kernels where `supported`; whether they are
    loaded. Call it before tracing: building inside a traced region would be traced."""
    global _loaded, _tried, _amx, _bf16
    if _tried:
        return _loaded
    _tried = True
    if not supported():
        return False
    isa = build()
    try:
        from torch.utils.cpp_extension import load as compile_and_load

        compile_and_load(name=f"dsv2_{SOURCE.stem}_{isa}", sources=[str(SOURCE)], extra_cflags=_FLAGS[isa],
                         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, an old assembler: fall back, saying why
        warnings.warn(f"dsv2: the CPU kernels ({SOURCE.name}, {isa}) did not build, decode keeps PyTorch's "
                      f"paths: {error}", stacklevel=2)
        return False
    if isa == "avx512":
        torch.library.register_fake("dsv2_cpu::routed_experts_bf16")(_output_like_x)
        torch.library.register_fake("dsv2_cpu::linear_bf16")(_linear_output)
    torch.library.register_fake("dsv2_cpu::linear_int8")(_linear_int8_output)
    torch.library.register_fake("dsv2_cpu::linear_w4a8")(_linear_w4a8_output)
    torch.library.register_fake("dsv2_cpu::dequantize_w4a8")(_dequantized_w4a8)
    torch.library.register_fake("dsv2_cpu::routed_experts_w4a8")(_routed_experts_output)
    torch.library.register_fake("dsv2_cpu::routed_experts_int8")(_routed_experts_output)
    torch.library.register_fake("dsv2_cpu::linear_bf16_fp32")(_linear_output)
    torch.library.register_fake("dsv2_cpu::routed_experts_bf16_fp32")(_output_like_x)
    _loaded, _bf16 = True, isa == "avx512"
    _amx = _bf16 and torch.cpu._is_amx_tile_supported()
    return True


def _output_like_x(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _linear_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_int8_output(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_w4a8_output(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def _dequantized_w4a8(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)


def _routed_experts_output(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor,
                           *operands: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def loaded() -> bool:
    return _loaded


def loaded_bf16() -> bool:
    """Whether the bf16 kernels (`routed_experts`, and `linear` where there are AMX tiles) are loaded: the AVX-512
    BF16 build."""
    return _bf16


def loaded_amx() -> bool:
    """Whether the kernels are loaded on a CPU with AMX tiles."""
    return _amx


def takes_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a graph runs x [..., K] @ weightᵀ through `linear`: loaded on a CPU with AMX, bf16 on both sides, x on
    the CPU, K a multiple of 32, at most BF16_MAX_ROWS rows."""
    return (_amx and x.dtype == weight.dtype == torch.bfloat16 and weight.dim() == 2 and x.device.type == "cpu"
            and x.shape[-1] % 32 == 0 and x.numel() // x.shape[-1] <= BF16_MAX_ROWS)


def takes_linear_int8(x: torch.Tensor) -> bool:
    """Whether `linear_int8` runs x [M, K]: loaded (AMX tiles, VNNI, which comes with AVX-512 BF16, or AVX2), float x on
    the CPU, K a multiple of 64 and at most 65536, any M."""
    return x.is_floating_point() and x.dim() == 2 and x.device.type == "cpu" and takes_int8_width(x.shape[-1])


def takes_int8_width(in_features: int) -> bool:
    """Whether the int8 kernels (`linear_int8`, `routed_experts_int8`) take inputs of this width: loaded, a
    multiple of 64 and at most 65536 (int32 sums)."""
    return _loaded and in_features % 64 == 0 and in_features <= 65536


def takes_bf16_fp32(in_features: int) -> bool:
    """Whether `linear_bf16_fp32` and `routed_experts_bf16_fp32` take inputs of this width: loaded (either build),
    a multiple of 8."""
    return _loaded and in_features % 8 == 0


def takes_w4a8(in_features: int, group_size: int) -> bool:
    """Whether `linear_w4a8` takes a matrix of K = in_features in groups of group_size: loaded (VNNI, which comes with
    AVX-512 BF16, or AVX2), groups of 64 or 128 (one or two chunks of the packed layout)."""
    return _loaded and group_size in (64, 128) and in_features % group_size == 0


def pack_w4a8(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N,K] in 0..15 -> [N,K/2] bytes in `linear_w4a8`'s layout: byte b of each row's 32-byte chunk c
    holds q[:, 64c + b] in its low nibble and q[:, 64c + 32 + b] in its high one."""
    halves = q.view(q.shape[0], -1, 2, 32)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).flatten(1)


def unpack_w4a8(packed: torch.Tensor) -> torch.Tensor:
    """`pack_w4a8`'s inverse: q uint8 [N,K]."""
    chunks = packed.view(packed.shape[0], -1, 1, 32)
    return torch.cat([chunks & 15, chunks >> 4], dim=2).flatten(1)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weightᵀ [K, N] for bf16 on AMX tiles, weight read in place (see `takes_linear`)."""
    y = torch.ops.dsv2_cpu.linear_bf16(x.reshape(-1, x.shape[-1]), weight)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M,K] @ (weight·scale)ᵀ with x quantized to int8 per row ("w8a8"), for int8 weight [N,K] and scale [N],
    summed in int32 on AMX tiles, or with VNNI or AVX2 where there are none (the same exact sums) -> [M,N] in x's dtype
    (see `takes_linear_int8`). Past TILE_ROWS rows, one call
    per TILE_ROWS (the weight read again for each): a row's result never depends on the rows beside it."""
    if len(x) <= TILE_ROWS:  # one call, no copy through torch.cat
        return torch.ops.dsv2_cpu.linear_int8(x, weight, scale)
    return torch.cat([torch.ops.dsv2_cpu.linear_int8(rows, weight, scale) for rows in x.split(TILE_ROWS)])


def linear_w4a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M,K] @ Wᵀ for int4 W = (q - z)·s per group of group_size (64 or 128) inputs, x quantized to int8 per row
    ("w4a8"), the group sums exact in int32 (VNNI or AVX2) -> [M,N] in x's dtype. packed: `pack_w4a8(q)`; scale fp32
    [N, K/G]; zero_point uint8 [N, K/G]. Past TILE_ROWS rows, one call per TILE_ROWS, as `linear_int8`."""
    if len(x) <= TILE_ROWS:
        return torch.ops.dsv2_cpu.linear_w4a8(x, packed, scale, zero_point, group_size)
    return torch.cat([torch.ops.dsv2_cpu.linear_w4a8(rows, packed, scale, zero_point, group_size)
                      for rows in x.split(TILE_ROWS)])


def linear_bf16_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 x [M,K] @ weightᵀ for a bf16 weight [N,K] read in place, each weight widened to fp32 (exact) and the
    products summed in fp32 -> fp32 [M,N] (see `takes_bf16_fp32`); past TILE_ROWS rows one call per TILE_ROWS, as
    `linear_int8`."""
    if len(x) <= TILE_ROWS:
        return torch.ops.dsv2_cpu.linear_bf16_fp32(x, weight)
    return torch.cat([torch.ops.dsv2_cpu.linear_bf16_fp32(rows, weight) for rows in x.split(TILE_ROWS)])


def dequantize_w4a8(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """W [N,K] = (q - z)·s in `dtype` (fp32 or bf16) from `linear_w4a8`'s operands, computed in fp32 and rounded once
    (what a prefill chunk multiplies by)."""
    return torch.ops.dsv2_cpu.dequantize_w4a8(packed, scale, zero_point, group_size, dtype)


def routed_experts(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Σ_k gates[n,k]·FFN_{indices[n,k]}(x[n]) for bf16 x [N,d] and stacked bf16 weights w1/w3 [E,I,d],
    w2 [E,d,I]; a slot of id -1 contributes nothing. Rounds as `RoutedExperts.forward` does in bf16."""
    return torch.ops.dsv2_cpu.routed_experts_bf16(x, gates, indices, w1, w2, w3)


W4a8Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # packed, scale, zero, each stacked [E, ...]


def routed_experts_w4a8(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: W4a8Operands,
                        w3: W4a8Operands, w2: W4a8Operands) -> torch.Tensor:
    """`routed_experts` for experts whose projections are w4a8 (`linear_w4a8`'s operands, each stacked over the
    experts: packed [E,N,K/2], scale and zero [E,N,K/G]), x fp32 or bf16 [N,d]: one call for the whole layer,
    each chosen expert's weights read once per 16 of its slots, the passes' gate/up and then down projections
    spread over the threads together. Rounds as `QuantizedRoutedExperts.dispatch` does: each projection is
    `linear_w4a8`'s, bit for bit."""
    return torch.ops.dsv2_cpu.routed_experts_w4a8(x, gates, indices, *w1, *w3, *w2)


Int8Operands = tuple[torch.Tensor, torch.Tensor]  # int8 weight [E,N,K], scale [E,N]


def routed_experts_int8(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: Int8Operands,
                        w3: Int8Operands, w2: Int8Operands) -> torch.Tensor:
    """`routed_experts_w4a8` for w8a8 experts (`linear_int8`'s operands stacked over the experts): each projection
    is `linear_int8`'s, bit for bit (its VNNI or AVX2 sums, which are the AMX tiles' exact integers)."""
    return torch.ops.dsv2_cpu.routed_experts_int8(x, gates, indices, *w1, *w3, *w2)


Bf16Operands = tuple[torch.Tensor]  # bf16 weight [E,N,K]


def routed_experts_bf16_fp32(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, w1: Bf16Operands,
                             w3: Bf16Operands, w2: Bf16Operands) -> torch.Tensor:
    """`routed_experts_w4a8` for bf16 experts and fp32 x (`linear_bf16_fp32`'s weights stacked over the experts:
    w1 and w3 [E,I,d], w2 [E,d,I]): each projection is `linear_bf16_fp32`'s, bit for bit."""
    return torch.ops.dsv2_cpu.routed_experts_bf16_fp32(x, gates, indices, *w1, *w3, *w2)
