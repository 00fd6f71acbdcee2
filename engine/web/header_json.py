"""A catalog header (little endian, explicit or implicit VR) as encoded DICOM JSON, element by
element, for series metadata the first time it is asked: the slices of a series share most
of their elements byte for byte (patient, study, equipment, geometry but position), so each
distinct element is converted once (fast_json, through pydicom for a sequence) and its JSON
text kept, and an instance's JSON is mostly the concatenation of kept pieces. About ten
times faster than reading the header with pydicom and converting it whole.

An element whose JSON names the instance (a BulkDataURI) is made for each instance, never
kept. Anything the walk does not expect (an ambiguous implicit VR, a broken length, nesting
deeper than MAX_DEPTH) gives None: the caller converts the header the general way."""
from __future__ import annotations

import json
import math
import struct
import threading
from io import BytesIO
from typing import Callable

from functools import lru_cache

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset

from stowage.engine.web.dicom_json import json_text
from stowage.engine.web.fast_json import BULK_THRESHOLD, dataset_json, element_json, number

_string = json.encoder.encode_basestring  # a JSON string as json.dumps(ensure_ascii=False) writes it

_EXPLICIT = struct.Struct("<HHHH").unpack_from  # group, element, VR, 16-bit length
_IMPLICIT = struct.Struct("<HHL").unpack_from  # group, element, 32-bit length
_UINT32 = struct.Struct("<L").unpack_from
_LONG = frozenset(int.from_bytes(v.encode(), "little") for v in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV",
                                                                 "UC", "UN", "UR", "UT", "UV"))
