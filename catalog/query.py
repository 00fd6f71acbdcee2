"""C-FIND over the catalog: a request identifier in, matching entities out.

    request = parse_request(identifier, sop_class_uid, relational)   # or QueryError
    for result in run(catalog, request): ...                        # Result per entity

A request names a model (by its FIND SOP class) and a level; each key is matched from an
indexed column (SQL, values bound as parameters), computed from the instances (derived
keys: counts, Modalities/SOP Classes in Study), or matched and returned from the stored
header of the entity's newest instance. PATIENT, STUDY and SERIES entities group the
`instances` view (one row per SOP Instance UID, as the duplicates policy keeps it);
IMAGE reads it row by row. Results come in pages ordered by the entity's key, so memory
stays bounded whatever the number of matches.

Hierarchical queries (the default): unique keys of the levels above the query level,
when given, must be single values; keys of the levels below are not matched (returned
empty). Relational queries (extended negotiation): any key at any level the model has
is matched; an entity matches when one of its instances does.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from stowage.catalog.attributes import header_is_implicit
from stowage.catalog.keys import DERIVED, LEVELS, UNIQUE, Model, models, table_level
from stowage.catalog import studies
from stowage.catalog.matching import Match, MatchError, _like, datetime_sql, matches, parse, sql
from stowage.catalog.reader import Catalog
from stowage.catalog.schema import KEYWORD_TO_COLUMN
from stowage.protocol.status import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, SOP_CLASS_NOT_SUPPORTED, UNABLE_TO_PROCESS

PAGE = 2000

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
_NOT_KEYS = frozenset({QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET})
_ANSWERED = frozenset({RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY})  # about the archive, not matched
# Indexed date/time pairs that combine into one date-time range (PS3.4 C.2.2.2.5.1).
_DATE_TIME = ((0x00080020, 0x00080030), (0x00080023, 0x00080033))
_TAG_COLUMN = {}  # tag -> indexed column, filled below


class QueryError(Exception):
    """A request that gets a failure status; `comment` becomes the Error Comment (LO)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


@dataclass
class RequestKey:
    tag: int
    vr: str
    level: str            # the level this key belongs to in the request's model
    match: Match
    matched: bool         # whether it restricts the result (else only returned)
    source: str           # indexed, derived, header
    column: str | None = None


@dataclass
class Request:
    model: Model
    level: str
    relational: bool
    keys: list[RequestKey]
    charset: list[str] = field(default_factory=list)  # the request's Specific Character Set
    # Date and time ranges given together are one continuum (C.2.2.2.5.1) only when the
    # requester asked for combined date-time matching; otherwise each is matched alone.
    combined_datetime: bool = True


