"""Metadata (WADO-RS …/metadata) as DICOM JSON (PS3.18 F.2): every attribute of each
instance, bulk values as BulkDataURIs. Answered from the catalog's stored headers where a
header provably holds everything but the pixels (a native CT or MR slice: no record is
read), else from the record, read once; each instance's JSON, once made, is kept in a
bounded cache keyed by its record, so the metadata of a 1,000-slice series asked again (a
viewer opening it twice, several viewers) is a concatenation.

A record never changes once written, so (segment, offset, base URL) names its JSON for good;
a compaction that moves it makes a new key, and the old entry ages out."""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
import threading
from collections import OrderedDict
from io import BytesIO
from typing import Any

import pydicom
from pydicom.uid import (
    UID,
    EncapsulatedCDAStorage,
    EncapsulatedMTLStorage,
    EncapsulatedOBJStorage,
    EncapsulatedPDFStorage,
    EncapsulatedSTLStorage,
)

from stowage.catalog import tombstones
from stowage.engine.web.dicom_json import dumps, resource_url
from stowage.engine.web.fast_json import BULK_THRESHOLD, dataset_json
from stowage.engine.web.header_json import header_json
from stowage.engine.web.records import IN_MEMORY, Instance, find
from stowage.engine.store.series_cache import BASE, fingerprint
from stowage.engine.web.transcode import NATIVE

CACHE_BYTES = 64 << 20  # per HTTP process
_BASE = BASE.encode()
_string = json.encoder.encode_basestring  # a JSON string as dumps (ensure_ascii=False) writes it
_DOCUMENT_CLASSES = frozenset({EncapsulatedPDFStorage, EncapsulatedCDAStorage, EncapsulatedSTLStorage,
                               EncapsulatedOBJStorage, EncapsulatedMTLStorage})


