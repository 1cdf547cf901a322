"""The cache's blocks: who holds each one, and (prefix caching) which token content each full block holds.

Plain Python, no torch. A block is free, held by one or more sequences (a reference count), or evictable:
held by none but still holding the latents of a known run of tokens, kept for whoever asks for that run next.

Prefix caching keys a full block by its content: `(parent, tokens)`, the id of the content of the block
before it (`ROOT` for the first) and the block's own `block_size` token ids. A block's latents depend on
every token before it, and the chain of parents says exactly which, so two blocks with equal keys hold equal
latents. Keys are compared whole (no hash stands for them), so a collision cannot hand out a wrong block.
Each key gets a content id, never reused, which its children's keys name.

A key is *pending* from the moment a sequence's block is given content it will compute until the sequence
has computed it, and *ready* after; only ready blocks are shared, and a shared block is never written again
(only positions past a sequence's cached prefix are). A ready block nobody holds is evictable; `allocate`
takes plainly free blocks first, then evicts the least recently used evictable ones. A pending block whose
sequence lets go of it (finished, aborted, preempted) forgets its key: its latents were never completed.
"""

from __future__ import annotations

from collections import OrderedDict, deque

ROOT = -1  # the parent of a sequence's first block
STALE = -2  # the parent of blocks whose sequence started before `forget_all`: no lookup ever reaches them
Key = tuple[int, tuple[int, ...]]


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))  # no content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 with ready content, least recent first
        self._refs = [0] * num_blocks
        self._key: dict[int, Key] = {}  # block -> its key (pending or ready)
        self._ready: set[int] = set()
        self._ids: dict[Key, int] = {}  # key -> content id
        self._holder: dict[int, int] = {}  # content id -> the block holding it
        self._next_id = 0
        self.hit_tokens = self.queried_tokens = 0  # prefix-cache totals (`match`)

    # -------------------------------------------------------------------------------------- holding
    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given now: free or evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks holding ready content, held or evictable."""
        return len(self._ready)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def is_shared_content(self, block: int) -> bool:
        """Whether others may read this block's latents: it holds ready content."""
        return block in self._ready

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} cache blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        """Let go of a sequence's blocks. Last first: a prefix becomes more recently used than what followed
        it, so it is evicted after its continuations (it is the part others are likelier to share)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._ready:
                self._evictable[block] = None
            else:
                self._forget(block)
                self._free.append(block)

    # --------------------------------------------------------------------------------------- content
    def content_id(self, parent: int, tokens: tuple[int, ...]) -> int:
        """The id of the content (parent, tokens), assigned on first use."""
        key = (parent, tokens)
        cid = self._ids.get(key)
        if cid is None:
            cid = self._ids[key] = self._next_id
            self._next_id += 1
        return cid

    def lookup(self, parent: int, tokens: tuple[int, ...]) -> tuple[int, int, bool] | None:
        """(content id, block, ready) of the block holding this content, if any does."""
        cid = self._ids.get((parent, tokens))
        block = None if cid is None else self._holder.get(cid)
        return None if block is None else (cid, block, block in self._ready)

    def share(self, block: int) -> None:
        """Hold a ready block one more time (taking it back from the evictable ones)."""
        assert block in self._ready, "only computed blocks are shared"
        self._evictable.pop(block, None)
        self._refs[block] += 1

    def claim(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """`block` (held by its one sequence) is to hold this content: pending, unless another block holds
        it already (computed twice, by sequences that did not know of each other). The content id."""
        cid = self.content_id(parent, tokens)
        if cid not in self._holder and block not in self._key:
            self._holder[cid] = block
            self._key[block] = (parent, tokens)
        return cid

    def computed(self, block: int) -> None:
        """The block's latents are all written: its content, if it claimed one, is ready to share."""
        if block in self._key:
            self._ready.add(block)

    def match(self, tokens: list[int], block_size: int, limit: int) -> tuple[list[int], list[int], bool]:
        """The longest run of ready blocks holding `tokens`' first full blocks, at most `limit` of them:
        (their blocks, their content ids, whether the next block is pending in another sequence, so that
        waiting for it beats computing it again). Counts the tokens asked for and found."""
        blocks, ids, parent = [], [], ROOT
        pending = False
        for i in range(limit):
            found = self.lookup(parent, tuple(tokens[i * block_size : (i + 1) * block_size]))
            if found is None:
                break
            cid, block, ready = found
            if not ready:
                pending = True
                break
            blocks.append(block)
            ids.append(cid)
            parent = cid
        return blocks, ids, pending

    def count(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def forget_all(self) -> None:
        """Drop every content (the weights changed): held blocks stay held, evictable ones become free."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._key.clear()
        self._ready.clear()
        self._ids.clear()
        self._holder.clear()

    def _forget(self, block: int) -> None:
        key = self._key.pop(block, None)
        self._ready.discard(block)
        if key is not None:
            cid = self._ids.pop(key)
            del self._holder[cid]
