"""Optimizer and schedules (paper §3.2.1): AdamW with decoupled weight decay on matrices only, linear
warmup then step decay of the learning rate, and an optional batch-size ramp.

DeepSeek-V2: β1 = 0.9, β2 = 0.95, weight decay 0.1; the learning rate warms up linearly for 2K steps,
then is multiplied by 0.316 after 60% of the training tokens and by 0.316 again after 90%; the batch
size ramps from 2304 to 9216 sequences over the first 225B tokens. The schedules here are pure
functions of the step (`Schedule`), so a resumed run needs nothing but the step counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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


@dataclass(frozen=True)
class Schedule:
    """The learning rate and batch size of every step of a run, as pure functions of the step (a resumed run
    needs nothing but its step counter).

    Learning rate: linear warmup over `warmup_steps`, then `peak_lr`, ×0.316 once 60% of the run's training
    *tokens* have been seen and ×0.316 again at 90% (paper §3.2.1). Tokens, not steps: with a batch-size ramp
    the early steps are smaller, so 60% of the steps is fewer than 60% of the tokens.
    Batch size: linear from `ramp_start` to `batch_size` sequences over the first `ramp_steps` steps (None: no
    ramp; the paper ramps 2304 -> 9216 over its first 225B tokens).
    """

    steps: int
    peak_lr: float
    warmup_steps: int
    batch_size: int
    seq_len: int
    ramp_start: int | None = None
    ramp_steps: int = 0

    def batch_size_at(self, step: int) -> int:
        if self.ramp_start is None or self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.batch_size
        return max(1, round(self.ramp_start + (self.batch_size - self.ramp_start) * step / self.ramp_steps))

    def batch_sizes(self) -> set[int]:
        return {self.batch_size_at(s) for s in range(min(self.steps, self.ramp_steps))} | {self.batch_size}

    @cached_property
    def _ramp_tokens(self) -> list[int]:
        """Tokens before each step of the ramp, and after it: [ramp steps + 1]."""
        sums = [0]
        for s in range(min(self.steps, max(self.ramp_steps, 0))):
            sums.append(sums[-1] + self.batch_size_at(s) * self.seq_len)
        return sums

    def tokens_before(self, step: int) -> int:
        """Training tokens of steps 0 .. step-1."""
        ramp = self._ramp_tokens
        if step < len(ramp):
            return ramp[step]
        return ramp[-1] + (step - (len(ramp) - 1)) * self.batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_before(self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): decayed once the tokens before it reach each point."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        seen = self.tokens_before(step) / max(1, self.total_tokens)
        return self.peak_lr * DECAY_FACTOR ** sum(seen >= p for p in DECAY_POINTS)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
