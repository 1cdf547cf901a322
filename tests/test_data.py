"""Pretraining data: corpus sources, packed token shards and their manifest, the resumable batch loader."""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv2.cli import main
from dsv2.config import resolve_config
from dsv2.data.corpus import STDLIB_EXCLUDED_DIRS, Corpus, DataError, Document, iter_documents, list_files
from dsv2.data.dedup import EXACT, NEAR, Deduplicator, Duplicate, shingles
from dsv2.data.prepare import STAGING_DIR, prepare_run_data
from dsv2.data.shards import (
    DEFAULT_VAL_FRACTION,
    MANIFEST_FILE,
    SPLITS,
    Batches,
    TokenShards,
    build_shards,
    is_validation,
    token_dtype,
)
from dsv2.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
# 40 short documents of different lengths and word orders; ids as a folder corpus would give them.
DOCS = [
    Document(f"docs/{i:03d}.txt", f"# doc {i}\n" + " ".join(WORDS[(7 * i + 3 * j) % 12] for j in range(5 + i % 13)))
    for i in range(40)
]
VAL_FRACTION = 0.25  # large, so 40 documents give a few validation ones
EOS = 1


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    hf = train_bpe([d.text for d in DOCS], vocab_size=300, special_tokens=["<bos>", "<eos>"])
    return Tokenizer(hf, bos_id=0, eos_id=EOS)


@pytest.fixture
def built(tmp_path: Path, tok: Tokenizer) -> tuple[Path, dict]:
    folder = tmp_path / "shards"
    manifest = build_shards(DOCS, tok, folder, shard_tokens=64, val_fraction=VAL_FRACTION, progress=False)
    return folder, manifest


def expected_stream(tok: Tokenizer, docs: list[Document], split: str) -> list[int]:
    """What a split's token stream must be: BOS text EOS per document of the split, in arrival order."""
    out = []
    for d in docs:
        if is_validation(d.id, VAL_FRACTION) == (split == "val"):
            out += tok.encode(d.text, add_bos=True) + [EOS]
    return out


# ------------------------------------------------------------------------------------------- corpus
def test_stdlib_corpus_is_deterministic_and_leaves_tests_out():
    first = list(islice(Corpus(), 100))
    assert len(first) == 100 and first == list(islice(iter_documents(None), 100))
    ids = [d.id for d in first]
    assert ids == sorted(ids) and all(i.endswith(".py") and not i.startswith("/") for i in ids)
    files = list_files(Corpus().path, ["*.py"], STDLIB_EXCLUDED_DIRS)
    assert len(files) > 300 and {"os.py", "json/__init__.py"} <= set(files)
    folders = {part for f in files for part in f.split("/")[:-1]}
    assert not folders & {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def test_folder_corpus_patterns_and_skips(tmp_path: Path):
    (tmp_path / "b" / "__pycache__").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b" / "c.md").write_text("second")
    (tmp_path / "b" / "data.bin").write_text("not matched by default")
    (tmp_path / "b" / "__pycache__" / "x.txt").write_text("cache")
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "blank.txt").write_text(" \n\t")
    corpus = Corpus(tmp_path)
    assert [(d.id, d.text) for d in corpus] == [("a.txt", "first"), ("b/c.md", "second")]
    assert corpus.skipped == {"not UTF-8": 1, "empty": 1}
    assert [d.id for d in iter_documents(tmp_path, patterns=["*.bin"])] == ["b/data.bin"]


