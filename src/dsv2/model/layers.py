"""Stateless building blocks: RMSNorm and the SwiGLU MLP used by dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def differentiating(weight: torch.Tensor) -> bool:
    """Whether this forward records gradients for `weight`. If so, a layout derived from it must be
    computed from the parameter itself, never taken from a copy made by `prepare_for_inference`."""
    return torch.is_grad_enabled() and weight.requires_grad


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
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
