"""Text sources -> documents.

`Corpus(source)` reads one of three kinds of source, one `Document` per file or line:

- `None`: the running Python's standard library, every `*.py` file outside test folders and
  site-packages (~700 files, ~12 MB on CPython 3.11). It is on every machine, so the small presets can
  be trained and checked end to end without downloading anything.
- a folder: every file matching `patterns` (default `*.txt *.md *.rst *.py`), one document per file.
- a `.jsonl` file: one document per line, the string in `text_field` (default "text").

Files are listed sorted by relative path, so a source gives the same documents in the same order on
every machine, and document ids (the relative path, or `name.jsonl:LINE`) never name the machine's own
folders: the train/validation split hashes them. Files that are not UTF-8, and documents that are empty
or only whitespace, are skipped and counted in `Corpus.skipped`; a malformed JSONL line is an error
naming the file and line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py")
# Test suites are most of the standard library's bytes and much of it is deliberately odd code (bad
# encodings, syntax-error fixtures); site-packages is whatever happens to be installed, so not reproducible.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
# Never text worth reading, whatever the source (hidden folders such as .git are skipped as well).
ALWAYS_EXCLUDED_DIRS = frozenset({"__pycache__"})

NOT_UTF8, EMPTY = "not UTF-8", "empty"  # the reasons counted in Corpus.skipped


class DataError(ValueError):
    """A data file or folder is unusable; the message names the file (and the line or field)."""


@dataclass(frozen=True)
class Document:
    id: str  # relative path, or "name.jsonl:LINE"; stable across machines (the split hashes it)
    text: str


def list_files(root: Path, patterns: Sequence[str], exclude_dirs: Collection[str] = ()) -> list[str]:
    """Relative POSIX paths of the files under `root` whose name matches one of `patterns`, sorted.

    Folders named in `exclude_dirs` or `ALWAYS_EXCLUDED_DIRS`, hidden folders and hidden files are skipped.
    """
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in exclude_dirs and d not in ALWAYS_EXCLUDED_DIRS and not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith(".") and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                found.append((rel / name).as_posix())
    return sorted(found)  # os.walk's order is the file system's; sorting makes it the same everywhere


class Corpus:
    """The documents of one source; iterate it (again) to read them (again).

    `description` says what the source is (it goes into the shard manifest); `skipped` counts, by reason,
    what the latest iteration left out.
    """

    def __init__(
        self, source: str | os.PathLike | None = None, *, patterns: Sequence[str] = DEFAULT_PATTERNS,
        text_field: str = "text",
    ):
        self.text_field = text_field
        self.skipped: Counter[str] = Counter()
        if source is None:
            self.kind, self.path = "stdlib", Path(sysconfig.get_paths()["stdlib"])
            self.patterns: tuple[str, ...] = ("*.py",)
            self.exclude_dirs: Collection[str] = STDLIB_EXCLUDED_DIRS
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            self.description = f"Python {version} standard library at {self.path} (*.py, without tests)"
            return
        self.path = Path(source)
        if self.path.is_dir():
            self.kind, self.patterns, self.exclude_dirs = "folder", tuple(patterns), ()
            self.description = f"folder {self.path} ({' '.join(self.patterns)})"
        elif self.path.is_file() and self.path.suffix == ".jsonl":
            self.kind = "jsonl"
            self.description = f"JSONL file {self.path} (field {text_field!r})"
        elif not self.path.exists():
            raise DataError(f"{self.path}: no such file or folder")
        else:
            raise DataError(f"{self.path}: not a folder or a .jsonl file")

    def __repr__(self) -> str:
        return f"Corpus({self.description})"

    def __iter__(self) -> Iterator[Document]:
        self.skipped.clear()
        return self._jsonl() if self.kind == "jsonl" else self._files()

    def _files(self) -> Iterator[Document]:
        for rel in list_files(self.path, self.patterns, self.exclude_dirs):
            path = self.path / rel
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                self.skipped[NOT_UTF8] += 1
                continue
            except OSError as e:
                raise DataError(f"{path}: cannot be read ({e.strerror})") from None
            if not text.strip():  # would only add a BOS/EOS pair to the token stream
                self.skipped[EMPTY] += 1
                continue
            yield Document(rel, text)

    def _jsonl(self) -> Iterator[Document]:
        field = self.text_field
        for number, record in jsonl_records(self.path):
            where = f"{self.path}:{number}"
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{where}: no field {field!r}")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                self.skipped[EMPTY] += 1
                continue
            yield Document(f"{self.path.name}:{number}", text)


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, the line's JSON value) for each line of a JSONL file that is not blank; a line that is not
    UTF-8 or not JSON is a DataError naming it."""
    with path.open("rb") as f:  # bytes, so a bad line is reported by number rather than by offset
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8") from None
            if not line.strip():  # blank lines (a trailing newline, separators) hold no record
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield number, record


def iter_documents(
    source: str | os.PathLike | None = None, *, patterns: Sequence[str] = DEFAULT_PATTERNS, text_field: str = "text",
) -> Iterator[Document]:
    """The documents of `source` (see `Corpus`); None is the Python standard library."""
    return iter(Corpus(source, patterns=patterns, text_field=text_field))
