"""What reading an untrusted encoded data set may cost (issue #25): a Deflated data set is
inflated as a bounded stream, never past `max_inflated_bytes`, and sequences are walked
no deeper than `max_nesting_depth`. A data set past either limit raises LimitExceeded, an
UnreadableDataset whose message is fit for an Error Comment (64 characters at most) and
whose `limit` names the stowage_limit_refusals label (engine/runtime/counts.py LIMITS).

Imports nothing of stowage: the catalog's readers, the importer and the conversion on
the way out all use it.
"""
from __future__ import annotations

import zlib

# engine/runtime/config.py's defaults (the catalog cannot import the engine above it;
# tests/test_limits_data.py checks that both agree).
MAX_INFLATED_BYTES = 256 << 20
MAX_NESTING_DEPTH = 64

_IN = 64 << 10    # compressed bytes handed to zlib at once: the unconsumed tail it copies stays small
_OUT = 256 << 10  # inflated bytes asked of zlib at once: what a step may add to memory


class UnreadableDataset(ValueError):
    """The data set cannot be parsed far enough to read its catalog attributes."""


class LimitExceeded(UnreadableDataset):
    """Reading the data set would go past a resource limit; `limit` is its LIMITS name."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def too_deep(max_depth: int) -> LimitExceeded:
    return LimitExceeded("nesting_depth", f"sequences nested deeper than max_nesting_depth ({max_depth})")


def too_large(max_bytes: int) -> LimitExceeded:
    return LimitExceeded("inflated_bytes", f"Deflated data set inflates past max_inflated_bytes ({max_bytes})")


class Truncated(Exception):
    """The inflated stream ended inside something that needed more bytes."""


class Inflater:
    """The inflated bytes of a Deflated data set (raw deflate, PS3.5 A.5), read as a
    stream: only what the reader asks for is inflated, a step at a time, and skipped bytes
    are dropped as they come, so memory holds a step, not the data set. Inflating past
    `limit` bytes in all raises LimitExceeded; a stream that does not inflate raises
    UnreadableDataset. A stream cut short (the head of a spooled instance) just ends."""

    def __init__(self, data: bytes | memoryview, limit: int) -> None:
        self.limit = limit
        self.total = 0  # bytes inflated so far
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._src = memoryview(data)
        self._src_pos = 0
        self._buf = bytearray()  # inflated, not yet read: self._buf[self._pos:]
        self._pos = 0
        self._ended = False

    def _step(self) -> bool:
        """Inflate one step into the buffer; False once nothing more will come."""
        if self._ended:
            return False
        data: bytes | memoryview = self._z.unconsumed_tail
        if not data and self._src_pos < len(self._src):
            data = self._src[self._src_pos:self._src_pos + _IN]
            self._src_pos += len(data)
        try:
            out = self._z.decompress(data, _OUT)
        except zlib.error as exc:
            raise UnreadableDataset(f"deflated data set does not inflate: {exc}") from None
        # The end of the stream, or of the input with nothing pending in zlib (cut short).
        self._ended = self._z.eof or (not data and not out)
        self.total += len(out)
        if self.total > self.limit:
            raise too_large(self.limit)
        self._buf += out
        return bool(out) or not self._ended

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > _OUT:
            del self._buf[:self._pos]
            self._pos = 0

    def peek(self, n: int) -> bytes:
        """The next n bytes without reading them (fewer only at the end)."""
        while len(self._buf) - self._pos < n and self._step():
            pass
        return bytes(self._buf[self._pos:self._pos + n])

    def read(self, n: int, into: bytearray | None = None) -> None:
        """Read n bytes, appended to `into` (None: dropped); raises Truncated if the stream
        ends first."""
        while n > 0:
            avail = len(self._buf) - self._pos
            if not avail:
                self._compact()
                if not self._step():
                    raise Truncated
                continue
            k = min(n, avail)
            if into is not None:
                into += self._buf[self._pos:self._pos + k]
            self._pos += k
            n -= k

    def rest(self) -> bytes:
        """Everything not read yet, to the end of the stream."""
        while self._step():
            pass
        out = bytes(self._buf[self._pos:])
        self._buf.clear()
        self._pos = 0
        return out

    def drain(self) -> int:
        """Inflate to the end, dropping the bytes; returns how many the stream holds in all."""
        while self._step():
            self._buf.clear()
        self._buf.clear()
        self._pos = 0
        return self.total


def inflate(data: bytes | memoryview, limit: int) -> bytes:
    """The whole inflated data set, or LimitExceeded if it holds more than `limit` bytes."""
    return Inflater(data, limit).rest()
