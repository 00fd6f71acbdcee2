"""C-FIND response identifiers: the requested keys with the values of one matching
entity, in a Specific Character Set that can carry them.

Values are text decoded with their own instance's character set (catalog columns, and
the stored header decoded by pydicom). A response that is plain ASCII is sent in the
request's character set (or none); otherwise in the first of the request's character
set, the stored instance's character set, and ISO_IR 192 (UTF-8) that encodes every
value without loss, always stated in (0008,0005).
"""
from __future__ import annotations

from typing import Any, Iterable

from pydicom.charset import custom_encoders, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from stowage.catalog.keys import LEVELS, UNIQUE
from stowage.catalog.matching import matching_items
from stowage.catalog.query import (INSTANCE_AVAILABILITY, QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE, Request,
                           RequestKey, Result)

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})

UTF8 = ["ISO_IR 192"]


def identifier(request: Request, result: Result, ae_title: str, pn_insensitive: bool = False) -> Dataset:
    """The response identifier for one matching entity."""
    plain: list[tuple[int, str, Any]] = [(QUERY_RETRIEVE_LEVEL, "CS", request.level)]
    stored: list[DataElement] = []  # from the header, already pydicom's
    depth = LEVELS.index(request.level)
    seen = {QUERY_RETRIEVE_LEVEL}
    for k in request.keys:
        seen.add(k.tag)
        value = _value(k, request, result, depth, ae_title, pn_insensitive)
        if isinstance(value, DataElement):
            stored.append(value)
        else:
            plain.append((k.tag, k.vr, value))
    for tag, value in result.values.items():  # unique keys of this level and above
        if tag not in seen and tag in _UNIQUE_TAGS:
            plain.append((tag, "UI" if tag != 0x00100020 else "LO", _plain(value)))
            seen.add(tag)
    if RETRIEVE_AE_TITLE not in seen:
        plain.append((RETRIEVE_AE_TITLE, "AE", ae_title))
    texts = [t for tag, vr, v in plain if vr in _TEXT_VRS and v is not None for t in _strings(v)]
    texts += [t for elem in stored for t in _texts_of(elem)]
    charset = choose_charset(texts, request.charset, result.charset)
    ds = Dataset()
    codec = _codec(charset)
    for tag, vr, value in plain:
        if codec is not None and vr not in ("SQ",):
            ds[tag] = _raw(tag, vr, value, codec)
        else:
            ds.add(DataElement(tag, vr, value))
    for elem in stored:
        ds.add(elem)
    if charset:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    return ds


_UNIQUE_TAGS = frozenset(UNIQUE.values())


def _value(k: RequestKey, request: Request, result: Result, depth: int, ae_title: str,
           pn_insensitive: bool) -> Any:
    """A key's value: plain (str, list, int, None) or a DataElement from the header."""
    if k.tag == RETRIEVE_AE_TITLE:
        return ae_title
    if k.tag == INSTANCE_AVAILABILITY:
        return "ONLINE"
    if LEVELS.index(k.level) > depth:  # a key of a lower level: returned empty
        return DataElement(k.tag, k.vr, []) if k.vr == "SQ" else None
    if k.tag in result.values:
        return _plain(result.values[k.tag])
    if k.source != "header" or result.header is None or k.tag not in result.header:
        return DataElement(k.tag, k.vr, []) if k.vr == "SQ" else None
    try:
        elem = result.header[k.tag]
        if elem.VR != "SQ":
            return DataElement(k.tag, elem.VR, elem.value)
        items = matching_items(k.match, elem.value, pn_insensitive)
        wanted = list(k.match.items) if k.match.kind == "sequence" else []
        return DataElement(k.tag, "SQ", Sequence([_item(i, wanted) for i in items]))
    except Exception:  # a header value pydicom cannot convert: returned empty
        return DataElement(k.tag, k.vr, []) if k.vr == "SQ" else None


def _strings(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _codec(charset: list[str]) -> str | None:
    """A Python codec that encodes each value on its own in `charset` (None for ISO 2022
    code extensions, which pydicom's encoder handles)."""
    if not charset:
        return "ascii"
    if len(charset) > 1:
        return None
    return "ascii" if charset[0].strip() in _DEFAULT_REPERTOIRE else python_encoding.get(charset[0].strip())


_PAD_NUL = frozenset({"UI", "OB", "UN"})


def _raw(tag: int, vr: str, value: Any, codec: str) -> RawDataElement:
    """An element already encoded (pydicom writes its bytes as they are)."""
    if value is None:
        data = b""
    else:
        text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        data = text.encode(codec if vr in _TEXT_VRS else "ascii", errors="replace")
        if len(data) % 2:
            data += b"\0" if vr in _PAD_NUL else b" "
    return RawDataElement(tag, vr, len(data), data, 0, True, True)


def _item(item: Dataset, wanted: list[int]) -> Dataset:
    """A sequence item with the requested keys only (all of them when none are named)."""
    if not wanted:
        return item
    out = Dataset()
    for tag in wanted:
        if tag in item:
            out.add(item[tag])
        else:
            out.add_new(tag, dictionary_VR(tag), None)
    return out


def _plain(value: Any) -> Any:
    """A column or derived value as pydicom wants it."""
    if value is None:
        return None
    if isinstance(value, list):
        return [str(v) for v in value if v is not None] or None
    return value


def _texts_of(elem: DataElement) -> Iterable[str]:
    """Every text value of an element, sequence items included."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            for sub in item:
                yield from _texts_of(sub)
    elif elem.VR in _TEXT_VRS and elem.value is not None:
        values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        for v in values:
            yield str(v)


_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})  # ASCII (pydicom reads it as latin-1)


def _codecs(charset: list[str]) -> list[str] | None:
    """Python codecs of each term of a Specific Character Set value, ASCII for the default."""
    out = []
    for term in charset:
        term = term.strip()
        if term in _DEFAULT_REPERTOIRE:
            out.append("ascii")
            continue
        codec = python_encoding.get(term)
        if codec is None:
            return None
        out.append(codec)
    return out


def fits(text: str, charset: list[str]) -> bool:
    """Whether every character of `text` is in `charset`'s repertoire: a single set must
    encode it whole; with ISO 2022 code extensions each character needs one of the sets."""
    codecs = _codecs(charset)
    if not codecs:
        return False
    if len(codecs) == 1:
        return _encodes(text, codecs[0])
    for ch in set(text):
        if ch.isascii():
            continue
        if not any(_encodes(ch, codec) for codec in codecs):
            return False
    return True


def _encodes(text: str, codec: str) -> bool:
    """Whether `codec` encodes `text` within the DICOM repertoire it stands for. Python's
    shift_jis (ISO_IR 13) and iso2022_jp_2 (ISO 2022 IR 159) encode far more than JIS X
    0201 and JIS X 0212: a kanji name answered in ISO_IR 13 went out as '??'. JIS X 0201
    is the characters shift_jis writes in one byte; JIS X 0212, pydicom's encoder."""
    try:
        if codec == "shift_jis":
            return all(len(ch.encode(codec)) == 1 for ch in text)
        if codec == "iso2022_jp_2":
            custom_encoders[codec](text)
            return True
        text.encode(codec)
        return True
    except (UnicodeError, LookupError, KeyError):
        return False


def choose_charset(texts: Iterable[str], requested: list[str], stored: list[str]) -> list[str]:
    """The Specific Character Set for a response holding `texts` ([] for none)."""
    values = [t for t in texts if t]
    if all(t.isascii() for t in values):
        return list(requested)
    for candidate in (requested, stored):
        if candidate and all(fits(t, candidate) for t in values):
            return list(candidate)
    return UTF8
