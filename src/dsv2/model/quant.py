"""Weight-only int8 and int4 for inference, and both with int8 activations (w8a8, w4a8): a module swap applied to a
built model, and its checkpoints.

Activations stay in the model dtype (bf16 or fp32); only weight matrices are stored in fewer bits, so a
memory-bound decode step reads fewer bytes.

    int8, per output channel n (symmetric):    s_n = max_k |W_nk| / 127,   q = round(W / s) in [-127, 127],
                                               W ≈ q·s
    int4, per group of G inputs (asymmetric):  over the group's values and 0: s = (hi - lo) / 15,
                                               z = round(-lo / s) in [0, 15],  q = clamp(round(W / s + z), 0, 15),
                                               W ≈ (q - z)·s   (integer zero points, as GPTQ/AWQ checkpoints)

Scales are rounded to the model dtype before q is computed, so q is the best code for the scale actually used.

CPU kernels (torch 2.13; x and the scales must share one dtype: fp32, bf16 or fp16):
    torch._weight_int8pack_mm(x [M,K], q int8 [N,K], s [N]) -> [M,N]
        on x86 vectorized in bf16 only (fp32 is a scalar loop: a V2-Lite expert 1408x2048 at one row 2.2 ms in fp32
        against 0.19 in bf16, at 8 rows 26.6 against 0.83; Zen 3, AVX2), so `Int8Linear` computes an fp32 model's
        weight-only products in bf16 there (x and the scales rounded to bf16, ~0.4%, beside int8's own ~1%)
    torch._convert_weight_to_int4pack_for_cpu(q int32 [N,K] in 0..15, inner_k_tiles) -> uint8 [N,K/2]
        (inner_k_tiles is ignored on CPU; the layout is the kernel's own)
    torch._weight_int4pack_mm_for_cpu(x [M,K], packed, G, scales_and_zeros [K/G,N,2]) -> [M,N]
        computes W = (q - 8)·s + zero per group (tinygemm's convention), so zero = (8 - z)·s;
        needs N % 16 == 0 and K % G == 0: matrices that do not fit stay in the model dtype; on x86 only its bf16
        form is vectorized (fp32 and fp16 are scalar loops: a V2-Lite expert 1408x2048 at one row 2.9 ms in
        fp32 against 0.25 in bf16, at 8 rows 29.6 against 0.84; Zen 3, AVX2), so `Int4Linear` computes an fp32
        model's products in bf16 there (x and the scales rounded to bf16, ~0.4% against int4's own ~10%).
Elsewhere (CUDA) both formats dequantize and call F.linear: correct, not fast.

"w8a8" is a second way to compute with the same int8 weights (same checkpoint): on the CPU each row of x is
quantized to 8 bits as well, and the product runs in integers through fbgemm's dynamic linear
(`quantized::linear_dynamic`, the int8 GEMM PyTorch ships for x86), which is what llama.cpp's Q8_0 dot products
do (they quantize activations per block of 32). Why: cold from memory, `_weight_int8pack_mm` reads V2-Lite's
shapes at ~15 GB/s (its 102400 x 2048 LM head: 13.8 ms against bf16's 17.5 ms), fbgemm at ~31 GB/s (6.2 ms).
fbgemm quantizes its input per tensor (one min/max over all rows), so `int8_rows` divides each row by its own
absmax first and appends one anchor row holding +1 and -1: the range is then always [-1, 1], every row gets
the same 8-bit grid whatever else is in the batch (batched = one at a time), and the product is scaled back
per row. The cost is the activations' rounding: ~0.4% of a row's absmax per element (step 2/255; 2/127 on
CPUs without VNNI, where fbgemm needs `reduce_range` to keep its int16 pair sums from saturating).
Where dsv2's kernels build (AVX-512 BF16 and so VNNI, or AVX2: `dsv2.model.cpu_kernels`), w8a8 runs on dsv2's own
int8 kernel instead wherever K is a multiple of 64: each row on 127 levels of its own absmax (step absmax/127), int8 x
int8 summed exactly in int32, the weight read in place, 16 rows a call, on AMX tiles where the CPU has them,
VNNI where not, AVX2's vpmaddubsw where neither (the same sums); on AMX 1.0-1.5x fbgemm's speed at 1-16 rows
(V2-Lite's expert 1408x2048, 8 rows: 0.31 ms against 0.43; its LM head, 8 rows: 11.9 against 15.9). The kernel's
grid and fbgemm's differ, so a machine's w8a8 logits depend on which runs, but on each a row's result is the same
in any batch.

Measured on the 2-core AVX-512 Xeon (torch 2.13, 2 threads, bf16 x, ms per call, 10th percentile; the
machine was shared, so single figures are noisy):
    1408x2048 (an expert's w1)  M=1     2     4     8     16    32    64    128
      bf16 F.linear                  0.39  0.28  0.28  0.27  0.30  0.38  0.55  (~0.6)
      _weight_int8pack_mm            0.096 0.12  0.16  0.35  0.63  1.25  2.7   5.6
      dequantize + F.linear          1.1   1.1   1.1   1.2   1.3   1.2   2.1   2.3
    4096x4096   M=1: bf16 1.18, Int8Linear 0.54, Int4Linear 0.51;  M=8: bf16 1.16, int8 1.74, int4 1.77;
                M=64: int8 ~43-60, dequantize + F.linear ~100 (the 32 MB bf16 copy); M=128: int8 ~92, dequantize ~87
The int8 kernel wins at batch 1-4 (2-4x fewer ms than bf16) but its cost grows linearly with M (about one
weight read per row; at M=8 it is already slower than a bf16 GEMV would be, but there is no bf16 copy),
while dequantizing costs one pass over the weight whatever M is. So `Int8Linear`
calls the kernel for M <= INT8_KERNEL_MAX_ROWS = 64 rows and dequantizes above (prefill chunks); the
crossover measured 32-64 rows for the small matrix and ~128 for the large one.
The int4 kernel is used for every M on CPU: its packed layout cannot be dequantized cheaply, and prefill
through it costs about as much per row as int8 (see the figures above).

"w4a8" is the same for int4 weights (same checkpoint): each row of x on 127 levels of its own absmax, as w8a8's
kernel does, times W = (q - z)·s. In groups of 64 or 128 on a CPU where dsv2's kernels build (AVX-512 BF16 and so
VNNI, or AVX2), `Int4Linear` lays its weight out for dsv2's w4a8 kernel (`cpu_kernels.linear_w4a8`: nibbles x int8
summed exactly per group, scaled in fp32; V2-Lite's 102400 x 2048 LM head at one row 8.7 ms, against 12.4 for w8a8's AMX
kernel and its twice larger weight) for up to INT8_KERNEL_MAX_ROWS rows, and dequantizes to (q - z)·s above. Elsewhere
(groups of 32, no kernel) it keeps torch's layout and rounds the rows to the same grid (`int8_grid`) before torch's
int4 kernel, which reconstructs W as (q - 8)·s + (8 - z)·s rounded to the model dtype: the same product but for that
rounding and the float sums' order.

What is converted (`quantize_model`): every nn.Linear of attention, the dense and shared-expert MLPs, the
routed experts (per expert) and the LM head (a large GEMV). Kept in the model dtype: the embedding (a
gather, not a GEMV), the router (fp32 routing decisions), the norms, and MLA's wkv_b: the absorbed path
uses W_UK / W_UV split out of it in full precision (`MLA.prepare_for_inference` keeps such a copy anyway),
and it is small (0.36% of V2-Lite's and 0.43% of V2's weight bytes; 0.8% of `small`'s, 4.8% of `nano`'s).

Checkpoints (`save_quantized` / `load_quantized`): config.json with
    quantization_config = {"quant_method": "dsv2_int8" | "dsv2_int4", "group_size": G (null for int8),
                           "modules_not_converted": [HF module names of weight matrices left unquantized]}
and safetensors with DeepSeek's HF names, routed experts one tensor per expert, for each converted module:
    int8: <module>.weight int8 [N,K], <module>.weight_scale [N] (model dtype)
    int4: <module>.weight uint8 [N,K/2] (q[:, 2j] in the low nibble of byte j, q[:, 2j+1] in the high one),
          <module>.weight_scale [N,K/G] (model dtype), <module>.weight_zero_point uint8 [N,K/G]; a matrix
          whose K is not a multiple of G uses the largest smaller group size that divides K
          (`int4_group_size`), so its K/G columns say which
int4 is stored unpacked because the CPU packed layout is a kernel detail; loading packs it again.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsv2.atomic import atomic_path
from dsv2.config import ModelConfig
from dsv2.model import cpu_kernels
from dsv2.model.fp8 import FP8Linear, FP8RoutedExperts
from dsv2.model.moe import RoutedExperts
from dsv2.model.transformer import Transformer
from dsv2.weights import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    SINGLE_FILE,
    CheckpointError,
    finish_shards,
    hf_name,
    weight_files,
)

METHODS = {"int8": "dsv2_int8", "int4": "dsv2_int4"}
GROUP_SIZES = (32, 64, 128)
INT8_KERNEL_MAX_ROWS = 64  # see the module docstring: above this many rows dequantize + F.linear is faster
INT4_INNER_K_TILES = 8  # a required argument of the CPU packing, which ignores it
X86 = platform.machine().lower() in ("x86_64", "amd64")  # where torch's int8 and int4 kernels are fast in bf16 only


# ------------------------------------------------------------------------------------------- int8
def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N,K] -> q int8 [N,K], s [N] in `dtype` (symmetric per output channel)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny).to(dtype)  # an all-zero row: any s
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.lru_cache(maxsize=16)
def _range_anchor(k: int) -> torch.Tensor:
    """A row [+1, -1, 0, ...] of k values (see `int8_rows`)."""
    anchor = torch.zeros(1, k)
    anchor[0, :2] = torch.tensor([1.0, -1.0])
    return anchor


@functools.cache
def _needs_reduce_range() -> bool:
    """fbgemm's 7-bit activations, on CPUs without VNNI (asked once, not in every decode step's GEMV)."""
    return not torch.cpu._is_vnni_supported()


def int8_rows(x2d: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M,K] @ Wᵀ with x quantized to 8 bits per row ("w8a8", the module docstring) -> [M,N] in x's dtype."""
    x = x2d.float()
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rows = torch.cat([x / amax, _range_anchor(x.shape[1])])
    y = torch.ops.quantized.linear_dynamic(rows, packed, _needs_reduce_range())
    return (y[:-1] * amax).to(x2d.dtype)