def test_jsonl_corpus(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n{"text": "  "}\n')
    corpus = Corpus(path)
    assert list(corpus) == [Document("data.jsonl:1", "one"), Document("data.jsonl:3", "two")]
    assert corpus.skipped == {"empty": 1}
    path.write_text('{"body": "x", "text": 1}\n')
    assert list(iter_documents(path, text_field="body")) == [Document("data.jsonl:1", "x")]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{broken\n', "data.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n\n{"body": "x"}\n', "data.jsonl:3: no field 'text'"),
    (b"[1, 2]\n", "data.jsonl:1: no field 'text'"),
    (b'{"text": ["a"]}\n', "data.jsonl:1: field 'text' must be a string, got list"),
    (b'{"text": "ok"}\n\xff\n', "data.jsonl:2: not UTF-8"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path.parent}/{message}")):
        list(iter_documents(path))


def test_source_errors(tmp_path: Path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        Corpus(tmp_path / "nowhere")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"table\.csv: not a folder or a \.jsonl file"):
        Corpus(tmp_path / "table.csv")


# ------------------------------------------------------------------------------------------- shards
def test_shards_round_trip_the_tokenizer_output(built, tok: Tokenizer):
    folder, manifest = built
    assert manifest["format_version"] == 1 and manifest["vocab_size"] == 300 and manifest["dtype"] == "uint16"
    assert manifest["documents"] == len(DOCS) and manifest["source"] == "unspecified"
    assert manifest == json.loads((folder / MANIFEST_FILE).read_text())
    total = 0
    for split in SPLITS:
        shards = TokenShards(folder, split, verify=True, vocab_size=300)
        expected = expected_stream(tok, DOCS, split)
        entries = manifest["splits"][split]["shards"]
        assert len(entries) >= 2 and [e["tokens"] for e in entries[:-1]] == [64] * (len(entries) - 1)
        assert shards.num_tokens == len(expected) == manifest["splits"][split]["tokens"]
        assert shards.read(0, shards.num_tokens).tolist() == expected
        assert shards.read(60, 10).tolist() == expected[60:70]  # crosses the first shard boundary
        assert np.memmap(folder / entries[1]["file"], dtype=np.uint16, mode="r").tolist() == expected[64:128]
        total += shards.num_tokens
    assert manifest["tokens"] == total
    assert not list(folder.glob(".*"))  # no temporary files left behind
    with pytest.raises(IndexError):
        shards.read(shards.num_tokens - 1, 2)
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_rebuild_replaces_the_folder_and_records_the_corpus(built, tok: Tokenizer, tmp_path: Path):
    folder, _ = built
    (tmp_path / "src").mkdir()
    for d in DOCS[:3]:
        (tmp_path / "src" / d.id.replace("/", "_")).write_text(d.text)
    (tmp_path / "src" / "blank.txt").write_text("")
    manifest = build_shards(Corpus(tmp_path / "src"), tok, folder, shard_tokens=64, val_fraction=0.0, progress=False)
    assert manifest["source"].startswith("folder ") and manifest["skipped"] == {"empty": 1}
    listed = {e["file"] for split in SPLITS for e in manifest["splits"][split]["shards"]}
    assert {p.name for p in folder.glob("*.bin")} == listed  # the first build's extra shards are gone
    assert TokenShards(folder, "val").num_tokens == 0
    assert TokenShards(folder, "train", verify=True).num_tokens == manifest["tokens"]


def test_split_is_by_document_and_stable_under_reordering(tmp_path: Path, tok: Tokenizer):
    def documents(folder: Path, split: str) -> list[tuple[int, ...]]:
        stream = TokenShards(folder, split).read(0, TokenShards(folder, split).num_tokens).tolist()
        docs, start = [], 0
        for i, t in enumerate(stream):
            if t == EOS:
                docs.append(tuple(stream[start : i + 1]))
                start = i + 1
        assert start == len(stream)  # the stream ends with a whole document
        return sorted(docs)

    a = build_shards(DOCS, tok, tmp_path / "a", shard_tokens=64, val_fraction=VAL_FRACTION, progress=False)
    b = build_shards(DOCS[::-1], tok, tmp_path / "b", shard_tokens=50, val_fraction=VAL_FRACTION, progress=True)
    assert 0 < a["splits"]["val"]["documents"] < len(DOCS)
    for split in SPLITS:
        assert a["splits"][split]["documents"] == b["splits"][split]["documents"]
        assert documents(tmp_path / "a", split) == documents(tmp_path / "b", split)
    val = sorted(tuple(tok.encode(d.text) + [EOS]) for d in DOCS if is_validation(d.id, VAL_FRACTION))
    assert documents(tmp_path / "a", "val") == val
    assert is_validation("x", 1.0) and not is_validation("x", 0.0)


def _edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        edit(manifest)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return apply


def _flip_byte(folder: Path) -> None:
    data = bytearray((folder / "train_00000.bin").read_bytes())
    data[3] ^= 0xFF
    (folder / "train_00000.bin").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, kwargs, message", [
    (lambda f: (f / MANIFEST_FILE).unlink(), {}, "manifest.json: missing"),
    (lambda f: (f / MANIFEST_FILE).write_text("{"), {}, "manifest.json: not valid JSON"),
    (_edit_manifest(lambda m: m.update(format_version=2)), {}, "manifest.json: unknown format_version 2"),
    (_edit_manifest(lambda m: m.pop("dtype")), {}, "manifest.json: missing field dtype"),
    (_edit_manifest(lambda m: m.update(dtype="uint32")), {}, "manifest.json: field dtype is uint32, but vocab_size"),
    (_edit_manifest(lambda m: m.update(dtype="float16")), {}, "manifest.json: field dtype must be one of"),
    (_edit_manifest(lambda m: m["splits"]["train"]["shards"][1].pop("sha256")), {},
     "manifest.json: missing field splits.train.shards[1].sha256"),
    (_edit_manifest(lambda m: m["splits"]["train"]["shards"][0].update(tokens="64")), {},
     "manifest.json: field splits.train.shards[0].tokens must be int"),
    (_edit_manifest(lambda m: m["splits"]["train"]["shards"][0].update(file="../x.bin")), {},
     "manifest.json: field splits.train.shards[0].file must be a file name"),
    (_edit_manifest(lambda m: m["splits"]["train"].update(tokens=1)), {}, "manifest.json: field splits.train.tokens"),
    (lambda f: (f / "train_00001.bin").unlink(), {}, "train_00001.bin: missing (listed in"),
    (lambda f: (f / "train_00000.bin").write_bytes((f / "train_00000.bin").read_bytes()[:-2]), {},
     "train_00000.bin: 126 bytes, but"),
    (_flip_byte, {"verify": True}, "train_00000.bin: sha256 is"),
    (lambda f: None, {"split": "dev"}, "manifest.json: no split 'dev'"),
    (lambda f: None, {"vocab_size": 400}, "manifest.json: field vocab_size is 300"),
])
def test_manifest_and_shard_errors_name_the_file(built, damage, kwargs: dict, message: str):
    folder, _ = built
    damage(folder)
    with pytest.raises(DataError, match=re.escape(message)):
        TokenShards(folder, **{"split": "train", **kwargs})
    if kwargs.get("verify"):  # the checksum costs a full read, so only `verify` looks at it
        TokenShards(folder, "train")


