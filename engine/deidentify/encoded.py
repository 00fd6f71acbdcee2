"""The profile applied to an encoded data set, element by element, without building a
pydicom Dataset: what ingest at wire speed needs (issue #22 asks >= 0.8x of plain ingest).

Only the elements an action changes are decoded and re-encoded; every other element,
pixel data included, is copied as it came. Sequences that are walked are written back with
undefined lengths (PS3.5 7.5.2), valid in every transfer syntax this handles: Implicit and
Explicit VR Little Endian, and the encapsulated (compressed) ones. Anything else -- big
endian, deflated, a character set beyond ASCII, Latin-1 and UTF-8, an instance with
burned-in annotation to check or clean, Explicit VR UN of undefined length -- raises
`Fallback`, and the caller takes the pydicom path (profile.py), which gives the same result
(tests/test_deidentify.py compares them)."""
from __future__ import annotations

import struct
from functools import lru_cache

from pydicom.datadict import dictionary_VR
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from stowage.engine.deidentify.dates import shift_da, shift_dt
from stowage.engine.deidentify.pixels import BURNING_MODALITIES, is_secondary_capture
from stowage.engine.deidentify.profile import (single_action, _DUMMY, _FREE_TEXT_VRS, _PATIENT_ID, _PATIENT_NAME,
                                               BASIC_PROFILE, DUMMY_TEXT, OPTION_CODES, Outcome, Profile, _Instance)


class Fallback(Exception):
    """This data set needs the pydicom path."""


UNDEFINED = 0xFFFFFFFF
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NUMBER_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8, "AT": 4}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_HEAD, _U32 = struct.Struct("<HHI"), struct.Struct("<I")
_LONG_STR = {v.decode() for v in _LONG}
_VRS = {v.encode(): v for v in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD",
                                "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI",
                                "UL", "UN", "UR", "US", "UT", "UV")}
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_MARKS = {0x00120062, 0x00120063, 0x00120064, 0x00280303}
_MARKS_CACHE: dict[tuple[int, tuple[bool, str]], tuple[Profile, list[tuple[int, bytes]]]] = {}
# Top-level attributes read before the walk: the patient, the pixel checks, the charset.
_WANTED = {0x00080005: "SpecificCharacterSet", 0x00100020: "PatientID", 0x00100010: "PatientName",
           0x00100021: "IssuerOfPatientID", 0x00100030: "PatientBirthDate", 0x00080050: "AccessionNumber",
           0x00101000: "OtherPatientIDs", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
           0x00080016: "SOPClassUID", 0x00080060: "Modality", 0x00280301: "BurnedInAnnotation",
           0x00280302: "RecognizableVisualFeatures"}
_PIXELS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_LAST_WANTED = max(_WANTED)
_ACTED_MAX, _ACTED_BYTES = 1 << 14, 256  # elements remembered per profile, up to this size (`_Walk.acted`)


@lru_cache(maxsize=4096)
def _vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


