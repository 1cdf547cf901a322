"""Stateless building blocks: the linear layer, RMSNorm and the SwiGLU MLP used by dense layers and shared
experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def differentiating(weight: torch.Tensor) -> bool:
    """Whether this forward records gradients for `weight`. If so, a layout derived from it must be
    computed from the parameter itself, never taken from a copy made by `prepare_for_inference`."""
    return torch.is_grad_enabled() and weight.requires_grad


MV_MIN_ELEMENTS = 1 << 18  # below this a matrix is faster through oneDNN (see `linear`)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weightᵀ [K, N] -> [..., N].

    One row in bf16 on the CPU (a batch-1 decode step, or an expert that got one token) goes through
    `torch.mv`, ATen's own GEMV, rather than F.linear's oneDNN GEMM, which reads V2-Lite's matrices 1.3-1.5x
    slower at one row (2-core AMX Xeon, `benchmarks/cpu_kernels.py`: 22-30 GB/s against 28-45) and costs a
    Lite-4 decode step 61 ms against 50. Below MV_MIN_ELEMENTS weights (nano's) oneDNN's ~19 us per call beats
    mv's ~23. Both accumulate in fp32."""
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]
            and weight.numel() >= MV_MIN_ELEMENTS):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


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
