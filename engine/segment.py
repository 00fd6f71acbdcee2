"""The segment file format: append-only records, each self-describing and checksummed.

    record  = prefix | header | payload
    prefix  = magic "STW1" | version u16 | flags u16 | header_len u32 | payload_len u64 | crc32 u32
    header  = msgpack map: the catalog row of the instance, plus `meta_length`
    payload = file meta group + dataset exactly as received, one zstd frame when flags & ZSTD

The CRC-32 covers the prefix (up to the CRC), the header and the payload as stored, so a
reader can walk a segment from any record boundary, verify each record, and stop at the
first torn or corrupted one. This module imports nothing from the rest of stowage.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import msgpack
import zstandard

MAGIC = b"STW1"
VERSION = 1
FLAG_ZSTD = 0x1
_PREFIX = struct.Struct("<4sHHIQ")
_CRC = struct.Struct("<I")
PREFIX_SIZE = _PREFIX.size + _CRC.size
MAX_HEADER = 1 << 20


class CorruptRecord(ValueError):
    """A record whose checksum or framing does not hold; the message says where."""


@dataclass(frozen=True)
class Record:
    """One verified record: where it is, what its header says, how its payload is stored."""

    offset: int
    length: int
    flags: int
    header: dict[str, Any]
    payload_offset: int
    payload_length: int


def encode_record(header: dict[str, Any], payload: bytes, flags: int) -> bytes:
    """The whole record, ready to append."""
    hdr = msgpack.packb(header, use_bin_type=True)
    prefix = _PREFIX.pack(MAGIC, VERSION, flags, len(hdr), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(hdr, zlib.crc32(prefix)))
    return b"".join((prefix, _CRC.pack(crc), hdr, payload))


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptRecord(f"record ends early at byte {f.tell()} (wanted {n} bytes, got {len(data)})")
    return data


def _read_at(f: BinaryIO, offset: int, verify_payload: bool = True) -> tuple[Record, bytes | None]:
    f.seek(offset)
    raw = _read_exact(f, PREFIX_SIZE)
    magic, version, flags, hlen, plen = _PREFIX.unpack_from(raw)
    (crc,) = _CRC.unpack_from(raw, _PREFIX.size)
    if magic != MAGIC or version != VERSION or hlen > MAX_HEADER:
        raise CorruptRecord(f"no valid record at byte {offset}")
    hdr = _read_exact(f, hlen)
    running = zlib.crc32(hdr, zlib.crc32(raw[: _PREFIX.size]))
    payload = None
    if verify_payload:
        payload = _read_exact(f, plen)
        if zlib.crc32(payload, running) != crc:
            raise CorruptRecord(f"checksum mismatch in record at byte {offset}")
    try:
        header = msgpack.unpackb(hdr, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptRecord(f"undecodable header in record at byte {offset}: {e}") from None
    rec = Record(offset, PREFIX_SIZE + hlen + plen, flags, header, offset + PREFIX_SIZE + hlen, plen)
    return rec, payload


def iter_records(path: Path, start: int = 0) -> Iterator[Record]:
    """Verified records from `start` to the first torn or corrupt one (which ends the walk).

    Raises nothing for a torn tail: call `valid_end` to learn where the good records stop.
    """
    with open(path, "rb") as f:
        offset = start
        while True:
            try:
                rec, _ = _read_at(f, offset)
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


def read_payload(path: Path, offset: int) -> tuple[Record, bytes]:
    """The record at `offset` and its payload, checksum-verified and decompressed."""
    with open(path, "rb") as f:
        rec, payload = _read_at(f, offset)
    assert payload is not None
    if rec.flags & FLAG_ZSTD:
        payload = zstandard.ZstdDecompressor().decompress(payload)
    return rec, payload


def segment_name(slot: int, sequence: int) -> str:
    return f"{slot:03d}-{sequence:08d}.seg"


def next_sequence(directory: Path, slot: int) -> int:
    """One past the highest sequence number used by `slot` in `directory`."""
    prefix = f"{slot:03d}-"
    seqs = [int(p.name[4:12]) for p in directory.glob(f"{prefix}*.seg") if p.name[4:12].isdigit()]
    return max(seqs, default=0) + 1


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
