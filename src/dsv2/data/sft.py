"""Supervised fine-tuning data: chat conversations (JSONL) -> token ids with a mask on what the model is taught to
say -> padded batches whose loss weights are that mask.

A file holds one conversation a line, in either of the formats fine-tuning tools share (OpenAI's chat fine-tuning
files, TRL's conversational and prompt-completion datasets):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "...", "completion": "..."}          a user turn and the assistant's reply

Only role and content are read: other keys of a message (OpenAI's "name", "weight") and of a row are ignored, so
every assistant turn is trained on. Each conversation goes through `Tokenizer.encode_chat`, the template inference
uses, and its targets are the tokens of the assistant's replies and their EOS; the user's and system's tokens are
context only. A conversation of n tokens trains as inputs ids[:-1] -> targets ids[1:], one per row of a batch,
padded on the right to the batch's longest (no packing, so no conversation attends to another).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv2.data.corpus import DataError, jsonl_records
from dsv2.tokenizer import Tokenizer, TokenizerError, check_messages
from dsv2.train.core import Batch

OVERFLOW = ("drop", "truncate")  # what encode_conversations does with a conversation longer than seq_len + 1


def validate_messages(messages: object, where: str) -> list[dict[str, str]]:
    """`messages` checked to be a non-empty list of {"role": "system"|"user"|"assistant", "content": str} and
    copied with only those two keys; DataError starting with `where` (e.g. "chats.jsonl:3") otherwise."""
    try:
        checked = check_messages(messages)
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    if not checked:
        raise DataError(f"{where}: messages is empty")
    return checked


def read_conversations(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file, each with at least one assistant turn (see the module docstring for the
    formats). Blank lines are skipped; a line that is not JSON, not an object, in neither format, with a bad
    message or no assistant turn, and a file with no conversation, are DataErrors naming the file (and line)."""
    path = Path(path)
    conversations = []
    for number, row in jsonl_records(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: must be a JSON object, got {type(row).__name__}")
        if "messages" in row:
            messages = validate_messages(row["messages"], where)
        elif "prompt" in row and "completion" in row:
            for key in ("prompt", "completion"):
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: {key} must be a string, got {type(row[key]).__name__}")
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        else:
            raise DataError(f"{where}: neither {{\"messages\": [...]}} nor {{\"prompt\": ..., \"completion\": ...}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn, so nothing to train on")
        conversations.append(messages)
    if not conversations:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return conversations


@dataclass
class Example:
    """One tokenized conversation: `mask[i]` says whether token i is a target (a reply's token or its EOS)."""

    ids: list[int]
    mask: list[bool]


def encode_conversations(
    conversations: list[list[dict[str, str]]], tokenizer: Tokenizer, seq_len: int, overflow: str = "drop",
) -> tuple[list[Example], dict[str, int]]:
    """A conversation of n tokens trains on inputs ids[:-1] -> targets ids[1:], so it fits when n <= seq_len + 1.

    overflow="drop": longer ones are dropped; "truncate": cut to their first seq_len + 1 tokens (and dropped if no
    target token is left). Returns the examples and counts {"conversations", "kept", "truncated", "dropped",
    "target_tokens"} (truncated ones are among the kept). If nothing is left, DataError saying how many were
    dropped and what to change.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    examples, truncated, longest = [], 0, 0
    for messages in conversations:
        ids, mask = tokenizer.encode_chat(messages)
        longest = max(longest, len(ids))
        if len(ids) > seq_len + 1:
            if overflow == "drop":
                continue
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        if any(mask[1:]):  # the first token is never a target: nothing predicts it
            examples.append(Example(ids, mask))
    counts = {
        "conversations": len(conversations), "kept": len(examples), "truncated": truncated,
        "dropped": len(conversations) - len(examples), "target_tokens": sum(sum(e.mask[1:]) for e in examples),
    }
    if not examples:
        advice = ("raise --seq-len, or truncate them (overflow 'truncate')" if overflow == "drop"
                  else "raise --seq-len: truncated, none kept a reply token")
        raise DataError(
            f"all {len(conversations)} conversations were dropped (the longest has {longest} tokens; seq_len "
            f"{seq_len} fits {seq_len + 1}); {advice}"
        )
    return examples, counts


def split_validation(
    examples: list[Example], fraction: float = 0.05, seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded choice of ceil(fraction * n) examples for validation, at most n - 1 so at least
    one is left to train on; both keep the examples' order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    chosen = set(np.random.default_rng(seed).permutation(n)[: min(math.ceil(fraction * n), n - 1)].tolist())
    return [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen]


class ChatBatches:
    """Endless `Batch`es of examples, one a row, right-padded with `pad_id` to the batch's longest (at most
    `seq_len`, so short conversations cost no more than their length): a `DataSource`.

    Row r holds an example of n tokens as inputs ids[:-1], targets ids[1:], weights mask[1:] (1.0 on the reply
    tokens a position predicts) and token_mask True on those n - 1 positions; padding has target `pad_id`, weight
    0 and token_mask False. Like `shards.Batches`, the examples are consumed as one sequence, epoch 0's order then
    epoch 1's, each a permutation seeded by (seed, epoch) (or in place without `shuffle`), so a batch may straddle
    two epochs and the place in that sequence, (epoch, position), is the whole state.
    """

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        if not examples:
            raise ValueError("no examples to make batches of")
        for i, e in enumerate(examples):
            if not 2 <= len(e.ids) <= seq_len + 1 or len(e.mask) != len(e.ids):
                raise ValueError(f"examples[{i}]: {len(e.ids)} ids and {len(e.mask)} mask values; a row of seq_len "
                                 f"{seq_len} needs as many of each, from 2 to {seq_len + 1}")
        self.examples, self.seq_len, self.pad_id, self.seed, self.shuffle = examples, seq_len, pad_id, seed, shuffle
        self.epoch = self.position = 0
        self._order: tuple[int, list[int]] | None = None  # the current epoch's permutation, built once

    def order(self, epoch: int) -> list[int]:
        """The example numbers in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return list(range(len(self.examples)))
        if self._order is None or self._order[0] != epoch:
            # seeded by the pair, so runs with neighbouring seeds share no epoch order
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist())
        return self._order[1]

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        for _ in range(batch_size):
            rows.append(self.examples[self.order(self.epoch)[self.position]])
            self.position += 1
            if self.position == len(self.examples):
                self.epoch, self.position = self.epoch + 1, 0
        shape = (batch_size, max(len(e.ids) for e in rows) - 1)
        inputs, targets = torch.full(shape, self.pad_id, dtype=torch.long), torch.full(shape, self.pad_id)
        weights, token_mask = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
        for row, e in enumerate(rows):
            n = len(e.ids) - 1
            inputs[row, :n], targets[row, :n] = torch.tensor(e.ids[:-1]), torch.tensor(e.ids[1:])
            weights[row, :n], token_mask[row, :n] = torch.tensor(e.mask[1:], dtype=torch.float), True
        return Batch(inputs, targets, weights, token_mask)

    def state_dict(self) -> dict[str, Any]:
        """The place in the example sequence, and what must match for it to mean the same place (JSON-able)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in (("seed", self.seed), ("shuffle", self.shuffle), ("num_examples", len(self.examples))):
            if state.get(key) != value:
                raise DataError(f"SFT data state: {key} is {state.get(key)!r} but this source's is {value!r}, "
                                "so the saved place would point at other examples")
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)
                and 0 <= position < len(self.examples)):
            raise DataError(f"SFT data state: epoch {epoch!r}, position {position!r} out of range "
                            f"({len(self.examples)} examples)")
        self.epoch, self.position = epoch, position
