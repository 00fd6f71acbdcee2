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

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from catalog.keys import LEVELS, UNIQUE
from catalog.matching import matching_items
from catalog.query import (INSTANCE_AVAILABILITY, QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE, Request,
                           RequestKey, Result)

UTF8 = ["ISO_IR 192"]
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def identifier(request: Request, result: Result, ae_title: str, pn_insensitive: bool = False) -> Dataset:
    """The response identifier for one matching entity."""
    ds = Dataset()
    ds.add_new(QUERY_RETRIEVE_LEVEL, "CS", request.level)
    depth = LEVELS.index(request.level)
    for k in request.keys:
        ds.add(_element(k, request, result, depth, ae_title, pn_insensitive))
    for tag, value in result.values.items():  # unique keys of this level and above
        if tag not in ds and tag in UNIQUE.values():
            ds.add_new(tag, dictionary_VR(tag), _plain(value))
    if RETRIEVE_AE_TITLE not in ds:
        ds.add_new(RETRIEVE_AE_TITLE, "AE", ae_title)
    charset = choose_charset(_texts(ds), request.charset, result.charset)
    if charset:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    return ds


def _element(k: RequestKey, request: Request, result: Result, depth: int, ae_title: str,
             pn_insensitive: bool) -> DataElement:
    if k.tag == RETRIEVE_AE_TITLE:
        return DataElement(k.tag, "AE", ae_title)
    if k.tag == INSTANCE_AVAILABILITY:
        return DataElement(k.tag, "CS", "ONLINE")
    if LEVELS.index(k.level) > depth:  # a key of a lower level: returned empty
        return DataElement(k.tag, k.vr, None)
    if k.tag in result.values:
        return DataElement(k.tag, k.vr, _plain(result.values[k.tag]))
    if k.source != "header" or result.header is None or k.tag not in result.header:
        return DataElement(k.tag, k.vr, [] if k.vr == "SQ" else None)
    try:
        stored = result.header[k.tag]
        if stored.VR != "SQ":
            return DataElement(k.tag, stored.VR, stored.value)
        items = matching_items(k.match, stored.value, pn_insensitive)
        wanted = list(k.match.items) if k.match.kind == "sequence" else []
        return DataElement(k.tag, "SQ", Sequence([_item(i, wanted) for i in items]))
    except Exception:  # a header value pydicom cannot convert: returned empty
        return DataElement(k.tag, k.vr, [] if k.vr == "SQ" else None)


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


def _texts(ds: Dataset) -> Iterable[str]:
    """Every text value of the data set, items included."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _texts(item)
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
        try:
            text.encode(codecs[0])
            return True
        except (UnicodeError, LookupError):
            return False
    for ch in set(text):
        if ch.isascii():
            continue
        for codec in codecs:
            try:
                ch.encode(codec)
                break
            except (UnicodeError, LookupError):
                continue
        else:
            return False
    return True


def choose_charset(texts: Iterable[str], requested: list[str], stored: list[str]) -> list[str]:
    """The Specific Character Set for a response holding `texts` ([] for none)."""
    values = [t for t in texts if t]
    if all(t.isascii() for t in values):
        return list(requested)
    for candidate in (requested, stored):
        if candidate and all(fits(t, candidate) for t in values):
            return list(candidate)
    return UTF8
