"""Optimizer and schedules (paper §3.2.1): AdamW with decoupled weight decay on matrices only, linear
warmup then step decay of the learning rate, and an optional batch-size ramp.

DeepSeek-V2: β1 = 0.9, β2 = 0.95, weight decay 0.1; the learning rate warms up linearly for 2K steps,
then is multiplied by 0.316 after 60% of the training tokens and by 0.316 again after 90%; the batch
size ramps from 2304 to 9216 sequences over the first 225B tokens. The schedules here are pure
functions of the step, so a resumed run needs nothing but the step counter.
"""

from __future__ import annotations

import torch
from torch import nn

DECAY_POINTS = (0.6, 0.9)
DECAY_FACTOR = 0.316


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (embeddings, projections, stacked experts) decay; norm weights do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    # fused: one kernel over all parameters (on the CPU ~3x faster than the default for-each)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8, fused=True)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup to `peak_lr`, then ×0.316 at 60% and again at 90% of training (step 0-based)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = step / max(1, total_steps)
    return peak_lr * DECAY_FACTOR ** sum(progress >= p for p in DECAY_POINTS)


def batch_size_at(step: int, final_batch: int, start_batch: int | None, ramp_steps: int) -> int:
    """Batch size ramping linearly from `start_batch` to `final_batch` over `ramp_steps` (None: no ramp)."""
    if start_batch is None or ramp_steps <= 0 or step >= ramp_steps:
        return final_batch
    return max(1, round(start_batch + (final_batch - start_batch) * step / ramp_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