def _column(tag: int) -> str | None:
    if not _TAG_COLUMN:
        from pydicom.datadict import tag_for_keyword
        _TAG_COLUMN.update({tag_for_keyword(kw): col for kw, col in KEYWORD_TO_COLUMN.items()})
    return _TAG_COLUMN.get(tag)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def parse_request(identifier: Dataset, sop_class_uid: str, relational: bool = False,
                  combined_datetime: bool = True) -> Request:
    """The request an identifier makes under a FIND SOP class; QueryError when it cannot
    be served as asked. `combined_datetime`: whether a date range and a time range given
    together are one date-time range (C-FIND: when extended negotiation asked for it)."""
    model = models().get(str(sop_class_uid))
    if model is None:
        raise QueryError(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {str(sop_class_uid)[:40]} not supported")
    try:
        level_elem = identifier.get(QUERY_RETRIEVE_LEVEL)
        level = str(level_elem.value or "").strip() if level_elem is not None else ""
    except Exception:
        level = ""
    if not level:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "no Query/Retrieve Level (0008,0052)")
    if level not in model.levels:
        what = "unknown" if level not in LEVELS else f"not in {model.name}"
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"Query/Retrieve Level {level[:16]!r} {what}")
    try:
        charset = identifier.get(SPECIFIC_CHARACTER_SET)
        charset_values = [] if charset is None or not charset.value else (
            [charset.value] if isinstance(charset.value, str) else list(charset.value))
        elements = [elem for elem in identifier]  # decodes the values with the request's charset
    except Exception as e:
        raise QueryError(UNABLE_TO_PROCESS, f"cannot decode the identifier: {e}") from None
    depth = model.levels.index(level)
    keys = []
    for elem in elements:
        tag = int(elem.tag)
        if tag in _NOT_KEYS or tag & 0xFFFF == 0 or tag >> 16 in (0x0000, 0x0002):
            continue
        key_level = model.level_of(tag)
        if key_level is None:
            home = table_level(tag)
            if home is not None and home not in model.levels and not (home == "PATIENT" and "STUDY" in model.levels
                                                                        and model.levels[0] == "STUDY"):
                raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                 f"key {_tag(tag)} is at {home} level; {model.name} has none")
            key_level = level  # "all other attributes" of the query level, from the header
        try:
            m = parse(elem)
        except MatchError as e:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(e)) from None
        if tag in _ANSWERED:
            keys.append(RequestKey(tag, str(elem.VR), level, Match("universal", str(elem.VR)), False, "archive"))
            continue
        key_depth = model.levels.index(key_level)
        if key_depth < depth and tag == UNIQUE[key_level] and not relational and m.kind not in ("universal", "single"):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                             f"hierarchical query: {_tag(tag)} must be one value")
        matched = not m.universal and (relational or key_depth <= depth)
        source = "derived" if tag in DERIVED else ("indexed" if _column(tag) else "header")
        if source == "derived" and not _derived_at(tag, level, model):
            matched = False  # a count of another level: returned empty
        keys.append(RequestKey(tag, str(elem.VR), key_level, m, matched, source, _column(tag)))
    return Request(model, level, relational, keys, charset_values, combined_datetime)


def _derived_at(tag: int, level: str, model: Model) -> bool:
    """Whether derived key `tag` has a value at `level` (its own level, or Study Root's
    patient counts at STUDY level)."""
    home = table_level(tag)
    return home == level or (home == "PATIENT" and level == "STUDY" and model.levels[0] == "STUDY")


# --- SQL -----------------------------------------------------------------------------------

_ENTITY = {
    "PATIENT": "coalesce(patient_id, '') || chr(0) || coalesce(issuer_of_patient_id, '')",
    "STUDY": "study_instance_uid",
    "SERIES": "series_instance_uid",
    "IMAGE": "sop_instance_uid",
}
_COUNTS = {
    0x00201200: "count(DISTINCT study_instance_uid)",   # patient related studies
    0x00201202: "count(DISTINCT series_instance_uid)",  # patient related series
    0x00201204: "count(*)",                             # patient related instances
    0x00201206: "count(DISTINCT series_instance_uid)",  # study related series
    0x00201208: "count(*)",                             # study related instances
    0x00201209: "count(*)",                             # series related instances
}
_LISTS = {0x00080061: "modality", 0x00080062: "sop_class_uid"}  # Modalities / SOP Classes in Study
_PATIENT_COUNTS = {0x00201200, 0x00201202, 0x00201204}
# The same over study summaries (catalog.studies): one row per study per file.
_SUMMARY_COUNTS = {
    0x00201200: "count(DISTINCT study_instance_uid)",
    0x00201202: "len(list_distinct(flatten(list(series))))",
    0x00201204: "CAST(sum(instances) AS BIGINT)",
    0x00201206: "len(list_distinct(flatten(list(series))))",
    0x00201208: "CAST(sum(instances) AS BIGINT)",
}
_SUMMARY_LISTS = {0x00080061: "modalities", 0x00080062: "sop_classes"}


def _from_summaries(request: "Request") -> bool:
    """Whether study summaries can answer the request: a PATIENT or STUDY query whose
    matched keys are all of its level or above, on columns the summaries carry."""
    if request.level not in ("PATIENT", "STUDY"):
        return False
    depth = LEVELS.index(request.level)
    for k in request.keys:
        if k.source == "indexed" and LEVELS.index(k.level) <= depth and k.column not in studies.ATTRIBUTES \
                and k.column != "study_instance_uid":
            return False  # a column returned that summaries lack
        if not k.matched:
            continue
        if LEVELS.index(k.level) > depth or (k.tag in _LISTS and k.match.kind == "wildcard"):
            return False
    return True


