"""Stateless building blocks: the linear layer, RMSNorm and the SwiGLU MLP used by dense layers and shared
experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv2 import hardware
from dsv2.model import cpu_kernels


def differentiating(weight: torch.Tensor) -> bool:
    """Whether this forward records gradients for `weight`. If so, a layout derived from it must be
    computed from the parameter itself, never taken from a copy made by `prepare_for_inference`."""
    return torch.is_grad_enabled() and weight.requires_grad


MV_MIN_ELEMENTS = 1 << 19  # one row times a matrix at least this big: oneDNN's GEMV (see `linear`)
ATEN_MAX_PRODUCT = 1 << 17  # rows x weight elements at most this: ATen's own kernel (see `linear`)
WEIGHT_LEFT_MAX_ROWS = 128  # up to this many rows: W @ xᵀ (see `linear`)
AMX = hardware.cpu_capability() == "AMX"  # oneDNN's GEMV and W @ xᵀ pay only with AMX tiles (see `linear`)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weightᵀ [K, N] -> [..., N].

    bf16 on the CPU picks the kernel by size and by CPU, as decode's products are small (2 cores, torch 2.13,
    `benchmarks/cpu_kernels.py`). oneDNN, which F.linear and torch.mv call for bf16, costs ~20 us per call
    whatever the size; ATen's own bf16 kernels have no such floor, and how fast they read depends on the CPU:
    ~12 GB/s on an AMX Xeon, 27-30 GB/s on a Zen 4 EPYC (AVX-512 BF16, no AMX), where oneDNN's GEMV reads 7.
    - one row on a CPU without AMX tiles: ATen's kernel, 2.4-3.5x torch.mv and F.linear there (a V2-Lite
      expert's 1408 x 2048: 189 us against 826 and 510; the LM head 102400 x 2048: 13.8 ms against 56 and 34);
    - one row and a matrix of >= MV_MIN_ELEMENTS on an AMX CPU (a decode step's projections and experts at
      V2-Lite's size): `torch.mv`, oneDNN's GEMV, which reads such matrices 1.2-1.5x faster than F.linear's GEMM
      (22-30 GB/s against 28-45): a Lite-4 decode step 61 ms against 50;
    - one row and a smaller matrix, or rows x elements <= ATEN_MAX_PRODUCT (nano's matrices, small batches):
      ATen's kernel, oneDNN switched off for the call: 3-15 us against 21-26 (one row of 64 x 128: 4 against 23);
    - up to WEIGHT_LEFT_MAX_ROWS rows on an AMX CPU (an expert's rows, a decode batch, a short chunk): W @ xᵀ,
      the weight as the left operand, which oneDNN takes as it is stored, where as F.linear's right operand it
      is re-laid out for AMX on every call: 20-45% faster from 4 to 128 rows (a V2-Lite expert's 1408 x 2048,
      16 rows: 266 us against 336; small's 768 x 1024, 128 rows: 156 against 234). Without AMX there is no
      re-layout and F.linear is as fast or faster (8 rows of 1408 x 2048: 463 us against 776);
    - more rows: F.linear (oneDNN's GEMM; AMX on a CPU that has it).
    All of them accumulate in fp32. Inside a `torch.compile` graph (`dsv2.infer.compiled`) it is F.linear, whose
    kernel the compiler picks (it packs the frozen weights for its own GEMMs, with none of these floors), except
    one bf16 row on a CPU with AMX: dsv2's AMX kernel (`cpu_kernels.linear`, 1.3-2.2x inductor's GEMMs there)."""
    if torch.compiler.is_compiling() and cpu_kernels.takes_linear(x, weight):
        return cpu_kernels.linear(x, weight)
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or torch.compiler.is_compiling():
        return F.linear(x, weight)
    rows = x.numel() // x.shape[-1]
    if rows == 1 and AMX and weight.numel() >= MV_MIN_ELEMENTS:
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    if rows == 1 or rows * weight.numel() <= ATEN_MAX_PRODUCT:
        return aten_linear(x, weight)
    if AMX and rows <= WEIGHT_LEFT_MAX_ROWS:
        # contiguous, as every other path's result is (a transposed view would surprise a later .view())
        return torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def aten_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear through ATen's own CPU kernel: oneDNN (mkldnn) switched off for the call, then restored. The
    flag is process-wide; the model's forwards run on one thread (the engine's), so nothing else sees it."""
    mkldnn = torch.backends.mkldnn
    enabled = mkldnn.enabled
    mkldnn.enabled = False
    try:
        return F.linear(x, weight)
    finally:
        mkldnn.enabled = enabled


class Linear(nn.Linear):
    """nn.Linear without bias whose forward is `linear` (the layout, names and checkpoints of nn.Linear)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm with the reference numerics: normalise in fp32, round to the input dtype, then scale.

    The order matters in bf16: the weight multiplies the already-rounded activations (reference-spec §5).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). w1/w2/w3 = HF gate_proj/down_proj/up_proj."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
