"""Metadata (WADO-RS …/metadata) as DICOM JSON, from the catalog's stored headers: no record
is read (unless a catalog row predates stored headers), and each instance's JSON, once made,
is kept in a bounded cache keyed by its record, so the metadata of a 1,000-slice series asked
again (a viewer opening it twice, several viewers) is a concatenation.

A record never changes once written, so (segment, offset, base URL) names its JSON for good;
a compaction that moves it makes a new key, and the old entry ages out."""
from __future__ import annotations

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

from stowage.engine.web.dicom_json import dumps, resource_url, to_json
from stowage.engine.web.fast_json import dataset_json
from stowage.engine.web.records import Instance
from stowage.engine.web.transcode import NATIVE

CACHE_BYTES = 64 << 20  # per HTTP process
_DOCUMENT_CLASSES = frozenset({EncapsulatedPDFStorage, EncapsulatedCDAStorage, EncapsulatedSTLStorage,
                               EncapsulatedOBJStorage, EncapsulatedMTLStorage})


class JsonCache:
    """Encoded instance metadata by (segment, offset, base), least recently used out first."""

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
    """One instance's metadata: its stored header, with BulkDataURIs for Pixel Data (and an
    Encapsulated Document) and the stored syntax as Available Transfer Syntax UID."""
    url = resource_url(base, inst.study, inst.series, inst.sop_instance_uid)
    ds = inst.dataset_header()
    if ds is not None:
        obj = dataset_json(ds, lambda tag: f"{url}/bulkdata/{tag:08X}")
    else:  # a catalog row without a header (written before headers were kept): the record
        ds = pydicom.dcmread(BytesIO(store.reader.part10(inst)), stop_before_pixels=True)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        obj = to_json(ds, bulk_base=url)
    if "00280010" in obj and "7FE00010" not in obj:  # an image: its pixels, by reference
        compressed = UID(inst.transfer_syntax_uid).is_compressed and inst.transfer_syntax_uid not in NATIVE
        bits = int((obj.get("00280100", {}).get("Value") or [16])[0] or 16)
        obj["7FE00010"] = {"vr": "OB" if compressed or bits <= 8 else "OW", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    if inst.sop_class_uid in _DOCUMENT_CLASSES and "00420011" not in obj:
        obj["00420011"] = {"vr": "OB", "BulkDataURI": f"{url}/bulkdata/00420011"}
    obj["00083002"] = {"vr": "UI", "Value": [inst.transfer_syntax_uid]}  # Available Transfer Syntax UID
    return obj


def series_metadata(store, found: list[Instance], base: str) -> bytes:
    """The JSON array of the instances' metadata, encoded."""
    parts = []
    for inst in found:
        key = (inst.segment, inst.offset, base)
        encoded = _cache.get(key)
        if encoded is None:
            encoded = dumps(instance_json(store, inst, base))
            _cache.put(key, encoded)
        parts.append(encoded)
    return b"[" + b",".join(parts) + b"]"
