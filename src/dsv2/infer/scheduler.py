"""Continuous batching over a paged cache: which sequences run this step, on which cache blocks.

Plain Python, no torch: the scheduler decides, the engine computes. Each step it returns

    decode   sequences whose every token but the last is cached: one new token each, batched together
    prefill  (sequence, n) pairs: the next n uncached tokens of a sequence still being prefilled

Policy, in order:
1. Every running sequence in decode gets one more cache slot. When the pool has no free block for it,
   the most recently admitted running sequence is preempted (recompute): its blocks go back to the free
   list and it returns to the front of the queue with its generated tokens kept as prompt, so it resumes
   where it stopped, from a fresh prefill. The oldest sequences therefore always make progress.
2. Prefill runs in chunks of at most `prefill_chunk` tokens, cut at fixed offsets of each sequence
   (0, chunk, 2·chunk, ...), so a sequence computes the same chunks whoever it shares the step with
   (batch invariance). Whole chunks run per step within a token budget: `max_prefill_tokens` while
   nobody decodes, but only `prefill_chunk` tokens while anyone does, so a step that decodes costs at
   most one chunk's prefill more than a decode step (this bounds the inter-token latency's tail), and a
   long prompt is spread over several steps while the decoders keep going.
   Sequences part-way through prefill go first, then waiting ones are admitted first come, first
   served, while a running slot (`max_running`) and blocks for their first chunk are free.

Cancellation (`abort`) and completion (`finish`) give a sequence's blocks back at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class BlockAllocator:
    """A free list of cache block ids."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} cache blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


@dataclass(eq=False)
class Sequence:
    """One request's tokens and cache blocks. `tokens` = prompt + generated; the first `num_computed`
    of them have their latents in the cache (at the positions the blocks cover, in order)."""

    request_id: str
    tokens: list[int]
    prompt_len: int
    max_tokens: int
    arrival: int = 0
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    preemptions: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def in_decode(self) -> bool:
        return self.num_computed == len(self.tokens) - 1


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(
        self, num_blocks: int, block_size: int, max_running: int = 32, prefill_chunk: int = 256,
        max_prefill_tokens: int = 1024,
    ):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("max_running", max_running),
                            ("prefill_chunk", prefill_chunk), ("max_prefill_tokens", max_prefill_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.block_size = block_size
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max(max_prefill_tokens, prefill_chunk)
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._arrivals = 0

    # ------------------------------------------------------------------------------------ membership
    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def check_fits(self, seq: Sequence, what: str | None = None) -> None:
        """Refuse a sequence that could never fit the whole pool, rather than deadlock on it later."""
        need = self.blocks_needed(len(seq.tokens) + seq.max_tokens - seq.num_generated - 1)  # at its longest
        if need > self.allocator.num_blocks:
            raise ValueError(
                f"{what or 'request ' + seq.request_id}: {seq.prompt_len} prompt + {seq.max_tokens} new tokens need "
                f"{need} cache blocks; the cache has {self.allocator.num_blocks} ({self.capacity_tokens()} tokens), "
                "and no request can use more than the whole cache"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        seq.arrival, self._arrivals = self._arrivals, self._arrivals + 1
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (or cancelled): its blocks are free for others at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []

    def abort(self, request_id: str) -> Sequence | None:
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------------------------ scheduling
    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        """Give `seq` blocks for `n_tokens` cached tokens in all, if the pool has them."""
        extra = self.blocks_needed(n_tokens) - len(seq.blocks)
        if extra > self.allocator.num_free:
            return False
        if extra > 0:
            seq.blocks += self.allocator.allocate(extra)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_computed = [], 0
        seq.preemptions += 1
        # back in arrival order, ahead of anyone who came later
        at = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(at, seq)

    def _chunk(self, seq: Sequence) -> int:
        """Tokens of `seq`'s next prefill chunk: up to its next multiple of `prefill_chunk`."""
        to_boundary = self.prefill_chunk - seq.num_computed % self.prefill_chunk
        return min(len(seq.tokens) - seq.num_computed, to_boundary)

    def schedule(self) -> StepPlan:
        decode: list[Sequence] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running or not seq.in_decode:
                continue
            while not self._grow(seq, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                decode.append(seq)

        # a chunk runs whole or waits for the next step (never cut by the budget), so chunk boundaries
        # never depend on the other requests; the budget is at least one chunk, so someone always runs
        prefill: list[tuple[Sequence, int]] = []
        budget = self.prefill_chunk if decode else self.max_prefill_tokens
        for seq in self.running:
            n = self._chunk(seq)
            if not seq.in_decode and n <= budget and self._grow(seq, seq.num_computed + n):
                prefill.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            n = self._chunk(seq)
            if n > budget or not self._grow(seq, n):
                break  # first come, first served: nobody overtakes the head of the queue
            self.running.append(self.waiting.popleft())
            prefill.append((seq, n))
            budget -= n
        return StepPlan(decode, prefill, preempted)

    def computed(self, seq: Sequence, n: int) -> None:
        """The engine ran n more tokens of `seq` through the model."""
        seq.num_computed += n