@dataclass
class Plan:
    """How to answer a request. IMAGE: `select` pages through matching instances (params
    `params`). Other levels, in two steps: `keys` pages through the keys `k` of matching
    entities (params `params`), then `select` aggregates every instance of those entities
    (its first parameter is the list of keys, then `select_params`), so that counts and
    lists cover all of an entity's instances, not only those that matched."""

    select: str
    params: list[Any]
    columns: dict[int, str]          # tag -> result column holding its value
    header_keys: list[RequestKey]    # matched in Python on the header
    wants_header: bool
    keys: str | None = None
    select_params: list[Any] = field(default_factory=list)
    given: list[str] | None = None   # the keys, when the request lists them (its level's unique key)
    having: bool = False             # whether `select` drops some keys' rows (HAVING on derived keys)
    header_tags: list[int] | None = None  # the header's elements that keys match or return


def plan(request: Request, pn_insensitive: bool = False) -> Plan:
    """The SQL for a request, values bound as parameters."""
    level, aggregated = request.level, request.level != "IMAGE"
    summaries = _from_summaries(request)
    source = "study_parts" if summaries else "instances"
    counts = _SUMMARY_COUNTS if summaries else _COUNTS
    where: list[str] = []
    params: list[Any] = []
    by_tag = {k.tag: k for k in request.keys}
    combined: set[int] = set()
    for date_tag, time_tag in _DATE_TIME if request.combined_datetime else ():
        d, t = by_tag.get(date_tag), by_tag.get(time_tag)
        if d and t and d.matched and t.matched and d.match.kind == "range" and t.match.kind == "range":
            where.append(datetime_sql(d.column, t.column, d.match, t.match, params))
            combined |= {date_tag, time_tag}
    for k in request.keys:
        if k.matched and k.source == "indexed" and k.tag not in combined:
            cond = sql(k.column, k.match, params, pn_insensitive)
            if cond:
                where.append(cond)
    derived = [k for k in request.keys if k.source == "derived" and _derived_at(k.tag, level, request.model)]
    selects = [f"{_ENTITY[level]} AS k"]
    columns: dict[int, str] = {}
    for k in request.keys:
        if k.source == "indexed" and LEVELS.index(k.level) <= LEVELS.index(level):
            name = f"c_{k.column}"
            selects.append(f"max({k.column}) AS {name}" if aggregated else f"{k.column} AS {name}")
            columns[k.tag] = name
    for lvl in LEVELS[:LEVELS.index(level) + 1]:  # unique keys of this level and above
        if lvl in request.model.levels and UNIQUE[lvl] not in columns:
            col = _column(UNIQUE[lvl])
            selects.append(f"max({col}) AS u_{col}" if aggregated else f"{col} AS u_{col}")
            columns[UNIQUE[lvl]] = f"u_{col}"
    having: list[str] = []
    select_params: list[Any] = []
    patient_counts = []
    for k in derived:
        name = f"d_{k.tag:08x}"
        columns[k.tag] = name
        if k.tag in _PATIENT_COUNTS and level == "STUDY":
            patient_counts.append((k, name))
            continue
        values = f"flatten(list({_SUMMARY_LISTS[k.tag]}))" if summaries and k.tag in _LISTS else \
            f"list({_LISTS[k.tag]})" if k.tag in _LISTS else None
        expr = counts.get(k.tag) or f"list_sort(list_distinct({values}))"
        selects.append(f"{expr} AS {name}")
        if k.matched:
            having.append(_derived_condition(k, expr, select_params, values))
    selects.append("max(specific_character_set) AS cs_" if aggregated else "specific_character_set AS cs_")
    header_keys = [k for k in request.keys if k.source == "header" and k.matched]
    wants_header = bool(header_keys) or any(k.source == "header" and k.level == level for k in request.keys)
    header_tags = sorted({k.tag for k in request.keys if k.source == "header"}) or None
    if wants_header:
        selects.append("arg_max({'h': header, 't': transfer_syntax_uid}, received_at) AS hdr" if aggregated
                       else "{'h': header, 't': transfer_syntax_uid} AS hdr")
    cond = " AND ".join(f"({c})" for c in where) or "TRUE"
    if not aggregated:
        return Plan(f"SELECT {', '.join(selects)} FROM instances WHERE {cond}", params, columns, header_keys,
                    wants_header, header_tags=header_tags)
    entity = _ENTITY[level]
    unique = by_tag.get(UNIQUE[level])
    if len(where) == 1 and unique is not None and unique.matched and unique.match.kind in ("single", "list") \
            and level != "PATIENT":
        # Only the level's own unique key: the keys are the values asked for (those not
        # held simply find no instances).
        where, params = [], []
        given = sorted(set(unique.match.values or [unique.match.value]))
        keys = "SELECT unnest(?) AS k"
        params = [given]
    elif summaries and level == "STUDY" and not patient_counts:
        # One pass over the summaries: the parts of a study that match are aggregated (a
        # study split over files has matching parts in each, its attributes being the same).
        having_sql = " HAVING " + " AND ".join(having) if having else ""
        return Plan(f"SELECT {', '.join(selects)} FROM {source} WHERE {cond} GROUP BY k{having_sql}",
                    params + select_params, columns, header_keys, wants_header, header_tags=header_tags)
    else:
        given = None
        keys = f"SELECT DISTINCT {entity} AS k FROM {source} WHERE {cond}"
    body = (f"SELECT {', '.join(selects)} FROM {source} WHERE {entity} IN (SELECT unnest(?)) GROUP BY k"
            + (" HAVING " + " AND ".join(having) if having else ""))
    if patient_counts:  # Study Root: the patient's counts at STUDY level
        parts = ", ".join(f"{counts[k.tag]} AS {name}" for k, name in patient_counts)
        body = body.replace(" AS k, ", f" AS k, max({_ENTITY['PATIENT']}) AS pk_, ", 1)
        body = (f"SELECT s.* EXCLUDE (pk_), {', '.join('p.' + name for _, name in patient_counts)} FROM ({body}) s "
                f"LEFT JOIN (SELECT {_ENTITY['PATIENT']} AS pk, {parts} FROM {source} GROUP BY pk) p ON p.pk = s.pk_")
        for k, name in patient_counts:
            if k.matched:
                body = f"SELECT * FROM ({body}) WHERE {_derived_condition(k, name, select_params)}"
    return Plan(body, params, columns, header_keys, wants_header, keys, select_params, given,
                bool(having) or any(k.matched for k, _ in patient_counts), header_tags)


