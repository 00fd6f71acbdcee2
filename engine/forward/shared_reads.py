"""Records read once for every destination: with several destinations (three rules sending
everything to three archives), each delivering thread would read, verify and decompress
the same record; the first one's read is kept for the others, in a small bounded cache
shared by the forwarding process's threads. Destinations that drain far apart (one was
down) just read again."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from stowage.engine.store.segment import read_payload

BUDGET = 32 << 20  # bytes of payloads kept
LARGEST = 4 << 20  # larger payloads are not kept (a few would evict everything else)


class SharedReads:
    """`read` as segment.read_payload, served from what another thread read lately."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self._kept: OrderedDict[tuple[str, int], bytes | memoryview] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def read(self, path: Path, offset: int) -> bytes | memoryview:
        key = (str(path), offset)
        with self._lock:
            payload = self._kept.get(key)
            if payload is not None:
                self._kept.move_to_end(key)
                self.hits += 1
                return payload
            self.misses += 1
        payload = read_payload(path, offset)
        if len(payload) <= LARGEST:
            with self._lock:
                if key not in self._kept:
                    self._kept[key] = payload
                    self._bytes += len(payload)
                while self._bytes > self.budget:
                    _k, old = self._kept.popitem(last=False)
                    self._bytes -= len(old)
        return payload