_SQ = int.from_bytes(b"SQ", "little")
_UN = int.from_bytes(b"UN", "little")
_BINARY = frozenset(int.from_bytes(v.encode(), "little") for v in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"))
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
MAX_DEPTH = 16
_KEEP = 100_000  # kept pieces per process (some 20 MB); past it the tables start again


class _Odd(Exception):
    pass


class Pieces:
    """Encoded JSON of elements: a table per (character set, VR encoding), by element bytes."""

    def __init__(self) -> None:
        self._tables: dict[tuple[bytes, bool], dict[bytes, bytes]] = {}
        self._count = 0
        self._lock = threading.Lock()

    def table(self, charset: bytes, implicit: bool) -> dict[bytes, bytes]:
        with self._lock:
            return self._tables.setdefault((charset, implicit), {})

    def put(self, table: dict[bytes, bytes], raw: bytes, piece: bytes) -> None:
        with self._lock:
            if self._count >= _KEEP:
                for t in self._tables.values():
                    t.clear()
                self._count = 0
            table[raw] = piece
            self._count += 1


_pieces = Pieces()


def header_json(header: bytes, implicit: bool, bulk: Callable[[int], str]) -> tuple[list[bytes], dict[int, bytes]] | None:
    """The encoded `"tag":{…}` members of the header's elements (Specific Character Set and
    group lengths left out), and the raw values of the image-size elements (Rows, Columns,
    Samples per Pixel, Bits Allocated, Number of Frames) for the caller's check; None when
    the walk meets something it does not expect."""
    try:
        return _members(memoryview(header), implicit, bulk)
    except (_Odd, struct.error, ValueError, KeyError):
        return None


_SIZES = frozenset({0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280100})


def _members(buf: memoryview, implicit: bool, bulk: Callable[[int], str]) -> tuple[list[bytes], dict[int, bytes]]:
    out: list[bytes] = []
    sizes: dict[int, bytes] = {}
    charset = b""
    kept = _pieces.table(charset, implicit)
    pos, end = 0, len(buf)
    data = buf.obj if isinstance(buf.obj, bytes) and len(buf.obj) == end else bytes(buf)
    while pos < end:
        start = pos
        if not implicit:  # the common case inline: a short VR and a defined length
            group, element, vr, length = _EXPLICIT(data, pos)
            if vr in _LONG:
                tag, vr, value_at, pos = _element(buf, pos, implicit)
            else:
                value_at = pos + 8
                pos = value_at + length
                if pos > end:
                    raise _Odd
                piece = kept.get(data[start:pos])  # most elements: one the series' slices share, kept
                if piece is not None:  # (never a character set or a group length: those are not kept)
                    if group == 0x0028 and (0x00280000 | element) in _SIZES:
                        sizes[0x00280000 | element] = data[value_at:pos]
                    if piece:
                        out.append(piece)
                    continue
                tag = group << 16 | element
        else:
            tag, vr, value_at, pos = _element(buf, pos, implicit)
        if tag == _CHARSET:
            charset = data[value_at:pos]
            kept = _pieces.table(charset, implicit)
            continue
        if not tag & 0xFFFF:  # group length
            continue
        if tag in _SIZES:
            sizes[tag] = data[value_at:pos]
        raw = data[start:pos]
        if vr in _BINARY and pos - value_at > BULK_THRESHOLD:  # names the instance: never kept
            out.append(_convert(raw, implicit, charset, bulk))
            continue
        piece = kept.get(raw)
        if piece is None:
            piece = _convert(raw, implicit, charset, bulk)
            if b'"BulkDataURI"' not in piece:
                _pieces.put(kept, raw, piece)
        if piece:
            out.append(piece)
    return out, sizes


def _element(buf: memoryview, pos: int, implicit: bool) -> tuple[int, int, int, int]:
    """(tag, VR code or 0, where the value starts, where the element ends)."""
    if implicit:
        group, element, length = _IMPLICIT(buf, pos)
        tag = group << 16 | element
        vr_name = _implicit_vr(tag)
        vr = int.from_bytes(vr_name.encode(), "little")
        pos += 8
    else:
        group, element, vr, length = _EXPLICIT(buf, pos)
        tag = group << 16 | element
        pos += 8
        if vr in _LONG:
            length = _UINT32(buf, pos)[0]
            pos += 4
    start = pos
    if length == _UNDEFINED:
        if vr not in (_SQ, _UN) and tag != 0x7FE00010:
            raise _Odd
        pos = _skip_items(buf, pos, MAX_DEPTH)
    else:
        pos += length
        if pos > len(buf):
            raise _Odd
    return tag, vr, start, pos


def _implicit_vr(tag: int) -> str:
    if tag & 0x10000:
        return "UN"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if " or " in vr:
        raise _Odd  # which one depends on other elements: the general way knows
    return vr


def _skip_items(buf: memoryview, pos: int, room: int) -> int:
    """Past the items of an undefined-length value and its delimiter."""
    if room < 1:
        raise _Odd
    while pos + 8 <= len(buf):
        group, element, length = _IMPLICIT(buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Odd
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, to its delimiter
            if pos + 8 > len(buf):
                raise _Odd
            group, element, length = _IMPLICIT(buf, pos)
            if group << 16 | element == _ITEM_END:
                pos += 8
                break
            pos = _nested_element(buf, pos, room)
    raise _Odd


def _nested_element(buf: memoryview, pos: int, room: int) -> int:
    """Past one element inside an item, in either VR encoding (explicit when bytes 4-5
    are two capital letters, as pydicom decides)."""
    if 0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B:
        _g, _e, vr, length = _EXPLICIT(buf, pos)
        pos += 8
        if vr in _LONG:
            length = _UINT32(buf, pos)[0]
            pos += 4
    else:
        _g, _e, length = _IMPLICIT(buf, pos)
        pos += 8
    if length == _UNDEFINED:
        return _skip_items(buf, pos, room - 1)
    return pos + length


def _convert(raw: bytes, implicit: bool, charset: bytes, bulk: Callable[[int], str]) -> bytes:
    """One element (with the character set it is read in) as `"tag":{…}`, b"" for none:
    an ASCII string or number straight to its text (_quick), another plain value by
    fast_json's conversion of its bytes, a sequence (or anything that conversion
    declines) by reading it with pydicom first."""
    quick = _quick(raw, implicit)
    if quick is not None:
        return quick
    obj = _plain(raw, implicit, charset, bulk)
    if obj is None:
        prefix = b""
        if charset:
            length = len(charset)
            prefix = (b"\x08\x00\x05\x00" + length.to_bytes(4, "little") if implicit
                      else b"\x08\x00\x05\x00CS" + length.to_bytes(2, "little")) + charset
        obj = dataset_json(read_dataset(BytesIO(prefix + raw), implicit, True), bulk)
        if not obj:
            return b""
        [(tag, value)] = obj.items()
        obj = {tag: value}
    elif not obj:
        return b""
    return json_text(obj)[1:-1].encode("utf-8")


_ASCII = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI"})  # strings the character set does not touch


def _quick(raw: bytes, implicit: bool) -> bytes | None:
    """The element's `"tag":{…}` text written directly when it is one of the values that
    differ slice to slice (SOP Instance UID, times, Instance Number, positions: UI, TM,
    IS, DS) or another ASCII string: the text fast_json and json.dumps give, without the
    dict and the encoder (a fifth of the time). None: not one of those, or not plain
    ASCII, or a number JSON cannot hold; the general way then decides."""
    if implicit:
        group, element, _length = _IMPLICIT(raw, 0)
        tag, value = group << 16 | element, raw[8:]
        try:
            vr = _implicit_vr(tag)
        except _Odd:
            return None
    else:
        group, element, code, _length = _EXPLICIT(raw, 0)
        tag = group << 16 | element
        vr = raw[4:6].decode("ascii", "replace")
        value = raw[12:] if code in _LONG else raw[8:]
    if vr not in _ASCII and vr not in ("IS", "DS"):
        return None
    try:
        text = bytes(value).decode("ascii")
    except UnicodeDecodeError:
        return None
    if vr in _ASCII:
        parts = [p.rstrip(" \x00") if vr == "UI" else p.strip(" \x00") for p in text.split("\\")]
        if not any(parts):
            return f'"{tag:08X}":{{"vr":"{vr}"}}'.encode()
        values = ",".join(_string(p) if p else "null" for p in parts)
    else:
        text = text.strip(" \x00")
        if not text:
            return f'"{tag:08X}":{{"vr":"{vr}"}}'.encode()
        try:
            numbers = [number(p, vr) if p.strip() else None for p in text.split("\\")]
        except ValueError:
            return None
        if any(type(n) is float and not math.isfinite(n) for n in numbers):
            return None
        values = ",".join("null" if n is None else repr(n) for n in numbers)
    return f'"{tag:08X}":{{"vr":"{vr}","Value":[{values}]}}'.encode()


def _plain(raw: bytes, implicit: bool, charset: bytes, bulk: Callable[[int], str]) -> dict | None:
    if implicit:
        group, element, _length = _IMPLICIT(raw, 0)
        tag, value = group << 16 | element, raw[8:]
        vr = _implicit_vr(tag)
    else:
        group, element, code, _length = _EXPLICIT(raw, 0)
        tag = group << 16 | element
        vr = raw[4:6].decode("ascii", "replace")
        value = raw[12:] if code in _LONG else raw[8:]
    if vr in ("SQ", "UN"):
        return None
    try:
        obj = element_json(tag, vr, value, _encodings(charset), bulk)
    except Exception:  # fast_json's _Fallback and anything odd: pydicom decides
        return None
    return {f"{tag:08X}": obj} if obj else {}


@lru_cache(maxsize=64)
def _encodings(charset: bytes) -> list[str]:
    text = charset.decode("ascii", "replace").strip(" \x00")
    terms = [t.strip() for t in text.split("\\")] if text else []
    return convert_encodings(terms or None)