def int8_grid(x2d: torch.Tensor) -> torch.Tensor:
    """x [M,K], each row rounded to 127 levels of its own absmax (what dsv2's int8 kernels multiply), in x's dtype."""
    x = x2d.float()
    step = x.abs().amax(dim=1, keepdim=True) / 127
    return (torch.round(x / step.clamp_min(torch.finfo(torch.float32).tiny)) * step).to(x2d.dtype)


class Int8Linear(nn.Module):
    """y = x Wᵀ with W = q·s: int8 weight [N,K], one scale per output channel. With `int8_activations` (set by
    `for_inference(model, "w8a8")`) the CPU forward quantizes x's rows too and multiplies in integers."""

    checkpoint_suffixes = ("weight", "weight_scale")
    int8_activations = False

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self._fbgemm_weight: torch.Tensor | None = None

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Linear:
        module = cls(weight.shape[1], weight.shape[0], weight.dtype, weight.device)
        module.weight, module.scale = quantize_int8(weight, weight.dtype)
        return module

    def dequantized(self) -> torch.Tensor:
        """W [N,K] in the scale dtype (int8 · float promotes to float in one pass)."""
        return torch.mul(self.weight, self.scale[:, None])

    def fbgemm_weight(self) -> torch.Tensor:
        """q and s prepacked for fbgemm (made at the first w8a8 call; a second copy of the int8 weight)."""
        if self._fbgemm_weight is None:
            with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; the op needs one
                warnings.simplefilter("ignore")
                per_channel = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                self._fbgemm_weight = torch.ops.quantized.linear_prepack(per_channel, None)
        return self._fbgemm_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and len(x2d) <= INT8_KERNEL_MAX_ROWS:
            if self.int8_activations and cpu_kernels.takes_linear_int8(x2d):
                y = cpu_kernels.linear_int8(x2d, self.weight, self.scale)
            elif self.int8_activations:
                y = int8_rows(x2d, self.fbgemm_weight())
            elif x2d.dtype == torch.float32 and X86:  # the kernel's fast form (the module docstring)
                y = torch._weight_int8pack_mm(x2d.bfloat16().contiguous(), self.weight, self.scale.bfloat16()).float()
            else:
                y = torch._weight_int8pack_mm(x2d.contiguous(), self.weight, self.scale)
        else:
            y = F.linear(x2d, self.dequantized())
        return y.view(*x.shape[:-1], self.out_features)

    def traces(self) -> bool:
        """Whether a compiled graph can run this module's decode rows: w8a8 through dsv2's int8 kernel (a custom op
        the graph calls as it is), not fbgemm, whose quantized tensors do not trace."""
        return self.int8_activations and cpu_kernels.takes_int8_width(self.in_features)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "weight_scale": self.scale}

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.weight.copy_(tensors["weight"])
        self.scale.copy_(tensors["weight_scale"])
        self._fbgemm_weight = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ------------------------------------------------------------------------------------------- int4
