"""Damaged DICOM files, as a migration meets them: flipped bytes, truncations, element
lengths that lie, a file meta UID in another character set, a file meta cut short, the
preamble left out. Deterministic for a given random.Random, so a failing case can be made
again from its seed. Used by tests/test_damaged_import.py and the fuzzer (bench/harness/fuzz.py).
"""
from __future__ import annotations

import random
import struct
from typing import Callable

PREAMBLE = 132  # 128 bytes and "DICM"


def meta_end(part10: bytes) -> int:
    """Where the data set starts in a Part-10 file with a preamble and an explicit meta group."""
    (length,) = struct.unpack_from("<I", part10, PREAMBLE + 8)  # (0002,0000) UL, 4-byte value
    return PREAMBLE + 12 + length


def _elements(data: bytes, start: int) -> list[tuple[int, str, int]]:
    """(position, VR, length position) of the top-level explicit VR little endian elements."""
    out, pos = [], start
    while pos + 8 <= len(data):
        vr = data[pos + 4:pos + 6]
        if not vr.isalpha():
            break
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            out.append((pos, vr.decode(), pos + 8))
            if length == 0xFFFFFFFF:
                break  # an undefined length: stop here, the walk would need the items
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            out.append((pos, vr.decode(), pos + 6))
            pos += 8 + length
    return out


def flip(data: bytes, rng: random.Random) -> bytes:
    """A few random bytes after the preamble replaced: what a bad disk or a bad copy does."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(PREAMBLE, len(b))
        b[i] ^= rng.randint(1, 255)
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    """Cut anywhere past the file meta but before the last byte."""
    return data[:rng.randrange(meta_end(data) + 1, len(data) - 1)]


def truncate_meta(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(PREAMBLE + 1, meta_end(data))]


def lying_length(data: bytes, rng: random.Random) -> bytes:
    """One top-level element of the data set claims more bytes than the file holds."""
    b = bytearray(data)
    elements = _elements(data, meta_end(data))
    pos, vr, at = rng.choice(elements)
    if at == pos + 8:
        struct.pack_into("<I", b, at, rng.choice([len(data), 0x7FFFFFF0, 0xFFFFFFF0]))
    else:
        struct.pack_into("<H", b, at, 0xFFF0)
        if len(data) - at < 0xFFF0:
            return bytes(b)
        b = b[:at + 100]  # a short value claiming 65520 bytes must run past the end
    return bytes(b)


def non_ascii_transfer_syntax(data: bytes, rng: random.Random) -> bytes:
    """The Transfer Syntax UID with one character replaced by a byte of another character set."""
    b = bytearray(data)
    for pos, vr, at in _elements(data, PREAMBLE):
        if struct.unpack_from("<HH", data, pos) == (0x0002, 0x0010):
            (n,) = struct.unpack_from("<H", data, at)
            b[pos + 8 + rng.randrange(n - 1)] = rng.choice([0xE9, 0xC3, 0xFF, 0x80])
            return bytes(b)
    raise ValueError("no Transfer Syntax UID in the file meta")


def no_preamble(data: bytes, rng: random.Random) -> bytes:
    """Not damage: "DICM" and the file meta without the 128-byte preamble, which DCMTK reads."""
    return data[128:]


BAD: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncated": truncate, "meta-truncated": truncate_meta, "lying-length": lying_length,
    "non-ascii-ts": non_ascii_transfer_syntax,
}
MAYBE: dict[str, Callable[[bytes, random.Random], bytes]] = {"flipped": flip}  # may still be a good file
GOOD: dict[str, Callable[[bytes, random.Random], bytes]] = {"no-preamble": no_preamble}
