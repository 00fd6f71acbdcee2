"""Free space on the archive's disk, for the store path's "is there room?" check.

Asking the kernel (statfs) on every store cost a system call and a round trip of the
GIL per instance. We ask at most every `interval` seconds and subtract what we stored
since, so the estimate errs low; and before refusing we ask again, so a store is never
refused on a stale figure.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path


class FreeSpace:
    def __init__(self, path: Path, interval: float = 0.25) -> None:
        self.path = path
        self.interval = interval
        self._free = 0
        self._at = float("-inf")

    def _refresh(self, now: float) -> None:
        self._free = shutil.disk_usage(self.path).free
        self._at = now

    def has_room(self, needed: int) -> bool:
        """Whether at least `needed` bytes are free."""
        now = time.monotonic()
        if now - self._at > self.interval or self._free < needed:
            self._refresh(now)
        return self._free >= needed

    def used(self, nbytes: int) -> None:
        self._free -= nbytes
