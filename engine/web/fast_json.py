"""The DICOM JSON Model (PS3.18 F.2) straight from a data set's raw elements, for metadata
of many instances: the catalog's stored headers are read by pydicom without converting
any value, and each value is turned into JSON here in one step, about ten times faster
than pydicom's Dataset.to_json_dict (which builds a DataElement per value first).

Sequences, ambiguous VRs and anything unexpected fall back to pydicom's conversion of that
one element, so the answer is the same JSON either way (tests/test_fast_json.py)."""
from __future__ import annotations

import base64
import struct
from typing import Any, Callable

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

BULK_THRESHOLD = 1024
_SPECIFIC_CHARACTER_SET = 0x00080005
_STRINGS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "SH", "LO", "UC"})
_TEXTS = frozenset({"ST", "LT", "UT", "UR"})  # one value: a backslash is text
_ENCODED = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})  # Specific Character Set applies
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_BINARY = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}
_TEXT_DELIMITERS = {0x5C}


class _Fallback(Exception):
    pass


def _vr(tag: int, raw_vr: str | None) -> str:
    if raw_vr:
        return str(raw_vr)
    if tag & 0x10000:  # private (odd group) in an implicit VR data set: unknown
        return "UN"
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _decode(value: bytes, vr: str, encodings: list[str]) -> str:
    if vr in _ENCODED:
        return decode_bytes(value, encodings, _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS)
    return value.decode("ascii", "replace")


def number(text: str, vr: str) -> int | float:
    text = text.strip()
    if vr == "IS":
        return int(text)
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _value(tag: int, vr: str, value: bytes, encodings: list[str], bulk: Callable[[int], str] | None) -> dict:
    out: dict[str, Any] = {"vr": vr}
    if not value:
        return out
    if vr in _STRINGS or vr in _TEXTS:
        text = _decode(value, vr, encodings)
        if vr in _TEXTS:
            text = text.rstrip(" \x00")
            return dict(out, Value=[text]) if text else out
        parts = [p.strip(" \x00") if vr != "UI" else p.rstrip(" \x00") for p in text.split("\\")]
        if not any(parts):
            return out
        return dict(out, Value=[p if p else None for p in parts])
    if vr == "PN":
        text = _decode(value, vr, encodings).rstrip(" \x00")
        if not text:
            return out
        names = []
        for name in text.split("\\"):
            groups = name.split("=")
            item = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups) if g}
            names.append(item or None)
        return dict(out, Value=names)
    if vr in ("IS", "DS"):
        text = value.decode("ascii").strip(" \x00")
        if not text:
            return out
        return dict(out, Value=[number(p, vr) if p.strip() else None for p in text.split("\\")])
    if vr in _NUMBERS:
        fmt = _NUMBERS[vr]
        size = struct.calcsize(fmt)
        if len(value) % size:
            raise _Fallback
        return dict(out, Value=list(struct.unpack(f"<{len(value) // size}{fmt}", value)))
    if vr == "AT":
        if len(value) % 4:
            raise _Fallback
        pairs = struct.unpack(f"<{len(value) // 2}H", value)
        return dict(out, Value=[f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)])
    if vr in _BINARY:
        if len(value) > BULK_THRESHOLD:
            return dict(out, BulkDataURI=bulk(tag)) if bulk is not None else {}
        return dict(out, InlineBinary=base64.b64encode(value).decode("ascii"))
    raise _Fallback


def element_json(tag: int, vr: str, value: bytes, encodings: list[str], bulk: Callable[[int], str] | None) -> dict:
    """One plain (not sequence, not ambiguous VR) little-endian value as a DICOM JSON
    object; raises ValueError when it needs pydicom's conversion instead."""
    try:
        return _value(tag, vr, value, encodings, bulk)
    except _Fallback:
        raise ValueError("not a plain value") from None


def dataset_json(ds: Dataset, bulk: Callable[[int], str] | None,
                 inherited: list[str] | None = None) -> dict[str, Any]:
    """`ds` (as read, values not yet converted) as a DICOM JSON object; binary values past
    BULK_THRESHOLD become bulk(tag) BulkDataURIs (left out when bulk is None). Specific
    Character Set is used to decode and left out (JSON text is Unicode). A sequence's
    items are converted the same way (with the character set they inherit); a bulk value
    inside item i of sequence S gets the URI bulk(S) + ".i.tag" (wado.py resolves it)."""
    raw_charset = ds.get(_SPECIFIC_CHARACTER_SET)
    try:
        charset = raw_charset.value if raw_charset is not None else None
        encodings = convert_encodings([charset] if isinstance(charset, str) else list(charset or []) or None) \
            if charset or inherited is None else inherited
    except Exception:
        encodings = inherited or convert_encodings(None)
    out: dict[str, Any] = {}
    for tag, raw in ds._dict.items():  # raw elements: nothing converted yet
        tag = int(tag)
        if tag == _SPECIFIC_CHARACTER_SET or not tag & 0xFFFF:  # and no group lengths
            continue
        try:
            if getattr(raw, "is_raw", False) and raw.value is None and raw.length not in (0, 0xFFFFFFFF):
                obj = _deferred(tag, raw, bulk)  # left on disk by dcmread(defer_size=...): bulk, never read
                if obj:
                    out[f"{tag:08X}"] = obj
                continue
            if not getattr(raw, "is_raw", False):
                raise _Fallback
            vr = _vr(tag, raw.VR)
            if vr == "SQ":
                obj = _sequence(ds, tag, bulk, encodings)
            elif " or " in vr or not raw.is_little_endian:
                raise _Fallback
            else:
                obj = _value(tag, vr, raw.value or b"", encodings, bulk)
        except _Fallback:
            obj = _pydicom(ds, tag, bulk)
        except (ValueError, UnicodeDecodeError, struct.error):
            obj = _pydicom(ds, tag, bulk)
        if obj:
            out[f"{tag:08X}"] = obj
    return out


def _deferred(tag: int, raw, bulk: Callable[[int], str] | None) -> dict[str, Any]:
    vr = _vr(tag, raw.VR)
    vr = "OB" if " or " in vr else vr
    return {"vr": vr, "BulkDataURI": bulk(tag)} if bulk is not None else {}


def _sequence(ds: Dataset, tag: int, bulk: Callable[[int], str] | None, encodings: list[str]) -> dict[str, Any]:
    items = ds[tag].value  # pydicom reads the items; their elements stay raw
    out: dict[str, Any] = {"vr": "SQ"}
    if items:
        out["Value"] = [dataset_json(item, _nested(bulk, tag, i), encodings) for i, item in enumerate(items)]
    return out


def _nested(bulk: Callable[[int], str] | None, tag: int, index: int) -> Callable[[int], str] | None:
    if bulk is None:
        return None
    return lambda inner: f"{bulk(tag)}.{index}.{inner:08X}"


def _pydicom(ds: Dataset, tag: int, bulk: Callable[[int], str] | None) -> dict[str, Any]:
    """pydicom's JSON of one element; {} when it cannot make one (an invalid value)."""
    try:
        elem = ds[tag]
        handler = (lambda e: bulk(int(e.tag))) if bulk is not None else (lambda e: "")
        obj = elem.to_json_dict(handler, BULK_THRESHOLD)
    except Exception:
        return {}
    if bulk is None and "BulkDataURI" in obj:
        return {}
    return obj