class JsonCache:
    """Encoded instance metadata by (segment, offset), least recently used out first."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.size += len(value)
            while self.size > self.limit and self._items:
                _k, old = self._items.popitem(last=False)
                self.size -= len(old)


_cache = JsonCache()


def instance_json(store, inst: Instance, base: str) -> dict[str, Any]:
    """One instance's metadata: every attribute it holds, bulk values (Pixel Data, an
    Encapsulated Document, long binary values, also inside sequences) as BulkDataURIs, and
    the stored syntax as Available Transfer Syntax UID. From the catalog's stored header
    when that is provably the whole data set but its Pixel Data (header_is_whole), else
    from the record, read once (the cache keeps the answer)."""
    url = resource_url(base, inst.study, inst.series, inst.sop_instance_uid)
    bulk = lambda tag: f"{url}/bulkdata/{tag:08X}"  # noqa: E731
    ds = inst.dataset_header() if inst.header is not None else None
    obj = dataset_json(ds, bulk) if ds is not None else None
    if obj is None or not header_is_whole(inst, obj):
        obj = _from_record(store, inst, bulk)
    if "00280010" in obj and "7FE00010" not in obj:  # an image: its pixels, by reference
        obj["7FE00010"] = {"vr": "OB", "BulkDataURI": bulk(0x7FE00010)}
    if "7FE00010" in obj and "BulkDataURI" in obj["7FE00010"]:
        obj["7FE00010"]["vr"] = _pixel_vr(inst, obj)
    if inst.sop_class_uid in _DOCUMENT_CLASSES and "00420011" not in obj:
        obj["00420011"] = {"vr": "OB", "BulkDataURI": bulk(0x00420011)}
    obj.pop("FFFCFFFC", None)  # Data Set Trailing Padding: not an attribute
    obj["00083002"] = {"vr": "UI", "Value": [inst.transfer_syntax_uid]}  # Available Transfer Syntax UID
    return obj


def _first(obj: dict[str, Any], tag: str, default: int) -> int:
    try:
        value = (obj.get(tag, {}).get("Value") or [default])[0]
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _pixel_vr(inst: Instance, obj: dict[str, Any]) -> str:
    compressed = UID(inst.transfer_syntax_uid).is_compressed and inst.transfer_syntax_uid not in NATIVE
    return "OB" if compressed or _first(obj, "00280100", 16) <= 8 else "OW"


def header_is_whole(inst: Instance, obj: dict[str, Any]) -> bool:
    """Whether the stored header (`obj`, its JSON) holds every attribute of the instance
    but Pixel Data (see _whole)."""
    return _whole(inst, _first(obj, "00280010", 0), _first(obj, "00280011", 0), _first(obj, "00280002", 1),
                  _first(obj, "00280100", 0), _first(obj, "00280008", 1))


def _whole(inst: Instance, rows: int, columns: int, samples: int, bits: int, frames: int) -> bool:
    """The header is the data set's bytes up to group 7FE0 with bulk values cut out; it is
    whole when the record's data set is exactly those bytes (nothing cut, nothing past
    them) or those bytes and one native Pixel Data element of the length that Rows,
    Columns, Samples per Pixel, Bits Allocated and Number of Frames give. Anything else
    (an encapsulated syntax, a cut value, elements after the pixels, a header re-encoded
    from big endian or deflate) is read from the record."""
    walkable, implicit, encapsulated = _syntax(inst.transfer_syntax_uid)
    if not walkable or not inst.header:
        return False
    rest = inst.dataset_length - len(inst.header)
    if rest == 0:
        return True
    if encapsulated:
        return False
    pixels = rows * columns * samples * max(frames, 1)
    if bits <= 0 or pixels <= 0:
        return False
    length = (pixels * bits + 7) // 8
    length += length & 1
    return rest == (8 if implicit else 12) + length


@lru_cache(maxsize=256)
def _syntax(uid: str) -> tuple[bool, bool, bool]:
    """Whether a header of this syntax is its data set's own bytes (little endian, not
    deflated), whether implicit VR, whether the pixels are encapsulated."""
    try:
        syntax = UID(uid)
        return (syntax.is_little_endian and not syntax.is_deflated, syntax.is_implicit_VR,
                syntax.is_compressed and uid not in NATIVE)
    except ValueError:
        return False, False, False


def from_headers(members: list[Instance]) -> bool:
    """Whether these instances' metadata can come from their stored headers without reading
    a record (little endian, native pixels; header_is_whole decides the rest per instance)."""
    for inst in members:
        walkable, _implicit, encapsulated = _syntax(inst.transfer_syntax_uid)
        if not walkable or encapsulated or not inst.header:
            return False
    return True


def _member(tag: int, vr: str, key: str, value: str) -> bytes:
    """`"tag":{"vr":vr,key:value}` as dumps writes it (one string value, or Value: [it]),
    without the encoder: two of these per instance."""
    text = _string(value)
    return f'"{tag:08X}":{{"vr":"{vr}","{key}":{"[" + text + "]" if key == "Value" else text}}}'.encode()


def _encoded_from_header(inst: Instance, url: str) -> bytes | None:
    """The instance's metadata, encoded, straight from its header's elements (header_json),
    when the header is whole; else None."""
    walkable, implicit, encapsulated = _syntax(inst.transfer_syntax_uid)
    if not inst.header or not walkable:
        return None
    walked = header_json(inst.header, implicit, lambda tag: f"{url}/bulkdata/{tag:08X}")
    if walked is None:
        return None
    members, sizes = walked

    def number(tag: int, default: int) -> int:
        raw = sizes.get(tag)
        if not raw:
            return default
        if tag == 0x00280008:  # Number of Frames: IS
            text = raw.decode("ascii", "replace").strip(" \x00").split("\\")[0]
            return int(text) if text.isdigit() else -1
        return int.from_bytes(raw[:2], "little") if len(raw) >= 2 else -1

    rows, bits = number(0x00280010, 0), number(0x00280100, 0)
    if not _whole(inst, rows, number(0x00280011, 0), number(0x00280002, 1), bits, number(0x00280008, 1)):
        return None
    if 0x00280010 in sizes:
        vr = "OB" if encapsulated or 0 < bits <= 8 else "OW"
        members.append(_member(0x7FE00010, vr, "BulkDataURI", f"{url}/bulkdata/7FE00010"))
    if inst.sop_class_uid in _DOCUMENT_CLASSES:
        return None  # its document is bulk: the general way adds it
    members.append(_member(0x00083002, "UI", "Value", inst.transfer_syntax_uid))
    return b"{" + b",".join(members) + b"}"


def _from_record(store, inst: Instance, bulk) -> dict[str, Any]:
    """The metadata read from the record itself: in memory up to IN_MEMORY, else spooled
    to a temporary file and read with large values left there (memory stays bounded; of a
    larger encapsulated instance, what follows its pixels is not read)."""
    if inst.dataset_length <= IN_MEMORY:
        ds = pydicom.dcmread(BytesIO(store.reader.part10(inst)), force=True)
        return dataset_json(ds, bulk)
    with tempfile.TemporaryFile() as spool:
        for chunk in store.reader.chunks(inst):
            spool.write(chunk)
        spool.seek(0)
        encapsulated = UID(inst.transfer_syntax_uid).is_compressed and inst.transfer_syntax_uid not in NATIVE
        ds = pydicom.dcmread(spool, force=True, defer_size=BULK_THRESHOLD, stop_before_pixels=encapsulated)
        return dataset_json(ds, bulk)


def instance_metadata(store, inst: Instance, base: str) -> bytes:
    """One instance's metadata, encoded: from its header's elements when the header is
    whole (the usual slice), else the general way (instance_json)."""
    fast = _encoded_from_header(inst, resource_url(base, inst.study, inst.series, inst.sop_instance_uid))
    return fast if fast is not None else dumps(instance_json(store, inst, base))


def series_metadata(store, found: list[Instance], base: str) -> bytes:
    """The JSON array of the instances' metadata, encoded."""
    return _with_base(_array(store, found), base)