def _derived_condition(k: RequestKey, expr: str, params: list[Any], values: str | None = None) -> str:
    """A HAVING condition for derived key k: `expr` its value, `values` (for Modalities and
    SOP Classes in Study) the list its values come from."""
    m = k.match
    if k.tag in _LISTS:
        if m.kind == "wildcard":  # instances only (summaries step aside, see _from_summaries)
            params.append(_like(m.value))
            return f"bool_or({_LISTS[k.tag]} LIKE ? ESCAPE '\\')"
        params.append(m.values if m.kind == "list" else [m.value])
        return f"list_has_any({values}, ?)"
    values = m.values if m.kind == "list" else [m.value]
    try:
        params.append([int(float(v)) for v in values])
    except ValueError:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"key {_tag(k.tag)} needs a number") from None
    return f"list_contains(?, {expr})"


# --- running ----------------------------------------------------------------------------


@dataclass
class Result:
    """One matching entity: values by tag (str, int, list), its newest instance's header
    (when a key needs it) and the Specific Character Set its values were stored in."""

    values: dict[int, Any]
    header: Dataset | None
    charset: list[str] = field(default_factory=list)


def decode_header(raw: dict | None, tags: list[int] | None = None) -> Dataset | None:
    """The stored header as a Dataset; with `tags`, only those elements (and Specific
    Character Set) are kept: the rest are stepped over, not decoded."""
    if not raw or raw.get("h") is None:
        return None
    try:
        return read_dataset(BytesIO(raw["h"]), header_is_implicit(raw.get("t") or ""), True, specific_tags=tags)
    except Exception:
        return None


