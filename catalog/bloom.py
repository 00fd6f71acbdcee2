"""A fixed-size Bloom filter over SOP Instance UIDs: the store path's "certainly new?" gate.

Most instances an archive receives are new; the filter answers that in about a
microsecond, so only possible duplicates pay for a catalog lookup. Its size is fixed
(memory does not grow with the archive); false positives only cost a lookup.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

_MASK64 = (1 << 64) - 1


class UidFilter:
    def __init__(self, bits: int = 1 << 27, hashes: int = 4) -> None:
        self._bits = bits
        self._k = hashes
        self._array = bytearray(bits // 8)

    def _positions(self, uid: str) -> list[int]:
        d = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=16).digest(), "little")
        h1, h2 = d & _MASK64, d >> 64
        return [(h1 + i * h2) % self._bits for i in range(self._k)]

    def add(self, uid: str) -> None:
        a = self._array
        for p in self._positions(uid):
            a[p >> 3] |= 1 << (p & 7)

    def update(self, uids: Iterable[str]) -> None:
        for uid in uids:
            self.add(uid)

    def __contains__(self, uid: str) -> bool:
        a = self._array
        return all(a[p >> 3] & (1 << (p & 7)) for p in self._positions(uid))
