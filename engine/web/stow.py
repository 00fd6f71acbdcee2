"""STOW-RS (PS3.18 10.5): `POST /studies` and `/studies/{study}` with
`multipart/related; type="application/dicom"`, each part a Part-10 file.

The body is read as it arrives, each read bounded by `network_timeout`: parts up to
`spill_threshold` in memory (64 MB a request at most), larger ones streamed to spool files
on the archive's disk (a 2 GB instance never sits in memory). Only when the whole body
has arrived and its closing boundary is read does anything get stored, so a truncated or
malformed body stores nothing. Each instance then goes through the same store path as
C-STORE (Archive.store: validation, duplicates policy, rejection notes, free space and
quota, group-committed fsync, audit line, metrics) and is acknowledged once durable.

Answer (PS3.18 10.5.3): 200 all stored; 202 some stored, some failed; 409 none stored;
400 a body that cannot be read; 415 a media type other than application/dicom. The body
is application/dicom+json: Retrieve URL, Referenced SOP Sequence (with each instance's
Retrieve URL) and Failed SOP Sequence (with the DIMSE failure status as Failure Reason,
PS3.18 Annex I, and our reason in Text Value (0040,A160), as the log and audit line say it).
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from stowage.catalog.attributes import extract
from stowage.engine.runtime.audit import Trail
from stowage.engine.store.archive import StoreResult, valid_uid
from stowage.engine.store.segment import FileRange
from stowage.engine.web.context import base_url, path_uid
from stowage.engine.web.dicom_json import MEDIA_TYPE, dumps, resource_url
from stowage.engine.web.errors import refusal
from stowage.engine.web.multipart import MultipartError, RelatedParser
from stowage.engine.web.store import STORE, WebStore, spool_dir
from stowage.protocol.status import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, PROCESSING_FAILURE, SUCCESS

log = logging.getLogger("stowage.http")
DICOM = "application/dicom"
SOURCE_AE = "DICOMWEB"  # the calling AE of what arrives by STOW-RS (catalog, file meta, audit)
# Parts up to spill_threshold are kept in memory, up to this much per request; the rest is
# spooled to disk as it arrives.
_IN_MEMORY_PER_REQUEST = 64 << 20
_MAX_EPILOGUE = 1 << 20
MIN_BODY_RATE = 500  # bytes/s, on average, that a body must arrive at once network_timeout has passed
_HEAD_BYTES = 4 << 20  # what Archive.store reads of a spooled data set for its attributes (all of one in memory)
_ids = count(1)
_trail = Trail()


@dataclass
class Part:
    path: Path | None  # the spool file, or None: the part is in `data`
    length: int
    data: bytearray | None = None  # received into once, stored from without a copy
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    result: StoreResult | None = None
    study: str = ""
    series: str = ""

    def head(self, n: int, start: int = 0) -> bytes | memoryview:
        if self.data is not None:  # a view: the in-memory part is not copied to be parsed
            return memoryview(self.data)[start:start + n]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(n)

    def dataset(self, start: int) -> memoryview | FileRange:
        if self.data is not None:
            return memoryview(self.data)[start:]
        return FileRange(self.path, start, self.length - start)


def _content_type(request: web.Request) -> None:
    ctype = request.headers.get("Content-Type", "")
    media, _, rest = ctype.partition(";")
    params = {k.strip().lower(): v.strip().strip('"') for k, _, v in
              (p.partition("=") for p in rest.split(";")) if k.strip()}
    if media.strip().lower() != "multipart/related":
        raise refusal(415, f"STOW-RS takes multipart/related; type=\"application/dicom\" bodies, not {ctype[:80]!r}")
    if params.get("type", DICOM).lower() != DICOM:
        raise refusal(415, f"STOW-RS here takes parts of type application/dicom only, not {params['type'][:60]!r} "
                           "(no DICOM JSON/XML metadata with bulk data)")
    if not params.get("boundary"):
        raise refusal(400, "the multipart/related Content-Type has no boundary parameter")


async def _read(coro, timeout: float, what: str):
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise refusal(408, f"the request body stalled: nothing arrived for {timeout:g} s while reading {what}; "
                           "nothing was stored") from None


class _Pace:
    """A body that trickles in (a byte now and then, each read within network_timeout)
    would hold its connection and spool for ever: after `grace` seconds it must have come
    at MIN_BODY_RATE on average since then (Apache's RequestReadTimeout MinRate, 500 B/s)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.started = time.monotonic()
        self.received = 0

    def add(self, n: int) -> None:
        self.received += n
        late = time.monotonic() - self.started - self.grace
        if late > 0 and self.received < late * MIN_BODY_RATE:
            raise refusal(408, f"the request body arrives slower than {MIN_BODY_RATE} bytes/s "
                               f"({self.received} in {late + self.grace:.0f} s); nothing was stored")


class _Receiver:
    """Where the parts of one body go as the parser finds them: memory, or a spool file
    once a part outgrows spill_threshold or the request its in-memory allowance."""

    def __init__(self, store: WebStore) -> None:
        self.store = store
        self.config = store.config
        self.folder = spool_dir(self.config.data_dir)  # on the archive's disk: the store path reads it there
        self.parts: list[Part] = []
        self.total = self.in_memory = 0
        self.data = bytearray()  # the current part's bytes so far, when in memory
        self.file = None

    async def event(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "start":
            ptype = ev[1].get("content-type", DICOM).split(";")[0].strip().lower()
            if ptype != DICOM:
                raise refusal(415, f"part {len(self.parts) + 1} is {ptype[:60]!r}: only application/dicom parts "
                                   "are taken; nothing was stored")
            self.parts.append(Part(None, 0))
            self.data, self.file = bytearray(), None
        elif kind == "data":
            await self._data(ev[1])
        elif kind == "end":
            if self.file is None:
                self.parts[-1].data = self.data
            else:
                await self.close()
            self.data = bytearray()

    async def _data(self, chunk: bytes | memoryview) -> None:
        """A piece of the current part (a view of the body's chunk: copied here, once)."""
        part = self.parts[-1]
        self.total += len(chunk)
        part.length += len(chunk)
        if self.total > self.config.max_spool_bytes:
            raise refusal(413, f"the body holds more than max_spool_bytes ({self.config.max_spool_bytes} bytes); "
                               "send fewer or smaller instances per request; nothing was stored")
        if self.file is None and (len(self.data) + len(chunk) > self.config.spill_threshold
                                  or self.in_memory + len(chunk) > _IN_MEMORY_PER_REQUEST):
            await self.store.run(self.folder.mkdir, parents=True, exist_ok=True)
            part.path = self.folder / f"{os.getpid()}-{next(_ids)}.part"
            self.file = await self.store.run(open, part.path, "wb")
            await self.store.run(self.file.write, self.data)
            self.in_memory -= len(self.data)
            self.data = bytearray()
        if self.file is None:
            self.data += chunk
            self.in_memory += len(chunk)
        else:
            await self.store.run(self.file.write, chunk)

    async def close(self) -> None:
        if self.file is not None:
            await self.store.run(self.file.close)
            self.file = None


async def _chunk(request: web.Request) -> bytes:
    """The next piece of the body as aiohttp received it (b"" at its end): readany() would
    join every piece it has buffered into one new bytes, a copy of most of the body when
    the event loop falls behind the socket."""
    while True:
        data, chunk_end = await request.content.readchunk()
        if data or not chunk_end:  # (b"", True) only marks the end of an HTTP chunk
            return data


async def _rest_of_body(request: web.Request, timeout: float) -> None:
    """Read what follows the closing boundary (an epilogue, at most 1 MB) to the end of the
    body: a body shorter than its Content-Length, cut by the client, stores nothing."""
    rest = 0
    while data := await _read(_chunk(request), timeout, "the end of the body"):
        rest += len(data)
        if rest > _MAX_EPILOGUE:
            raise refusal(400, "more than 1 MB follows the closing boundary; nothing was stored")


def _boundary(request: web.Request) -> str:
    _media, _, rest = request.headers.get("Content-Type", "").partition(";")
    for piece in rest.split(";"):
        name, _, value = piece.partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"')
    return ""


async def _spool(request: web.Request, store: WebStore) -> list[Part]:
    """Every part of the body, in memory or in a spool file; 4xx (and every spool file
    removed) when the body is not a complete multipart/related of application/dicom parts."""
    try:
        parser = RelatedParser(_boundary(request))
    except MultipartError as e:
        raise refusal(400, f"the multipart/related Content-Type cannot be used: {e}") from None
    receiver = _Receiver(store)
    timeout = store.config.network_timeout
    pace = _Pace(timeout)
    try:
        try:
            while parser.state != "done":
                data = await _read(_chunk(request), timeout, f"part {max(parser.parts, 1)}")
                if not data:
                    parser.finish()
                    break
                pace.add(len(data))
                for ev in parser.feed(data):
                    if ev[0] != "done":
                        await receiver.event(ev)
            await _rest_of_body(request, timeout)  # the whole HTTP message, not only the closing boundary
        except MultipartError as e:
            raise refusal(400, f"malformed multipart body: {e}; nothing was stored") from None
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, HttpProcessingError) as e:  # cut short
            raise refusal(400, f"the body could not be read to its end ({type(e).__name__}); nothing was stored") \
                from None
        if not receiver.parts:
            raise refusal(400, "the multipart body holds no part; nothing was stored")
    except OSError as e:
        await receiver.close()
        _remove(receiver.parts)
        raise refusal(507, f"cannot spool the body: {e.strerror or e}; nothing was stored") from None
    except BaseException:
        await receiver.close()
        _remove(receiver.parts)
        raise
    return receiver.parts


def _remove(parts: list[Part]) -> None:
    for p in parts:
        if p.path is not None:
            p.path.unlink(missing_ok=True)
        p.data = None


def _part10(part: Part) -> tuple[str, int]:
    """The part's transfer syntax and where its data set starts; fills its SOP UIDs.
    Raises ValueError with a reason."""
    head = bytes(part.head(64 << 10))
    # 128-byte preamble and "DICM", or (as DCMTK reads them) "DICM" at the start, the preamble left out
    pos = 132 if head[128:132] == b"DICM" else 4 if head[:4] == b"DICM" and head[4:6] == b"\x02\x00" else 0
    if head[pos:pos + 2] != b"\x02\x00":
        raise ValueError("not a DICOM Part-10 file (no DICM prefix, no file meta information)")
    meta: dict[int, str] = {}
    while pos + 8 <= len(head) and head[pos:pos + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", head, pos + 2)[0]
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            length = struct.unpack_from("<I", head, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", head, pos + 6)[0]
            start = pos + 8
        if start + length > len(head):
            raise ValueError("the file meta information is cut short or too long")
        meta[element] = head[start:start + length].decode("ascii", "replace").strip(" \x00")
        pos = start + length
    part.sop_class_uid, part.sop_instance_uid = meta.get(0x0002, ""), meta.get(0x0003, "")
    ts = meta.get(0x0010, "")
    for what, uid in (("Transfer Syntax UID", ts), ("Media Storage SOP Class UID", part.sop_class_uid),
                      ("Media Storage SOP Instance UID", part.sop_instance_uid)):
        if not valid_uid(uid):
            raise ValueError(f"the file meta information has no valid {what} (0002,00xx)")
    return ts, pos


def _store_one(store: WebStore, part: Part, study: str | None) -> StoreResult:
    try:
        ts, start = _part10(part)
    except (ValueError, struct.error) as e:
        return StoreResult(CANNOT_UNDERSTAND, str(e))
    archive = store.archive()
    attrs = None
    try:  # the study and series the data set names: the URL's check, the answer's Retrieve URL
        attrs = extract(part.head(part.length if part.data is not None else _HEAD_BYTES, start), ts, store.config.max_inflated_bytes,
                        store.config.max_nesting_depth)
        part.study, part.series = attrs.get("study_instance_uid") or "", attrs.get("series_instance_uid") or ""
    except Exception as e:  # Archive.store says why, and counts a limit, when no study is asked for
        if study is not None:
            return StoreResult(CANNOT_UNDERSTAND, f"cannot parse the dataset: {e}"[:64])
    if study is not None and part.study != study:
        return StoreResult(DATASET_DOES_NOT_MATCH_SOP_CLASS, "its Study Instance UID is not the one of the URL")
    # the attributes go with it: the store path does not parse the data set a second time
    result = archive.store(part.dataset(start), ts, part.sop_class_uid, part.sop_instance_uid, calling_ae=SOURCE_AE,
                           called_ae=store.config.aet, attrs=attrs)
    _trail.stored(0, SOURCE_AE, part.sop_instance_uid, result.status, part.length - start, result.comment)
    return result


def _element(vr: str, value: object) -> dict:
    """One DICOM JSON element (PS3.18 F.2.2); an empty value has no "Value" (as pydicom writes it)."""
    return {"vr": vr, "Value": [value]} if value not in ("", None) else {"vr": vr}


def _answer(parts: list[Part], base: str, study: str | None) -> tuple[int, bytes]:
    """The status and DICOM JSON body of PS3.18 10.5.3, written directly as JSON (the bytes
    pydicom's Dataset.to_json_dict gave, at a tenth of its ~90 µs an instance)."""
    ok = [p for p in parts if r_ok(p)]
    failed = [p for p in parts if not r_ok(p)]
    referenced = []
    for p in ok:
        item = {"00081150": _element("UI", p.sop_class_uid), "00081155": _element("UI", p.sop_instance_uid)}
        if p.study:
            item["00081190"] = _element("UR", resource_url(base, p.study, p.series, p.sop_instance_uid))
        referenced.append(item)
    failures = []
    for p in failed:
        result = p.result or StoreResult(PROCESSING_FAILURE, "not processed")
        item = {}
        if valid_uid(p.sop_class_uid):
            item["00081150"] = _element("UI", p.sop_class_uid)
        if valid_uid(p.sop_instance_uid):
            item["00081155"] = _element("UI", p.sop_instance_uid)
        item["00081197"] = _element("US", result.status)
        # (0040,A160): why, in words (not standard here, but read by people)
        item["0040A160"] = _element("UT", result.comment[:1024])
        failures.append(item)
    obj = {"00081199": {"vr": "SQ", "Value": referenced}, "00081198": {"vr": "SQ", "Value": failures}}
    stored_studies = {p.study for p in ok} - {""} | ({study} if study else set())
    if len(stored_studies) == 1:
        obj["00081190"] = _element("UR", resource_url(base, stored_studies.pop()))
    status = 200 if not failed else 202 if ok else 409
    return status, dumps(obj)


async def stow(request: web.Request) -> web.Response:
    _content_type(request)
    store: WebStore = request.app[STORE]
    study = path_uid(request, "study") if "study" in request.match_info else None
    started = time.monotonic()
    parts = await _spool(request, store)
    try:
        results = await asyncio.gather(*(store.run(_store_one, store, p, study)
                                         for p in parts))
        for p, r in zip(parts, results):
            p.result = r
    finally:
        await store.run(_remove, parts)
    status, body = _answer(parts, base_url(request), study)
    stored = sum(r_ok(p) for p in parts)
    log.info("STOW-RS from %s: %d stored, %d failed, %.1f MB in %.2f s", request.remote, stored,
             len(parts) - stored, sum(p.length for p in parts) / 1e6, time.monotonic() - started)
    return web.Response(status=status, body=body, content_type=MEDIA_TYPE)


def r_ok(p: Part) -> bool:
    return p.result is not None and p.result.status == SUCCESS


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(f"{base}/studies", stow), web.post(f"{base}/studies/{{study}}", stow)]
