"""Long-context evaluation: validation loss by token position, and needle-in-a-haystack pass-key retrieval.

`loss_by_position` is the next-token loss at each position of fixed long-document windows, averaged over
them: flat to the right end for a model that uses its whole context, rising past the length a model was
trained at when it does not extrapolate (the before/after picture of a YaRN extension).

`needle_accuracy` is the paper's Figure 4 on a small scale: for each (length, depth), prompts with a random
5-digit pass key at that depth of real text (`data.longctx`), scored by exact match of the greedy
continuation with the key. Greedy decoding emits the key's tokens exactly when, fed the key, the argmax at
each of its positions is its next token, so one teacher-forced forward per prompt scores it with no decoding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dsv2.data import longctx
from dsv2.model import Transformer
from dsv2.tokenizer import Tokenizer
from dsv2.train.core import Batch, next_token_loss

LOGITS_BUDGET = 1 << 28  # bytes of fp32 logits one forward may hold (rows per forward follow from it)


@torch.no_grad()
def loss_by_position(model: Transformer, batches: Iterable[Batch]) -> torch.Tensor:
    """[S] fp32: the mean next-token loss at each position of the batches' sequences (all of length S)."""
    was_training = model.training
    model.eval()
    total, rows = None, 0
    for batch in batches:
        loss = next_token_loss(model(batch.inputs).float(), batch).sum(0)
        total = loss if total is None else total + loss
        rows += len(batch)
    model.train(was_training)
    if total is None:
        raise ValueError("loss_by_position: no batches")
    return total / rows


def position_bins(losses: torch.Tensor, bins: int) -> list[dict[str, float]]:
    """The per-position losses as `bins` equal spans of positions: [{start, end, loss}] (end exclusive)."""
    edges = np.linspace(0, len(losses), min(bins, len(losses)) + 1).round().astype(int)
    return [{"start": int(a), "end": int(b), "loss": float(losses[a:b].mean())}
            for a, b in zip(edges[:-1], edges[1:], strict=True)]


def cut(batch: Batch, length: int) -> Batch:
    """The same target tokens as sequences of `length` (which divides S): each sees at most `length` tokens."""
    return Batch(batch.inputs.reshape(-1, length), batch.targets.reshape(-1, length))


def ppl_by_position(models: dict[str, Transformer], batches: list[Batch], bins: int,
                    l0: int | None = None) -> dict[str, dict[str, Any]]:
    """Per model, on the same batches: the mean loss, its `position_bins`, and with `l0` (dividing S, less
    than it) the loss of the same tokens cut into l0-token sequences, "cut_to_l0": the loss at L0 on the
    very text the long sequences hold, so that the two differ only by the context the model could use."""
    out = {}
    for name, model in models.items():
        losses = loss_by_position(model, batches)
        out[name] = {"mean": float(losses.mean()), "bins": position_bins(losses, bins)}
        S = batches[0].inputs.shape[1]
        if l0 is not None and l0 < S and S % l0 == 0:
            out[name]["cut_to_l0"] = float(loss_by_position(model, [cut(b, l0) for b in batches]).mean())
    return out


@torch.no_grad()
def needle_accuracy(
    model: Transformer, tokenizer: Tokenizer, haystack: Sequence[int], lengths: Sequence[int],
    depths: Sequence[float], trials: int = 4, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Exact-match pass-key accuracy per (length, depth) over `trials` random keys each (module docstring).
    `haystack`: text token ids, at least max(lengths) of them. Returns {"lengths", "depths", "trials",
    "accuracy": [len(lengths)][len(depths)]}."""
    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    accuracy = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc="needle", unit="prompt", disable=not progress)
    for length in lengths:
        cells = [longctx.needle_prompt(tokenizer, haystack, length, d, longctx.random_key(rng))
                 for d in depths for _ in range(trials)]
        found = []
        rows = max(1, LOGITS_BUDGET // (4 * model.config.vocab_size * (length + 8)))
        for i in range(0, len(cells), rows):
            group = cells[i : i + rows]
            # prompt + the whole answer (its last token's logits unused), right-padded: keys may differ in
            # token count, and no real position attends to the padding
            width = max(len(c.prompt) + len(c.answer) for c in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for r, c in enumerate(group):
                ids[r, : len(c.prompt) + len(c.answer)] = torch.tensor([*c.prompt, *c.answer])
            logits = model(ids.to(device))
            for r, c in enumerate(group):
                at = len(c.prompt) - 1
                guess = logits[r, at : at + len(c.answer)].argmax(-1).tolist()
                found.append(guess == c.answer)
            bar.update(len(group))
        accuracy.append(np.mean(np.array(found).reshape(len(depths), trials), axis=1).tolist())
    bar.close()
    model.train(was_training)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy}
