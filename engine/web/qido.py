"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, at the top and nested
(`/studies/{study}/series`, `/studies/{study}/instances`, ...).

A query becomes a C-FIND identifier of the Study Root model and runs through the same
code as C-FIND (catalog.query: matching, relational keys, derived counts), so both doors
match alike. What PS3.18 adds is handled here: keys as keywords or tags (and
`Sequence.Item` paths), UID lists with commas, `includefield` (a list, or `all`: every
key the archive holds for the levels up to the query's), `limit`/`offset` (at most
`qido_max_limit` per answer: a larger limit is cut to it, with a Warning header),
`fuzzymatching` (case- and accent-insensitive person names), 204 when nothing matches.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from stowage.catalog.keys import LEVELS, STUDY_ROOT_FIND, UNIQUE, models
from stowage.catalog.query import QueryError, parse_request, run
from stowage.catalog.responses import identifier as response_identifier
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.web.context import CONFIG, base_url, path_uid
from stowage.engine.web.store import STORE
from stowage.engine.web.dicom_json import MEDIA_TYPE, dumps, resource_url
from stowage.engine.web.fast_json import dataset_json
from stowage.engine.web.negotiation import refused
from stowage.engine.web.errors import refusal
from stowage.engine.web.sending import StreamedResponse

audit = logging.getLogger("stowage.audit")
_RESERVED = frozenset({"includefield", "limit", "offset", "fuzzymatching", "access_token"})
_NUMERIC = {"US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float,
            "IS": int, "DS": float}
_LIST_VRS = frozenset({"UI", "CS"})  # a comma separates values (PS3.18 8.3.4.1)

# Attributes answered by default (PS3.18 Table 10.6.3-3, -4, -5), by level.
DEFAULTS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "RetrieveAETitle"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "SeriesDate",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
               "PerformedProcedureStepStartTime"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber", "Rows", "Columns",
              "BitsAllocated", "NumberOfFrames"),
}
_TIMEZONE = 0x00080201  # Timezone Offset From UTC, answered when held (every level)


@dataclass
class Search:
    level: str                       # STUDY, SERIES or IMAGE
    identifier: Dataset
    limit: int
    offset: int
    fuzzy: bool
    warnings: list[str] = field(default_factory=list)
    all_fields: bool = False