def test_build_needs_an_eos(tmp_path: Path, tok: Tokenizer):
    with pytest.raises(ValueError, match="no EOS id"):
        build_shards(DOCS, Tokenizer(tok.hf, bos_id=0, eos_id=None), tmp_path, progress=False)


# ------------------------------------------------------------------------------------------- batches
def test_batches_are_seeded_and_cover_every_window_once_per_epoch(built):
    shards = TokenShards(built[0], "train")
    B, T = 3, 8
    loader = Batches(shards, B, T, seed=5)
    n = loader.num_windows
    assert n == (shards.num_tokens - 1) // T and n % B != 0  # so some batch straddles two epochs
    windows = [shards.read(w * T, T + 1).tolist() for w in range(n)]
    orders = [loader.order(0).tolist(), loader.order(1).tolist()]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(n)) and orders[0] != orders[1] != list(range(n))

    rows = []
    for _ in range(math.ceil(2 * n / B)):
        x, y = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    assert rows[: 2 * n] == [windows[w] for w in orders[0] + orders[1]]

    same, other = Batches(shards, B, T, seed=5), Batches(shards, B, T, seed=6)
    first = next(same)[0]
    assert torch.equal(first, torch.tensor(rows[:B])[:, :-1]) and not torch.equal(first, next(other)[0])


