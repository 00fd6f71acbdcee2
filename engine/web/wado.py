"""WADO-RS (PS3.18 10.4): study, series and instance retrieval, metadata, bulk data and
frames. Rendered images and thumbnails are in rendered.py.

- Retrieve: `multipart/related; type="application/dicom"`, one Part-10 file per part.
  `transfer-syntax=*` gives each instance as stored, byte-exact, streamed from its
  segment; a named syntax is converted where pydicom can (transcode.py), else 406; no
  syntax named: Explicit VR Little Endian where it can be had, else as stored (PS3.18
  8.7.3.5.2 allows that for data that cannot be decompressed).
- Metadata: `application/dicom+json`, every attribute, at study, series and instance level,
  from the catalog's stored headers where they are whole, else from the record (metadata.py).
- Bulk data and frames: multipart/related of `application/octet-stream` (or the
  compressed syntax's image type), every part labelled with its transfer syntax.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

import numpy as np
from aiohttp import web
from pydicom.uid import UID, ExplicitVRLittleEndian

from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.web import native_frame, pixels
from stowage.engine.web.context import base_url, path_uid
from stowage.engine.web.dicom_json import MEDIA_TYPE, resource_url
from stowage.engine.web.errors import refusal
from stowage.engine.web.metadata import resource_metadata
from stowage.engine.web.multipart import MultipartWriter
from stowage.engine.web.negotiation import DEFAULT_SYNTAX, IMAGE_MEDIA_TYPES, alternatives, image_media_type
from stowage.engine.web.records import IN_MEMORY, Instance, Unreadable, find
from stowage.engine.web.store import STORE, WebStore
from stowage.engine.web.transcode import MAX_BYTES, NATIVE, TranscodeError, possible, transcode

log = logging.getLogger("stowage.http")
audit = logging.getLogger("stowage.audit")
DICOM = "application/dicom"
OCTETS = "application/octet-stream"
_ENCAPSULATED_DOCUMENT = 0x00420011


def _uids(request: web.Request) -> tuple[str, str | None, str | None]:
    info = request.match_info
    return (path_uid(request, "study"), path_uid(request, "series") if "series" in info else None,
            path_uid(request, "instance") if "instance" in info else None)


async def _instances(store: WebStore, request: web.Request, with_header: bool = False) -> list[Instance]:
    study, series, instance = _uids(request)
    found = await (store.run(find, store.lookups, study, series, instance, with_header) if with_header else
                   store.run(store.find, study, series, instance))
    if not found:
        what = "instance" if instance else "series" if series else "study"
        raise refusal(404, f"no such {what} in this archive")
    return found


# -- retrieve --------------------------------------------------------------------------

def _plan(request: web.Request, found: list[Instance]) -> str | None:
    """The transfer syntax to send every instance in (None: each as stored); 406 when no
    alternative of the Accept header can be served."""
    wanted = alternatives(request.headers.get("Accept"), DICOM)
    stored = {i.transfer_syntax_uid for i in found}
    for alt in wanted:
        if alt.media_type not in (DICOM, "*/*", "application/*"):
            continue
        if alt.transfer_syntax == "*":
            return None
        if alt.transfer_syntax is None:  # the default syntax where it can be had, else as stored
            return ExplicitVRLittleEndian if all(possible(s, ExplicitVRLittleEndian) for s in stored) \
                and all(i.dataset_length <= MAX_BYTES or i.transfer_syntax_uid == ExplicitVRLittleEndian
                        for i in found) else None
        if all(possible(s, alt.transfer_syntax) for s in stored) and all(
                i.dataset_length <= MAX_BYTES or i.transfer_syntax_uid == alt.transfer_syntax for i in found):
            return alt.transfer_syntax
    names = ", ".join(sorted(UID(s).name for s in stored))
    raise refusal(406, f"cannot give these instances (stored as {names}) as the Accept header asks; "
                       'ask for multipart/related; type="application/dicom"; transfer-syntax=* to get them as stored')


async def retrieve(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    found = await _instances(store, request)
    target = _plan(request, found)
    started, sent, nbytes = time.monotonic(), 0, 0
    writer = MultipartWriter(DICOM)
    base = base_url(request)
    sizes = await store.run(_sizes, store, found) if target is None else None
    await writer.start(request, length=None if sizes is None else _body_length(writer, found, sizes, base))
    if request.method == "HEAD":  # the headers only: no record is read, nothing is sent
        return await writer.finish()
    ahead: dict[int, asyncio.Future] = {}  # the next instances' reads, in the pool while we send
    gone: ConnectionError | None = None  # the client left mid-answer: what it had is audited all the same
    try:
        for i, inst in enumerate(found):
            for j in range(i, min(i + _AHEAD, len(found))):
                if j in ahead or not _whole(found[j], target):
                    continue
                if j > i and sum(_weight(found[k], target) for k in (*ahead, j)) > _AHEAD_BYTES:
                    break  # large instances (converted ones above all): fewer ahead, not GBs held
                ahead[j] = asyncio.ensure_future(store.run(_load, store, writer, found[j], target, base, j == 0))
            location = resource_url(base, inst.study, inst.series, inst.sop_instance_uid)
            try:
                if i in ahead:
                    encoded, size = await ahead.pop(i)
                    if sizes is not None and size != sizes[i]:
                        raise Unreadable(f"{inst.sop_instance_uid} is {size} bytes, its record's head said {sizes[i]}")
                    await writer.whole_part(encoded)
                    _recycle(store, request, encoded)
                    nbytes += size
                else:
                    size = await _stream_stored(store, writer, inst, location)
                    if sizes is not None and size != sizes[i]:
                        raise Unreadable(f"{inst.sop_instance_uid} was {size} bytes, its record's head said {sizes[i]}")
                    nbytes += size
                sent += 1
            except (Unreadable, TranscodeError) as e:  # the status line is gone: end the body early
                log.error("WADO-RS: %s; the answer to %s stops here", e, request.remote)
                break
    except ConnectionError as e:
        gone = e
    finally:
        for future in ahead.values():
            future.cancel()
        await asyncio.gather(*ahead.values(), return_exceptions=True)
    process_counts.retrieved("WADO-RS", sent, len(found) - sent, 0, nbytes)
    audit.info("WADO-RS retrieve %s to %s: %d of %d instance(s), %.1f MB in %.2f s%s", request.path, request.remote,
               sent, len(found), nbytes / 1e6, time.monotonic() - started, " (the client left)" if gone else "",
               extra={"fields": {"event": "retrieve", "door": "dicomweb", "path": request.path,
                                 "peer": request.remote, "completed": sent, "failed": len(found) - sent,
                                 "bytes": nbytes, **({"client_left": True} if gone else {})}})
    if gone is not None:
        raise gone
    if sent < len(found):
        request.transport and request.transport.close()  # a truncated body, never a complete-looking one
        return writer.response
    return await writer.finish()


_AHEAD = 4  # instances read ahead of the one being sent (both cores decompress while the socket drains)
_AHEAD_BYTES = 64 << 20  # ...while what they hold stays under this (the one to send next is always read)
_CONVERTED_GROWTH = 8  # a converted instance may be this many times its stored size (a compressed one decoded)


def _weight(inst: Instance, target: str | None) -> int:
    """What reading `inst` ahead may hold in memory, at most."""
    converted = target is not None and target != inst.transfer_syntax_uid
    return inst.dataset_length * (_CONVERTED_GROWTH if converted else 1)


def _whole(inst: Instance, target: str | None) -> bool:
    """Whether the instance is sent from memory (read whole, or converted), not streamed."""
    return inst.dataset_length <= IN_MEMORY or (target is not None and target != inst.transfer_syntax_uid)


def _sizes(store: WebStore, found: list[Instance]) -> list[int] | None:
    """Each instance's Part-10 length as stored, from its record's head; None when one does
    not say (the body is then sent chunked). The records are read ahead first: their heads
    here, their payloads next."""
    store.reader.will_need(found)
    sizes = []
    for inst in found:
        size = store.reader.part10_length(inst)
        if size is None:
            return None
        sizes.append(size)
    return sizes


def _body_length(writer: MultipartWriter, found: list[Instance], sizes: list[int], base: str) -> int:
    return sum(len(_head(writer, inst, inst.transfer_syntax_uid, base, i == 0)) + size
               for i, (inst, size) in enumerate(zip(found, sizes))) + len(writer.closing(after_parts=True))


def _head(writer: MultipartWriter, inst: Instance, syntax: str, base: str, first: bool) -> bytes:
    location = resource_url(base, inst.study, inst.series, inst.sop_instance_uid)
    return writer.head(f"{DICOM}; transfer-syntax={syntax}", location, first)


def _load(store: WebStore, writer: MultipartWriter, inst: Instance, target: str | None, base: str,
          first: bool) -> tuple[bytes | memoryview, int]:
    """The whole part (delimiter, headers, the Part-10 file) in one buffer, and the file's
    size: the instance as stored (read into a buffer of store.parts, after its head), or
    converted to `target`."""
    if target is None or target == inst.transfer_syntax_uid:
        head = _head(writer, inst, inst.transfer_syntax_uid, base, first) + PREAMBLE
        part = store.reader.payload_into(inst, len(head), store.parts.take)
        part[:len(head)] = np.frombuffer(head, np.uint8)
        return memoryview(part), len(part) - len(head) + len(PREAMBLE)
    data = _converted(store, inst, target)
    return _head(writer, inst, target, base, first) + data, len(data)


def _recycle(store: WebStore, request: web.Request, sent: bytes | memoryview) -> None:
    """A part's buffer back to store.parts once nothing refers to it: once written, when the
    transport copies what the socket did not take (asyncio's plain TCP one before Python
    3.12), else once the transport holds nothing (later ones, and TLS's, keep a reference
    to what they have not sent or encrypted yet)."""
    transport = request.transport
    if isinstance(sent, memoryview) and isinstance(sent.obj, np.ndarray) and transport is not None and (
            (_TRANSPORT_COPIES and transport.get_extra_info("sslcontext") is None)
            or transport.get_write_buffer_size() == 0):
        store.parts.give(sent.obj)


_TRANSPORT_COPIES = sys.version_info < (3, 12) and type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy


async def _stream_stored(store: WebStore, writer: MultipartWriter, inst: Instance, location: str) -> int:
    """A large instance, streamed from its segment chunk by chunk."""
    ctype = f"{DICOM}; transfer-syntax={inst.transfer_syntax_uid}"
    chunks = store.reader.chunks(inst)
    first = await store.run(next, chunks, b"")
    await writer.part(ctype, first, location)
    total = len(first)
    while True:
        chunk = await store.run(next, chunks, b"")
        if not chunk:
            return total
        await writer.write(chunk)
        total += len(chunk)


def _converted(store: WebStore, inst: Instance, target: str) -> bytes:
    return transcode(store.reader.part10(inst), target, store.config)


# -- metadata --------------------------------------------------------------------------

async def metadata(request: web.Request) -> web.Response:
    accept = alternatives(request.headers.get("Accept"), MEDIA_TYPE)
    if not any(a.media_type in (MEDIA_TYPE, "application/json", "*/*", "application/*") for a in accept):
        raise refusal(406, f"metadata is given as {MEDIA_TYPE} only")
    store = request.app[STORE]
    study, series, instance = _uids(request)
    try:
        body = await store.run(resource_metadata, store, study, series, instance, base_url(request))
    except Unreadable as e:
        raise refusal(500, str(e)) from None
    if body is None:
        raise refusal(404, f"no such {'instance' if instance else 'series' if series else 'study'} in this archive")
    return web.Response(body=body, content_type=MEDIA_TYPE)


# -- bulk data and frames --------------------------------------------------------------

def _frame_numbers(text: str) -> list[int]:
    numbers = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece.isdigit() or len(piece) > 9 or int(piece) < 1:
            raise refusal(400, f"frame list {text[:64]!r}: frame numbers are whole numbers from 1, comma-separated")
        numbers.append(int(piece))
    if len(numbers) > 10000:
        raise refusal(400, "at most 10,000 frames per request")
    return numbers


def _frames(store: WebStore, inst: Instance, numbers: list[int], accept: str | None) -> tuple[str, list[tuple[str, bytes]]]:
    """The part type and (content type, bytes) of each frame asked for, as the Accept
    header allows; raises FrameError. A frame named more than once is made once and sent
    as often as named: "1,1,1,…" (4,000 fit in a URL) held a copy per mention, 2 GB for
    a 512 kB frame."""
    distinct = list(dict.fromkeys(numbers))
    part_type, parts = _distinct_frames(store, inst, distinct, accept)
    made = dict(zip(distinct, parts))
    return part_type, [made[k] for k in numbers]


def _distinct_frames(store: WebStore, inst: Instance, numbers: list[int],
                     accept: str | None) -> tuple[str, list[tuple[str, bytes]]]:
    if inst.dataset_length > MAX_BYTES:
        raise pixels.FrameError(413, f"frames of instances over {MAX_BYTES >> 20} MB are not served: "
                                     "retrieve the instance")
    payload = store.reader.payload(inst)
    if numbers == [1] and _native_octets(accept):  # a viewer's request for a slice: no pydicom parse
        frame = native_frame.frame_one(payload)
        if frame is not None:
            return OCTETS, [(f"{OCTETS}; transfer-syntax={ExplicitVRLittleEndian}", bytes(frame))]
    part10 = PREAMBLE + bytes(payload)
    ds = pixels.read(part10)
    pixels.check(ds, numbers)
    stored_ts = str(ds.file_meta.TransferSyntaxUID)
    compressed = UID(stored_ts).is_compressed and stored_ts not in NATIVE
    for alt in alternatives(accept, OCTETS):
        media, ts = alt.media_type, alt.transfer_syntax
        if media in (OCTETS, "*/*", "application/*"):
            if ts == "*" or (compressed and ts == stored_ts):
                label, frames = pixels.stored(ds, numbers)
                return OCTETS, [(f"{OCTETS}; transfer-syntax={label}", f) for f in frames]
            if ts in (None, ExplicitVRLittleEndian) and pixels.decodable(ds):
                frames = pixels.stored(ds, numbers)[1] if not compressed else pixels.decoded(ds, numbers, part10)
                return OCTETS, [(f"{OCTETS}; transfer-syntax={ExplicitVRLittleEndian}", f) for f in frames]
        elif media in IMAGE_MEDIA_TYPES.values() or media == "image/*":
            want = ts if ts not in (None, "*") else DEFAULT_SYNTAX.get(media)
            if compressed and (ts == "*" or want == stored_ts or media == "image/*") \
                    and (media == "image/*" or image_media_type(stored_ts) == media):
                _label, frames = pixels.stored(ds, numbers)
                ctype = f"{image_media_type(stored_ts)}; transfer-syntax={stored_ts}"
                return image_media_type(stored_ts), [(ctype, f) for f in frames]
    raise pixels.FrameError(406, f"the frames are stored as {UID(stored_ts).name}; the Accept header allows "
                                 "none of what can be made of them (application/octet-stream with "
                                 "transfer-syntax=* always can)")


def _native_octets(accept: str | None) -> bool:
    """Whether the Accept header's first usable choice for a native frame is its bytes as
    stored (octet-stream, transfer syntax * or Explicit VR Little Endian), as the loop in
    _distinct_frames would find for a native instance (an image type never applies to one)."""
    for alt in alternatives(accept, OCTETS):
        if alt.media_type in (OCTETS, "*/*", "application/*"):
            if alt.transfer_syntax in ("*", None, ExplicitVRLittleEndian):
                return True
    return False


async def frames(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    numbers = _frame_numbers(request.match_info["frames"])
    inst = (await _instances(store, request))[0]
    try:
        part_type, parts = await store.run(_frames, store, inst, numbers, request.headers.get("Accept"))
    except pixels.FrameError as e:
        raise refusal(e.status, str(e)) from None
    except Unreadable as e:
        raise refusal(500, str(e)) from None
    writer = MultipartWriter(part_type)
    await writer.start(request)
    base = resource_url(base_url(request), inst.study, inst.series, inst.sop_instance_uid)
    for number, (ctype, data) in zip(numbers, parts):
        await writer.part(ctype, data, f"{base}/frames/{number}")
    process_counts.retrieved("WADO-RS", 1, 0, 0, sum(len(d) for _c, d in parts))
    return await writer.finish()


def _bulk_path(text: str) -> list[int]:
    """A BulkDataURI's last segment: a tag, or sequence tag.item.tag… for a value inside a
    sequence (metadata.py writes them); refused unless it is that."""
    pieces = text.split(".")
    ok = len(pieces) % 2 == 1 and len(pieces) <= 17 and all(
        (len(p) == 8 and all(c in "0123456789abcdefABCDEF" for c in p)) if n % 2 == 0 else (p.isdigit() and len(p) <= 6)
        for n, p in enumerate(pieces))
    if not ok:
        raise refusal(400, f"bulk data tag {text[:40]!r}: eight hex digits, e.g. 7FE00010 (inside a sequence: "
                           "sequence tag.item index.tag, e.g. 00880200.0.7FE00010)")
    return [int(p, 16) if n % 2 == 0 else int(p) for n, p in enumerate(pieces)]


def _bulk(store: WebStore, inst: Instance, path: list[int]) -> tuple[str, bytes]:
    if inst.dataset_length > MAX_BYTES:
        raise pixels.FrameError(413, f"bulk data of instances over {MAX_BYTES >> 20} MB is not served: "
                                     "retrieve the instance")
    ds = pixels.read(store.reader.part10(inst))
    ts = str(ds.file_meta.TransferSyntaxUID)
    where, tag = ds, path[0]
    for n in range(0, len(path) - 1, 2):
        items = where.get(path[n])
        if items is None or items.VR != "SQ" or path[n + 1] >= len(items.value):
            raise pixels.FrameError(404, f"the instance has no item {path[n + 1]} in "
                                         f"({path[n] >> 16:04X},{path[n] & 0xFFFF:04X})")
        where, tag = items.value[path[n + 1]], path[n + 2]
    elem = where.get(tag)
    if elem is None or elem.value is None:
        raise pixels.FrameError(404, f"the instance has no ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    value = elem.value if isinstance(elem.value, (bytes, bytearray)) else None
    if value is None:
        raise pixels.FrameError(404, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not bulk data")
    label = ts if tag == 0x7FE00010 and len(path) == 1 and UID(ts).is_compressed and ts not in NATIVE \
        else ExplicitVRLittleEndian
    return f"{OCTETS}; transfer-syntax={label}", bytes(value)


def _bulk_single_part(accept: str | None) -> bool:
    """Whether the bulk data goes as a bare application/octet-stream body (the Accept
    header's best alternative names it so) rather than multipart; 406 when no alternative
    takes application/octet-stream at all (bulk data is given as nothing else)."""
    for alt in alternatives(accept, OCTETS):
        if alt.media_type in (OCTETS, "*/*", "application/*"):
            return not alt.multipart and alt.media_type == OCTETS
    raise refusal(406, f"bulk data is given as {OCTETS} only (single part or multipart/related), which the Accept "
                       "header does not allow; compressed frames as image types: .../frames/{n}")


async def bulkdata(request: web.Request) -> web.StreamResponse:
    path = _bulk_path(request.match_info["tag"])
    single = _bulk_single_part(request.headers.get("Accept"))
    store = request.app[STORE]
    inst = (await _instances(store, request))[0]
    try:
        ctype, data = await store.run(_bulk, store, inst, path)
    except pixels.FrameError as e:
        raise refusal(e.status, str(e)) from None
    except Unreadable as e:
        raise refusal(500, str(e)) from None
    if single:
        return web.Response(body=data, headers={"Content-Type": ctype})
    writer = MultipartWriter(OCTETS)
    await writer.start(request)
    await writer.part(ctype, data)
    return await writer.finish()


def routes(base: str) -> list[web.RouteDef]:
    s, se, i = f"{base}/studies/{{study}}", "/series/{series}", "/instances/{instance}"
    return [
        web.get(s, retrieve), web.get(s + se, retrieve), web.get(s + se + i, retrieve),
        web.get(s + "/metadata", metadata), web.get(s + se + "/metadata", metadata),
        web.get(s + se + i + "/metadata", metadata),
        web.get(s + se + i + "/frames/{frames}", frames),
        web.get(s + se + i + "/bulkdata/{tag}", bulkdata),
    ]
