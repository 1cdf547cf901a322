"""Documents -> packed token shards, and the resumable batch loader over them.

A shard folder holds

    manifest.json         written last: format version, vocab size, dtype, the source, what was dropped
                          (skipped files, duplicates: `dedup`, null when off), and per split its shards
                          (file, token count, sha256) and document and token totals
    train_00000.bin ...   flat little-endian token ids, uint16 when the vocabulary fits (<= 65536 ids)
    val_00000.bin ...     and uint32 otherwise; no header, so numpy.memmap reads them in place

Each document becomes `BOS text EOS` (BOS from `Tokenizer.encode(add_bos=True)`, the one place that
decides it) and the documents of a split are concatenated without padding into one token stream, cut
into shards of exactly `shard_tokens` tokens (the last one shorter). A document may therefore straddle
two shards; `TokenShards.read` addresses the stream by global position and crosses the boundary back.

The validation split is chosen per document from a hash of its id (`is_validation`), so it depends
neither on the order the documents arrive in, nor on how many processes tokenize them, nor on the other
documents: adding files to a corpus never moves an existing document between splits.

`Batches` cuts a split into windows of seq_len + 1 tokens, one starting every seq_len tokens, so each
token after the first is a target exactly once per pass; or takes the windows it is given, e.g. those of
`document_windows` that lie inside one document each (long-context training and evaluation: a window that
spans several short documents has no long-range dependence to learn). It visits them in a seeded permutation per
epoch, and its whole state is its place in that sequence, (epoch, index), which a checkpoint saves.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from dsv2.atomic import write_bytes_atomic, write_text_atomic
from dsv2.data.corpus import Corpus, DataError, Document

if TYPE_CHECKING:  # writing needs `tokenizers` and `datasketch` (and scipy with it); reading shards does not
    from dsv2.data.dedup import Deduplicator
    from dsv2.tokenizer import Tokenizer

# The `dedup` field was added within version 1: it is optional, nothing reads it back, so manifests
# written before it load unchanged.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_TOKENS = 2**22  # 8 MiB of uint16 per file
DEFAULT_VAL_FRACTION = 0.02
SPLITS = ("train", "val")
# Explicitly little-endian, so a folder written on one machine reads the same on any other.
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SHARD_FILE = re.compile(r"^(train|val)_\d{5}\.bin$")


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype name in `DTYPES` that holds every id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Whether document `doc_id` belongs to the validation split: the first 8 bytes of sha256(id), read as
    a fraction of 2^64, fall below `val_fraction`. A hash rather than a seeded draw, so the answer depends
    on nothing but the id."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2**64


# ------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """One split's token stream -> `{split}_NNNNN.bin` files of exactly `shard_tokens` tokens (the last shorter)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []  # tokens not yet written, fewer than shard_tokens between calls
        self.num_pending = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = self.tokens = 0

    def add(self, ids: list[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.num_pending += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        while self.num_pending >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> None:
        if self.num_pending:
            self._write(self.num_pending)

    def _write(self, n: int) -> None:
        stream = np.concatenate(self.pending)
        data, rest = stream[:n].tobytes(), stream[n:]
        self.pending, self.num_pending = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        write_bytes_atomic(self.folder / name, data)  # a crash mid-write leaves a dot-file, never a short shard
        self.shards.append({"file": name, "tokens": n, "sha256": hashlib.sha256(data).hexdigest()})

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def build_shards(
    documents: Iterable[Document], tokenizer: Tokenizer, folder: str | os.PathLike, *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float = DEFAULT_VAL_FRACTION, source: str | None = None,
    max_documents: int | None = None, dedup: Deduplicator | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `documents` into train and val shards under `folder`; returns the manifest it wrote.

    Only the first `max_documents` documents are read (None: all). A `dedup` (a fresh `Deduplicator`) drops
    the duplicates among them before they are tokenized, and its counts go into the manifest's `dedup`
    field. `source` describes where the documents came from (default: a `Corpus`'s own description). A build
    replaces whatever an earlier one left in `folder`: the old manifest goes first, so a build that stops
    halfway leaves a folder that refuses to load rather than one mixing two builds, and shards the new
    manifest does not list are deleted once it is written.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS id, which packed documents need as their separator")
    if dedup is not None and dedup.documents_in:
        raise ValueError("dedup has already seen documents; give each build a fresh Deduplicator")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST_FILE
    manifest_path.unlink(missing_ok=True)

    vocab_size = tokenizer.hf.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    writers = {split: _ShardWriter(folder, split, DTYPES[dtype], shard_tokens) for split in SPLITS}
    stream = documents if max_documents is None else itertools.islice(documents, max_documents)
    if dedup is not None:
        stream = dedup.filter(stream)
    bar = tqdm(stream, desc="tokenizing", unit="doc", disable=not progress)
    for i, doc in enumerate(bar):
        ids = [*tokenizer.encode(doc.text, add_bos=True), tokenizer.eos_id]
        writers["val" if is_validation(doc.id, val_fraction) else "train"].add(ids)
        if progress and i % 128 == 0:
            dropped = "" if dedup is None else f", {len(dedup.duplicates)} duplicates dropped"
            bar.set_postfix_str(f"{sum(w.tokens for w in writers.values()):,} tokens{dropped}", refresh=False)
    bar.close()
    for w in writers.values():
        w.close()

    if source is None:
        source = documents.description if isinstance(documents, Corpus) else "unspecified"
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "skipped": dict(documents.skipped) if isinstance(documents, Corpus) else {},
        "dedup": None if dedup is None else dedup.summary(),
        "vocab_size": vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "documents": sum(w.documents for w in writers.values()),
        "tokens": sum(w.tokens for w in writers.values()),
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    listed = {s["file"] for w in writers.values() for s in w.shards}
    for stale in folder.iterdir():
        if _SHARD_FILE.match(stale.name) and stale.name not in listed:
            stale.unlink()
    return manifest


# ------------------------------------------------------------------------------------------- reading
def _field(obj: Any, key: str, kind: type, path: Path, where: str = "") -> Any:
    """`obj[key]`, checked to be a `kind`; errors name the manifest and the field's dotted path."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise DataError(f"{path}: field {where or '(top level)'} must be an object")
    if key not in obj:
        raise DataError(f"{path}: missing field {name}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{path}: field {name} must be {kind.__name__}, got {value!r:.80}")
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class TokenShards:
    """One split of a shard folder, memory-mapped: `num_tokens` tokens addressed by global position.

    Everything the manifest promises is checked on opening except the checksums, which cost a full read
    and are checked with `verify=True`; `vocab_size`, when given, must match the tokenizer's.
    """

    def __init__(
        self, folder: str | os.PathLike, split: str = "train", *, verify: bool = False, vocab_size: int | None = None,
    ):
        self.folder, self.split = Path(folder), split
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"{path}: missing; is {self.folder} a shard folder (dsv2.data.shards.build_shards)?")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        m = self.manifest
        version = _field(m, "format_version", int, path)
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: unknown format_version {version}; this dsv2 reads {FORMAT_VERSION}")
        self.vocab_size: int = _field(m, "vocab_size", int, path)
        dtype = _field(m, "dtype", str, path)
        if dtype not in DTYPES:
            raise DataError(f"{path}: field dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if dtype != token_dtype(self.vocab_size):
            need = token_dtype(self.vocab_size)
            raise DataError(f"{path}: field dtype is {dtype}, but vocab_size {self.vocab_size} is stored as {need}")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise DataError(f"{path}: field vocab_size is {self.vocab_size}, but the tokenizer has {vocab_size} ids")
        self.dtype = DTYPES[dtype]
        splits = _field(m, "splits", dict, path)
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} under field splits (it has {', '.join(map(repr, splits))})")
        where = f"splits.{split}"
        entries = _field(splits[split], "shards", list, path, where)
        self.num_documents: int = _field(splits[split], "documents", int, path, where)

        self._shards: list[np.memmap] = []
        self._starts = [0]  # global position of each shard's first token, then the total
        for i, entry in enumerate(entries):
            at = f"{where}.shards[{i}]"
            name = _field(entry, "file", str, path, at)
            tokens = _field(entry, "tokens", int, path, at)
            sha256 = _field(entry, "sha256", str, path, at)
            if Path(name).name != name or name.startswith("."):
                raise DataError(f"{path}: field {at}.file must be a file name in the folder, got {name!r}")
            if tokens < 1:  # never written; numpy cannot map an empty file
                raise DataError(f"{path}: field {at}.tokens must be >= 1, got {tokens}")
            shard = self.folder / name
            if not shard.is_file():
                raise DataError(f"{shard}: missing (listed in {path} as {at})")
            size, expected = shard.stat().st_size, tokens * self.dtype.itemsize
            if size != expected:
                raise DataError(
                    f"{shard}: {size} bytes, but {path} field {at}.tokens says {tokens} {dtype} tokens "
                    f"({expected} bytes)"
                )
            if verify and (actual := _sha256(shard)) != sha256:
                raise DataError(f"{shard}: sha256 is {actual}, but {path} field {at}.sha256 says {sha256}")
            self._shards.append(np.memmap(shard, dtype=self.dtype, mode="r", shape=(tokens,)))
            self._starts.append(self._starts[-1] + tokens)
        self.num_tokens = self._starts[-1]
        if (total := _field(splits[split], "tokens", int, path, where)) != self.num_tokens:
            raise DataError(f"{path}: field {where}.tokens is {total}, but its shards hold {self.num_tokens} tokens")

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        where = f"{str(self.folder)!r}, {self.split!r}"
        return f"TokenShards({where}): {self.num_tokens:,} tokens in {len(self._shards)} shards"

    def document_starts(self) -> np.ndarray:
        """The global position of every document's BOS token, ascending (a document straddling two shards
        counts once)."""
        bos = self.manifest.get("bos_id")
        if not isinstance(bos, int):
            raise DataError(f"{self.folder}: the manifest has no bos_id, so documents cannot be told apart")
        return np.concatenate([np.empty(0, dtype=np.int64), *(
            np.flatnonzero(np.asarray(shard) == bos) + start
            for shard, start in zip(self._shards, self._starts[:-1], strict=True))])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split: a read-only view into one shard, or a copy joining
        the pieces when the range crosses shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside the split's [0, {self.num_tokens})")
        shard = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while length > 0:
            offset = start - self._starts[shard]
            take = min(length, self._starts[shard + 1] - start)
            parts.append(self._shards[shard][offset : offset + take])
            start, length, shard = start + take, length - take, shard + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)


# ------------------------------------------------------------------------------------------- batches
def document_windows(shards: TokenShards, seq_len: int) -> np.ndarray:
    """Start positions of the windows of seq_len + 1 tokens that lie inside one document each: one every
    seq_len tokens from each document's BOS while the window fits before the next BOS (or the split's end).
    Raises `DataError` when no document is that long."""
    doc_starts = shards.document_starts()
    doc_ends = np.append(doc_starts[1:], shards.num_tokens)
    windows = [np.arange(s, e - seq_len, seq_len) for s, e in zip(doc_starts, doc_ends, strict=True)
               if e - s >= seq_len + 1]
    if not windows:
        longest = int((doc_ends - doc_starts).max(initial=0))
        raise DataError(f"{shards.folder}: split {shards.split!r} has no document of seq_len + 1 = {seq_len + 1} "
                        f"tokens (the longest has {longest}); long-context data needs long documents")
    return np.concatenate(windows)


class Batches:
    """Endless (inputs, targets) batches from one split: int64 tensors [batch_size, seq_len], the targets
    being the inputs shifted by one token.

    Window w holds tokens [w·seq_len, w·seq_len + seq_len + 1). The windows are consumed as one sequence:
    epoch 0's order, then epoch 1's, and so on; each batch takes the next `batch_size` of them, so every
    window is used exactly once per epoch, no batch is short, and a batch may straddle two epochs. With
    `shuffle` an epoch's order is a permutation seeded by (seed, epoch); without it the windows come in
    place, so a fresh `Batches(val, ..., shuffle=False)` gives the same validation batches every time
    (take the first k with itertools.islice).

    The place in that sequence, (epoch, index within the epoch), is the whole state: `state_dict()` after
    a batch, then `load_state_dict()` on a fresh loader, resumes at exactly the next batch. `position`
    starts that many windows in. `windows`: the windows' start positions instead (`document_windows`).
    `batch_size` may be changed between batches (a batch-size schedule)
    without skipping or repeating a window, since the place is counted in windows, not batches.
    """

    def __init__(
        self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0, position: int = 0, *,
        shuffle: bool = True, windows: np.ndarray | None = None,
    ):
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0),
                                 ("position", position, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.shards, self.batch_size, self.seq_len, self.seed, self.shuffle = shards, batch_size, seq_len, seed, shuffle
        self.starts = (np.arange((shards.num_tokens - 1) // seq_len) * seq_len if windows is None
                       else np.asarray(windows, dtype=np.int64))
        self.num_windows = len(self.starts)
        if self.num_windows < 1:
            raise DataError(
                f"{shards.folder}: split {shards.split!r} has {shards.num_tokens} tokens, fewer than one window "
                f"of seq_len + 1 = {seq_len + 1}"
            )
        self.epoch, self.index = divmod(position, self.num_windows)
        self._order: tuple[int, np.ndarray] | None = None  # the current epoch's permutation, built once

    @property
    def position(self) -> int:
        """Windows consumed so far."""
        return self.epoch * self.num_windows + self.index

    def order(self, epoch: int) -> np.ndarray:
        """The window numbers in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        if self._order is None or self._order[0] != epoch:
            # (seed, epoch) seeds the generator as a pair, so runs with neighbouring seeds share no epoch
            # order (seed + epoch would give run s+1 the second epoch of run s).
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._order[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in rows:
            window = int(self.order(self.epoch)[self.index])
            row[:] = self.shards.read(int(self.starts[window]), self.seq_len + 1)
            self.index += 1
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
        x = torch.from_numpy(rows)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """The place in the window sequence, and what must match for it to mean the same place (JSON-able)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "num_windows", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state: {key} is {state.get(key)!r} but this loader's is {getattr(self, key)!r}, "
                    "so the saved place would point at different windows"
                )
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(index, int) and 0 <= index < self.num_windows):
            raise DataError(f"loader state: epoch {epoch!r}, index {index!r} out of range ({self.num_windows} windows)")
        self.epoch, self.index = epoch, index