def test_batches_resume_at_exactly_the_next_batch(built):
    shards = TokenShards(built[0], "train")
    B, T = 4, 8
    n = Batches(shards, B, T).num_windows
    for consumed in (3, n // B + 1):  # mid-epoch, and just after a batch that crossed into epoch 1
        run = Batches(shards, B, T, seed=1)
        for _ in range(consumed):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
        expected = [next(run) for _ in range(5)]
        resumed = Batches(shards, B, T, seed=1)
        resumed.load_state_dict(state)
        from_position = Batches(shards, B, T, seed=1, position=consumed * B)
        for want in expected:
            got, again = next(resumed), next(from_position)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]) and torch.equal(want[0], again[0])

    halves = Batches(shards, B // 2, T, seed=1)  # a smaller batch size continues at the same window
    halves.load_state_dict(state)
    assert torch.equal(torch.cat([next(halves)[0], next(halves)[0]]), expected[0][0])
    with pytest.raises(DataError, match="loader state: seed is 1 but this loader's is 2"):
        Batches(shards, B, T, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="loader state: seq_len"):
        Batches(shards, B, T + 1, seed=1).load_state_dict(state)


def test_validation_batches_are_a_fixed_sequence(built):
    val = TokenShards(built[0], "val")
    first = [next(Batches(val, 2, 4, seed=s, shuffle=False))[0] for s in (0, 9)]
    assert torch.equal(first[0], first[1])
    assert first[0].tolist() == [val.read(0, 4).tolist(), val.read(4, 4).tolist()]
    loader = Batches(val, 2, 4, shuffle=False)
    again = Batches(val, 2, 4, shuffle=False)
    assert all(torch.equal(next(loader)[1], next(again)[1]) for _ in range(loader.num_windows))
    with pytest.raises(DataError, match="fewer than one window"):
        Batches(val, 1, val.num_tokens)


# ------------------------------------------------------------------------------------------- dedup
def random_words(seed: int, n: int = 200) -> list[str]:
    """`n` words drawn from a fixed 400-word made-up vocabulary: two draws share almost no word 5-gram."""
    rng = random.Random(seed)
    vocabulary = ["".join(random.Random(i).choices(string.ascii_lowercase, k=3 + i % 6)) for i in range(400)]
    return rng.choices(vocabulary, k=n)


def edited(words: list[str], every: int) -> list[str]:
    """`words` with every `every`-th word (from the 10th on) replaced by a word the vocabulary lacks."""
    return [f"EDIT{i}" if i >= 10 and (i - 10) % every == 0 else w for i, w in enumerate(words)]


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a.split()), shingles(b.split())
    return len(x & y) / len(x | y)


BASE = [" ".join(random_words(seed)) for seed in range(8)]
# Corpus order: the originals come first, so they are the occurrences kept.
DUP_DOCS = [Document(f"d/{i}.txt", text) for i, text in enumerate(BASE)] + [
    Document("d/copy_of_2.txt", BASE[2]),  # exact
    Document("d/rewrapped_5.txt", "\n  " + "\n".join(BASE[5].split()) + "\n"),  # exact once whitespace is normalised
    Document("d/two_words_changed_3.txt", " ".join(edited(BASE[3].split(), every=95))),  # near at 0.8
    Document("d/copy_of_near_3.txt", " ".join(edited(BASE[3].split(), every=95))),  # exact copy of a dropped one
    Document("d/tenth_changed_7.txt", " ".join(edited(BASE[7].split(), every=19))),  # near only at 0.5
]
DROPPED_AT_08 = [
    Duplicate("d/copy_of_2.txt", EXACT, "d/2.txt"),
    Duplicate("d/rewrapped_5.txt", EXACT, "d/5.txt"),
    Duplicate("d/two_words_changed_3.txt", NEAR, "d/3.txt"),
    Duplicate("d/copy_of_near_3.txt", EXACT, "d/two_words_changed_3.txt"),
]


def test_planted_duplicates_are_what_the_tests_say():
    by_id = {d.id: d.text for d in DUP_DOCS}
    assert 0.88 < jaccard(BASE[3], by_id["d/two_words_changed_3.txt"]) < 0.92
    assert 0.55 < jaccard(BASE[7], by_id["d/tenth_changed_7.txt"]) < 0.65
    assert max(jaccard(a, b) for i, a in enumerate(BASE) for b in BASE[:i]) < 0.05


def test_dedup_drops_exact_then_near_duplicates_keeping_the_first():
    dedup = Deduplicator()
    kept = list(dedup.filter(DUP_DOCS))
    assert dedup.duplicates == DROPPED_AT_08
    assert [d.id for d in kept] == [d.id for d in DUP_DOCS if d.id not in {x.id for x in DROPPED_AT_08}]
    assert dedup.summary() == {
        "documents_in": len(DUP_DOCS), "exact_duplicates": 3, "near_duplicates": 1, "near_duplicate_threshold": 0.8,
        "method": dedup.method,
    }
    looser = Deduplicator(near_duplicate_threshold=0.5)
    list(looser.filter(DUP_DOCS))
    assert looser.duplicates == [*DROPPED_AT_08, Duplicate("d/tenth_changed_7.txt", NEAR, "d/7.txt")]
    strict = Deduplicator(near_duplicate_threshold=0.99)
    list(strict.filter(DUP_DOCS))
    assert (strict.exact_duplicates, strict.near_duplicates) == (3, 0)


