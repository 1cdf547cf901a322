"""The plain generate loop: one sequence, no cache, the whole prefix recomputed every step.

Slow on purpose: it is the readable reference the engine (latent cache, absorbed attention, batching)
is tested against token for token.
"""

from __future__ import annotations

import torch

from dsv2.infer.sampling import SamplingParams, sample
from dsv2.model import Transformer


@torch.no_grad()
def generate(
    model: Transformer, prompt_ids: list[int], params: SamplingParams, eos_id: int | None = None,
) -> list[int]:
    """Generated token ids (EOS or a stop token included when it ended the sequence)."""
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    generator = params.generator(device)
    stop_ids = set(params.stop_token_ids) | ({eos_id} if eos_id is not None and not params.ignore_eos else set())
    out: list[int] = []
    while len(out) < params.max_tokens and len(ids) < model.config.max_position_embeddings:
        logits = model(torch.tensor([ids], device=device))[0, -1]
        token = sample(logits, params, ids, len(prompt_ids), generator)
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out
