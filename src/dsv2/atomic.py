"""Atomic file writes: the one way dsv2 writes a file that something else may read or resume from.

A file is written next to its destination under a hidden temporary name, flushed and fsync'ed, then
renamed over the destination, and the folder is fsync'ed so the rename itself survives a crash. A reader
(or a resumed run) therefore sees the old file or the new one, never half of one, and an interrupted
write leaves only a dot-file that nothing lists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so the entries renamed into it are on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden name a write of `path` goes to before its rename (`.name.tmp`, same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (by any library's own writer); on success it is
    fsync'ed and renamed into place, on an exception removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
