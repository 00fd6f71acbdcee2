"""Choosing stored instances to send: by patient, study, series or instance, or by
`key=value` matches on catalog columns. Column names come only from the catalog schema;
values are always bound parameters (DESIGN.md invariant 6)."""
from __future__ import annotations

import shlex
from typing import Sequence

from stowage.catalog.reader import Catalog
from stowage.catalog.schema import COLUMN_NAMES, DICOM_COLUMNS, KEYWORD_TO_COLUMN
from stowage.engine.transfer.results import Instance

LEVELS = {"patient": "patient_id", "study": "study_instance_uid",
          "series": "series_instance_uid", "instance": "sop_instance_uid"}
_TEXT_COLUMNS = frozenset(c for c, _kw in DICOM_COLUMNS)
_FIELDS = ("sop_instance_uid, sop_class_uid, transfer_syntax_uid, segment, \"offset\", dataset_length, "
           "epoch_us(received_at)")


class SelectionError(ValueError):
    """A selection that cannot be run; the message says what to change."""


def _column(key: str) -> str:
    if key in _TEXT_COLUMNS:
        return key
    if key in KEYWORD_TO_COLUMN:
        return KEYWORD_TO_COLUMN[key]
    raise SelectionError(f"unknown key {key!r} in --query: use a DICOM keyword (e.g. PatientID, Modality) "
                         f"or a catalog column ({', '.join(sorted(_TEXT_COLUMNS))})")


def parse_query(text: str) -> list[tuple[str, str]]:
    """'Modality=CT PatientName="DOE^J*"' -> [(column, value), ...]."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise SelectionError(f"--query {text!r}: {e}") from None
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise SelectionError(f"--query: {word!r} is not key=value")
        pairs.append((_column(key.strip()), value))
    if not pairs:
        raise SelectionError("--query: give at least one key=value")
    return pairs


def _like(value: str) -> str:
    """DICOM wildcards (* and ?) as a LIKE pattern, with LIKE's own characters escaped."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def select(catalog: Catalog, level: str | None = None, values: Sequence[str] = (),
           query: Sequence[tuple[str, str]] = ()) -> list[Instance]:
    """The kept instances matching, in segment order (sequential reads)."""
    where, params = [], []
    if level is not None:
        where.append(f"{LEVELS[level]} IN (SELECT unnest(?))")
        params.append(list(values))
    for column, value in query:
        assert column in COLUMN_NAMES  # _column() vouched for it
        if "*" in value or "?" in value:
            where.append(f"{column} LIKE ? ESCAPE '\\'")
            params.append(_like(value))
        else:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT {_FIELDS} FROM instances"
    if where:
        sql += " WHERE " + " AND ".join(where)
    _cols, rows = catalog.execute(sql + " ORDER BY segment, \"offset\"", params)
    return [Instance(*r[:5], dataset_length=r[5] or 0, received_at=r[6]) for r in rows]