class _Walk:
    """One data set's rewrite."""

    def __init__(self, profile: Profile, buf: memoryview, implicit: bool) -> None:
        self.p, self.buf, self.implicit = profile, buf, implicit
        self.b = buf.obj if isinstance(buf.obj, bytes) and len(buf) == len(buf.obj) else bytes(buf)
        self.buf = memoryview(self.b)
        self.by_tag = profile.actions.by_tag
        self.codec = "ascii"
        self.inst: _Instance | None = None

    # -- reading --------------------------------------------------------------------------
    def header(self, pos: int) -> tuple[int, str, int, int]:
        """(tag, VR, value offset, value length) of the element at `pos`."""
        b = self.b
        group, elem, rest = _HEAD.unpack_from(b, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:
            return tag, "", pos + 8, rest
        if self.implicit:
            vr = "SQ" if rest == UNDEFINED and tag not in _PIXELS else _vr_of(tag)
            return tag, vr, pos + 8, rest
        vr = _VRS.get(b[pos + 4:pos + 6])
        if vr is None:
            raise Fallback(f"unknown VR at offset {pos}")
        if vr in _LONG_STR:
            length = _U32.unpack_from(b, pos + 8)[0]
            if vr == "UN" and length == UNDEFINED:
                raise Fallback("Explicit VR UN of undefined length (an implicit sequence inside)")
            return tag, vr, pos + 12, length
        return tag, vr, pos + 8, rest >> 16

    def skip_undefined(self, pos: int) -> int:
        """End of an undefined-length sequence or encapsulated pixel data starting at `pos`."""
        while True:
            tag, _vr, val, length = self.header(pos)
            if tag == _SEQ_END:
                return val
            if tag != _ITEM:
                raise Fallback(f"unexpected ({tag >> 16:04X},{tag & 0xFFFF:04X}) in a sequence")
            pos = val + length if length != UNDEFINED else self.skip_items_content(val)

    def skip_items_content(self, pos: int) -> int:
        while True:
            tag, vr, val, length = self.header(pos)
            if tag == _ITEM_END:
                return val
            pos = self.skip_undefined(val) if length == UNDEFINED else val + length

    def text(self, val: int, length: int) -> str:
        return self.b[val:val + length].decode(self.codec).rstrip("\0 ").lstrip(" ")

    # -- writing --------------------------------------------------------------------------
    def element(self, tag: int, vr: str, value: bytes) -> bytes:
        if len(value) & 1:
            value += b"\0" if vr in ("UI", "OB", "UN") else b" "
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if self.implicit:
            return head + struct.pack("<I", len(value)) + value
        if vr.encode() in _LONG:
            return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
        return head + vr.encode() + struct.pack("<H", len(value)) + value

    def string(self, tag: int, vr: str, value: str) -> bytes:
        return self.element(tag, vr, value.encode(self.codec))

    def sequence(self, tag: int, items: list[list[bytes]]) -> bytes:
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + (b"" if self.implicit else b"SQ\0\0")
        out = [head, b"\xff\xff\xff\xff"]
        for item in items:
            out += [b"\xfe\xff\x00\xe0\xff\xff\xff\xff", *item, b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"]
        out.append(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
        return b"".join(out)

    # -- the profile ----------------------------------------------------------------------
    def items(self, val: int, length: int, dummy_text: bool, scrub: bool = False) -> list[list[bytes]]:
        out, pos = [], val
        end = None if length == UNDEFINED else val + length
        while end is None or pos < end:
            tag, _vr, ival, ilen = self.header(pos)
            if tag == _SEQ_END:
                break
            if tag != _ITEM:
                raise Fallback("a sequence holds something other than items")
            iend = None if ilen == UNDEFINED else ival + ilen
            chunks, after = self.dataset(ival, iend, dummy_text, scrub)
            out.append(chunks)
            pos = after
        return out

    def dataset(self, pos: int, end: int | None, dummy_text: bool, scrub: bool = False,
                marks: list[tuple[int, bytes]] | tuple = ()) -> tuple[list[bytes], int]:
        """The rewritten elements of one data set, and where it ended (`end` None: at its
        Item Delimitation Item). Elements no action changes are copied in runs, as one
        slice each; `marks` (the top level's) go in tag order, replacing any the sender wrote.

        The element headers are read inline here, as `header` reads them: this loop runs
        for every element of every instance ingested into a project."""
        out: list = []
        private: list[tuple[int, int, int]] = []
        b, buf, unpack, u32 = self.b, self.buf, _HEAD.unpack_from, _U32.unpack_from
        implicit, get_action, vrs = self.implicit, self.by_tag.get, _VRS
        keep_private = self.p.actions.private == "C"
        limit = len(b) if end is None else end
        run = pos          # start of the run of elements copied as they came
        mi, n_marks = 0, len(marks)
        next_mark = marks[0][0] if n_marks else 0x100000000
        while pos < limit:
            group, elem, rest = unpack(b, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if end is None and tag == _ITEM_END:
                    break
                vr, val, length = "", pos + 8, rest
            elif implicit:
                vr, val, length = ("SQ" if rest == UNDEFINED and tag not in _PIXELS else _vr_of(tag)), pos + 8, rest
            else:
                vr = vrs.get(b[pos + 4:pos + 6])
                if vr is None:
                    raise Fallback(f"unknown VR at offset {pos}")
                if vr in _LONG_STR:
                    length, val = u32(b, pos + 8)[0], pos + 12
                    if vr == "UN" and (length == UNDEFINED or not group & 1 and _vr_of(tag) != "UN"):
                        # an implicit sequence inside, or a standard attribute a system that did not
                        # know it wrote as UN (a newer sequence holding UIDs, names): pydicom reads
                        # it with its dictionary VR, so that the profile sees what it is
                        raise Fallback("Explicit VR UN of undefined length, or of a standard attribute")
                else:
                    val, length = pos + 8, rest >> 16
            nxt = self.skip_undefined(val) if length == UNDEFINED else val + length
            if tag >= next_mark:  # the marks before this element, in tag order
                if run < pos:
                    out.append(buf[run:pos])
                if private:
                    out += self.private(private)
                    private = []
                while mi < n_marks and marks[mi][0] <= tag:
                    out.append(marks[mi][1])
                    mi += 1
                next_mark = marks[mi][0] if mi < n_marks else 0x100000000
                run = pos
            if group & 1:
                if run < pos:
                    out.append(buf[run:pos])
                if keep_private:
                    private.append((tag, pos, nxt))
                pos = run = nxt
                continue
            if private:
                out += self.private(private)
                private = []
            action = get_action(tag)
            if (action is None or action == "K") and vr != "SQ" and tag not in _MARKS and \
                    not ((dummy_text and action is None or scrub) and vr in _FREE_TEXT_VRS and length) and \
                    not (0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E):
                pos = nxt  # unchanged: stays in the run
                continue
            if run < pos:
                out.append(buf[run:pos])
            run = nxt
            if tag in _MARKS and n_marks or 0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E:
                pos = nxt
                continue
            if tag in (_PATIENT_NAME, _PATIENT_ID) and action not in ("K", None):
                out.append(self.string(tag, vr, self.inst.pseudonym))
                pos = nxt
                continue
            if action is not None and vr != "SQ" and not scrub:
                chunk = self.acted(tag, vr, pos, val, length, nxt, action)
            else:
                chunk = self.act(tag, vr, pos, val, length, nxt, action, dummy_text)
            if chunk is not None:
                if scrub and vr in _FREE_TEXT_VRS:
                    chunk = self.scrubbed(chunk, tag, vr)
                out.append(chunk)
            pos = nxt
        else:
            if end is None:
                raise Fallback("an item of undefined length without its Item Delimitation Item")
        if run < pos:
            out.append(buf[run:pos])
        if private:
            out += self.private(private)
        while mi < n_marks:
            out.append(marks[mi][1])
            mi += 1
        return out, (pos + 8 if end is None else end)

    def scrubbed(self, chunk: bytes, tag: int, vr: str) -> bytes:
        mv = memoryview(chunk)
        w = _Walk(self.p, mv, self.implicit)
        w.codec, w.inst = self.codec, self.inst
        _t, _v, val, length = w.header(0)
        if not length:
            return chunk
        value = w.text(val, length)
        return self.string(tag, vr, self.p._scrub(value, self.inst)) if value else chunk

    def acted(self, tag, vr, start, val, length, nxt, action):
        """`act` for an element that is not a sequence, remembered: one series' instances
        carry the same study, series and frame of reference UIDs, dates and device
        values, and come out the same for the same patient. The key holds the element's
        bytes, the action, the encoding and the patient (date offset, words to scrub);
        the UIDs an element maps are recorded in the instance on every use."""
        if nxt - start > _ACTED_BYTES or action == "X":  # large values are rare, and not kept
            return self.act(tag, vr, start, val, length, nxt, action, False)
        inst = self.inst
        key = (self.b[start:nxt], action, self.implicit, self.codec, inst.offset, inst.scrub)
        cache = self.p.acted
        hit = cache.get(key)
        if hit is None:
            chunk = self.act(tag, vr, start, val, length, nxt, action, False)
            pairs = ()
            if vr == "UI" and length:
                olds = (u.strip("\0 ") for u in self.text(val, length).split("\\"))
                pairs = tuple((o, inst.uids[o]) for o in olds if o in inst.uids)
            if len(cache) >= _ACTED_MAX:
                cache.clear()
            cache[key] = (chunk, pairs)
            return chunk
        chunk, pairs = hit
        for old, new in pairs:
            inst.uids.setdefault(old, new)
        return chunk

    def act(self, tag, vr, start, val, length, nxt, action, dummy_text):
        raw = self.buf[start:nxt]
        if action is None:
            if vr == "SQ":
                return self.sequence(tag, self.items(val, length, dummy_text))
            if dummy_text and vr in _FREE_TEXT_VRS and length:
                return self.string(tag, vr, DUMMY_TEXT)
            return raw
        if action == "X":
            return None
        action = single_action(action, vr)
        if action == "K":
            return self.sequence(tag, self.items(val, length, dummy_text)) if vr == "SQ" else raw
        if action == "Z":
            return self.sequence(tag, []) if vr == "SQ" else self.element(tag, vr, b"")
        if action == "D":
            return self.dummy(tag, vr, val, length)
        if action == "U":
            if vr == "SQ":
                return self.sequence(tag, self.items(val, length, dummy_text))
            if vr == "UI":
                return self.uids(tag, val, length)
            return self.element(tag, vr, b"")
        if action == "C":
            return self.clean(tag, vr, raw, val, length)
        raise ValueError(f"action {action!r}")

    def uids(self, tag: int, val: int, length: int) -> bytes:
        text = self.text(val, length)
        if not text:
            return self.element(tag, "UI", b"")
        new = "\\".join(self.uid(u.strip("\0 ")) for u in text.split("\\"))
        return self.string(tag, "UI", new)

    def uid(self, old: str) -> str:
        uids = self.inst.uids
        if old not in uids:
            uids[old] = self.p.keyed.uid(old)
        return uids[old]

    def dummy(self, tag: int, vr: str, val: int, length: int) -> bytes:
        if vr == "SQ":
            return self.sequence(tag, self.items(val, length, True))
        if vr == "UI":
            return self.uids(tag, val, length)
        if vr in _NUMBER_SIZE:
            return self.element(tag, vr, b"\0" * _NUMBER_SIZE[vr])
        if vr in _BINARY:
            return self.element(tag, vr, b"\0\0")
        return self.string(tag, vr, _DUMMY[vr] if vr in _DUMMY else DUMMY_TEXT)

    def clean(self, tag: int, vr: str, raw, val: int, length: int) -> bytes:
        if vr == "SQ":
            return self.sequence(tag, self.items(val, length, False, scrub=True))
        if not length:
            return bytes(raw)
        if vr in ("DA", "DT"):
            if self.p.modified_dates:
                shift = shift_da if vr == "DA" else shift_dt
                values = self.text(val, length).split("\\")
                return self.string(tag, vr, "\\".join(shift(v, self.inst.offset) for v in values))
            return bytes(raw) if self.p.full_dates else self.dummy(tag, vr, val, length)
        if vr == "TM":
            return bytes(raw)
        if vr == "AE":
            return self.string(tag, vr, "AE" + self.p.keyed.token("ae", self.text(val, length), 12))
        if vr in _BINARY:
            return self.dummy(tag, vr, val, length)
        if vr in _FREE_TEXT_VRS:
            values = self.text(val, length).split("\\") if vr not in ("LT", "ST", "UT") else \
                [self.text(val, length)]
            return self.string(tag, vr, "\\".join(self.p._scrub(v, self.inst) for v in values))
        return bytes(raw)

    def private(self, found: list[tuple[int, int, int]]) -> list[bytes]:
        """Retain Safe Private: the Table E.3.10-1 elements and their creators, in order."""
        creators = {}
        for tag, start, nxt in found:
            if 0x10 <= (tag & 0xFFFF) <= 0xFF:
                _t, _v, val, length = self.header(start)
                creators[(tag >> 16, tag & 0xFF)] = self.text(val, length).strip()
        keep = set()
        for tag, _s, _n in found:
            elem = tag & 0xFFFF
            if elem >= 0x1000:
                creator = creators.get((tag >> 16, elem >> 8))
                if creator and (tag >> 16, creator, elem & 0xFF) in self.p.actions.safe_private:
                    keep |= {tag, (tag & 0xFFFF0000) | (elem >> 8)}
        return [self.buf[s:n] for tag, s, n in found if tag in keep]


def _top_values(w: _Walk, start: int, end: int) -> dict[str, object]:
    """The _WANTED attributes of the top level (they all come before (0028,0303)); the
    headers read inline, as `_Walk.header` reads them (this runs for every instance)."""
    values: dict[str, object] = {}
    pos, b, implicit, unpack = start, w.b, w.implicit, _HEAD.unpack_from
    while pos < end:
        group, elem, rest = unpack(b, pos)
        tag = group << 16 | elem
        if tag > _LAST_WANTED:
            break
        if implicit or group == 0xFFFE:
            val, length = pos + 8, rest
        elif b[pos + 4:pos + 6] in _LONG:
            val, length = pos + 12, _U32.unpack_from(b, pos + 8)[0]
        else:
            val, length = pos + 8, rest >> 16
        if tag in _WANTED:
            text = b[val:val + length].decode("latin-1").rstrip("\0 ").lstrip(" ")
            values[_WANTED[tag]] = text.split("\\") if tag == 0x00101000 and "\\" in text else text
        pos = w.skip_undefined(val) if length == UNDEFINED else val + length
    return values


def deidentify(profile: Profile, data: bytes | memoryview, transfer_syntax: str, start: int = 0,
               ) -> tuple[bytes, Outcome, str]:
    """The de-identified encoding of `data[start:]` (a data set without file meta), what was
    done, and the SOP Class UID. (`start`: a whole file's bytes need no copy.)"""
    parts, outcome, sop_class = deidentify_parts(profile, data, transfer_syntax, start)
    return b"".join(parts), outcome, sop_class


def deidentify_parts(profile: Profile, data: bytes | memoryview, transfer_syntax: str, start: int = 0,
                     ) -> tuple[list, Outcome, str]:
    """`deidentify`, the encoding left in pieces (bytes, and slices of `data` where it is
    unchanged): written with one writev, a CT's pixels are never copied in memory."""
    if transfer_syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        raise Fallback(f"transfer syntax {transfer_syntax}")
    buf = memoryview(data)
    w = _Walk(profile, buf, transfer_syntax == ImplicitVRLittleEndian)
    values = _top_values(w, start, len(buf))
    charset = str(values.get("SpecificCharacterSet", "")).strip()
    if charset not in _CODECS:
        raise Fallback(f"character set {charset}")
    w.codec = _CODECS[charset]
    # (the pydicom path decides for these, also whether there are pixels at all)
    if (str(values.get("BurnedInAnnotation", "")).upper() == "YES"
                                 or str(values.get("Modality", "")).upper() in BURNING_MODALITIES
                                 or is_secondary_capture(str(values.get("SOPClassUID", "")))
                                 or str(values.get("RecognizableVisualFeatures", "")).upper() == "YES"):
        raise Fallback("burned-in annotation to check")
    decoded = {k: (bytes(v, "latin-1").decode(w.codec) if isinstance(v, str) else v) for k, v in values.items()}
    w.inst = inst = _Instance(lambda k: decoded.get(k, ""), profile.keyed)
    key = (w.implicit, w.codec)
    marks = _MARKS_CACHE.get((id(profile), key))
    if marks is None:  # the same for every instance of one profile and encoding
        marks = _MARKS_CACHE[(id(profile), key)] = (profile, _marks(w, profile))
    chunks, _ = w.dataset(start, len(buf), dummy_text=False, marks=marks[1])
    sop = str(values.get("SOPInstanceUID", ""))
    study = str(values.get("StudyInstanceUID", ""))
    new_sop = inst.uids.get(sop, sop) if not profile.retain_uids else sop
    new_study = inst.uids.get(study, study) if not profile.retain_uids else study
    return chunks, Outcome(inst.patient_id, inst.patient_name, inst.pseudonym,
                                     inst.offset if profile.modified_dates else 0, (sop, new_sop),
                                     (study, new_study), inst.uids), str(values.get("SOPClassUID", ""))


def _marks(w: _Walk, profile: Profile) -> list[tuple[int, bytes]]:
    chosen = [BASIC_PROFILE] + [OPTION_CODES[o] for o in sorted(profile.options)]
    items = [[w.string(0x00080100, "SH", c.value), w.string(0x00080102, "SH", c.scheme_designator),
              w.string(0x00080104, "LO", c.meaning)] for c in chosen]
    dates = "MODIFIED" if profile.modified_dates else "UNMODIFIED" if profile.full_dates else "REMOVED"
    return [(0x00120062, w.string(0x00120062, "CS", "YES")),
            (0x00120063, w.string(0x00120063, "LO", "\\".join(c.meaning[:64] for c in chosen))),
            (0x00120064, w.sequence(0x00120064, items)),
            (0x00280303, w.string(0x00280303, "CS", dates))]