GOLDEN_SIGNATURE = [1773678457, 507677952, 2485074829, 1523906857]


def test_dedup_signatures_are_fixed():
    """The same shingles give the same signature in every run, process and machine (a fixed seed and scheme):
    these values were computed once and must not change, or rebuilt corpora would silently differ."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    signature = Deduplicator()._signature(shingles(words))
    assert signature.hashvalues[:4].tolist() == GOLDEN_SIGNATURE
    assert len(signature.hashvalues) == 256


def test_dedup_options_are_checked():
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="near_duplicate_threshold must be in"):
            Deduplicator(bad)
    with pytest.raises(ValueError, match="near_duplicate_threshold 0.999 is too high for LSH with 256 permutations"):
        Deduplicator(0.999)
    short = Deduplicator()
    assert short.check(Document("a", "one two")) is None and short.check(Document("b", "one  two\n")).kind == EXACT


def test_shards_record_dedup_and_are_deterministic(tmp_path: Path, tok: Tokenizer):
    def build(name: str, **kwargs) -> dict:
        return build_shards(DUP_DOCS, tok, tmp_path / name, shard_tokens=256, val_fraction=VAL_FRACTION,
                            progress=False, **kwargs)

    first, second = build("a", dedup=Deduplicator()), build("b", dedup=Deduplicator())
    assert first["dedup"] == {**Deduplicator().summary(), "documents_in": len(DUP_DOCS), "exact_duplicates": 3,
                              "near_duplicates": 1}
    assert first["documents"] == len(DUP_DOCS) - 4 and first == second
    for split in SPLITS:
        for entry in first["splits"][split]["shards"]:
            assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    kept = [d for d in DUP_DOCS if d.id not in {x.id for x in DROPPED_AT_08}]
    assert TokenShards(tmp_path / "a", "train").read(0, TokenShards(tmp_path / "a", "train").num_tokens).tolist() == (
        [t for d in kept if not is_validation(d.id, VAL_FRACTION) for t in tok.encode(d.text) + [EOS]])

    looser = build("c", dedup=Deduplicator(0.5))
    assert looser["dedup"]["near_duplicates"] == 2 and looser["dedup"]["near_duplicate_threshold"] == 0.5
    off = build("d")
    assert off["dedup"] is None and off["documents"] == len(DUP_DOCS)
    used = Deduplicator()
    used.check(DUP_DOCS[0])
    with pytest.raises(ValueError, match="fresh Deduplicator"):
        build("e", dedup=used)


def test_manifests_without_dedup_still_load(built):
    folder, _ = built
    _edit_manifest(lambda m: m.pop("dedup"))(folder)
    assert TokenShards(folder, "train", verify=True).num_tokens > 0


# ------------------------------------------------------------------------------------------- prepare
CONFIG = resolve_config("nano").replace(vocab_size=300)


def write_folder(folder: Path, texts: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def folder_state(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A source with the planted duplicates, one file per document (names sort in DUP_DOCS order)."""
    return write_folder(tmp_path / "texts", {f"{i:02d}.txt": d.text for i, d in enumerate(DUP_DOCS)})


def test_prepare_builds_dedups_and_reuses(tmp_path: Path, text_folder: Path):
    run = tmp_path / "runs" / "a"
    tokenizer, train, val = prepare_run_data(run, text_folder, CONFIG, progress=False)
    assert folder_state(run) == ["data", *[f"data/{f}" for f in sorted(os.listdir(run / "data"))], TOKENIZER_FILE]
    m = train.manifest
    assert m["dedup"]["exact_duplicates"] == 3 and m["dedup"]["near_duplicates"] == 1
    assert train.num_documents + val.num_documents == m["documents"] == len(DUP_DOCS) - 4
    assert m["source"].startswith(f"folder {text_folder}") and tokenizer.hf.get_vocab_size() == 300
    assert not (run / STAGING_DIR).exists()

    stamps = {p: p.stat().st_mtime_ns for p in (run / TOKENIZER_FILE, run / "data" / MANIFEST_FILE)}
    again = prepare_run_data(run, tmp_path / "nowhere-needed", CONFIG, dedup=False, progress=False)  # reused
    assert again[1].manifest == m and all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    (run / TOKENIZER_FILE).unlink()  # shards are one tokenizer's ids: a new tokenizer rebuilds them
    _, train, _ = prepare_run_data(run, text_folder, CONFIG, dedup=False, progress=False)
    assert train.manifest["dedup"] is None and train.manifest["documents"] == len(DUP_DOCS)
    (run / "data" / MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match=rf"{TOKENIZER_FILE}: 300 ids, but the model's vocab_size is 1024"):
        prepare_run_data(run, text_folder, resolve_config("nano"), progress=False)
    assert (run / TOKENIZER_FILE).is_file() and not (run / STAGING_DIR).exists()