def _array(store, found: list[Instance]) -> bytes:
    """The JSON array of the instances' metadata with series_cache.BASE for the base URL
    (so that one encoding serves every name clients reach the server by)."""
    parts = []
    for inst in found:
        key = (inst.segment, inst.offset)
        encoded = _cache.get(key)
        if encoded is None:
            encoded = instance_metadata(store, inst, BASE)
            _cache.put(key, encoded)
        parts.append(encoded)
    return b"[" + b",".join(parts) + b"]"


def _with_base(array: bytes, base: str) -> bytes:
    return array.replace(_BASE, base.encode())  # base_url() is ASCII, nothing in it to escape in JSON


def deletions_stamp(store) -> tuple | None:
    """The tombstone log's stamp: taken before a series' instances are looked up, it tells
    whether a delete or a rejection may have come between the lookup and the keeping."""
    return tombstones.stamp_of(store.lookups.tombstones_dir)


def made_series(store, study: str, series: str, members: list[Instance], stamp: tuple | None) -> bytes:
    """The series' metadata array (BASE for the base URL) made from `members` (looked up
    with their headers after `stamp` was taken), and kept on disk: unless the series was
    deleted meanwhile, so that no deleted patient's data stays behind in the cache."""
    array = _array(store, members)
    store.series_cache.put(series, fingerprint(members), array)
    if deletions_stamp(store) != stamp and not find(store.lookups, study, series):
        store.series_cache.forget([series])
    return array


def resource_metadata(store, study: str, series: str | None, instance: str | None, base: str) -> bytes | None:
    """The metadata of a study, a series or an instance (None: the archive holds none of
    it). Of a study or series, each series' array comes from the on-disk series cache when
    it still describes what the catalog holds (series_cache.py), else is made and kept."""
    if instance is not None:
        found = find(store.lookups, study, series, instance, with_header=True)
        return series_metadata(store, found, base) if found else None
    # A series asked for the first time has no file kept: its headers come with the lookup
    # (one catalog query, not a lookup and then the headers).
    headed = series is not None and not store.series_cache.holds(series)
    stamp = deletions_stamp(store)
    found = find(store.lookups, study, series, with_header=headed)
    if not found:
        store.series_cache.forget([series] if series else [])
        return None
    groups: dict[str, list[Instance]] = {}
    for inst in found:
        groups.setdefault(inst.series, []).append(inst)
    arrays = []
    for uid, members in groups.items():
        array = None if headed else store.series_cache.get(uid, fingerprint(members))
        if array is None:
            if not headed:
                stamp = deletions_stamp(store)
                members = find(store.lookups, study, uid, with_header=True)  # the headers, only now
            array = made_series(store, study, uid, members, stamp)
        if len(array) > 2:
            arrays.append(array[1:-1])
    return _with_base(b"[" + b",".join(arrays) + b"]", base)
