"""Needle-in-a-haystack prompts and synthetic pass-key documents (DeepSeek-V2 paper §3.1.4, Figure 4).

A needle is a sentence holding a random 5-digit pass key; it is placed at a token depth of a haystack of
real text (the validation split's documents), and the prompt ends by asking for the key:

    [BOS] haystack[:at]  NEEDLE  haystack[at:room]  QUESTION  ->  ANSWER

`room` is the haystack tokens that fit `length` prompt tokens beside BOS, needle and question, and
`at = round(depth · room)`: depth 0 puts the needle right after BOS, depth 1 right before the question.
Each piece is tokenized on its own, so the needle is the same ids wherever it lands. A pass-key document for
training is the same prompt followed by its answer, at a random depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dsv2.data.shards import TokenShards
from dsv2.tokenizer import Tokenizer

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class NeedlePrompt:
    prompt: list[int]  # exactly the requested length
    answer: list[int]  # the key's tokens, which a model that found the needle continues with
    needle_at: int  # index in `prompt` of the needle's first token
    needle_len: int


def random_key(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10_000, 100_000)))


def needle_prompt(tokenizer: Tokenizer, haystack: Sequence[int], length: int, depth: float, key: str) -> NeedlePrompt:
    """A prompt of `length` tokens with the needle for `key` at `depth` of its haystack (the module docstring).
    `haystack`: text token ids (no BOS / EOS), at least as many as fit."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth: must be in [0, 1], got {depth!r}")
    needle = tokenizer.encode(NEEDLE.format(key=key), add_bos=False)
    question = tokenizer.encode(QUESTION, add_bos=False)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    room = length - len(bos) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"length: {length} tokens do not hold the needle and question ({length - room} tokens)")
    if len(haystack) < room:
        raise ValueError(f"haystack: {len(haystack)} tokens, but a {length}-token prompt needs {room}")
    at = round(depth * room)
    prompt = [*bos, *haystack[:at], *needle, *haystack[at:room], *question]
    return NeedlePrompt(prompt, tokenizer.encode(ANSWER.format(key=key), add_bos=False), len(bos) + at, len(needle))


def text_only(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
    """`ids` without BOS and EOS: a haystack is text, not documents (a BOS mid-prompt restarts the context)."""
    special = {tokenizer.bos_id, tokenizer.eos_id} - {None}
    return [int(t) for t in ids if t not in special]


def passkey_document(tokenizer: Tokenizer, window: Sequence[int], length: int, rng: np.random.Generator) -> list[int]:
    """A training document of exactly `length` tokens: a needle prompt over `window`'s text at a random depth
    with a random key, then the key."""
    key = random_key(rng)
    answer_len = len(tokenizer.encode(ANSWER.format(key=key), add_bos=False))
    p = needle_prompt(tokenizer, text_only(tokenizer, window), length - answer_len, float(rng.random()), key)
    return [*p.prompt, *p.answer]


def haystack(shards: TokenShards, tokenizer: Tokenizer, n: int) -> list[int]:
    """The first `n` text tokens of a split's documents, in order, without their BOS / EOS."""
    ids: list[int] = []
    start = 0
    while len(ids) < n and start < shards.num_tokens:
        take = min(max(2 * (n - len(ids)), 1024), shards.num_tokens - start)
        ids += text_only(tokenizer, shards.read(start, take).tolist())
        start += take
    if len(ids) < n:
        raise ValueError(f"{shards.folder}: split {shards.split!r} has {len(ids)} text tokens, fewer than the "
                         f"{n} a haystack needs")
    return ids[:n]