def _val_only_name() -> str:
    return next(f"a{i}.txt" for i in range(10_000) if is_validation(f"a{i}.txt", DEFAULT_VAL_FRACTION))


BAD_SOURCES = {  # name -> (files of the source folder, or a JSONL's bytes; the start of the message)
    "empty folder": ({}, "folder {src} holds no files matching *.txt *.md *.rst *.py"),
    "binary files": ({"a.txt": b"\xff\xfe\x00", "b.py": b"caf\xe9", "c.md": b"\x80"},
                     "folder {src} holds no UTF-8 text files matching *.txt *.md *.rst *.py "
                     "(3 files skipped: not UTF-8)"),
    "no matching files": ({"table.csv": "a,b\n", "notes.doc": "x"},
                          "folder {src} holds no files matching *.txt *.md *.rst *.py"),
    "blank and binary": ({"a.txt": " \n", "b.txt": b"\xff"},
                         "(2 files skipped: 1 empty, 1 not UTF-8)"),
    "jsonl without the field": (b'{"body": "some text"}\n', "{src}:1: no field 'text'"),
    "jsonl of blank texts": (b'{"text": " "}\n\n{"text": ""}\n',
                             "JSONL file {src} holds no records with a non-blank string field 'text' "
                             "(2 lines skipped: empty)"),
    "too little text": ({"a.txt": "tiny"}, "tokens from 1 document, but the model's vocab_size is 300"),
    "only validation left": ({_val_only_name(): BASE[0], "b.txt": BASE[0], "c.txt": "\t" + BASE[0]},
                             "1 document left of 3 read (2 exact and 0 near duplicates dropped), and none of "
                             "them is in the train split"),
}


def _bad_source(tmp_path: Path, case: str) -> tuple[Path, str]:
    content, message = BAD_SOURCES[case]
    if isinstance(content, bytes):
        src = tmp_path / "src.jsonl"
        src.write_bytes(content)
    else:
        src = write_folder(tmp_path / "src", content)
    return src, message.format(src=src)


@pytest.mark.parametrize("case", list(BAD_SOURCES))
@pytest.mark.parametrize("run_exists", [False, True])
def test_prepare_checks_the_source_and_leaves_nothing_behind(tmp_path: Path, case: str, run_exists: bool):
    src, message = _bad_source(tmp_path, case)
    run = tmp_path / "runs" / "r"
    if run_exists:
        write_folder(run, {"notes.txt": "mine"})
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_run_data(run, src, CONFIG, progress=False)
    if run_exists:
        assert folder_state(run) == ["notes.txt"]
    else:
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["binary files", "jsonl without the field", "only validation left"])
def test_data_command_reports_a_bad_source(tmp_path: Path, case: str, capsys):
    src, message = _bad_source(tmp_path, case)
    config = tmp_path / "config.json"
    CONFIG.to_json(config)
    run = tmp_path / "run"
    assert main(["data", "--data", str(src), "--out", str(run), "--model", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dsv2: error: " in err and message in err
    assert not run.exists()


def test_data_command_prepares_with_dedup_options(tmp_path: Path, text_folder: Path, capsys):
    config = tmp_path / "config.json"
    CONFIG.to_json(config)
    args = ["data", "--data", str(text_folder), "--model", str(config)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a'}: tokenizer.json and data/ with" in out
    assert "duplicates dropped: 3 exact, 1 near (Jaccard >= 0.8) of 13 documents read" in out
    assert main([*args, "--out", str(tmp_path / "b"), "--near-dup-threshold", "0.5"]) == 0
    assert "duplicates dropped: 3 exact, 2 near (Jaccard >= 0.5)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "c"), "--no-dedup"]) == 0
    assert "built without deduplication" in capsys.readouterr().out
    assert TokenShards(tmp_path / "c" / "data").manifest["documents"] == len(DUP_DOCS)
    assert main([*args, "--out", str(tmp_path / "d"), "--near-dup-threshold", "2"]) == 2
    assert "near_duplicate_threshold must be in (0, 1), got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
