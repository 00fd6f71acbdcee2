"""Catalog attributes of an encoded data set, read on the C-STORE hot path.

Decoding a whole data set with pydicom costs hundreds of microseconds; the catalog
needs two dozen short strings from the first few hundred bytes. So a little-endian
data set (Implicit VR, Explicit VR and every encapsulated syntax) is read by a
scanner that walks the top-level elements with ``struct.unpack_from`` over a
memoryview, skips sequences without parsing them, and stops after the highest tag
the catalog wants. Anything else, or anything the scanner does not trust, goes to
pydicom. Both paths hand the same raw bytes to the same decoder, so they agree.

The same walk goes on to the pixel data to keep the *header*: the top-level, non-bulk
elements exactly as encoded (their byte ranges, concatenated), so that any attribute an
instance holds can be returned by a query. Past the catalog's columns the walk is best
effort: anything odd there (a truncated head of a spooled instance, a broken sequence)
ends the header, never the store.

What reading may cost is bounded (catalog/limits.py, issue #25): a Deflated data set is
inflated as a stream up to its Pixel Data only, bulk values dropped as they come, and
never past `max_inflated_bytes`; undefined-length sequences are followed
`max_nesting_depth` deep at most. Past either, the data set is refused (LimitExceeded).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, TEXT_VR_DELIMS, VR

from stowage.catalog.limits import (  # UnreadableDataset: also for callers of extract, as before
    MAX_INFLATED_BYTES,
    MAX_NESTING_DEPTH,
    Inflater,
    Truncated,
    UnreadableDataset,
    inflate,
    too_deep,
)
from stowage.catalog.schema import DICOM_COLUMNS


class _Fallback(Exception):
    """The scanner met something it does not handle; pydicom takes over."""


class _TooDeep(Exception):
    """Sequences nested deeper than the scanner's depth bound (extract names the limit)."""


Raw = dict[int, tuple[str, bytes]]  # tag -> (VR, value bytes as encoded)

# --- tables, computed once from the schema -------------------------------------------

_COLUMN_OF: dict[int, str] = {tag_for_keyword(kw): col for col, kw in DICOM_COLUMNS}
_WANTED = frozenset(_COLUMN_OF)
_WANTED_LIST = sorted(_WANTED)
_MAX_TAG = max(_WANTED)
_DICTIONARY_VR: dict[int, str] = {tag: dictionary_VR(tag) for tag in _WANTED}
_CHARSET_TAG = tag_for_keyword("SpecificCharacterSet")
_COLUMN_NAMES = tuple(col for col, _ in DICOM_COLUMNS)

# --- the header: which top-level elements are kept --------------------------------
HEADER = "header"  # the extract() key (and catalog column) holding the header bytes
_HEADER_LIMIT = 0x7FDFFFFF  # stop at Pixel Data's group: what follows is bulk or padding
_SMALL = 1024  # values this short are always kept
_MAX_VALUE = 8 << 10  # a longer value is bulk (private blobs, LUTs, curves, documents)
_MAX_SEQUENCE = 64 << 10
_MAX_HEADER = 256 << 10
_BULK_TAGS = frozenset({
    0x00420011,  # Encapsulated Document
    0x00880200,  # Icon Image Sequence
    0x54000100,  # Waveform Sequence
    0x54001010,  # Waveform Data
    0x00283006,  # LUT Data
    0x00281201, 0x00281202, 0x00281203, 0x00281221, 0x00281222, 0x00281223,  # palette data
})


class _Cut:
    """Where the header ends, and the bulk elements (holes) cut out of it."""

    __slots__ = ("end", "holes")

    def __init__(self) -> None:
        self.end = 0
        self.holes: list[tuple[int, int]] = []

    def bytes_of(self, buf: memoryview) -> bytes | None:
        if not self.holes:
            header = bytes(buf[:self.end])
        else:
            parts, pos = [], 0
            for start, end in self.holes:
                parts.append(buf[pos:start])
                pos = end
            parts.append(buf[pos:self.end])
            header = b"".join(parts)
        return header if 0 < len(header) <= _MAX_HEADER else None