def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N,K] -> q uint8 [N,K] in 0..15, s [N,K/G] in `dtype`, z uint8 [N,K/G] (asymmetric per group)."""
    w = weight.detach().float().unflatten(1, (-1, group_size))  # [N, K/G, G]
    # the range includes 0 so that an integer zero point in 0..15 exists (all-positive groups would clip)
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(w / s[..., None] + zero[..., None]).clamp(0, 15)
    return q.flatten(1).to(torch.uint8), scale, zero.to(torch.uint8)


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N,K] nibbles -> [N,K/2] bytes: the checkpoint layout (even column in the low nibble)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_pairs(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 15, b >> 4], dim=-1).flatten(1)


@functools.lru_cache(maxsize=4)
def _cpu_int4_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of the CPU packed layout (bytes in order, low nibble first), its row-major index in the
    [N,K] matrix. Learnt from the kernel itself: pack matrices whose nibbles spell their own index, one hex
    digit per pass. Only saving and `dequantized` need it; the forward never does."""
    index = torch.arange(n * k)
    order = torch.zeros(n * k, dtype=torch.long)
    for digit in range(max(1, math.ceil(math.log2(n * k) / 4))):
        spelled = ((index >> (4 * digit)) & 15).view(n, k).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(spelled, INT4_INNER_K_TILES)
        order |= unpack_pairs(packed).flatten().long() << (4 * digit)
    return order


