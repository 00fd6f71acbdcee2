"""File Meta Information (PS3.10 7.1) from a byte template: same bytes as pydicom
writes, in about a microsecond instead of a few hundred."""
from __future__ import annotations

import struct

from stowage.protocol.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


_IMPL = (_element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
         + _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)))


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              source_ae: str = "") -> bytes:
    """The encoded (0002,eeee) group, group length included."""
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _ui(sop_class_uid)),
        _element(0x0003, b"UI", _ui(sop_instance_uid)),
        _element(0x0010, b"UI", _ui(transfer_syntax_uid)),
        _IMPL,
        _element(0x0016, b"AE", _text(source_ae.strip())) if source_ae.strip() else b"",
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def group_length(payload: bytes | memoryview) -> int:
    """Bytes of the (0002,eeee) group at the start of `payload` (no preamble), as
    `file_meta` encodes it: its group length element plus the length it states."""
    tag, vr, n, value = struct.unpack_from("<I2sHI", payload)
    if tag != 0x00000002 or vr != b"UL" or n != 4:
        raise ValueError("payload does not start with a File Meta Information Group Length")
    return 12 + value
