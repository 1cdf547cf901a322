"""Exact and near-duplicate documents, dropped before tokenising; the first occurrence in corpus order is kept.

    dedup = Deduplicator(near_duplicate_threshold=0.8)
    kept = list(dedup.filter(documents))          # dedup.summary() -> the counts for the shard manifest

A document is an **exact duplicate** of an earlier one when their texts are equal once whitespace is
normalised (runs of whitespace -> one space, ends stripped): the key is the sha256 of that string, so
re-indented or re-wrapped copies count as the same text.

A document is a **near duplicate** when its estimated Jaccard similarity to a document kept earlier is at
least `near_duplicate_threshold`. The sets compared are the document's distinct word 5-grams (shingles):
words rather than characters because both the prose and the code in these corpora are made of words, a
word shingle carries more text per hash (the 12 MB default corpus has ~1.2M distinct word 5-grams; its
character 5-grams would be roughly one per byte), and a changed word costs at most 5 shingles, so "a few
words changed" stays close to J = 1. Five words is a common choice in web-text deduplication: long enough
that stock phrases do not make unrelated documents similar, short enough that edits leave most shingles
intact. A document of 5 words or fewer is one shingle, its whole text.

The similarity is estimated by MinHash and candidates are found by LSH (banding), both from `datasketch`:
256 permutations from a fixed seed under datasketch's explicit "affine32" scheme, so the signatures are the
same on every run and machine. LSH only proposes candidates; a candidate counts only if the MinHash
estimate of its Jaccard similarity reaches the threshold (σ ≈ 0.025 at J = 0.8 with 256 permutations), and
of several the earliest kept document is named. The banding is tuned for recall (`LSH_WEIGHTS`) because
false candidates are filtered out by that check. On the default corpus (the standard library, whose
near-duplicates are codec tables with J between 0.75 and 0.98), checked against exact Jaccard, 128
permutations with even weights misjudged 4 documents and this setting 1, for ~0.7 s more. Only kept
documents enter the index, so a chain A ~ B ~ C where C is not near A keeps A and C.

Shingles are hashed with zlib's crc32 instead of datasketch's default sha1: it is a fixed standard
(deterministic everywhere) and hashes ~2x faster, and its weakness as a hash (it is linear) is hidden by
the scheme's MurmurHash3 finaliser, which mixes every input hash before the permutations.

The index lives in memory (a few KB per kept document), which suits corpora of thousands to tens of
thousands of documents.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsv2.data.corpus import Document

if TYPE_CHECKING:  # imported when a Deduplicator is made: datasketch brings scipy, ~1 s that `dsv2 info` need not pay
    from datasketch import MinHash

EXACT, NEAR = "exact", "near"  # Duplicate.kind
DEFAULT_THRESHOLD = 0.8
NUM_PERM = 256
SHINGLE_WORDS = 5
SEED = 1
# LSH banding that weighs a missed pair 4x a false candidate: candidates are checked against the threshold
# anyway, so extra ones cost a comparison, while a missed one is a duplicate kept.
LSH_WEIGHTS = (0.2, 0.8)
SCHEME = "affine32"  # named explicitly: datasketch 2.0 changed its default scheme once already


@dataclass(frozen=True)
class Duplicate:
    id: str  # the dropped document
    kind: str  # EXACT or NEAR
    of: str  # the earlier document it duplicates: a kept one, or for an exact copy maybe a dropped near duplicate


def shingles(words: list[str], n: int = SHINGLE_WORDS) -> set[bytes]:
    """The distinct word n-grams of a document (its whole text when it has fewer than n words), as bytes."""
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")} if words else set()
    # the i-th list starts i words in; zip stops at the shortest, so the last gram ends at the last word
    return {" ".join(gram).encode("utf-8") for gram in zip(*(words[i:] for i in range(n)), strict=False)}


class Deduplicator:
    """Streaming duplicate filter over one sequence of documents, in order; see the module docstring.

    `duplicates` lists what was dropped, `summary()` gives the counts the shard manifest records. One
    instance filters one corpus: its index remembers every document it has kept.
    """

    def __init__(
        self, near_duplicate_threshold: float = DEFAULT_THRESHOLD, *, num_perm: int = NUM_PERM,
        shingle_words: int = SHINGLE_WORDS, seed: int = SEED,
    ):
        if isinstance(near_duplicate_threshold, bool) or not 0 < near_duplicate_threshold < 1:
            raise ValueError(f"near_duplicate_threshold must be in (0, 1), got {near_duplicate_threshold!r}")
        if num_perm < 2 or shingle_words < 1:
            raise ValueError(f"num_perm must be >= 2 and shingle_words >= 1, got {num_perm} and {shingle_words}")
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm, self.shingle_words, self.seed = (
            float(near_duplicate_threshold), num_perm, shingle_words, seed)
        try:
            self._lsh = MinHashLSH(threshold=self.threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        except ValueError as e:  # too close to 1: the best banding would be a single band
            raise ValueError(f"near_duplicate_threshold {self.threshold} is too high for LSH with {num_perm} "
                             f"permutations ({e}); 0.99 is the most 256 allow") from None
        # Drawing the permutations costs more than hashing a short document; draw them once and share them.
        self._permutations = MinHash(num_perm, seed=seed, scheme=SCHEME).permutations
        self._exact: dict[bytes, str] = {}  # sha256 of the normalised text -> id of the kept document
        self._kept: list[tuple[str, MinHash]] = []  # LSH key i -> (document id, signature)
        self.documents_in = 0
        self.duplicates: list[Duplicate] = []

    @property
    def exact_duplicates(self) -> int:
        return sum(d.kind == EXACT for d in self.duplicates)

    @property
    def near_duplicates(self) -> int:
        return sum(d.kind == NEAR for d in self.duplicates)

    @property
    def method(self) -> str:
        return (f"exact: sha256 of whitespace-normalised text; near: datasketch MinHash LSH over word "
                f"{self.shingle_words}-grams ({self.num_perm} permutations, seed {self.seed}, {SCHEME}, crc32)")

    def check(self, doc: Document) -> Duplicate | None:
        """Whether `doc` duplicates a document kept earlier (and what it is then); a new one is kept."""
        self.documents_in += 1
        words = doc.text.split()
        key = hashlib.sha256(" ".join(words).encode("utf-8")).digest()
        if (first := self._exact.get(key)) is not None:
            return self._drop(Duplicate(doc.id, EXACT, first))
        self._exact[key] = doc.id
        grams = shingles(words, self.shingle_words)
        if not grams:  # no words at all: only an exact copy can duplicate it
            return None
        signature = self._signature(grams)
        similar = [i for i in self._lsh.query(signature) if self._kept[i][1].jaccard(signature) >= self.threshold]
        if similar:
            return self._drop(Duplicate(doc.id, NEAR, self._kept[min(similar)][0]))  # min: the earliest kept
        self._lsh.insert(len(self._kept), signature)
        self._kept.append((doc.id, signature))
        return None

    def _signature(self, grams: set[bytes]) -> MinHash:
        from datasketch import MinHash  # loaded by __init__ already, so this is a lookup

        signature = MinHash(self.num_perm, seed=self.seed, scheme=SCHEME, permutations=self._permutations,
                            hashfunc=zlib.crc32)
        signature.update_batch(grams)
        return signature

    def _drop(self, duplicate: Duplicate) -> Duplicate:
        self.duplicates.append(duplicate)
        return duplicate

    def filter(self, documents: Iterable[Document]) -> Iterator[Document]:
        """The documents of `documents` that duplicate none before them, in order."""
        for doc in documents:
            if self.check(doc) is None:
                yield doc

    def summary(self) -> dict[str, Any]:
        """The counts, threshold and method, as the shard manifest's `dedup` field records them."""
        return {
            "documents_in": self.documents_in,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "near_duplicate_threshold": self.threshold,
            "method": self.method,
        }