def run(catalog: Catalog, request: Request, pn_insensitive: bool = False, page: int = PAGE,
        skip: int = 0) -> Iterator[Result]:
    """Every matching entity after the first `skip`, in pages of at most `page` entities
    ordered by entity key."""
    p = plan(request, pn_insensitive)
    results = _pages(catalog, p, pn_insensitive, page, skip if _skipped_in_sql(p) else 0)
    return results if _skipped_in_sql(p) else itertools.islice(results, skip, None)


def _skipped_in_sql(p: Plan) -> bool:
    """Whether OFFSET in SQL skips whole results: one row per result (IMAGE and STUDY over
    summaries; or keys that each have their rows, not keys listed in the request nor
    dropped by HAVING) and no key matched in Python afterwards. Else they are skipped as
    made, which costs a QIDO-RS client paging through 10^5 instances seconds a page."""
    return (p.keys is None or (p.given is None and not p.having)) and not p.header_keys


def _pages(catalog: Catalog, p: Plan, pn_insensitive: bool, page: int, skip: int) -> Iterator[Result]:
    last, start = None, 0
    while True:
        after = "k > ?" if last is not None else "TRUE"
        bound = p.params + ([last] if last is not None else []) + [page]
        if p.keys is None:  # IMAGE, or STUDY over summaries: one statement
            offset = " OFFSET ?" if skip and last is None else ""
            columns, rows = catalog.execute(f"SELECT * FROM ({p.select}) WHERE {after} ORDER BY k LIMIT ?{offset}",
                                            bound + ([skip] if offset else []))
            found, last_key = len(rows), rows[-1][0] if rows else None
        elif p.given is not None:  # the keys are the values asked for
            keys = p.given[start:start + page]
            start += page
            columns, rows = catalog.execute(f"SELECT * FROM ({p.select}) ORDER BY k", [keys, *p.select_params]) \
                if keys else ([], [])
            found, last_key = len(keys), None
        elif not p.having:  # every key found has rows: keys and rows in one statement
            offset = " OFFSET ?" if skip and last is None else ""
            columns, rows = catalog.execute(
                f"WITH page_ AS (SELECT k FROM ({p.keys}) WHERE {after} ORDER BY k LIMIT ?{offset}) "
                f"SELECT * FROM ({p.select.replace('(SELECT unnest(?))', '(SELECT k FROM page_)', 1)}) ORDER BY k",
                bound + ([skip] if offset else []) + p.select_params)
            found, last_key = len(rows), rows[-1][0] if rows else None
        else:
            def both(execute):
                _cols, keys = execute(f"SELECT k FROM ({p.keys}) WHERE {after} ORDER BY k LIMIT ?", bound)
                keys = [k for (k,) in keys]
                if not keys:
                    return keys, [], []
                return (keys, *execute(f"SELECT * FROM ({p.select}) ORDER BY k", [keys, *p.select_params]))
            keys, columns, rows = catalog.snapshot(both)
            found, last_key = len(keys), keys[-1] if keys else None
        index = {name: i for i, name in enumerate(columns)}
        for row in rows:
            header = decode_header(row[index["hdr"]], p.header_tags) if p.wants_header else None
            if p.header_keys and not _header_matches(p.header_keys, header, pn_insensitive):
                continue
            cs = row[index["cs_"]]
            yield Result({tag: row[index[name]] for tag, name in p.columns.items()}, header,
                         cs.split("\\") if cs else [])
        if found < page:
            return
        last = last_key


def _header_matches(keys: list[RequestKey], header: Dataset | None, pn_insensitive: bool) -> bool:
    for k in keys:
        elem = header.get(k.tag) if header is not None else None
        try:
            value = elem.value if elem is not None else None
        except Exception:
            value = None
        if not matches(k.match, value, pn_insensitive):
            return False
    return True
