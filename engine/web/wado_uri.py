"""WADO-URI (PS3.18 9, the legacy `?requestType=WADO` form) for viewers that predate
DICOMweb: `GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=` with
`contentType` application/dicom (the Part-10 file; `transferSyntax` converts as WADO-RS
does, none gives it as stored), or image/jpeg (the default) / image/png rendered with
`windowCenter`, `windowWidth`, `rows`, `columns`, `frameNumber`, `imageQuality`."""
from __future__ import annotations

import math

from aiohttp import web

from stowage.engine.store.archive import valid_uid
from stowage.engine.web import pixels, rendered
from stowage.engine.web.errors import refusal
from stowage.engine.web.records import Unreadable
from stowage.engine.web.store import STORE
from stowage.engine.web.transcode import MAX_BYTES, TranscodeError, possible, transcode

_KNOWN = {"requestType", "studyUID", "seriesUID", "objectUID", "contentType", "transferSyntax", "windowCenter",
          "windowWidth", "rows", "columns", "frameNumber", "imageQuality", "charset", "anonymize", "access_token"}


def _uid(q, name: str, required: bool = True) -> str | None:
    value = q.get(name)
    if value is None:
        if required:
            raise refusal(400, f"WADO-URI needs {name}")
        return None
    if not valid_uid(value):
        raise refusal(400, f"{name}={value[:70]!r} is not a valid UID")
    return value


def _int(q, name: str, low: int, high: int) -> int | None:
    text = q.get(name)
    if text is None:
        return None
    if not text.isdigit() or not low <= int(text) <= high:
        raise refusal(400, f"{name}={text[:20]!r}: a whole number from {low} to {high}")
    return int(text)


async def wado(request: web.Request) -> web.Response:
    q = request.query
    unknown = set(q) - _KNOWN
    if unknown:
        raise refusal(400, f"unknown WADO-URI parameter(s): {', '.join(sorted(unknown))[:100]}")
    if q.get("requestType") != "WADO":
        raise refusal(400, "requestType=WADO is required")
    study, series, instance = _uid(q, "studyUID"), _uid(q, "seriesUID"), _uid(q, "objectUID")
    if q.get("anonymize") == "yes":
        raise refusal(400, "anonymize=yes is not supported")
    store = request.app[STORE]
    found = await store.run(store.find, study, series, instance)
    if not found:
        raise refusal(404, "no such instance in this archive")
    inst = found[0]
    content = (q.get("contentType") or "image/jpeg").split(",")[0].strip().lower()
    if content == "application/dicom":
        ts = q.get("transferSyntax")
        if ts is not None and not valid_uid(ts):
            raise refusal(400, f"transferSyntax={ts[:70]!r} is not a UID")
        if ts and ts != inst.transfer_syntax_uid and (not possible(inst.transfer_syntax_uid, ts)
                                                      or inst.dataset_length > MAX_BYTES):
            raise refusal(406, f"cannot give this instance in {ts}")
        try:
            data = await store.run(store.reader.part10, inst)
            if ts and ts != inst.transfer_syntax_uid:
                data = await store.run(transcode, data, ts, store.config)
        except (Unreadable, TranscodeError) as e:
            raise refusal(500 if isinstance(e, Unreadable) else 406, str(e)) from None
        return web.Response(body=data, content_type="application/dicom")
    if content not in rendered.FORMATS:
        raise refusal(406, f"contentType {content[:40]!r}: application/dicom, image/jpeg or image/png")
    opts = {"window": None, "function": "linear", "viewport": None, "quality": _int(q, "imageQuality", 1, 100) or 90}
    if "windowCenter" in q or "windowWidth" in q:
        try:
            opts["window"] = (float(q["windowCenter"]), float(q["windowWidth"]))
        except (KeyError, ValueError):
            raise refusal(400, "windowCenter and windowWidth: two numbers, both given") from None
        if not all(math.isfinite(v) for v in opts["window"]):
            raise refusal(400, "windowCenter and windowWidth: finite numbers (not nan or inf)")
        if opts["window"][1] <= 0:
            raise refusal(400, "windowWidth must be above 0")
    rows, columns = _int(q, "rows", 1, 4096), _int(q, "columns", 1, 4096)
    if rows or columns:
        opts["viewport"] = (columns or rows, rows or columns)
    frame = _int(q, "frameNumber", 1, 1 << 30) or 1
    try:
        body = await store.run(rendered.render, store, inst, frame, opts, content)
    except pixels.FrameError as e:
        raise refusal(e.status, str(e)) from None
    except Unreadable as e:
        raise refusal(500, str(e)) from None
    return web.Response(body=body, content_type=content)


def routes() -> list[web.RouteDef]:
    return [web.get("/wado", wado)]
