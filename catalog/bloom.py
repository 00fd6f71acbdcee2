"""A fixed-size Bloom filter over SOP Instance UIDs: the store path's "certainly new?" gate.

Most instances an archive receives are new; the filter answers that in about a
microsecond, so only possible duplicates pay for a catalog lookup. Its size is fixed
(memory does not grow with the archive); false positives only cost a lookup.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

import numpy as np

_TWO_UINT64 = struct.Struct("<QQ").unpack  # the 128-bit digest as two little-endian halves
_blake2b = hashlib.blake2b


_last: tuple[str | None, int, int] = (None, 0, 0)  # the UID hashed last, and its digest's halves


def _halves(uid: str) -> tuple[int, int]:
    """The digest's two halves of `uid`, hashed once for consecutive calls with the same
    UID: the store path probes the worker's filter, then the sealed one, then adds the UID
    (three filters of different sizes, one digest). One entry, replaced as a whole, so a
    thread reading it while another replaces it sees either UID with its own digest."""
    global _last
    last = _last
    if last[0] == uid:
        return last[1], last[2]
    h1, h2 = _TWO_UINT64(_blake2b(uid.encode(), digest_size=16).digest())
    _last = (uid, h1, h2)
    return h1, h2


def positions(uid: str, bits: int, hashes: int) -> tuple[int, ...]:
    """The filter's bit positions of `uid`: double hashing over a 128-bit BLAKE2b digest,
    (h1 + i*h2) mod bits. The shared sealed-UID file (catalog/sealed_uids.py) keeps these
    positions on disk: never change the formula, only how fast it is computed."""
    h1, h2 = _halves(uid)
    if hashes == 4 and not bits & (bits - 1):  # the store path's case: a mask, no loop
        m = bits - 1
        return h1 & m, (h1 + h2) & m, (h1 + 2 * h2) & m, (h1 + 3 * h2) & m
    return tuple((h1 + i * h2) % bits for i in range(hashes))


def positions_array(uids: Sequence[str], bits: int, hashes: int) -> np.ndarray:
    """`positions` of every UID at once, as a (len(uids), hashes) uint64 array: one digest
    per UID, the arithmetic done by numpy (a seal's thousands of UIDs). `bits` must be a
    power of two: then uint64 wrap-around leaves the masked bits as Python's ints have them."""
    if bits & (bits - 1):
        raise ValueError("positions_array needs a power-of-two filter size")
    digests = b"".join([_blake2b(uid.encode(), digest_size=16).digest() for uid in uids])
    h = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    steps = np.arange(hashes, dtype=np.uint64)
    return (h[:, :1] + steps * h[:, 1:]) & np.uint64(bits - 1)


class UidFilter:
    def __init__(self, bits: int = 1 << 27, hashes: int = 4) -> None:
        self._bits = bits
        self._k = hashes
        self._array = bytearray(bits // 8)

    def _positions(self, uid: str) -> tuple[int, ...]:
        return positions(uid, self._bits, self._k)

    def add(self, uid: str) -> None:
        a = self._array
        for p in positions(uid, self._bits, self._k):
            a[p >> 3] |= 1 << (p & 7)

    def update(self, uids: Iterable[str]) -> None:
        a, bits, k = self._array, self._bits, self._k
        for uid in uids:
            for p in positions(uid, bits, k):
                a[p >> 3] |= 1 << (p & 7)

    def __contains__(self, uid: str) -> bool:
        a = self._array
        for p in positions(uid, self._bits, self._k):
            if not a[p >> 3] & (1 << (p & 7)):
                return False
        return True