def _is_bulk(tag: int, vr: int, length: int) -> bool:
    """A top-level value left out of the header (called only for values over _SMALL)."""
    if tag in _BULK_TAGS:
        return True
    if length <= _MAX_VALUE:
        return False
    return length > _MAX_SEQUENCE or not (vr == _SQ or (not vr and _dictionary_vr(tag) == "SQ"))


@lru_cache(maxsize=1024)
def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def header_is_implicit(transfer_syntax_uid: str) -> bool:
    """How header bytes are encoded: little endian, implicit VR when the data set's own
    transfer syntax is Implicit VR Little Endian, otherwise explicit VR."""
    return _syntax(transfer_syntax_uid.strip(" \x00")) == "implicit"


def _vr_code(vr: str) -> int:
    """A two-letter VR as the little-endian uint16 the scanner reads in its place."""
    return int.from_bytes(vr.encode("ascii"), "little")


_VR_BY_CODE: dict[int, str] = {_vr_code(vr): str(vr) for vr in VR if len(vr) == 2}
_LONG_VRS = frozenset(_vr_code(vr) for vr in EXPLICIT_VR_LENGTH_32)  # 4-byte lengths
_UN = _vr_code("UN")
_SQ = _vr_code("SQ")

_TEXT_VRS = frozenset({"SH", "LO", "PN", "ST", "LT", "UT", "UC"})  # Specific Character Set applies
_SINGLE_VALUED = frozenset({"ST", "LT", "UT"})  # a backslash is text, not a separator
_LEADING_SPACE_KEPT = frozenset({"PN", "ST", "LT", "UT", "UC"})

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

_EXPLICIT_HEADER = struct.Struct("<HHHH").unpack_from  # group, element, VR, 16-bit length
_IMPLICIT_HEADER = struct.Struct("<HHL").unpack_from  # group, element, 32-bit length
_UINT32 = struct.Struct("<L").unpack_from
_UINT16 = struct.Struct("<H").unpack_from
_TAG = struct.Struct("<HH").unpack_from

# --- public API ----------------------------------------------------------------------


def extract(dataset: bytes | memoryview, transfer_syntax_uid: str, max_inflated_bytes: int = MAX_INFLATED_BYTES,
            max_nesting_depth: int = MAX_NESTING_DEPTH) -> dict[str, str | None]:
    """Catalog attributes of an encoded dataset (no file meta, no preamble: the bytes
    of a C-STORE data set).

    One key per column of ``DICOM_COLUMNS``; the value is the element's value as
    ``str`` (backslash-separated when multi-valued) or None when absent or empty.
    Plus ``HEADER``: the top-level non-bulk elements as bytes (see header_is_implicit),
    or None. Raises UnreadableDataset when neither the scanner nor pydicom can read it,
    LimitExceeded (one) when reading it would inflate a Deflated data set past
    `max_inflated_bytes` or walk sequences nested deeper than `max_nesting_depth`.
    """
    buf = memoryview(dataset)
    if buf.format != "B" or buf.ndim != 1:  # the scanner indexes single bytes
        buf = buf.cast("B") if buf.c_contiguous else memoryview(buf.tobytes())
    uid = transfer_syntax_uid.strip(" \x00")
    mode = _syntax(uid)
    if mode != "slow":
        cut = _Cut()
        try:
            found = _scan(buf, implicit=mode == "implicit", cut=cut, max_depth=max_nesting_depth)
        except _Fallback:
            pass
        except (_TooDeep, RecursionError):  # RecursionError: a max_nesting_depth above what Python's stack holds
            raise too_deep(max_nesting_depth) from None
        else:
            result = _found_to_strings(buf, found)
            result[HEADER] = cut.bytes_of(buf)
            return result
    raw, header = _slow_path(dataset, uid, max_inflated_bytes, max_nesting_depth)
    result = _to_strings(raw)
    result[HEADER] = header
    return result


