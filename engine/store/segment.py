"""The segment file format: append-only records, each self-describing and checksummed.

    record  = prefix | header | payload
    prefix  = magic "STW1" | version u16 | flags u16 | header_len u32 | payload_len u64 | crc32 u32
    header  = msgpack map: the catalog row of the instance, plus `meta_length`
    payload = file meta group + dataset exactly as received, one zstd frame when flags & ZSTD;
              with flags & SHUFFLE the bytes were byte-shuffled before compression

The CRC-32 covers the prefix (up to the CRC), the header and the payload as stored, so a
reader can walk a segment from any record boundary, verify each record, and stop at the
first torn or corrupted one. This module imports nothing from the rest of stowage.

A zstd frame is never trusted for its size: it is decompressed bounded by what the
record's header says the payload holds (`meta_length` + `dataset_length`), or by the
frame's own content size when the header does not say; a frame that claims or yields
more, or less, is a corrupt record (OversizedRecord, when more).
"""
from __future__ import annotations

import itertools
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import msgpack
import numpy as np
import zstandard

from stowage.catalog.tail import packb

try:  # the same CRC-32 as zlib's, several times faster (ISA-L, carry-less multiply; docs/benchmarks.md)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without the wheel
    from zlib import crc32

MAGIC = b"STW1"
VERSION = 1
FLAG_ZSTD = 0x1
# Byte shuffle in 16-bit lanes, per SHUFFLE_BLOCK (as blosc does): the low and the high
# bytes of native 16-bit pixels are put apart, which zstd then compresses better and
# faster (docs/benchmarks.md, compression). Block-wise so that a payload streams in and
# out in bounded memory.
FLAG_SHUFFLE = 0x2
SHUFFLE_BLOCK = 1 << 18
_PREFIX = struct.Struct("<4sHHIQ")
_CRC = struct.Struct("<I")
PREFIX_SIZE = _PREFIX.size + _CRC.size
MAX_HEADER = 1 << 20
_HEADER_GUESS = 2048  # read with the prefix: most headers are a few hundred bytes
_CHUNK = 1 << 20


class CorruptRecord(ValueError):
    """A record whose checksum or framing does not hold; the message says where."""


class OversizedRecord(CorruptRecord):
    """A compressed payload that claims or yields more bytes than its record says it
    holds (a damaged or forged frame): refused before anything that size is allocated.
    `limit` is its stowage_limit_refusals label, for a caller that counts it."""

    limit = "record_length"


@dataclass(frozen=True)
class Record:
    """One verified record: where it is, what its header says, how its payload is stored."""

    offset: int
    length: int
    flags: int
    header: dict[str, Any]
    payload_offset: int
    payload_length: int


@dataclass(frozen=True)
class FileRange:
    """Payload bytes that live in a (spool) file: large instances never sit in memory."""

    path: Path
    offset: int
    length: int

    def chunks(self, size: int = _CHUNK) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left:
                chunk = f.read(min(size, left))
                if not chunk:
                    raise OSError(f"{self.path} ends before its recorded length")
                left -= len(chunk)
                yield chunk


# A payload part: bytes in memory (bytes, or a bytearray/memoryview a door received into,
# stored without a copy), or a FileRange.
Part = bytes | bytearray | memoryview | FileRange


def part_length(part: Part) -> int:
    return part.length if isinstance(part, FileRange) else len(part)


def encode_record(header: dict[str, Any], payload: bytes, flags: int) -> bytes:
    """The whole record, ready to append."""
    return b"".join(record_parts(header, [payload], flags))  # type: ignore[arg-type]


def record_parts(header: dict[str, Any], payload: list[Part], flags: int) -> list[Part]:
    """The record as parts to append in order: its head, then the payload parts."""
    hdr = packb(header)
    length = sum(map(part_length, payload))
    prefix = _PREFIX.pack(MAGIC, VERSION, flags, len(hdr), length)
    crc = crc32(hdr, crc32(prefix))
    for part in payload:
        for chunk in (part.chunks() if isinstance(part, FileRange) else [part]):
            crc = crc32(chunk, crc)
    return [prefix + _CRC.pack(crc) + hdr, *payload]


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptRecord(f"record ends early at byte {f.tell()} (wanted {n} bytes, got {len(data)})")
    return data


