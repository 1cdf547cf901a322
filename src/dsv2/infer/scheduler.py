"""Continuous batching over a paged cache: which sequences run this step, on which cache blocks.

Plain Python, no torch: the scheduler decides, the engine computes. Each step it returns

    decode   sequences whose every token but the last is cached: one new token each, batched together
    prefill  (sequence, n) pairs: the next n uncached tokens of a sequence still being prefilled

Policy, in order:
1. Every running sequence in decode gets one more cache slot. When the pool has no free block for it,
   the most recently admitted running sequence is preempted (recompute): its blocks go back to the free
   list and it returns to the front of the queue with its generated tokens kept as prompt, so it resumes
   where it stopped, from a fresh prefill. A running sequence part-way through prefill that lacks blocks
   for its next chunk preempts the same way (the newest, never itself). The oldest sequences therefore
   always make progress.
2. Prefill runs in chunks of at most `prefill_chunk` tokens, cut at fixed offsets of each sequence
   (0, chunk, 2·chunk, ...), so a sequence computes the same chunks whoever it shares the step with
   (batch invariance). Whole chunks run per step within a token budget: `max_prefill_tokens` while
   nobody decodes, but only `prefill_chunk` tokens while anyone does, so a step that decodes costs at
   most one chunk's prefill more than a decode step (this bounds the inter-token latency's tail), and a
   long prompt is spread over several steps while the decoders keep going.
   Sequences part-way through prefill go first, then waiting ones are admitted first come, first
   served, while a running slot (`max_running`) and blocks for their first chunk are free.

Cancellation (`abort`) and completion (`finish`) give a sequence's blocks back at once.

Prefix caching (`prefix_caching=True`; `infer/block_pool.py` keeps the blocks' contents): every full block
a sequence computes is published under its token content, and a sequence being admitted starts from the
longest run of published blocks holding its first tokens (shared, reference counted), so its prefill starts
after them; at least its last token is always computed, for the logits of the next one. When the next block
it needs is still being computed by a running sequence (the n samples of one request, a burst sharing a
system prompt), the queue waits for it instead of computing it twice. Blocks nobody holds keep their
content until they are needed (least recently used first), so a finished request's prompt serves the next
one, and a preempted sequence recomputes only what was evicted meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv2.infer.block_pool import ROOT, STALE, BlockPool


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
    reuse_prefix: bool = True  # may start from cached blocks (not when every prompt position's logits are needed)
    chain: list[int] = field(default_factory=list)  # content ids of its full blocks published so far

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
        max_prefill_tokens: int = 1024, prefix_caching: bool = False,
    ):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("max_running", max_running),
                            ("prefill_chunk", prefill_chunk), ("max_prefill_tokens", max_prefill_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.block_size = block_size
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max(max_prefill_tokens, prefill_chunk)
        self.prefix_caching = prefix_caching
        self.allocator = BlockPool(num_blocks)
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
        self._release(seq)

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
            if self.prefix_caching:
                self._publish(seq)  # claimed now, so that others wait for these blocks rather than recompute them
        return True

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks, seq.chain, seq.num_computed = [], [], 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
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
        for seq in list(self.running):
            n = self._chunk(seq)
            if seq not in self.running or seq.in_decode or n > budget:
                continue
            # as in decode, a sequence short of blocks takes them from newer ones: two sequences part-way
            # through prefill on a full pool would otherwise wait for each other forever
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                if victim is seq:
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim in decode:
                    decode.remove(victim)
            else:
                prefill.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]  # first come, first served: nobody overtakes the head of the queue
            if not self._start_from_cached_prefix(seq):
                break
            n = self._chunk(seq)
            if n > budget or not self._grow(seq, seq.num_computed + n):
                self._release(seq)
                break
            if self.prefix_caching:
                self.allocator.count(len(seq.tokens), seq.num_computed)
            self.running.append(self.waiting.popleft())
            prefill.append((seq, n))
            budget -= n
        return StepPlan(decode, prefill, preempted)

    def _start_from_cached_prefix(self, seq: Sequence) -> bool:
        """Give a sequence being admitted the cached blocks of its prefix; False: wait, the next block it
        needs is being computed by a running sequence."""
        if not self.prefix_caching or not seq.reuse_prefix:
            return True
        limit = (len(seq.tokens) - 1) // self.block_size  # the last token is always computed
        blocks, ids, pending = self.allocator.match(seq.tokens, self.block_size, limit)
        if pending:
            return False
        for block in blocks:
            self.allocator.share(block)
        seq.blocks, seq.chain, seq.num_computed = blocks, ids, len(blocks) * self.block_size
        return True

    def computed(self, seq: Sequence, n: int) -> None:
        """The engine ran n more tokens of `seq` through the model: the blocks it filled can be shared."""
        before = seq.num_computed // self.block_size
        seq.num_computed += n
        if not self.prefix_caching:
            return
        self._publish(seq)
        for i in range(before, seq.num_computed // self.block_size):
            self.allocator.computed(seq.blocks[i])

    def forget_prefixes(self) -> None:
        """The model's weights changed: no cached block may be reused, nor anything running sequences computed
        before (their further blocks are published under a parent no lookup reaches)."""
        self.allocator.forget_all()
        for seq in self.running:
            seq.chain = [STALE] * len(seq.blocks)

    def _publish(self, seq: Sequence) -> None:
        """Claim the content of every block of `seq` whose tokens are all known (pending until computed)."""
        full = min(len(seq.blocks), len(seq.tokens) // self.block_size)
        for i in range(len(seq.chain), full):
            parent = seq.chain[-1] if seq.chain else ROOT
            tokens = tuple(seq.tokens[i * self.block_size : (i + 1) * self.block_size])
            seq.chain.append(self.allocator.claim(seq.blocks[i], parent, tokens))
