"""Rotary position embedding with YaRN, applied to MLA's decoupled RoPE slice (paper §2.1.3, §3.1.4) and to
the whole heads of the attention variants (`attention_variants.py`).

Layout: MLA's d_h^R rope channels are rotated as interleaved pairs (x_{2i}, x_{2i+1}) by angle p·θ_i,
exactly as DeepSeek's checkpoints expect (their projection rows are stored in that order). A NeoX-style
`rotate_half` without permuting those rows would change every attention score (reference-spec §7). The
variants rotate halves (x_i, x_{i+d/2}), as Llama and so DeepSeek LLM's checkpoints do.

YaRN (reference-spec §8) blends, per frequency, the original θ_i ("extrapolation") with θ_i / s
("interpolation") by a linear ramp between two correction dims, and is used at every position, not only
past `original_max_position_embeddings`. Its second half, the mscale² factor on the softmax scale, lives
in `ModelConfig.softmax_scale`; this module only carries the cos/sin magnitude ratio.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv2.config import ModelConfig, yarn_mscale


def yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rope channel whose wavelength fits `num_rotations` times in `max_pos` tokens."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """θ_i for i < d/2 (d = `config.rope_dim`), fp32, YaRN-blended when `rope_scaling` says so."""
    dim, base = config.rope_dim, float(config.rope_theta)
    extrapolation = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    rs = config.rope_scaling
    if rs is None:
        return extrapolation
    factor = float(rs["factor"])
    # transformers takes the top-level pretraining length first (ModelConfig refuses the two disagreeing)
    orig = config.original_max_position_embeddings or rs.get("original_max_position_embeddings",
                                                             config.max_position_embeddings)
    low = yarn_correction_dim(rs.get("beta_fast") or 32, dim, base, orig)
    high = yarn_correction_dim(rs.get("beta_slow") or 1, dim, base, orig)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_original = 1.0 - ramp  # 1 for high-frequency channels, which YaRN leaves alone
    return extrapolation / factor * (1 - keep_original) + extrapolation * keep_original


def cos_sin_magnitude(config: ModelConfig) -> float:
    """YaRN's attention factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim).

    1.0 for DeepSeek-V2's own config (0.707 / 0.707). With only one of the two given, transformers
    (the reference) uses mscale(s) = 0.1·ln(s) + 1; an explicit `attention_factor` wins.
    """
    rs = config.rope_scaling
    if rs is None:
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = float(rs["factor"])
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return yarn_mscale(factor, float(rs["mscale"])) / yarn_mscale(factor, float(rs["mscale_all_dim"]))
    return yarn_mscale(factor)


class RotaryEmbedding(nn.Module):
    """positions -> (cos, sin) of shape [..., d_h^R/2], fp32, magnitude-scaled."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.magnitude = cos_sin_magnitude(config)
        # A plain attribute, not a buffer: it must stay fp32 (model.to(bfloat16) casts buffers) and real
        # (a model built on the meta device has no buffer data). So `model.to(device)` leaves it on the CPU:
        # forward moves a copy to the positions' device (d_h^R/2 floats, once per model forward, not per
        # layer), and `prepare_for_inference` moves it once, for inference steps to copy nothing.
        self.inv_freq = inv_frequencies(config)

    def prepare_for_inference(self, device: torch.device) -> None:
        self.inv_freq = self.inv_freq.to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate pairs of the last dim of x [B, S, (heads,) d] by angles of [B or 1, S, d/2]: interleaved pairs
    (x_{2i}, x_{2i+1}) (MLA), or with `interleaved=False` the halves' pairs (x_i, x_{i+d/2}) (Llama).

    Computed in fp32 and rounded once, like the reference's complex multiplication.
    """
    if x.dim() == 4:  # one angle per token, shared by every head
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    dim = -1 if interleaved else -2
    pairs = x.float().unflatten(-1, (-1, 2) if interleaved else (2, -1))
    first, second = pairs.unbind(dim)
    rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=dim)
    return rotated.flatten(-2).to(x.dtype)