def _prefix(raw: bytes, offset: int) -> tuple[int, int, int, int]:
    """(flags, header length, payload length, stored CRC) from a record's first bytes."""
    if len(raw) < PREFIX_SIZE:
        raise CorruptRecord(f"no valid record at byte {offset}")
    magic, version, flags, hlen, plen = _PREFIX.unpack_from(raw)
    (expected,) = _CRC.unpack_from(raw, _PREFIX.size)
    if magic != MAGIC or version != VERSION or hlen > MAX_HEADER:
        raise CorruptRecord(f"no valid record at byte {offset}")
    return flags, hlen, plen, expected


def _read_head(f: BinaryIO, offset: int) -> tuple[Record, int, int]:
    """The record at `offset` (header decoded), its stored CRC, and the CRC of its prefix
    and header, to be continued over the payload."""
    f.seek(offset)
    raw = _read_exact(f, PREFIX_SIZE)
    flags, hlen, plen, expected = _prefix(raw, offset)
    hdr = _read_exact(f, hlen)
    running = crc32(hdr, crc32(raw[: _PREFIX.size]))
    try:
        header = msgpack.unpackb(hdr, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptRecord(f"undecodable header in record at byte {offset}: {e}") from None
    if not isinstance(header, dict):
        raise CorruptRecord(f"header of the record at byte {offset} is not a map")
    rec = Record(offset, PREFIX_SIZE + hlen + plen, flags, header, offset + PREFIX_SIZE + hlen, plen)
    return rec, expected, running


_UID_KEY = packb("sop_instance_uid")


def check_holds(hdr: bytes | memoryview, uid: str | None, offset: int) -> None:
    """The record's header names `uid`, as the catalog row that led to it does: a row
    pointing at another instance's record (a segment file replaced or renamed by hand, a
    bug) is refused as corrupt, never served under the wrong UID. A byte search, not a
    decode: msgpack writes a string with its length, so a longer UID does not match.
    Records whose header names no instance (written by hand) are let through."""
    if uid and packb(uid) not in hdr and _UID_KEY in hdr:
        raise _not_held(uid, offset)


def _not_held(uid: str, offset: int) -> CorruptRecord:
    return CorruptRecord(f"the record at byte {offset} holds another instance than {uid}, which the catalog "
                         "puts there")


def _payload_chunks(f: BinaryIO, rec: Record, expected: int, running: int) -> Iterator[bytes]:
    """The payload as stored, in chunks; raises CorruptRecord after the last chunk if the
    CRC does not hold (so consumers must discard what they got)."""
    f.seek(rec.payload_offset)
    left = rec.payload_length
    while left:
        chunk = _read_exact(f, min(_CHUNK, left))
        running = crc32(chunk, running)
        left -= len(chunk)
        yield chunk
    if running != expected:
        raise CorruptRecord(f"checksum mismatch in record at byte {rec.offset}")


def _verified(f: BinaryIO, offset: int) -> Record:
    rec, expected, running = _read_head(f, offset)
    for _ in _payload_chunks(f, rec, expected, running):
        pass
    return rec


def iter_records(path: Path, start: int = 0) -> Iterator[Record]:
    """Verified records from `start` to the first torn or corrupt one (which ends the walk).

    Raises nothing for a torn tail: call `valid_end` to learn where the good records stop.
    """
    with open_segment(path) as f:
        offset = start
        while True:
            try:
                rec = _verified(f, offset)
            except CorruptRecord:
                return
            yield rec
            offset += rec.length


def valid_end(path: Path, start: int = 0) -> int:
    """Byte offset just past the last verifiable record at or after `start`."""
    end = start
    for rec in iter_records(path, start):
        end = rec.offset + rec.length
    return end


_U16 = np.dtype("<u2")


def _shuffle_rows(src: np.ndarray, dst: np.ndarray) -> None:
    """Each row of `src` (uint8, even width) as its low bytes, then its high bytes."""
    half = src.shape[1] // 2
    pairs = src.view(_U16)
    np.bitwise_and(pairs, 0xFF, out=dst[:, :half], casting="unsafe")
    np.right_shift(pairs, 8, out=dst[:, half:], casting="unsafe")


def _unshuffle_rows(src: np.ndarray, dst: np.ndarray) -> None:
    half = src.shape[1] // 2
    pairs = dst.view(_U16)
    np.left_shift(src[:, half:], 8, out=pairs, dtype=_U16)
    np.bitwise_or(pairs, src[:, :half], out=pairs)


_SMALL = 16 << 10


def _shuffle_small(data: bytes | bytearray | memoryview) -> memoryview:
    """One partial block by slicing: for small payloads faster than numpy, and it keeps
    the GIL (numpy lets it go and must wait to get it back from busy threads)."""
    raw = bytes(data)
    even = len(raw) // 2 * 2
    return memoryview(raw[0:even:2] + raw[1:even:2] + raw[even:])


def _lanes(data: bytes | bytearray | memoryview, inverse: bool) -> memoryview:
    """Shuffle (or unshuffle) whole blocks and a final partial block of `data`: as whole
    16-bit lanes (shift and mask over contiguous rows, several times faster than a
    transposing copy)."""
    if len(data) <= _SMALL and not inverse:
        return _shuffle_small(data)
    src = np.frombuffer(data, np.uint8)
    out = np.empty(len(src), np.uint8)
    _lanes_into(src, out, inverse)
    return memoryview(out)


def _lanes_into(src: np.ndarray, out: np.ndarray, inverse: bool) -> None:
    rows = _unshuffle_rows if inverse else _shuffle_rows
    whole = len(src) // SHUFFLE_BLOCK * SHUFFLE_BLOCK
    if whole:
        rows(src[:whole].reshape(-1, SHUFFLE_BLOCK), out[:whole].reshape(-1, SHUFFLE_BLOCK))
    even = whole + (len(src) - whole) // 2 * 2
    if even > whole:
        rows(src[whole:even].reshape(1, -1), out[whole:even].reshape(1, -1))
    out[even:] = src[even:]


def shuffle(data: bytes | bytearray | memoryview) -> memoryview:
    return _lanes(data, inverse=False)


def shuffle_joined(head: bytes, body: bytes | memoryview) -> memoryview:
    """`shuffle(head + body)` without copying `body` into a joined buffer first (a record's
    file meta and its data set: the meta is small and of even length, the data set large)."""
    first = min(SHUFFLE_BLOCK, len(head) + len(body))  # the block that holds the head
    if len(head) % 2 or first - len(head) < 2 or first < _SMALL:
        return shuffle(head + bytes(body))
    out = np.empty(len(head) + len(body), np.uint8)
    src = np.frombuffer(body, np.uint8)
    even = first // 2 * 2  # an odd total leaves one last byte as it is
    half, head_half, cut = even // 2, len(head) // 2, even - len(head)
    low, high = out[:half], out[half:even]
    meta = np.frombuffer(head, np.uint8)
    low[:head_half], high[:head_half] = meta[0::2], meta[1::2]
    pairs = src[:cut].view(_U16)
    np.bitwise_and(pairs, 0xFF, out=low[head_half:], casting="unsafe")
    np.right_shift(pairs, 8, out=high[head_half:], casting="unsafe")
    if first > even:
        out[even:first] = src[cut:first - len(head)]
    _lanes_into(src[first - len(head):], out[first:], inverse=False)
    return memoryview(out)


def unshuffle(data: bytes | bytearray | memoryview) -> memoryview:
    return _lanes(data, inverse=True)


def _unshuffled(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Re-block a decompressed stream and undo the shuffle block by block."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        whole = len(pending) // SHUFFLE_BLOCK * SHUFFLE_BLOCK
        if whole:
            yield unshuffle(memoryview(pending)[:whole])
            del pending[:whole]
    if pending:
        yield unshuffle(pending)


def payload_size(header: dict[str, Any]) -> int | None:
    """The decompressed payload's length as the record header says it (file meta and data
    set), or None when it does not say (records written by hand, in tests)."""
    meta, dataset = header.get("meta_length"), header.get("dataset_length")
    if type(meta) is int and type(dataset) is int and meta >= 0 and dataset >= 0:
        return meta + dataset
    return None


def _frame_size(first: bytes | memoryview, offset: int) -> int:
    """The content size a zstd frame's header declares, or -1 when it declares none."""
    try:
        return zstandard.frame_content_size(first[:18])  # a frame header is 18 bytes at most
    except zstandard.ZstdError as e:
        raise CorruptRecord(f"compressed payload of the record at byte {offset} is not a zstd frame: {e}") from None


def _bound(declared: int, expected: int | None, offset: int) -> int:
    """How many bytes the payload may decompress to: what the header says, which the
    frame must agree with; else what the frame declares."""
    where = f"compressed payload of the record at byte {offset}"
    if expected is None:
        if declared == -1:
            raise CorruptRecord(f"{where} says nowhere how long it is")
        return declared
    if declared > expected:
        raise OversizedRecord(f"{where} declares {declared} bytes, its header {expected}")
    if declared not in (-1, expected):
        raise CorruptRecord(f"{where} declares {declared} bytes, its header {expected}")
    return expected


class _Chunks:
    """A file-like read() over an iterator of chunks, for zstandard's streaming reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = memoryview(b"")

    def read(self, n: int) -> bytes:
        while not self._current:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._current = memoryview(chunk)
        out, self._current = self._current[:n], self._current[n:]
        return bytes(out)

    def drain(self) -> None:
        """Read to the end: the record CRC is checked there."""
        self._current = memoryview(b"")
        for _ in self._chunks:
            pass


def _decompressed(chunks: Iterator[bytes], offset: int, expected: int | None = None) -> Iterator[bytes]:
    """A compressed payload's chunks, decompressed in pieces of _CHUNK bytes at most, never
    more in all than _bound allows; CorruptRecord if the frame yields more or less."""
    chunks = iter(chunks)
    first = next(chunks, b"")
    limit = _bound(_frame_size(first, offset), expected, offset)
    source = _Chunks(itertools.chain([first], chunks))
    produced = 0
    try:
        pieces = zstandard.ZstdDecompressor().read_to_iter(source, read_size=_CHUNK, write_size=min(_CHUNK, limit + 1))
        for out in pieces:
            produced += len(out)
            if produced > limit:
                raise OversizedRecord(f"compressed payload of the record at byte {offset} decompresses past "
                                      f"the {limit} bytes it holds")
            yield out
    except zstandard.ZstdError as e:  # damaged bytes, seen before the CRC at the end
        raise CorruptRecord(f"compressed payload of the record at byte {offset} does not decompress: {e}") from None
    source.drain()  # raises CorruptRecord if the record CRC fails
    if produced != limit:
        raise CorruptRecord(f"compressed payload of the record at byte {offset} is incomplete")


def open_record(f: BinaryIO, offset: int) -> tuple[Record, Iterator[bytes]]:
    """The record at `offset` of `f` (header decoded) and its payload as stored, in
    chunks; the chunks raise CorruptRecord after the last one if the record's CRC fails."""
    rec, expected, running = _read_head(f, offset)
    return rec, _payload_chunks(f, rec, expected, running)


def decoded(rec: Record, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A record's stored payload chunks, decompressed and unshuffled as its flags say."""
    if rec.flags & FLAG_ZSTD:
        chunks = _decompressed(chunks, rec.offset, payload_size(rec.header))
    if rec.flags & FLAG_SHUFFLE:
        chunks = _unshuffled(chunks)
    return chunks


def stream_payload(path: Path, offset: int, uid: str | None = None) -> Iterator[bytes]:
    """The record's payload (file meta + dataset as received), decompressed, in chunks;
    raises CorruptRecord, after the last chunk at the latest, if its checksum fails, and
    before the first if the record is not `uid`'s (check_holds)."""
    with open_segment(path) as f:
        rec, expected, running = _read_head(f, offset)
        if uid and rec.header.get("sop_instance_uid", uid) != uid:
            raise _not_held(uid, offset)
        yield from decoded(rec, _payload_chunks(f, rec, expected, running))


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: one is not safe to share between threads, and making
    one per record costs its context's allocation each time."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def read_payload(path: Path, offset: int, uid: str | None = None) -> bytes | memoryview:
    """The record's payload, checksum-verified and decompressed, in memory (records that
    fit: one read, one CRC pass, one decompression, one unshuffle), as a bytes-like object;
    CorruptRecord if it is not `uid`'s (check_holds). The header is decoded only for a
    compressed payload: it bounds the decompression."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        remote = _elsewhere(path) if _elsewhere is not None else None
        if remote is None:
            raise
        return _verified_payload(remote.pread, offset, uid)
    try:
        return _verified_payload(lambda n, at: os.pread(fd, n, at), offset, uid)
    finally:
        os.close(fd)


def _verified_payload(pread: Callable[[int, int], bytes], offset: int, uid: str | None) -> bytes | memoryview:
    head = pread(PREFIX_SIZE + _HEADER_GUESS, offset)
    flags, hlen, plen, expected = _prefix(head, offset)
    if len(head) < PREFIX_SIZE + hlen:
        head += pread(PREFIX_SIZE + hlen - len(head), offset + len(head))
    if len(head) < PREFIX_SIZE + hlen:
        raise CorruptRecord(f"record at byte {offset} ends early")
    check_holds(head[PREFIX_SIZE:PREFIX_SIZE + hlen], uid, offset)
    running = crc32(head[PREFIX_SIZE:PREFIX_SIZE + hlen], crc32(head[:_PREFIX.size]))
    raw = pread(plen, offset + PREFIX_SIZE + hlen)
    if len(raw) != plen:
        raise CorruptRecord(f"record at byte {offset} ends early")
    if crc32(raw, running) != expected:
        raise CorruptRecord(f"checksum mismatch in record at byte {offset}")
    if flags & FLAG_ZSTD:
        raw = _decompress(raw, head[PREFIX_SIZE:PREFIX_SIZE + hlen], offset)
    if flags & FLAG_SHUFFLE:
        raw = unshuffle(raw)
    return raw


def _decompress(raw: bytes, hdr: bytes, offset: int) -> bytes:
    """A checksum-verified compressed payload, decompressed in one call (zstd allocates what
    the frame declares) when the frame declares at most a chunk, or what the record header
    says; else streamed within the bound. The header is decoded only past a chunk: most
    records are smaller, and decoding a catalog row costs a tenth of their decompression."""
    declared = _frame_size(raw, offset)
    expected = None
    if not 0 <= declared <= _CHUNK:
        try:
            header = msgpack.unpackb(hdr, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise CorruptRecord(f"undecodable header in record at byte {offset}: {e}") from None
        expected = payload_size(header) if isinstance(header, dict) else None
        if expected is None or declared != expected:
            return b"".join(_decompressed(iter([raw]), offset, expected))
    try:
        return _decompressor().decompress(raw)
    except zstandard.ZstdError as e:
        raise CorruptRecord(f"compressed payload of the record at byte {offset} does not decompress: {e}") from None


# A segment whose file is not on local disk may be readable elsewhere: engine.storage
# installs an opener for segments uploaded to object storage (this module imports nothing
# of stowage). The opener returns a read-only file-like object with read, seek, tell,
# close and pread(n, offset), or None when it has no copy either.
_elsewhere: Callable[[Path], Any] | None = None


def read_elsewhere(opener: Callable[[Path], Any] | None) -> None:
    """Install (or, with None, remove) the opener of segments not on local disk."""
    global _elsewhere
    _elsewhere = opener


def open_segment(path: Path, buffering: int = -1) -> BinaryIO:
    """The segment file at `path` for reading: the local file, or, when it is not there
    (evicted after its upload), the copy `read_elsewhere` installed an opener for; raises
    FileNotFoundError when neither has it."""
    try:
        return open(path, "rb", buffering=buffering)
    except FileNotFoundError:
        f = _elsewhere(path) if _elsewhere is not None else None
        if f is None:
            raise
        return f


def segment_name(slot: int, sequence: int) -> str:
    return f"{slot:03d}-{sequence:08d}.seg"


def next_sequence(directory: Path, slot: int) -> int:
    """One past the highest sequence number used by `slot` in `directory`."""
    prefix = f"{slot:03d}-"
    seqs = [int(p.name[4:12]) for p in directory.glob(f"{prefix}*.seg") if p.name[4:12].isdigit()]
    return max(seqs, default=0) + 1