# --- fast path -----------------------------------------------------------------------


@lru_cache(maxsize=128)
def _syntax(uid: str) -> str:
    """'implicit' or 'explicit' for syntaxes the scanner reads, else 'slow'.

    An unknown UID is taken as explicit VR little endian, like pydicom does: every
    syntax added since the retired ones is encapsulated, hence explicit VR LE.
    """
    try:
        syntax = UID(uid)
        if not syntax.is_little_endian or syntax.is_deflated:
            return "slow"
        return "implicit" if syntax.is_implicit_VR else "explicit"
    except ValueError:
        return "explicit"


Found = dict[int, tuple[int, int, int]]  # tag -> (VR code, 0 when implicit; value start; value end)


def _scan(buf: memoryview, implicit: bool, cut: _Cut | None = None, max_depth: int = MAX_NESTING_DEPTH) -> Found:
    """Where the wanted values of a little-endian data set are; raises _Fallback on
    anything odd, _TooDeep on undefined-length sequences nested deeper than `max_depth`.

    With `cut`, also walks on to the pixel data and records there where the header ends
    and which bulk elements it leaves out."""
    if _looks_explicit(buf) == implicit:
        raise _Fallback("the data set's VR encoding differs from its transfer syntax")
    found: Found = {}
    end = _walk(buf, 0, implicit, _MAX_TAG if cut is None else _HEADER_LIMIT, found, cut, max_depth)
    if cut is not None:
        cut.end = end
    return found


def _raw(buf: memoryview, found: Found) -> Raw:
    """The found values as (VR name, bytes)."""
    return {tag: (_DICTIONARY_VR[tag] if vr == _UN or not vr else _VR_BY_CODE[vr], bytes(buf[start:end]))
            for tag, (vr, start, end) in found.items()}


def _looks_explicit(buf: memoryview) -> bool:
    """pydicom's test on the first element: are bytes 4-5 two capital letters?"""
    return len(buf) < 6 or (0x40 < buf[4] < 0x5B and 0x40 < buf[5] < 0x5B)


def _walk(buf: memoryview, pos: int, implicit: bool, limit: int,
          found: dict[int, tuple[int, int, int]] | None, cut: _Cut | None = None,
          room: int = MAX_NESTING_DEPTH) -> int:
    """Walk elements from pos up to the first tag above limit; return where that is.

    Records (VR code, start, end) of wanted elements into found (top level only;
    nested items pass None). Less than a header's worth of bytes left ends the walk,
    as in pydicom. Undefined lengths are skipped item by item, `room` more levels of
    them at most (the recursion is bounded by it). With cut (top level),
    bulk elements are noted as holes, and the walk goes on past the wanted tags to
    `limit` in _walk_header, where anything odd ends the walk instead of raising.
    """
    end_of_buffer = len(buf)
    strict_limit = _MAX_TAG if cut is not None else limit
    while pos + 8 <= end_of_buffer:
        if implicit:
            group, element, length = _IMPLICIT_HEADER(buf, pos)
            vr = 0
        else:
            group, element, vr, length = _EXPLICIT_HEADER(buf, pos)
        tag = group << 16 | element
        if tag > strict_limit:
            if cut is None:
                return pos
            return _walk_header(buf, pos, implicit, limit, cut, room)
        start = pos
        pos += 8
        if not implicit:
            if vr in _LONG_VRS:
                if pos + 4 > end_of_buffer:
                    raise _Fallback("header runs past the end")
                length = _UINT32(buf, pos)[0]
                pos += 4
            elif vr not in _VR_BY_CODE:
                raise _Fallback(f"unknown VR at offset {pos - 8}")
        if length == _UNDEFINED:
            # Contents of an undefined-length UN are implicit VR (PS3.5 6.2.2).
            pos = _skip_items(buf, pos, implicit or vr == _UN, room)
            if cut is not None and pos - start > _SMALL and _is_bulk(tag, _SQ, pos - start):
                cut.holes.append((start, pos))
            continue
        if pos + length > end_of_buffer:
            raise _Fallback(f"element ({group:04X},{element:04X}) runs past the end")
        if found is not None and tag in _WANTED:
            found[tag] = (vr, pos, pos + length)
        if cut is not None and length > _SMALL and _is_bulk(tag, vr, length):
            cut.holes.append((start, pos + length))
        pos += length
    return pos


