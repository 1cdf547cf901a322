"""A run folder's training data: a text source -> `tokenizer.json` (byte-level BPE) and `data/` (token shards).

    tokenizer, train, val = prepare_run_data("runs/nano", None, resolve_config("nano"))

What `dsv2 data` runs, and `dsv2 train` before its first step. Once per run folder: an existing
`tokenizer.json` is reused, and so is `data/` when it has a manifest; when the tokenizer has to be trained,
`data/` is rebuilt too, since shards are the ids of one tokenizer. The BPE learns from the first
`tokenizer_documents` documents as the source gives them; the shards hold the first `max_documents`, less
their exact and near duplicates (`dedup`; the counts are in the manifest).

Nothing half-made is ever left behind. The source is checked before anything is written (it must give at
least one document; the errors name the folder or file and say what was expected); then the tokenizer and
shards are built in a hidden staging folder inside the run folder and renamed into place only once they
are complete and checked (the BPE learned the whole vocabulary, the train split is not empty). If any of
that fails, the staging folder is removed, and so is the run folder if this call created it, so a failed
call leaves the run folder as it found it.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from dsv2.atomic import atomic_path, fsync_dir
from dsv2.config import ModelConfig
from dsv2.data.corpus import Corpus, DataError
from dsv2.data.dedup import DEFAULT_THRESHOLD, Deduplicator
from dsv2.data.shards import MANIFEST_FILE, TokenShards, build_shards
from dsv2.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]  # ids 0 and 1, as the presets expect
DATA_DIR = "data"
STAGING_DIR = ".prepare.tmp"  # hidden, so no corpus listing of the run folder picks it up
DEFAULT_MAX_DOCUMENTS = 3000
DEFAULT_TOKENIZER_DOCUMENTS = 1000


def prepare_run_data(
    run_dir: str | os.PathLike, source: str | os.PathLike | None, config: ModelConfig, *,
    max_documents: int | None = DEFAULT_MAX_DOCUMENTS, tokenizer_documents: int = DEFAULT_TOKENIZER_DOCUMENTS,
    dedup: bool = True, near_duplicate_threshold: float = DEFAULT_THRESHOLD, progress: bool = True,
    tokenizer_from: str | os.PathLike | None = None,
) -> tuple[Tokenizer, TokenShards, TokenShards]:
    """The run folder's tokenizer and its train and validation shards, built from `source` (a folder, a
    .jsonl file, or None for the Python standard library) when the folder does not hold them yet.

    `config` gives the vocabulary size and the BOS/EOS ids. `max_documents` (None: all) and `dedup` /
    `near_duplicate_threshold` apply when `data/` is built, `tokenizer_documents` when the tokenizer is.
    `tokenizer_from`: a model folder whose `tokenizer.json` the run takes instead of training one (a stage that
    continues a trained model must keep its ids).
    Raises `DataError` (or `ValueError` for a bad option) with nothing written; see the module docstring.
    """
    run_dir = Path(run_dir)
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 (or None for all), got {max_documents}")
    if tokenizer_documents < 1:
        raise ValueError(f"tokenizer_documents must be >= 1, got {tokenizer_documents}")
    train_tokenizer = not (run_dir / TOKENIZER_FILE).is_file()
    if train_tokenizer or not (run_dir / DATA_DIR / MANIFEST_FILE).is_file():
        deduplicator = Deduplicator(near_duplicate_threshold) if dedup else None  # checks the threshold
        given = None if tokenizer_from is None else Path(tokenizer_from) / TOKENIZER_FILE
        _build(run_dir, Corpus(source), config, train_tokenizer, max_documents=max_documents,
               tokenizer_documents=tokenizer_documents, dedup=deduplicator, progress=progress, given=given)
    tokenizer = Tokenizer.from_folder(run_dir, config)
    train = TokenShards(run_dir / DATA_DIR, "train", vocab_size=config.vocab_size)
    val = TokenShards(run_dir / DATA_DIR, "val", vocab_size=config.vocab_size)
    return tokenizer, train, val


def _build(
    run_dir: Path, corpus: Corpus, config: ModelConfig, train_tokenizer: bool, *, max_documents: int | None,
    tokenizer_documents: int, dedup: Deduplicator | None, progress: bool, given: Path | None = None,
) -> None:
    """Check the source, then build the tokenizer (if `train_tokenizer`) and data/ in the staging folder and
    move them into `run_dir`; on failure remove what this call created."""
    documents = iter(corpus)
    first = next(documents, None)  # reading on to the first document is enough to know the source gives some
    documents.close()  # a generator: closes the JSONL file now rather than at garbage collection
    if first is None:
        raise _no_documents(corpus)
    if train_tokenizer and given is not None:
        hf = HFTokenizer.from_file(str(given))
        if (ids := hf.get_vocab_size(with_added_tokens=True)) != config.vocab_size:
            raise DataError(f"{given}: {ids} ids, but the model's vocab_size is {config.vocab_size}")
    elif train_tokenizer:  # trained in memory, so a source too small for the vocabulary fails before any write
        texts = [d.text for d in itertools.islice(corpus, tokenizer_documents)]
        hf = train_bpe(texts, vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS)
        if (learned := hf.get_vocab_size(with_added_tokens=True)) != config.vocab_size:
            raise DataError(
                f"{corpus.description}: the BPE learned {learned} tokens from {_count(len(texts), 'document')}, "
                f"but the model's vocab_size is {config.vocab_size}; the source needs more (or more varied) text"
            )
    else:
        tokenizer = Tokenizer.from_folder(run_dir, config)
        if (ids := tokenizer.hf.get_vocab_size(with_added_tokens=True)) != config.vocab_size:
            raise DataError(
                f"{run_dir / TOKENIZER_FILE}: {ids} ids, but the model's vocab_size is {config.vocab_size}; "
                "this run folder was prepared for another model"
            )

    created = _first_missing(run_dir)  # the folder (or ancestor) this call creates, removed again on failure
    staging = run_dir / STAGING_DIR
    try:
        if staging.exists():  # left by a call that was killed
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        if train_tokenizer:
            with atomic_path(staging / TOKENIZER_FILE) as tmp:
                hf.save(str(tmp))
            tokenizer = Tokenizer.from_folder(staging, config)
        manifest = build_shards(corpus, tokenizer, staging / DATA_DIR, max_documents=max_documents, dedup=dedup,
                                progress=progress)
        if manifest["splits"]["train"]["documents"] == 0:
            raise DataError(f"{corpus.description}: {_kept(manifest)}, and none of them is in the train split")

        # Into place: data first, the tokenizer last, so a crash in between leaves data without a tokenizer,
        # which the next call rebuilds whole (never a tokenizer next to another tokenizer's shards).
        data_dir = run_dir / DATA_DIR
        if data_dir.exists():  # incomplete (no manifest), or made by the tokenizer being replaced
            os.replace(data_dir, staging / "replaced")
        os.replace(staging / DATA_DIR, data_dir)
        if train_tokenizer:
            os.replace(staging / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
        fsync_dir(run_dir)
        shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(created or staging, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its ancestors that does not exist yet (None if `path` exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _no_documents(corpus: Corpus) -> DataError:
    """The error for a source that gives no document: what it holds, and what it was expected to hold."""
    if corpus.kind == "jsonl":
        unit = "lines"
        what = f"JSONL file {corpus.path} holds no records with a non-blank string field {corpus.text_field!r}"
    else:
        unit = "files"
        name = "the Python standard library at" if corpus.kind == "stdlib" else "folder"
        kind = "UTF-8 text files" if corpus.skipped else "files"
        what = f"{name} {corpus.path} holds no {kind} matching {' '.join(corpus.patterns)}"
    return DataError(what + _skipped(corpus.skipped, unit))


def _skipped(skipped: Counter[str], unit: str) -> str:
    """' (3 files skipped: not UTF-8)', ' (5 files skipped: 3 not UTF-8, 2 empty)', or '' when none were."""
    if not skipped:
        return ""
    reasons = next(iter(skipped)) if len(skipped) == 1 else ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
    return f" ({sum(skipped.values())} {unit} skipped: {reasons})"


def _kept(manifest: dict) -> str:
    """'3 documents left of 5 read (2 exact and 0 near duplicates dropped)', from a shard manifest."""
    d, documents = manifest["dedup"], _count(manifest["documents"], "document")
    if d is None:
        return f"{documents} read"
    return (f"{documents} left of {d['documents_in']} read ({d['exact_duplicates']} exact and "
            f"{d['near_duplicates']} near duplicates dropped)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