def _tag_of(name: str) -> int | None:
    """A keyword or an 8-digit hex tag as an int; None when it is neither."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    return int(tag) if tag is not None else None


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _path(name: str) -> list[int]:
    """`PatientName`, `00100010`, `ReferencedStudySequence.ReferencedSOPInstanceUID`."""
    tags = []
    for part in name.split("."):
        tag = _tag_of(part)
        if tag is None:
            raise refusal(400, f"unknown query key {name!r}: not a DICOM keyword or tag (PS3.18 8.3.4)")
        if tag >> 16 in (0x0000, 0x0002, 0xFFFE) or tag & 0xFFFF == 0:
            raise refusal(400, f"query key {name!r} cannot be matched (group length, file meta or delimiter)")
        tags.append(tag)
    for tag in tags[:-1]:
        if _vr(tag) != "SQ":
            raise refusal(400, f"query key {name!r}: {keyword_for_tag(tag) or hex(tag)} is not a sequence")
    return tags


def _value(tag: int, vr: str, text: str, name: str) -> Any:
    if vr in _LIST_VRS:
        text = text.replace(",", "\\")
    if text == "" or vr not in _NUMERIC:
        return text
    try:
        values = [_NUMERIC[vr](v) for v in text.split("\\")]
        if vr in ("IS", "DS"):
            return text  # checked; kept as text, as a C-FIND identifier carries it
        return values if len(values) > 1 else values[0]
    except ValueError:
        raise refusal(400, f"query key {name}={text[:64]!r}: {vr} needs a number") from None


def _put(ds: Dataset, tags: list[int], value: Any) -> None:
    """Set the element at `tags` (sequence path) in `ds`, creating the one item on the way."""
    tag = tags[0]
    if len(tags) == 1:
        ds.add_new(tag, _vr(tag), value)
        return
    if tag not in ds or not ds[tag].value:
        ds.add_new(tag, "SQ", Sequence([Dataset()]))
    _put(ds[tag].value[0], tags[1:], value)


_INT_MAX = 2**31 - 1  # PS3.18 has limit and offset as unsigned integers; past this is no count anyone means


def _number(query: web.MultiDictProxy, key: str, default: int) -> int:
    """A whole-number parameter: refused (400) when given twice, when not ASCII digits
    (negative, a fraction, an exponent, '²'), or past 2**31 - 1."""
    given = query.getall(key, [])
    if not given:
        return default
    if len(given) > 1:
        raise refusal(400, f"{key} is given {len(given)} times: give it once")
    text = given[0]
    if not (text.isascii() and text.isdigit()):
        raise refusal(400, f"{key}={text[:32]!r}: must be a whole number >= 0")
    if len(text) > 10 or int(text) > _INT_MAX:
        raise refusal(400, f"{key}={text[:32]!r}: must be at most {_INT_MAX}")
    return int(text)


def parse_search(query: web.MultiDictProxy, level: str, fixed: dict[int, str], max_limit: int) -> Search:
    """The search a QIDO-RS request asks for; `fixed`: the UIDs in the path."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    warnings = []
    limit = _number(query, "limit", max_limit)
    if limit > max_limit:
        warnings.append(f"the limit {limit} is above this archive's maximum of {max_limit} results per "
                        f"request (qido_max_limit); at most {max_limit} are returned: page with offset")
        limit = max_limit
    offset = _number(query, "offset", 0)
    fuzzy = query.get("fuzzymatching", "false").lower()
    if fuzzy not in ("true", "false"):
        raise refusal(400, f"fuzzymatching={fuzzy[:16]!r}: must be true or false")
    for tag, uid in fixed.items():
        ds.add_new(tag, "UI", uid)
    seen: dict[tuple[int, ...], str] = {}  # by attribute: PatientName and 00100010 are one key
    for name, text in query.items():
        if name in _RESERVED:
            continue
        tags = _path(name)
        if tuple(tags) in seen:
            first = seen[tuple(tags)]
            also = "" if first == name else f" (as {first!r} and {name!r})"
            raise refusal(400, f"query key {name!r} given twice{also}: give a list of values in one (a,b,c)")
        seen[tuple(tags)] = name
        if len(tags) == 1 and tags[0] in fixed:
            if text and text != fixed[tags[0]]:
                raise refusal(400, f"query key {name!r} contradicts the UID in the path")
            continue
        value = _value(tags[-1], _vr(tags[-1]), text, name)
        try:
            _put(ds, tags, value)
        except (ValueError, TypeError, OverflowError) as e:
            raise refusal(400, f"query key {name}={text[:64]!r}: {e}") from None
    all_fields = False
    for item in query.getall("includefield", []):
        for name in filter(None, (n.strip() for n in item.split(","))):
            if name == "all":
                all_fields = True
                continue
            tags = _path(name)
            if _elem_at(ds, tags) is None:
                _put(ds, tags, None if _vr(tags[-1]) != "SQ" else Sequence())
    for lvl in LEVELS[1:LEVELS.index(level) + 1]:
        for keyword in DEFAULTS[lvl]:
            tag = int(tag_for_keyword(keyword))
            if tag not in ds:
                ds.add_new(tag, _vr(tag), None)
    if all_fields:
        model = models()[STUDY_ROOT_FIND]
        for lvl in model.levels[:model.levels.index(level) + 1]:
            for tag, key in model.keys[lvl].items():
                if tag not in ds:
                    ds.add_new(tag, key.vr, None if key.vr != "SQ" else Sequence())
    if _TIMEZONE not in ds:
        ds.add_new(_TIMEZONE, "SH", None)
    return Search(level, ds, limit, offset, fuzzy == "true", warnings, all_fields)


def _elem_at(ds: Dataset, tags: list[int]) -> Any:
    elem = ds.get(tags[0])
    if elem is None or len(tags) == 1:
        return elem
    return _elem_at(elem.value[0], tags[1:]) if elem.value else None


_PIECE = 100  # results made into JSON at a time: a large answer is never whole as Python objects


def search(catalog, search: Search, base: str, ae_title: str, pn_insensitive: bool) -> tuple[list[bytes], int, bool]:
    """The matches (at most `limit`, after `offset`) as pieces of one DICOM JSON array, how
    many, and whether more remain. Made `_PIECE` results at a time, each piece encoded before
    the next is made: an answer of 1,000 instances with every field held its whole JSON as
    Python objects at once (about 10 MB), in each of the pool's threads."""
    try:
        request = parse_request(search.identifier, STUDY_ROOT_FIND, relational=True)
        fuzzy = search.fuzzy or pn_insensitive
        results = run(catalog, request, fuzzy, skip=search.offset)
        page = list(itertools.islice(results, search.limit + 1))
    except QueryError as e:
        raise refusal(400, f"cannot search: {e.comment}") from None
    more = len(page) > search.limit
    del page[search.limit:]
    pieces = []
    for start in range(0, len(page), _PIECE):
        out = [_match_json(request, result, search.level, base, ae_title, fuzzy)
               for result in page[start:start + _PIECE]]
        page[start:start + _PIECE] = [None] * len(out)  # the results made into JSON are let go
        pieces.append(dumps(out)[1:-1])
    if pieces:
        pieces[0] = b"[" + pieces[0]
        pieces[-1] += b"]"
    return [p if i == 0 else b"," + p for i, p in enumerate(pieces)], len(page), more