def _walk_header(buf: memoryview, pos: int, implicit: bool, limit: int, cut: _Cut, room: int) -> int:
    """The rest of the top level, past the catalog's tags, for the header only: returns
    where it ends (the first tag past limit, or the first thing it cannot walk). Nesting
    past `room` still refuses the data set (_TooDeep), as anywhere else."""
    end_of_buffer = len(buf)
    while pos + 8 <= end_of_buffer:
        start = pos
        if implicit:
            group, element, length = _IMPLICIT_HEADER(buf, pos)
            vr = 0
        else:
            group, element, vr, length = _EXPLICIT_HEADER(buf, pos)
        tag = group << 16 | element
        if tag > limit:
            return pos
        pos += 8
        if not implicit:
            if vr in _LONG_VRS:
                if pos + 4 > end_of_buffer:
                    return start
                length = _UINT32(buf, pos)[0]
                pos += 4
            elif vr not in _VR_BY_CODE:
                return start
        if length == _UNDEFINED:
            try:
                pos = _skip_items(buf, pos, implicit or vr == _UN, room)
            except _Fallback:
                return start
            if pos - start > _SMALL and _is_bulk(tag, _SQ, pos - start):
                cut.holes.append((start, pos))
            continue
        if pos + length > end_of_buffer:
            return start  # e.g. the head of a spooled instance ends inside this element
        if length > _SMALL and _is_bulk(tag, vr, length):
            cut.holes.append((start, pos + length))
        pos += length
    return pos if pos <= end_of_buffer else start


