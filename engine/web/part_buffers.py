"""Buffers for the parts of a WADO-RS answer, reused from part to part: a fresh buffer the
size of a CT slice costs its page faults each time (more than the copy into it), so a
retrieve of a series takes a few buffers and passes them round. Thread-safe: the reading
threads take, the event loop gives back once the socket has taken every byte."""
from __future__ import annotations

import threading

import numpy as np

from stowage.engine.store.payload_into import SCRATCH_MAX


class PartBuffers:
    """At most `keep` buffers of at most `largest` bytes kept (larger parts get their own)."""

    def __init__(self, keep: int = 8, largest: int = SCRATCH_MAX + (64 << 10)) -> None:
        self.keep, self.largest = keep, largest
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        """A writable buffer of n bytes (a view of a kept one when one is large enough)."""
        if n <= self.largest:
            with self._lock:
                for i, buf in enumerate(self._free):
                    if len(buf) >= n:
                        return self._free.pop(i)[:n]
            return np.empty(self.largest, np.uint8)[:n]
        return np.empty(n, np.uint8)

    def give(self, view: np.ndarray) -> None:
        """Back to the pool: only when nothing refers to its bytes any more."""
        buf = view.base if view.base is not None else view
        if len(buf) == self.largest:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)
