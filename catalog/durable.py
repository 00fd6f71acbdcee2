"""Durability of names: a created, renamed or removed file survives a crash only once the
directory that holds it is fsync'd. Here, below the segment store and the catalog, so that
both can use it."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync `directory`: the entries made in it so far are on stable storage."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, text: str) -> None:
    """Put `text` at `path` whole or not at all, durably: written to a temporary file of
    this process, fsync'd, renamed over `path`, the directory fsync'd (a crash leaves the
    old content or the new, never a torn file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_stamp(path: Path) -> tuple | None:
    """A value that changes whenever the file at `path` is replaced or written (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
