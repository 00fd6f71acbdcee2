"""Export: stored instances as Part-10 files whose dataset bytes are those received."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from catalog.reader import Catalog
from engine.filemeta import PREAMBLE
from engine.segment import stream_payload

SELECTORS = {"patient": "patient_id", "study": "study_instance_uid",
             "series": "series_instance_uid", "instance": "sop_instance_uid"}


@dataclass
class ExportResult:
    written: int = 0
    failed: list[str] | None = None


def select(catalog: Catalog, level: str | None, values: list[str]) -> list[tuple[str, str, int]]:
    """(sop_instance_uid, segment, offset) of the instances to export; values are bound."""
    sql = "SELECT sop_instance_uid, segment, \"offset\" FROM instances"
    if level is not None:
        sql += f" WHERE {SELECTORS[level]} IN (SELECT unnest(?))"
    _cols, rows = catalog.execute(sql + " ORDER BY segment, \"offset\"", [values] if level else [])
    return rows


def export(data_dir: Path, out: Path, level: str | None, values: list[str],
           duplicates: str = "keep-newest") -> ExportResult:
    catalog = Catalog(data_dir / "catalog", duplicates)
    try:
        rows = select(catalog, level, values)
    finally:
        catalog.close()
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(failed=[])
    for uid, segment, offset in rows:
        target = out / f"{uid}.dcm"  # a validated UID: digits and dots only
        tmp = out / f".{uid}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(PREAMBLE)
                for chunk in stream_payload(data_dir / "segments" / segment, offset):
                    f.write(chunk)
        except (OSError, ValueError) as e:  # CorruptRecord is a ValueError
            tmp.unlink(missing_ok=True)
            result.failed.append(f"{uid}: {e}")
            continue
        os.replace(tmp, target)
        result.written += 1
    return result