class Int4Linear(nn.Module):
    """y = x Wᵀ with W = (q - z)·s per group of `group_size` inputs: 4-bit weight, scales and zero points. With
    `int8_activations` ("w4a8", `for_inference(model, "w4a8")`) the CPU forward quantizes x's rows to 8 bits too.

    `weight` holds uint8 [N,K/2] in one of three layouts (`layout`), chosen where the weights are set (so move a
    model by loading it there): "cpu", torch's CPU kernel's; "w4a8", dsv2's w4a8 kernel's (`cpu_kernels.pack_w4a8`,
    in w4a8 where `cpu_kernels.takes_w4a8`: the kernels built, groups of 64 or 128); "pairs", the checkpoint's
    (`pack_pairs`), off the CPU."""

    checkpoint_suffixes = ("weight", "weight_scale", "weight_zero_point")

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 int8_activations: bool = False):
        super().__init__()
        self.int8_activations = int8_activations
        self.layout = "pairs"
        self.w4a8_scale: torch.Tensor | None = None  # s as fp32 [N, K/G], the w4a8 kernel's
        self.bf16_scales_and_zeros: torch.Tensor | None = None  # torch's kernel's operand for fp32 x on x86
        if not self.fits(out_features, in_features, group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % group_size == 0, got "
                             f"[{out_features}, {in_features}] with group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # the kernel's form of s and zero = (8 - z)·s; z itself is kept for the checkpoint (exact round trip)
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("zero_point", torch.empty(out_features, groups, dtype=torch.uint8, device=device))

    @staticmethod
    def fits(out_features: int, in_features: int, group_size: int) -> bool:
        """Whether the CPU kernel takes this shape (N a multiple of 16, K of the group size)."""
        return out_features % 16 == 0 and in_features % group_size == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 128, int8_activations: bool = False) -> Int4Linear:
        module = cls(weight.shape[1], weight.shape[0], group_size, weight.dtype, weight.device, int8_activations)
        module.set_quantized(*quantize_int4(weight, group_size, weight.dtype))
        return module

    def use_int8_activations(self) -> None:
        """Switch to w4a8, re-laying out the weights for the w4a8 kernel where it runs."""
        if not self.int8_activations:
            q = self.nibbles()
            self.int8_activations = True
            self.set_quantized(q, self.scales_and_zeros[..., 0].t(), self.zero_point)

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set from q uint8 [N,K], s [N,K/G], z uint8 [N,K/G]; packs q for the kernel that will run it."""
        s = scale.to(self.scales_and_zeros.dtype)
        if self.weight.device.type != "cpu":
            self.layout, packed = "pairs", pack_pairs(q.to(self.weight.device))
        elif self.int8_activations and cpu_kernels.takes_w4a8(self.in_features, self.group_size):
            self.layout, packed = "w4a8", cpu_kernels.pack_w4a8(q)
            self.w4a8_scale = s.float().contiguous()
        else:
            self.layout = "cpu"
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INT4_INNER_K_TILES)
        self.weight.copy_(packed)
        zero = ((8 - zero_point.float()) * s.float()).to(s.dtype)
        self.scales_and_zeros.copy_(torch.stack([s, zero], dim=-1).transpose(0, 1))
        self.zero_point.copy_(zero_point)
        self.bf16_scales_and_zeros = (self.scales_and_zeros.bfloat16()
                                      if self.layout == "cpu" and s.dtype == torch.float32 and X86 else None)

    def nibbles(self) -> torch.Tensor:
        """q uint8 [N,K], undoing whichever layout `weight` holds."""
        if self.layout == "pairs":
            return unpack_pairs(self.weight)
        if self.layout == "w4a8":
            return cpu_kernels.unpack_w4a8(self.weight)
        stream = unpack_pairs(self.weight).flatten()
        q = torch.empty_like(stream)
        q[_cpu_int4_order(self.out_features, self.in_features)] = stream
        return q.view(self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """W [N,K] in the scale dtype, exactly as the kernel reconstructs it: (q - 8)·s + zero for torch's (s and zero
        in bf16 where an fp32 model's products run in bf16), (q - z)·s for the w4a8 one."""
        if self.layout == "w4a8":  # one pass over the packed weight, in dsv2's kernel (fp32 or bf16 out)
            dtype = self.scales_and_zeros.dtype
            out = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            return cpu_kernels.dequantize_w4a8(self.weight, self.w4a8_scale, self.zero_point, self.group_size,
                                               out).to(dtype)
        scales_and_zeros = self.scales_and_zeros if self.bf16_scales_and_zeros is None else self.bf16_scales_and_zeros
        s, zero = (t.t().repeat_interleave(self.group_size, dim=1).float() for t in scales_and_zeros.unbind(-1))
        return ((self.nibbles().float() - 8) * s + zero).to(self.scales_and_zeros.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.layout == "w4a8" and len(x2d) <= INT8_KERNEL_MAX_ROWS:
            y = cpu_kernels.linear_w4a8(x2d, self.weight, self.w4a8_scale, self.zero_point, self.group_size)
        elif self.layout == "cpu":
            # w4a8 without its kernel: the rows rounded to their 8-bit grid, then torch's int4 kernel
            rows = int8_grid(x2d) if self.int8_activations else x2d
            if rows.dtype == torch.float32 and self.bf16_scales_and_zeros is not None:  # its fast form (module doc)
                y = torch._weight_int4pack_mm_for_cpu(rows.bfloat16().contiguous(), self.weight, self.group_size,
                                                      self.bf16_scales_and_zeros).float()
            else:
                y = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight, self.group_size,
                                                      self.scales_and_zeros)
        else:
            y = F.linear(x2d, self.dequantized())
        return y.view(*x.shape[:-1], self.out_features)

    def traces(self) -> bool:
        """Whether a compiled graph can run this module's decode rows: w4a8 on dsv2's kernel (a custom op)."""
        return self.layout == "w4a8"

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": pack_pairs(self.nibbles()), "weight_scale": self.scales_and_zeros[..., 0].t(),
                "weight_zero_point": self.zero_point}

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.set_quantized(unpack_pairs(tensors["weight"]), tensors["weight_scale"], tensors["weight_zero_point"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


QUANTIZED = (Int8Linear, Int4Linear)


# ------------------------------------------------------------------------------------------- bf16
BF16_KERNEL_MAX_ROWS = 64  # rows up to which `Bf16Linear` runs dsv2's kernel; above, F.linear on an fp32 copy


class Bf16Linear(nn.Module):
    """y = x Wᵀ for an fp32 model's x with W stored in bf16: the "bf16" format of `for_inference`, for a CPU without
    native bf16 (AVX2), where `dtype="auto"` is fp32 because ATen's bf16 products are slow there, but an fp32 weight
    is twice the bytes a memory-bound decode step reads. Up to BF16_KERNEL_MAX_ROWS rows on the CPU, dsv2's kernel
    (`cpu_kernels.linear_bf16_fp32`: each weight widened to fp32, exact, products summed in fp32) reads W in place;
    above (a prefill chunk) F.linear on W widened to fp32 (a copy per call, small beside the GEMM). Either way the
    product is that of the fp32 model whose weights were rounded to bf16, but for the fp32 sums' order."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and len(x2d) <= BF16_KERNEL_MAX_ROWS
                and cpu_kernels.takes_bf16_fp32(self.in_features)):
            y = cpu_kernels.linear_bf16_fp32(x2d, self.weight)
        else:
            y = F.linear(x2d, self.weight.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def traces(self) -> bool:
        """Whether a compiled decode graph calls dsv2's kernel (a custom op) for this module's rows."""
        return cpu_kernels.takes_bf16_fp32(self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=bf16"


def to_bf16_weights(model: Transformer) -> Transformer:
    """An fp32 model's weight matrices stored in bf16 (`Bf16Linear`, in place; activations, norms, the router, the
    embedding and MLA's wkv_b stay fp32, as in the int8 formats); a bf16 model is returned as it is."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        return model
    stored = (model.config.quantization_config or {}).get("quant_method")
    if dtype != torch.float32 or stored is not None:
        raise ValueError(f"quantization bf16 stores an fp32 model's weights in bf16; the model is {stored or dtype}")
    cpu_kernels.load()  # the kernel the format runs on (built here, not in the first decode step)
    _swap(model, lambda name, weight: None if _keeps(name, tuple(weight.shape), "bf16", 0) else Bf16Linear(weight))
    return model.eval()


# -------------------------------------------------------------------------------------- the experts
class QuantizedRoutedExperts(RoutedExperts):
    """Routed experts with one module per expert and projection (Int8Linear, Int4Linear, or an nn.Linear
    where int4 does not fit); the grouped routing of `RoutedExperts.forward` is reused as it is, except in a
    compiled graph where every projection is w4a8, or every one w8a8, and the rows are a decode step's (at most
    INT8_KERNEL_MAX_ROWS): there the whole layer is one call of dsv2's kernel (`cpu_kernels.routed_experts_w4a8`
    or `routed_experts_int8`), bit for bit the projections of `dispatch`, its twin. In the graph, `dispatch` runs
    through the opaque `dsv2::routed_experts` and spent 2.3 ms a layer, ~0.7 of it Python and small ops around
    its kernel calls (w4a8, V2-Lite-4, batch 1, 2-core Zen 4), one expert's products after another; the fused
    call, 1.5 ms, spreads all chosen experts' rows over the threads. Eager, `dispatch` stays: gathering the
    operand tensors of 64 experts from the modules costs 0.3 ms a call (a graph gathers them once, when traced)."""

    # each projection module's operands of the fused kernels, in the kernels' order
    FUSED_OPERANDS = {"w4a8": ("weight", "w4a8_scale", "zero_point"), "w8a8": ("weight", "scale"), "bf16": ("weight",)}

    def __init__(self, w1: list[nn.Module], w2: list[nn.Module], w3: list[nn.Module]):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: no stacked parameters
        self.n_experts = len(w1)
        self.w1, self.w2, self.w3 = nn.ModuleList(w1), nn.ModuleList(w2), nn.ModuleList(w3)
        self.stacked_operands: tuple[tuple[torch.Tensor, ...], ...] | None = None  # `prepare_for_inference`'s

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and (kernel := self.fused_kernel(x)) is not None:
            return kernel(x, weights, indices, *self.fused_operands())
        return super().forward(x, weights, indices)

    def fused_layout(self) -> str | None:
        """"w4a8" where every projection is w4a8 on its kernel, "w8a8" where every one is w8a8 on `linear_int8`,
        else None: the layouts a fused kernel takes."""
        projections = [m for projection in (self.w1, self.w2, self.w3) for m in projection]
        if all(isinstance(m, Int4Linear) and m.layout == "w4a8" for m in projections):
            return "w4a8"
        if all(isinstance(m, Int8Linear) and m.traces() for m in projections):
            return "w8a8"
        if all(isinstance(m, Bf16Linear) and m.traces() for m in projections):
            return "bf16"
        return None

    def fused_kernel(self, x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        """The kernel a compiled graph runs these experts on, or None (`dispatch`): `cpu_kernels.routed_experts_w4a8`
        or `routed_experts_int8` by `fused_layout`, for float x of at most INT8_KERNEL_MAX_ROWS rows on the CPU
        (more: `dispatch`, whose slabs dequantize)."""
        if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and len(x) <= INT8_KERNEL_MAX_ROWS):
            return None
        layout = self.fused_layout()
        if layout == "bf16" and x.dtype != torch.float32:
            return None
        return {"w4a8": cpu_kernels.routed_experts_w4a8, "w8a8": cpu_kernels.routed_experts_int8,
                "bf16": cpu_kernels.routed_experts_bf16_fp32}.get(layout)

    def fused_operands(self) -> tuple[cpu_kernels.W4a8Operands | cpu_kernels.Int8Operands | cpu_kernels.Bf16Operands,
                                      ...]:
        """The operands of w1, w3, w2 for `fused_kernel`, each stacked over the experts: (packed, scale, zero) for
        w4a8, (weight, scale) for w8a8. The stacks `prepare_for_inference` made, else stacked now (a copy, which
        a graph traced without them makes at every call)."""
        if self.stacked_operands is not None:
            return self.stacked_operands
        names = self.FUSED_OPERANDS[self.fused_layout()]
        return tuple(tuple(torch.stack([getattr(m, name) for m in projection]) for name in names)
                     for projection in (self.w1, self.w3, self.w2))

    @torch.no_grad()
    def prepare_for_inference(self) -> None:
        """Where a fused kernel takes these experts, stack each operand over the experts once and make the modules'
        tensors views of the stack: no second copy, and a graph passes the kernel 9 tensors instead of 9 per
        expert (V2-Lite: 576, whose boxing into the call and guards cost ~0.3 ms a layer at batch 1). Like every
        prepared layout, it is not kept in step with a module whose tensors are replaced afterwards (in-place
        edits write through the views): prepare again (`Transformer.prepare_for_inference`)."""
        self.stacked_operands = None
        if (layout := self.fused_layout()) is None:
            return
        stacked = self.fused_operands()
        for projection, operands in zip((self.w1, self.w3, self.w2), stacked, strict=True):
            for e, module in enumerate(projection):
                for name, operand in zip(self.FUSED_OPERANDS[layout], operands, strict=True):
                    setattr(module, name, operand[e])
        self.stacked_operands = stacked

    def uses_grouped_mm(self, x: torch.Tensor, n_slots: int) -> bool:
        return False  # F.grouped_mm takes stacked float weights only

    def per_expert(self) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
        return self.w1, self.w2, self.w3

    @staticmethod
    def expert(x: torch.Tensor, w1: nn.Module, w2: nn.Module, w3: nn.Module) -> torch.Tensor:
        return w2(F.silu(w1(x)) * w3(x))


# ------------------------------------------------------------------------------------------ the swap
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(w[123])\.(\d+)$")


def hf_module_name(name: str) -> str:
    """Our module name -> its HF name; routed experts per expert: layers.L.ffn.experts.w1.E ->
    model.layers.L.mlp.experts.E.gate_proj."""
    m = _EXPERT.match(name)
    if m is not None:
        name = f"{m[1]}.{m[3]}.{m[2]}"
    return hf_name(f"{name}.weight").removesuffix(".weight")


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding `weight` (an expert's slice of the stacked tensor, copied)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone())
    return linear


def _swap(model: Transformer, convert: Callable[[str, torch.Tensor], nn.Module | None]) -> None:
    """Replace every nn.Linear and every routed expert's projection with convert(our name, weight); None keeps
    it (an expert's projection then becomes an nn.Linear of its own)."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, convert(name, child.weight) or child)
            elif type(child) is RoutedExperts:
                projections = {
                    w: [convert(f"{name}.{w}.{e}", weight) or _linear(weight)
                        for e, weight in enumerate(getattr(child, w))]
                    for w in ("w1", "w2", "w3")
                }
                setattr(parent, child_name, QuantizedRoutedExperts(**projections))


def _check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")


def int4_group_size(shape: tuple[int, ...], group_size: int) -> int | None:
    """The group size an [N,K] matrix gets in int4: `group_size`, or where K is not a multiple of it the
    largest smaller one of GROUP_SIZES that divides K (V2-Lite's dense down_proj: K = 10944 = 171·64, so it
    takes groups of 64 under 128 rather than staying in bf16, where it was 12% of an int4 decode step);
    None where none fits. A function of the shape and the recorded group_size, so loading finds it again."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if Int4Linear.fits(shape[0], shape[1], g):
            return g
    return None


def _keeps(name: str, shape: tuple[int, ...], method: str, group_size: int) -> bool:
    """Whether the weight matrix `name` stays in the model dtype (see the module docstring)."""
    if name.endswith("attn.wkv_b"):
        return True
    return method == "int4" and int4_group_size(shape, group_size) is None


def _not_converted(model: Transformer) -> list[str]:
    """HF module names of the weight matrices left in the model dtype (the embedding and routers included)."""
    return sorted(
        hf_module_name(name) for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Embedding) or name.endswith("ffn.gate")
    )


@torch.no_grad()
def quantize_model(model: Transformer, method: str, group_size: int = 128,
                   int8_activations: bool = False) -> Transformer:
    """Swap the model's weight matrices for `method` ("int8" or "int4", groups of `group_size` along K) in
    place; returns the model, its config's `quantization_config` set to what a checkpoint records.
    `int8_activations`: int4 modules laid out for w4a8 (`Int4Linear`)."""
    _check_method(method, group_size)
    if model.config.quantization_config:
        raise ValueError(f"model is already quantized ({model.config.quantization_config.get('quant_method')})")

    def convert(name: str, weight: torch.Tensor) -> nn.Module | None:
        if _keeps(name, tuple(weight.shape), method, group_size):
            return None
        if method == "int8":
            return Int8Linear.quantize(weight)
        return Int4Linear.quantize(weight, int4_group_size(tuple(weight.shape), group_size), int8_activations)

    _swap(model, convert)
    model.config = model.config.replace(quantization_config={
        "quant_method": METHODS[method], "group_size": group_size if method == "int4" else None,
        "modules_not_converted": _not_converted(model),
    })
    return model.eval()


INFERENCE_FORMATS = ("int8", "w8a8", "int4", "w4a8", "fp8", "bf16")  # LLM(quantization=...), --quantization


def check_quantization(quantization: str | None) -> str | None:
    if quantization is not None and quantization not in INFERENCE_FORMATS:
        raise ValueError(f"quantization must be one of {', '.join(INFERENCE_FORMATS)} or None, got {quantization!r}")
    return quantization


def for_inference(model: Transformer, quantization: str | None, group_size: int = 128) -> Transformer:
    """The model in the weight format `quantization` asks for (`LLM`, `--quantization`): None leaves it as it is;
    "int8" / "int4" quantize a float model (or accept one stored that way); "w8a8" and "w4a8" are int8 and int4
    weights computed with int8 activations (the module docstring); "fp8" accepts a block-FP8 checkpoint loaded with
    fp8="keep" (converting a float model to FP8 is `dsv2 quantize --format fp8`); "bf16" stores an fp32 model's
    weights in bf16, products in fp32 (`Bf16Linear`, for CPUs without native bf16)."""
    if check_quantization(quantization) is None:
        return model
    if quantization == "bf16":
        return to_bf16_weights(model)
    if quantization == "w8a8":
        model = for_inference(model, "int8", group_size)
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.int8_activations = True
        cpu_kernels.load()  # the int8 kernel w8a8 runs on (built here, not in the first decode step)
        return model
    stored = (model.config.quantization_config or {}).get("quant_method")
    kept_fp8 = any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in model.modules())
    if quantization == "fp8":
        if not kept_fp8:
            raise ValueError("quantization fp8 runs a block-FP8 checkpoint kept in FP8; write one with "
                             "`dsv2 quantize MODEL --out DIR --format fp8`")
        return model
    if quantization == "w4a8":
        cpu_kernels.load()  # before the weights are laid out: the w4a8 kernel's layout where it runs
        if stored == METHODS["int4"]:  # a stored int4 checkpoint: its modules re-laid out
            for module in model.modules():
                if isinstance(module, Int4Linear):
                    module.use_int8_activations()
            return model
        if stored is None:
            return quantize_model(model, "int4", group_size, int8_activations=True)
    elif stored == METHODS[quantization]:
        return model  # a checkpoint `dsv2 quantize` wrote: already in this format
    if stored is not None:
        raise ValueError(f"quantization {quantization}: the model is stored as {stored}; load it as it is")
    return quantize_model(model, quantization, group_size)


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized model's checkpoint, by HF name."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            for suffix, t in module.checkpoint_tensors().items():
                tensors[f"{hf_module_name(name)}.{suffix}"] = t
    for name, p in model.named_parameters():
        tensors[_hf_parameter_name(name)] = p
    return tensors


def _hf_parameter_name(name: str) -> str:
    module_name, _, leaf = name.rpartition(".")
    return f"{hf_module_name(module_name)}.{leaf}"


@torch.no_grad()
def save_quantized(model: Transformer, folder: str | os.PathLike,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write a quantized model (`quantize_model`) as config.json + safetensors (layout: module docstring).
    Every file is written atomically, the index and config last; stale shards of an earlier save are removed."""
    qc = model.config.quantization_config
    if not qc or not str(qc.get("quant_method", "")).startswith("dsv2_int"):
        raise ValueError("save_quantized: the model is not quantized (call quantize_model first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in checkpoint_tensors(model).items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous().clone()
        size += t.nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for file, shard in zip(names, shards, strict=True):
        with atomic_path(folder / file) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    weight_map = {name: file for file, shard in zip(names, shards, strict=True) for name in shard}
    finish_shards(folder, names, weight_map, sum(t.nbytes for shard in shards for t in shard.values()))
    dtype = next(t for t in model.state_dict().values() if t.is_floating_point()).dtype
    model.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).to_json(folder / CONFIG_FILE)


@torch.no_grad()
def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu") -> Transformer:
    """A `save_quantized` folder -> its model in `dtype` on `device`: built on the meta device, modules swapped
    by the recorded quantization_config, tensors copied in (int4 packed here); nothing is re-quantized."""
    folder = Path(folder)
    config = ModelConfig.from_json(folder / CONFIG_FILE)
    qc = config.quantization_config or {}
    method = next((m for m, name in METHODS.items() if name == qc.get("quant_method")), None)
    if method is None:
        raise CheckpointError(f"{folder / CONFIG_FILE}: quantization_config.quant_method must be one of "
                              f"{', '.join(METHODS.values())}, got {qc.get('quant_method')!r}")
    group_size = qc.get("group_size") or 128
    kept = set(qc.get("modules_not_converted", []))

    def empty(name: str, weight: torch.Tensor) -> nn.Module | None:
        if hf_module_name(name) in kept:
            return None
        n, k = weight.shape
        if method == "int8":
            return Int8Linear(k, n, dtype, "meta")
        return Int4Linear(k, n, int4_group_size((n, k), group_size), dtype, "meta")

    with torch.device("meta"):
        model = Transformer(config)
    _swap(model, empty)
    model = model.to(dtype=dtype).to_empty(device=device)
    quantized = {hf_module_name(name): m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
    params = {_hf_parameter_name(name): p for name, p in model.named_parameters()}
    expected = {f"{prefix}.{s}" for prefix, m in quantized.items() for s in m.checkpoint_suffixes} | set(params)
    files = weight_files(folder)
    missing, unexpected = sorted(expected - set(files)), sorted(set(files) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the tensors do not match {CONFIG_FILE}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    with ExitStack() as stack:
        opened = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(files.values())}

        def read(name: str) -> torch.Tensor:
            return opened[files[name]].get_tensor(name)

        for prefix, module in quantized.items():
            tensors = {s: read(f"{prefix}.{s}") for s in module.checkpoint_suffixes}
            if isinstance(module, Int8Linear) and bool((tensors["weight"] == -128).any()):
                raise CheckpointError(f"{files[prefix + '.weight']}: {prefix}.weight holds -128: dsv2's int8 is "
                                      "symmetric, q in [-127, 127] (quantize_int8; the int8 kernels' AVX2 products "
                                      "rely on it)")
            module.load_checkpoint_tensors(tensors)
        for name, p in params.items():
            p.copy_(read(name))
    return model.eval()
