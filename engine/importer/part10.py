"""Reading a DICOM file from disk (PS3.10) as the import needs it: where its data set
starts, what its File Meta Information says, and whether the data set is whole.

Four shapes are accepted: a Part-10 file (128-byte preamble, "DICM", file meta group),
one that starts with "DICM" and the file meta group (the preamble left out, which DCMTK
reads too), a file that starts directly with the file meta group, and a bare data set
(no meta at all; old ACR-NEMA-style exports, usually Implicit VR Little Endian). The
data set bytes are never re-encoded: the import stores the bytes from `dataset_offset` on
as they are.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, \
    ImplicitVRLittleEndian, MediaStorageDirectoryStorage

from stowage.catalog.limits import MAX_NESTING_DEPTH, too_deep

_DICM = b"DICM"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                       b"UV"})
_VR = re.compile(rb"^[A-Z]{2}$")
_UID = re.compile(r"^[0-9.]{1,64}$")
_LEGACY_UID = re.compile(r"^[\x21-\x7e]{1,64}$")  # old files' SOP UIDs: printable ASCII at least
_META_UIDS = {0x0002: "Media Storage SOP Class UID", 0x0003: "Media Storage SOP Instance UID",
              0x0010: "Transfer Syntax UID"}
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class NotDicom(ValueError):
    """The file is not DICOM (or nothing of it can be read as DICOM)."""


class Malformed(ValueError):
    """The file is DICOM but its data set is cut short or its encoding is broken."""


@dataclass(frozen=True)
class FileInfo:
    dataset_offset: int
    transfer_syntax_uid: str
    sop_class_uid: str | None      # from the file meta; None when there is none
    sop_instance_uid: str | None
    source_ae: str                 # (0002,0016), when a valid AE title, else ""
    has_meta: bool
    has_preamble: bool

    @property
    def is_dicomdir(self) -> bool:
        return self.sop_class_uid == MediaStorageDirectoryStorage  # a DICOMDIR


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\x00 ")


def _read_meta(data: bytes | memoryview, pos: int) -> tuple[int, dict[int, bytes]]:
    """Walk the (0002,eeee) elements from `pos` as pydicom does (while the group is 2);
    returns where the data set starts and the values by element number."""
    values: dict[int, bytes] = {}
    end = len(data)
    while end - pos >= 8:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4:pos + 6])
        if not _VR.match(vr):  # non-conformant Implicit VR meta
            length, head = struct.unpack_from("<I", data, pos + 4)[0], 8
        elif vr in _LONG_VRS:
            if end - pos < 12:
                raise Malformed("file meta group cut short")
            length, head = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", data, pos + 6)[0], 8
        if length == 0xFFFFFFFF or pos + head + length > end:
            raise Malformed(f"file meta element (0002,{element:04X}) runs past the end of the file")
        values[element] = bytes(data[pos + head:pos + head + length])
        pos += head + length
    return pos, values


def _guess_syntax(data: bytes | memoryview, pos: int) -> str:
    """The transfer syntax of a data set without file meta (PS3.5 says nothing; this is
    what DCMTK and pydicom guess): big endian when the first group reads byte-swapped,
    explicit when a VR follows the first tag, else implicit."""
    if len(data) - pos < 8:
        raise NotDicom("too short to be DICOM")
    group_le = struct.unpack_from("<H", data, pos)[0]
    group_be = struct.unpack_from(">H", data, pos)[0]
    vr = bytes(data[pos + 4:pos + 6])
    if group_le > 0x00FF and 0x0002 <= group_be <= 0x00FF and _VR.match(vr):
        return ExplicitVRBigEndian
    if not 0x0002 <= group_le <= 0x0028:  # a data set starts with a low group: 0008, 0010…
        raise NotDicom("no preamble, no file meta, and no recognisable data set")
    return ExplicitVRLittleEndian if _VR.match(vr) else ImplicitVRLittleEndian


def _prefix_without_preamble(data: bytes | memoryview) -> bool:
    """"DICM" at the very start, then a file meta element: a Part-10 file whose 128-byte
    preamble was left out (DCMTK reads these; so do we)."""
    return len(data) >= 16 and bytes(data[:4]) == _DICM and struct.unpack_from("<H", data, 4)[0] == 0x0002


def _check_uids(meta: dict[int, bytes]) -> None:
    """The file meta's UIDs must be UIDs: a damaged one (flipped bits, another character set)
    refuses this file with its reason, never a failure further down the store path."""
    for element, name in _META_UIDS.items():
        if element in meta:
            value = meta[element].rstrip(b"\x00 ")
            if not (_UID if element == 0x0010 else _LEGACY_UID).match(value.decode("latin-1")):
                raise Malformed(f"the file meta {name} (0002,{element:04X}) is not a UID: {value[:64]!r}")


def read_info(data: bytes | memoryview) -> FileInfo:
    """What the file's first bytes say; raises NotDicom or Malformed."""
    if len(data) == 0:
        raise NotDicom("empty file")
    preamble = len(data) >= 132 and bytes(data[128:132]) == _DICM
    start = 132 if preamble else 4 if _prefix_without_preamble(data) else 0
    has_meta = len(data) - start >= 12 and struct.unpack_from("<H", data, start)[0] == 0x0002
    if not has_meta and preamble:
        raise Malformed("no File Meta Information after the DICM prefix")
    if has_meta:
        offset, meta = _read_meta(data, start)
        _check_uids(meta)
        syntax = _text(meta.get(0x0010, b"")) or None
    else:
        offset, meta, syntax = 0, {}, None
    if syntax is None:
        try:
            syntax = _guess_syntax(data, offset)
        except NotDicom:
            if has_meta:
                raise Malformed("no Transfer Syntax UID in the file meta, and the data set is not recognisable")
            raise
    source = _text(meta.get(0x0016, b"")).strip()
    return FileInfo(offset, syntax, _text(meta[0x0002]) if 0x0002 in meta else None,
                    _text(meta[0x0003]) if 0x0003 in meta else None,
                    source if _AE.match(source) else "", has_meta, preamble)