def _match_json(request, result, level: str, base: str, ae_title: str, fuzzy: bool) -> dict:
    ds = response_identifier(request, result, ae_title, fuzzy)
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "") if level != "STUDY" else None
    sop = str(ds.get("SOPInstanceUID", "") or "") if level == "IMAGE" else None
    obj = dataset_json(ds, None)  # the identifier's elements are raw: converted in one step
    obj["00081190"] = {"vr": "UR", "Value": [resource_url(base, study, series, sop)]}
    obj.pop("00080052", None)  # Query/Retrieve Level: C-FIND's, not QIDO's
    return dict(sorted(obj.items()))


async def _answer(request: web.Request, level: str, fixed: dict[int, str]) -> web.Response:
    config, store = request.app[CONFIG], request.app[STORE]
    wanted = search_of(request, level, fixed, config.qido_max_limit)
    started = time.monotonic()
    pieces, found, more = await store.run(search, store.catalog, wanted, base_url(request), config.aet,
                                          config.pn_case_insensitive)
    process_counts.add("finds")
    audit.info("QIDO-RS %s from %s: %d match(es) in %.1f ms", level, request.remote, found,
               (time.monotonic() - started) * 1000,
               extra={"fields": {"event": "find", "door": "dicomweb", "query_level": level, "peer": request.remote,
                                 "matches": found, "query": _logged_query(request)}})
    headers = {}
    warnings = list(wanted.warnings)
    if more:
        warnings.append("there are more matches than returned: ask again with a larger offset")
    if warnings:
        headers["Warning"] = ", ".join(f'299 stowage "{w}"' for w in warnings)
    if not found:
        return web.Response(status=204, headers=headers)
    if len(pieces) == 1:
        return web.Response(body=pieces[0], content_type=MEDIA_TYPE, headers=headers)
    response = StreamedResponse(headers=headers)  # the pieces as they are, never joined into one body
    response.content_type = MEDIA_TYPE
    await response.prepare(request)
    while pieces:
        await response.write(pieces.pop(0))
    await response.write_eof()
    return response


def _logged_query(request: web.Request) -> str:
    """The query string for the audit line, without `access_token` (RFC 6750 2.3: a browser
    link's bearer token): the audit trail names the token, never holds it."""
    kept = [p for p in request.query_string.split("&") if p.split("=", 1)[0] != "access_token"]
    return "&".join(kept)[:512]


def search_of(request: web.Request, level: str, fixed: dict[int, str], max_limit: int) -> Search:
    _acceptable(request)
    return parse_search(request.query, level, fixed, max_limit)


def _acceptable(request: web.Request) -> None:
    accept = request.headers.get("Accept", "*/*")
    types = [a.split(";")[0].strip().lower() for a in accept.split(",")]
    no = refused(accept)  # "application/dicom+json; q=0" is a refusal, not a wish
    if MEDIA_TYPE in no or not any(t in (MEDIA_TYPE, "application/json", "*/*", "application/*") and t not in no
                                   for t in types):
        raise refusal(406, f"QIDO-RS answers {MEDIA_TYPE} only (Accept: {accept[:100]})")


async def studies(request: web.Request) -> web.Response:
    return await _answer(request, "STUDY", {})


async def series(request: web.Request) -> web.Response:
    fixed = {UNIQUE["STUDY"]: path_uid(request, "study")} if "study" in request.match_info else {}
    return await _answer(request, "SERIES", fixed)


async def instances(request: web.Request) -> web.Response:
    fixed = {}
    if "study" in request.match_info:
        fixed[UNIQUE["STUDY"]] = path_uid(request, "study")
    if "series" in request.match_info:
        fixed[UNIQUE["SERIES"]] = path_uid(request, "series")
    return await _answer(request, "IMAGE", fixed)


def routes(base: str) -> list[web.RouteDef]:
    return [web.get(f"{base}/studies", studies), web.get(f"{base}/series", series),
            web.get(f"{base}/instances", instances), web.get(f"{base}/studies/{{study}}/series", series),
            web.get(f"{base}/studies/{{study}}/instances", instances),
            web.get(f"{base}/studies/{{study}}/series/{{series}}/instances", instances)]
