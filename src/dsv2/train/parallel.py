"""Plumbing applied to a built model from outside its math (ARCHITECTURE principle 5).

So far: activation checkpointing per decoder block. FSDP2 and expert parallelism belong here too.
"""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from dsv2.model import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of storing them (memory for compute).

    Recomputation replays the block exactly, including a bound token-dropping function, so the routing
    record may receive a second, identical entry per layer during backward; it is read before backward.
    """
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)