# --- is the data set whole? ----------------------------------------------------------

def check_whole(dataset: bytes | memoryview, transfer_syntax_uid: str, file_offset: int = 0,
                max_depth: int = MAX_NESTING_DEPTH) -> None:
    """Raise Malformed if the data set is cut short: every element's length, sequences and
    encapsulated pixel data included, must fit; LimitExceeded if undefined-length values
    nest deeper than `max_depth` (the walk recurses once per level, so it is bounded
    there, never by Python's stack). Deflated data sets are left to the catalog reader,
    which inflates them within its own limits. Byte positions in messages count from the
    start of the file, where the data set begins at `file_offset`."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return
    big = transfer_syntax_uid == ExplicitVRBigEndian
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    if not implicit and len(dataset) >= 8 and not _VR.match(bytes(dataset[4:6])):
        raise Malformed(f"the data set is Implicit VR, but its transfer syntax {transfer_syntax_uid} is explicit")
    try:
        _Walker(dataset, ">" if big else "<", implicit, file_offset, max_depth).dataset(0, in_item=False)
    except RecursionError:  # a max_depth above what Python's stack holds
        raise too_deep(max_depth) from None


class _Walker:
    """Hops over elements by their lengths; never decodes values."""

    def __init__(self, data: bytes | memoryview, endian: str, implicit: bool, base: int,
                 max_depth: int = MAX_NESTING_DEPTH) -> None:
        self.data, self.end, self.implicit, self.base = data, len(data), implicit, base
        self.max_depth = max_depth
        self.tag = struct.Struct(endian + "HH")
        self.u32 = struct.Struct(endian + "I")
        self.u16 = struct.Struct(endian + "H")
        self.item = struct.Struct(endian + "HHI")

    def _cut(self, what: str, pos: int) -> Malformed:
        return Malformed(f"truncated: {what} at byte {self.base + pos} runs past the end of the file "
                         f"({self.base + self.end} bytes)")

    def dataset(self, pos: int, in_item: bool, implicit: bool | None = None, room: int | None = None) -> int:
        """Walk elements from `pos` (to the item's delimiter when `in_item`); `room`: how
        many levels of undefined-length values may still open (max_depth at the top)."""
        implicit = self.implicit if implicit is None else implicit
        room = self.max_depth if room is None else room
        data, end = self.data, self.end
        while pos < end:
            if end - pos < 8:
                if not in_item and not any(bytes(data[pos:end])):
                    return end  # a few zero bytes of padding after the last element
                raise self._cut("an element header", pos)
            group, element = self.tag.unpack_from(data, pos)
            tag = group << 16 | element
            if tag == _ITEM_END:
                return pos + 8
            if group == 0xFFFE:
                raise Malformed(f"unexpected delimiter ({group:04X},{element:04X}) at byte {self.base + pos}")
            vr = b""
            if implicit:
                length, head = self.u32.unpack_from(data, pos + 4)[0], 8
            else:
                vr = bytes(data[pos + 4:pos + 6])
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise self._cut("an element header", pos)
                    length, head = self.u32.unpack_from(data, pos + 8)[0], 12
                else:
                    length, head = self.u16.unpack_from(data, pos + 6)[0], 8
            pos += head
            if length == 0xFFFFFFFF:  # a sequence, UN sequence, or encapsulated pixel data
                if room < 1:
                    raise too_deep(self.max_depth)
                pos = self._items(pos, tag, implicit or vr == b"UN", room - 1)
            elif pos + length > end:
                raise self._cut(f"element ({group:04X},{element:04X}) of {length} bytes", pos - head)
            else:
                pos += length
        if in_item:
            raise self._cut("an item without its delimiter", pos)
        return pos

    def _items(self, pos: int, tag: int, implicit: bool, room: int) -> int:
        data, end = self.data, self.end
        while True:
            if end - pos < 8:
                raise self._cut(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) without its sequence delimiter", pos)
            group, element, length = self.item.unpack_from(data, pos)
            item_tag = group << 16 | element
            pos += 8
            if item_tag == _SEQ_END:
                return pos
            if item_tag != _ITEM:
                raise Malformed(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): expected an item at byte {self.base + pos - 8}")
            if length == 0xFFFFFFFF:
                pos = self.dataset(pos, in_item=True, implicit=implicit, room=room)
            elif pos + length > end:
                raise self._cut(f"an item of ({tag >> 16:04X},{tag & 0xFFFF:04X})", pos - 8)
            else:
                pos += length
