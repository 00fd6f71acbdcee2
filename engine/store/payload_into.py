"""A record's payload read into a buffer the caller gives, through buffers each thread
keeps: for serving many records in a row (a WADO-RS series), where segment.read_payload's
fresh allocations (the compressed bytes, the decompressed ones, the unshuffled ones) cost
more in page faults than the copies themselves (docs/benchmarks.md, DICOMweb).

Same checks as read_payload (the record CRC over what is stored, the decompressed size
bounded by what the frame and the record header say); records it does not take on (over
SCRATCH_MAX, in object storage, a frame without its size) go through read_payload.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import msgpack
import numpy as np
import zstandard

from stowage.engine.store import segment
from stowage.engine.store.segment import (FLAG_SHUFFLE, FLAG_ZSTD, PREFIX_SIZE, CorruptRecord, OversizedRecord,
                                          crc32)

# Per-thread scratch at most this large is kept between records: 2 buffers a thread (the
# stored bytes, the decompressed ones); a 512×512 16-bit slice takes half of one.
SCRATCH_MAX = 1 << 20
_HEAD = PREFIX_SIZE + 2048
_local = threading.local()
Alloc = Callable[[int], np.ndarray]


def _scratch(name: str, n: int) -> np.ndarray:
    buf = getattr(_local, name, None)
    if buf is None or len(buf) < n:
        buf = np.empty(max(n, 1 << 16), np.uint8)
        setattr(_local, name, buf)
    return buf[:n]


def payload_length(path: Path, offset: int) -> int | None:
    """The decompressed payload's length, from the record's head (no payload read, nothing
    verified), or None when the head does not say it or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.pread(fd, _HEAD, offset)
        flags, hlen, plen, _crc = segment._prefix(head, offset)
        if not flags & FLAG_ZSTD:
            return plen
        if len(head) < PREFIX_SIZE + hlen + 18:
            head += os.pread(fd, PREFIX_SIZE + hlen + 18 - len(head), offset + len(head))
        return _size(head, hlen, plen, offset)
    except (OSError, CorruptRecord):
        return None
    finally:
        os.close(fd)


def _size(head: bytes, hlen: int, plen: int, offset: int) -> int | None:
    """What a compressed payload decompresses to: the frame's declared size, which the
    record header must agree with when it says; None when neither says it, or they differ."""
    declared = segment._frame_size(head[PREFIX_SIZE + hlen:PREFIX_SIZE + hlen + 18], offset)
    try:
        header = msgpack.unpackb(head[PREFIX_SIZE:PREFIX_SIZE + hlen], raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    expected = segment.payload_size(header) if isinstance(header, dict) else None
    if declared < 0 or (expected is not None and expected != declared):
        return None
    return declared


def read_payload_into(path: Path, offset: int, lead: int, alloc: Alloc, uid: str | None = None) -> np.ndarray:
    """`alloc(lead + n)`'s buffer with the record's payload (n bytes, verified, decompressed,
    unshuffled) at [lead:lead + n]; the caller fills [:lead]. Raises what read_payload does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _copied(path, offset, lead, alloc, uid)
    try:
        head = os.pread(fd, _HEAD, offset)
        flags, hlen, plen, expected_crc = segment._prefix(head, offset)
        if len(head) < PREFIX_SIZE + hlen + min(plen, 18):
            head += os.pread(fd, PREFIX_SIZE + hlen + 18 - len(head), offset + len(head))
        segment.check_holds(head[PREFIX_SIZE:PREFIX_SIZE + hlen], uid, offset)
        try:
            n = _size(head, hlen, plen, offset) if flags & FLAG_ZSTD else plen
        except CorruptRecord:  # not a zstd frame: read_payload says what is wrong with it
            n = None
        if n is None or plen > SCRATCH_MAX or n > SCRATCH_MAX:
            return _copied(path, offset, lead, alloc, uid)
        running = crc32(head[PREFIX_SIZE:PREFIX_SIZE + hlen], crc32(head[:PREFIX_SIZE - 4]))
        out = alloc(lead + n)
        stored = out[lead:lead + n] if not flags & (FLAG_ZSTD | FLAG_SHUFFLE) else _scratch("stored", plen)
        if os.preadv(fd, [stored], offset + PREFIX_SIZE + hlen) != plen:
            raise CorruptRecord(f"record at byte {offset} ends early")
    finally:
        os.close(fd)
    if crc32(stored, running) != expected_crc:
        raise CorruptRecord(f"checksum mismatch in record at byte {offset}")
    plain = stored
    if flags & FLAG_ZSTD:
        plain = _scratch("plain", n) if flags & FLAG_SHUFFLE else out[lead:lead + n]
        _decompress_into(stored, plain, offset)
    if flags & FLAG_SHUFFLE:
        segment._lanes_into(plain, out[lead:lead + n], inverse=True)
    return out


def _decompress_into(stored: np.ndarray, plain: np.ndarray, offset: int) -> None:
    """Decompress a frame that declares len(plain) bytes into `plain`: zstd checks the
    declared size against what the frame yields."""
    where = f"compressed payload of the record at byte {offset}"
    try:
        with segment._decompressor().stream_reader(stored, read_size=len(stored), read_across_frames=False) as r:
            view, got = memoryview(plain), 0
            while got < len(plain):
                step = r.readinto(view[got:])
                if not step:
                    raise CorruptRecord(f"{where} is incomplete")
                got += step
            if r.read(1):
                raise OversizedRecord(f"{where} decompresses past the {len(plain)} bytes it holds")
    except zstandard.ZstdError as e:
        raise CorruptRecord(f"{where} does not decompress: {e}") from None


def _copied(path: Path, offset: int, lead: int, alloc: Alloc, uid: str | None) -> np.ndarray:
    payload = segment.read_payload(path, offset, uid)
    out = alloc(lead + len(payload))
    out[lead:] = np.frombuffer(payload, np.uint8)
    return out
