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
