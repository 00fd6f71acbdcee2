"""Deleting stored instances: tombstones for every record of a selection.

    result = delete(config, "study", [uid])                  # hides them now, durably
    result = delete(config, "study", [uid], dry_run=True)    # what it would hide

A deletion writes tombstones (catalog.tombstones), fsync'd before `delete` returns; the
catalog views leave the records out at once in every process (C-FIND, C-MOVE, C-GET,
export, send, storage commitment). The bytes stay in their segments until compaction
drops dead records. What is hidden: every record the catalog holds (duplicates and
superseded versions included) whose patient / study / series / SOP instance UID is one
of `values`, and that no tombstone hides yet. A copy of an instance received after the
deletion is a new record (new received_at) and is visible again.

The rejection of instances by a rejection note (engine.store.rejection) and the quota call
the same function with their own reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from stowage.catalog import tombstones
from stowage.engine.store.series_cache import SeriesCache
from stowage.catalog.reader import Catalog
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import audit_line

log = logging.getLogger("stowage.delete")

LEVELS = {"patient": "patient_id", "study": "study_instance_uid", "series": "series_instance_uid",
          "instance": "sop_instance_uid"}
_MAX_AUDIT_VALUES = 100


class DeleteError(ValueError):
    """A deletion that cannot be done as asked; the message says why."""


@dataclass
class DeleteResult:
    level: str
    values: list[str]
    reason: str
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0          # distinct SOP Instance UIDs
    records: int = 0            # stored records hidden (an instance stored twice has two)
    done: bool = False          # False: a dry run, nothing hidden
    study_uids: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # values no stored record has (a typo?)
    already: list[str] = field(default_factory=list)  # values whose every record is hidden already

    def summary(self) -> str:
        return (f"{self.patients} patient(s), {self.studies} study(ies), {self.series} series, "
                f"{self.instances} instance(s) ({self.records} stored record(s))")


def live_records(catalog: Catalog, column: str, values: Sequence[str]) -> list[tuple]:
    """(sop_instance_uid, received_at µs, study, series, patient_id) of every record whose
    `column` is one of `values` and that no tombstone hides (values are bound)."""
    _cols, rows = catalog.execute(
        "SELECT sop_instance_uid, epoch_us(received_at), study_instance_uid, series_instance_uid, patient_id "
        f"FROM records r WHERE {column} IN (SELECT unnest(?)) AND NOT EXISTS (SELECT 1 FROM tombstones t "
        "WHERE t.sop_instance_uid = r.sop_instance_uid AND t.received_at = r.received_at)", [list(values)])
    return rows


def _unmatched(catalog: Catalog, column: str, values: Sequence[str], rows: list[tuple]) -> tuple[list[str], list[str]]:
    """The values that no live record has: (unknown to the archive, deleted already). A
    mistyped UID in a list of right ones must be noticed, not silently left undeleted."""
    index = {"patient_id": 4, "study_instance_uid": 2, "series_instance_uid": 3, "sop_instance_uid": 0}[column]
    live = {r[index] for r in rows}
    missing = [v for v in values if v not in live]
    if not missing:
        return [], []
    _cols, held = catalog.execute(f"SELECT DISTINCT {column} FROM records WHERE {column} IN (SELECT unnest(?))",
                                  [missing])
    hidden = {h for (h,) in held}
    return [v for v in missing if v not in hidden], [v for v in missing if v in hidden]


def _check(level: str, values: Sequence[str]) -> list[str]:
    from stowage.engine.store.archive import valid_uid
    if level not in LEVELS:
        raise DeleteError(f"unknown level {level!r}: choose one of {', '.join(LEVELS)}")
    values = list(dict.fromkeys(v.strip() for v in values if v and v.strip()))  # each once
    if not values:
        raise DeleteError(f"give at least one {level} to delete")
    for v in values:
        if level == "patient" and len(v) > 64:
            raise DeleteError(f"patient ID {v[:20]!r}… is longer than 64 characters")
        if level != "patient" and not valid_uid(v):
            raise DeleteError(f"{v[:70]!r} is not a valid UID (digits and dots, at most 64)")
    return values


def delete(config: Config, level: str, values: Sequence[str], reason: str = "deleted", actor: str = "cli",
           dry_run: bool = False, catalog: Catalog | None = None, comment: str = "") -> DeleteResult:
    """Hide every stored record of the selection (see the module docstring); durable when
    it returns. `reason`: deleted, quota (rejected:<code> is the rejection notes'); `comment`:
    why, in the administrator's words. `catalog`: an open view to use, else one is opened here."""
    values = _check(level, values)
    own = catalog is None
    catalog = catalog or Catalog(config.data_dir / "catalog", config.duplicates, cluster=config.cluster_view)
    try:
        rows = live_records(catalog, LEVELS[level], values)
        unknown, already = _unmatched(catalog, LEVELS[level], values, rows)
    finally:
        if own:
            catalog.close()
    result = DeleteResult(level, values, reason, patients=len({r[4] for r in rows}),
                          studies=len({r[2] for r in rows}), series=len({r[3] for r in rows}),
                          instances=len({r[0] for r in rows}), records=len(rows),
                          study_uids=sorted({r[2] for r in rows if r[2]}), unknown=unknown, already=already)
    if dry_run or not rows:
        return result
    tombstones.append(config.data_dir, [
        tombstones.Tombstone(uid, at, reason, study or "", actor=actor, comment=comment)
        for uid, at, study, _series, _patient in rows])
    result.done = True
    # the series metadata kept on disk (WADO-RS) of what was deleted goes too: a deleted
    # patient's data must not stay behind in a cache (an instance's series: made anew when asked)
    SeriesCache(config.data_dir).forget({r[3] for r in rows if r[3]})
    audit_line(f"delete {level} {values[0]}{' …' if len(values) > 1 else ''}: {result.summary()}", {
        "event": "delete", "scope": level, "values": values[:_MAX_AUDIT_VALUES], "reason": reason, "actor": actor,
        **({"comment": comment} if comment else {}),
        "patients": result.patients, "studies": result.studies, "series": result.series,
        "instances": result.instances, "records": result.records})
    log.info("deleted %s (%s %s, reason %s, by %s)", result.summary(), level, ",".join(values[:3]), reason, actor)
    return result
