"""Temporary files for export, created so that nothing already in the out folder (a stale
temporary file, a symbolic link someone planted under a predictable name) is written through."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def open_new(tmp: Path) -> BinaryIO:
    """`tmp` created anew for writing: a file or link of that name is removed first, never
    followed or reused."""
    try:
        fd = os.open(tmp, _FLAGS, 0o644)
    except FileExistsError:
        tmp.unlink()
        fd = os.open(tmp, _FLAGS, 0o644)
    return open(fd, "wb")
