"""The DICOM JSON Model (PS3.18 Annex F), written once for every service: data sets to
JSON with BulkDataURIs for bulk values, and the resource URLs that answers carry."""
from __future__ import annotations

import json
import math
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.dataelem import DataElement

MEDIA_TYPE = "application/dicom+json"
BULK_THRESHOLD = 1024  # binary values longer than this go out as a BulkDataURI
_DROP = frozenset({0x00080005})  # Specific Character Set: JSON text is Unicode already


def resource_url(base: str, study: str, series: str | None = None, instance: str | None = None) -> str:
    """The WADO-RS URL of a study, series or instance under `base` (…/dicom-web)."""
    url = f"{base}/studies/{study}"
    if series:
        url += f"/series/{series}"
        if instance:
            url += f"/instances/{instance}"
    return url


def to_json(ds: Dataset, bulk_base: str | None = None) -> dict[str, Any]:
    """`ds` as a DICOM JSON object. With `bulk_base` (an instance's URL), binary values
    past the threshold become BulkDataURIs `{bulk_base}/bulkdata/{tag}`; without, they
    are left out (no inline megabytes)."""
    def bulk(elem: DataElement) -> str:
        return f"{bulk_base}/bulkdata/{int(elem.tag):08X}"

    for tag in _DROP & set(ds.keys()):
        del ds[tag]
    if bulk_base is None:
        return _without_bulk(ds.to_json_dict(BULK_THRESHOLD, lambda e: "", suppress_invalid_tags=True))
    return ds.to_json_dict(BULK_THRESHOLD, bulk, suppress_invalid_tags=True)


def _without_bulk(obj: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for tag, value in obj.items():
        if "BulkDataURI" in value:
            continue
        if value.get("vr") == "SQ" and "Value" in value:
            value = dict(value, Value=[_without_bulk(item) for item in value["Value"]])
        out[tag] = value
    return out


def dumps(objects: list[dict[str, Any]] | dict[str, Any]) -> bytes:
    return json_text(objects).encode("utf-8")


def json_text(obj: Any) -> str:
    """`obj` as compact JSON, always valid (RFC 8259): a NaN or an infinity (an FL/FD value,
    a DS such as "nan" or "1e999") goes out as the string "NaN", "Infinity" or "-Infinity",
    not as the bare NaN json.dumps writes, which JSON.parse refuses (a viewer then loses the
    whole series' metadata for one odd value). PS3.18 F.2.3.1 (CP 1861) allows strings for
    DS and IS; for FL and FD no number can say it."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if obj != obj else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


Formatter = Callable[[Dataset], dict[str, Any]]