def _skip_items(buf: memoryview, pos: int, implicit: bool, room: int) -> int:
    """Skip the items of an undefined-length value; return the position after its delimiter.
    `room`: how many levels of such values, this one included, may still nest."""
    if room < 1:
        raise _TooDeep
    end_of_buffer = len(buf)
    while pos + 8 <= end_of_buffer:
        group, element, length = _IMPLICIT_HEADER(buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Fallback(f"expected an item at offset {pos - 8}")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _walk(buf, pos, implicit, _ITEM_END - 1, None, None, room - 1)
        if pos + 8 > end_of_buffer or _tag_at(buf, pos) != _ITEM_END:
            raise _Fallback(f"item without its delimiter at offset {pos}")
        pos += 8
    raise _Fallback("sequence runs past the end")


def skip_undefined(buf: memoryview, pos: int, implicit: bool, room: int = MAX_NESTING_DEPTH) -> int | None:
    """Past the delimiter of the undefined-length value whose items start at pos (a byte
    memoryview), or None where this walk cannot tell: a broken value, or one nested deeper
    than `room` (engine/web/native_frame.py walks to Pixel Data with it)."""
    try:
        return _skip_items(buf, pos, implicit, room)
    except (_Fallback, _TooDeep, RecursionError, struct.error):
        return None


def _tag_at(buf: memoryview, pos: int) -> int:
    group, element = _TAG(buf, pos)
    return group << 16 | element


# --- slow path -----------------------------------------------------------------------


def _slow_path(dataset: bytes | memoryview, transfer_syntax_uid: str, max_inflated: int = MAX_INFLATED_BYTES,
               max_depth: int = MAX_NESTING_DEPTH) -> tuple[Raw, bytes | None]:
    """Raw wanted values read by pydicom (big endian, deflated, or what the scanner
    refused), and the header re-encoded little endian. Of a deflated data set, only its
    head is inflated (_deflated_head)."""
    try:
        syntax = UID(transfer_syntax_uid)
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
        deflated = syntax.is_deflated
    except ValueError:  # not a known transfer syntax: explicit VR little endian, as pydicom
        implicit, little, deflated = False, True, False
    data = bytes(dataset)  # no copy when it already is bytes
    whole_header = True
    if deflated:
        data, whole_header = _deflated_head(data, max_inflated, max_depth)
    fp = BytesIO(data)
    try:
        ds = read_dataset(fp, implicit, little, stop_when=_past_wanted,
                          specific_tags=_WANTED_LIST)
        # keep_deferred: an empty raw value is None, and must not be converted
        elements = [ds.get_item(tag, keep_deferred=True) for tag in _WANTED if tag in ds]
    except RecursionError:  # pydicom recurses into undefined-length sequences
        raise too_deep(max_depth) from None
    except Exception as exc:  # pydicom signals bad data with many exception types
        raise UnreadableDataset(f"pydicom cannot parse the data set: {exc}") from exc
    if fp.tell() > len(data):
        raise UnreadableDataset(f"data set truncated: an element ends at byte {fp.tell()} "
                                f"of a {len(data)}-byte data set")
    raw: Raw = {}
    for elem in elements:
        value = elem.value if isinstance(elem.value, bytes) else b""  # None when empty
        length = getattr(elem, "length", 0)  # only raw elements have one
        if length != _UNDEFINED and len(value) < length:
            raise UnreadableDataset(f"data set truncated inside element {elem.tag}")
        vr = elem.VR if elem.VR and elem.VR != "UN" else _DICTIONARY_VR[elem.tag]
        raw[int(elem.tag)] = (str(vr), value)
    if not whole_header:
        return raw, None
    return raw, _slow_header(data, implicit, little, _syntax(transfer_syntax_uid) == "implicit", max_depth)


# --- deflated: the head only, in bounded memory ----------------------------------------


def _deflated_head(data: bytes, max_inflated: int, max_depth: int) -> tuple[bytes, bool]:
    """What the slow path needs of a Deflated data set: its top-level elements up to Pixel
    Data, bulk values left out (skipped as they inflate, never held), as explicit VR
    little endian bytes; and whether they are the whole header (False: past _MAX_HEADER).

    Inflates no further than Pixel Data, never past `max_inflated` bytes in all
    (LimitExceeded), and walks sequences iteratively, `max_depth` deep at most. What the
    walk cannot follow (a broken or cut encoding) is handed to pydicom whole, as before,
    inflated within the same bound."""
    stream = Inflater(data, max_inflated)
    kept = bytearray()
    try:
        while True:
            head = stream.peek(12)
            if len(head) < 8:
                return bytes(kept), True
            group, element, vr, length = _EXPLICIT_HEADER(head, 0)
            tag = group << 16 | element
            if tag > _HEADER_LIMIT:
                return bytes(kept), True
            size = 8
            if vr in _LONG_VRS:
                if len(head) < 12:
                    raise _Fallback("header runs past the end")
                length, size = _UINT32(head, 8)[0], 12
            elif vr not in _VR_BY_CODE:
                raise _Fallback(f"unknown VR of ({group:04X},{element:04X})")
            if length == _UNDEFINED:
                value = _undefined_value(stream, size, vr == _UN, max_depth)
                if value is not None and not (len(value) > _SMALL and tag in _BULK_TAGS):
                    kept += value
            elif length > _SMALL and tag not in _WANTED and _is_bulk(tag, vr, length):
                stream.read(size + length)
            else:
                stream.read(size + length, kept)
            if tag > _MAX_TAG and len(kept) > _MAX_HEADER:  # the catalog's values are in; no header
                return bytes(kept), False
    except (_Fallback, Truncated):
        return inflate(data, max_inflated), True


def _undefined_value(stream: Inflater, size: int, implicit: bool, max_depth: int) -> bytearray | None:
    """Read a top-level undefined-length element (its `size`-byte element header first)
    to its sequence delimiter; its bytes, or None when it is bulk (over _MAX_SEQUENCE).

    Iterative: `stack` holds one entry per open level, True for a sequence (items
    expected), False for an item (elements expected), with its VR encoding."""
    out: bytearray | None = bytearray()
    stream.read(size, out)
    stack, depth = [(True, implicit)], 1
    if depth > max_depth:
        raise too_deep(max_depth)
    while stack:
        in_sequence, implicit = stack[-1]
        head = stream.peek(12)
        if len(head) < 8:
            raise Truncated
        group, element, length = _IMPLICIT_HEADER(head, 0)
        tag = group << 16 | element
        if in_sequence:
            out = _take(stream, 8, out)
            if tag == _SEQUENCE_END:
                stack.pop()
                depth -= 1
            elif tag != _ITEM:
                raise _Fallback(f"expected an item, found ({group:04X},{element:04X})")
            elif length == _UNDEFINED:
                stack.append((False, implicit))
            else:
                out = _take(stream, length, out)
            continue
        if tag == _ITEM_END:
            out = _take(stream, 8, out)
            stack.pop()
            continue
        if group == 0xFFFE:
            raise _Fallback(f"unexpected delimiter ({group:04X},{element:04X})")
        size, vr = 8, 0
        if not implicit:
            vr = _UINT16(head, 4)[0]
            if vr in _LONG_VRS:
                if len(head) < 12:
                    raise Truncated
                length, size = _UINT32(head, 8)[0], 12
            elif vr in _VR_BY_CODE:
                length = _UINT16(head, 6)[0]
            else:
                raise _Fallback(f"unknown VR of ({group:04X},{element:04X})")
        out = _take(stream, size, out)
        if length != _UNDEFINED:
            out = _take(stream, length, out)
            continue
        depth += 1
        if depth > max_depth:
            raise too_deep(max_depth)
        stack.append((True, implicit or vr == _UN))
    return out


def _take(stream: Inflater, n: int, out: bytearray | None) -> bytearray | None:
    """Read n bytes into `out`, which becomes None (bulk: dropped) past _MAX_SEQUENCE."""
    if out is not None and len(out) + n > _MAX_SEQUENCE:
        out = None
    stream.read(n, out)
    return out


def _slow_header(data: bytes, implicit: bool, little: bool, implicit_out: bool,
                 max_depth: int = MAX_NESTING_DEPTH) -> bytes | None:
    """The header by pydicom, re-encoded little endian; None when pydicom cannot. Sequences
    nested past what pydicom's recursion holds refuse the data set (LimitExceeded), as the
    scanner does; the scanner counts levels, this only sees pydicom run out of stack."""
    try:
        ds = read_dataset(BytesIO(data), implicit, little,
                          stop_when=lambda tag, vr, length: tag > _HEADER_LIMIT)
        out = Dataset()
        for tag in list(ds.keys()):
            raw = ds.get_item(tag, keep_deferred=True)
            length = getattr(raw, "length", 0)
            vr = _vr_code(raw.VR) if raw.VR and len(raw.VR) == 2 else 0
            if length == _UNDEFINED or length > _SMALL:
                if int(tag) in _BULK_TAGS or (length != _UNDEFINED and _is_bulk(int(tag), vr, length)):
                    continue
            out.add(ds[tag])
        header = encode_dataset(out, implicit_out)
        return header if 0 < len(header) <= _MAX_HEADER else None
    except RecursionError:
        raise too_deep(max_depth) from None
    except Exception:  # best effort: the catalog columns are what a store needs
        return None


def encode_dataset(ds: Dataset, implicit: bool = False) -> bytes:
    """`ds` encoded little endian, Explicit VR unless `implicit`, without file meta: a data
    set as a C-STORE carries it and as the catalog keeps its header."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _past_wanted(tag: int, vr: str | None, length: int) -> bool:
    """stop_when for pydicom: the same stopping point as the scanner's."""
    return tag > _MAX_TAG


# --- decoding ------------------------------------------------------------------------


def _found_to_strings(buf: memoryview, found: Found) -> dict[str, str | None]:
    """What _to_strings(_raw(buf, found)) gives, without the bytes and tuples between:
    the scanner's values decoded straight from the data set (the store path's case)."""
    result: dict[str, str | None] = dict.fromkeys(_COLUMN_NAMES)
    obj = buf.obj
    data = obj if type(obj) is bytes and len(obj) == len(buf) else buf  # slicing bytes: one copy, no view
    charset = found.get(_CHARSET_TAG)
    decode_text = _text_decoder(_tidy(str(data[charset[1]:charset[2]], "latin-1"), "CS") if charset else None)
    for tag, (vr, start, end) in found.items():
        name = _DICTIONARY_VR[tag] if vr == _UN or not vr else _VR_BY_CODE[vr]
        if name in _TEXT_VRS and decode_text is not _latin1:
            text = decode_text(bytes(data[start:end]))
        else:
            text = str(data[start:end], "latin-1")
        result[_COLUMN_OF[tag]] = _tidy(text, name)
    return result


def _to_strings(raw: Raw) -> dict[str, str | None]:
    """Column name -> decoded, tidied value, from raw element bytes."""
    result: dict[str, str | None] = dict.fromkeys(_COLUMN_NAMES)
    charset = raw.get(_CHARSET_TAG)
    decode_text = _text_decoder(_tidy(charset[1].decode("latin-1"), "CS") if charset else None)
    for tag, (vr, value) in raw.items():
        text = decode_text(value) if vr in _TEXT_VRS else value.decode("latin-1")
        result[_COLUMN_OF[tag]] = _tidy(text, vr)
    return result


def _tidy(value: str, vr: str) -> str | None:
    """Strip the padding DICOM calls insignificant, value by value; '' becomes None."""
    if vr in _SINGLE_VALUED:
        return value.rstrip(" \x00") or None
    chars = " \x00"
    if vr in _LEADING_SPACE_KEPT:
        if "\\" not in value:
            return value.rstrip(chars) or None
        return "\\".join(v.rstrip(chars) for v in value.split("\\")) or None
    if "\\" not in value:
        return value.strip(chars) or None
    return "\\".join(v.strip(chars) for v in value.split("\\")) or None


def _latin1(value: bytes) -> str:
    return value.decode("latin-1")


def _utf8(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


@lru_cache(maxsize=256)
def _text_decoder(charset: str | None) -> Callable[[bytes], str]:
    """The decoder for text VRs under a Specific Character Set value; never raises.

    No charset and ISO_IR 6 decode as latin-1, not strict ASCII: it is what pydicom
    does, and mislabelled data must still land in the catalog.
    """
    terms = charset.split("\\") if charset else []
    if not any(terms) or terms in (["ISO_IR 6"], ["ISO_IR 100"]):
        return _latin1
    if terms == ["ISO_IR 192"]:
        return _utf8
    try:
        encodings = convert_encodings(terms)
    except (LookupError, ValueError):  # ValueError: a term with a NUL in it (codecs.lookup says so)
        encodings = ["iso8859"]

    def decode(value: bytes) -> str:
        try:
            return decode_bytes(value, encodings, TEXT_VR_DELIMS)
        except (UnicodeError, LookupError, ValueError):
            try:
                return value.decode(encodings[0], errors="replace")
            except LookupError:
                return value.decode("latin-1")

    return decode


if __name__ == "__main__":  # python -m stowage.catalog.attributes: µs per call on pydicom test files
    import timeit

    from pydicom.data import get_testdata_file
    from pydicom.filereader import _read_file_meta_info, read_preamble

    for name in ("MR_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm", "MR_small_bigendian.dcm"):
        with open(get_testdata_file(name), "rb") as f:
            read_preamble(f, False)
            syntax = _read_file_meta_info(f).TransferSyntaxUID
            body = f.read()
        loops, best = 5000, min(timeit.repeat(lambda: extract(body, syntax), number=5000, repeat=5))
        print(f"{name:28s} {len(body):6d} B  {syntax:22s} {best / loops * 1e6:7.1f} µs/call")
