"""Verification of a migrated study: which instances the source holds (SOP Instance UIDs
from SERIES- then IMAGE-level C-FIND, hierarchical as every Study Root SCP must accept),
against what the catalog holds; optionally re-reading every record from the segments.

When the source answers no IMAGE-level query, its Number of Study Related Instances is
the yardstick (the count, not the identities, is then checked); without that either, the
retrieve's own completed count is all there is, and the report says so (verified_by).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from stowage.catalog.reader import Catalog
from stowage.engine.store.commitment import Reference, judge
from stowage.engine.migrate.source import Session


@dataclass
class SourceListing:
    """The source's own account of a study: its instances, or why we have none."""

    uids: dict[str, str] | None  # SOP Instance UID -> SOP Class UID; None: not available
    problem: str = ""

    @property
    def sop_classes(self) -> list[str]:
        return sorted(set((self.uids or {}).values()) - {""})


def _level(session: Session, level: str, study_uid: str, series_uid: str | None = None) -> tuple[list[Dataset], str]:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or ""
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
        ds.SOPClassUID = ""
    answer = session.find(ds)
    if not answer.ok:
        what = "no final status" if answer.status is None else f"status 0x{answer.status:04X}"
        return [], f"{level}-level C-FIND: {what} {answer.comment}".strip()
    return answer.matches, ""


def list_instances(session: Session, study_uid: str) -> SourceListing:
    """Every SOP Instance UID of the study at the source, series by series."""
    series, problem = _level(session, "SERIES", study_uid)
    if problem:
        return SourceListing(None, problem)
    uids: dict[str, str] = {}
    for s in series:
        series_uid = str(s.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            continue
        images, problem = _level(session, "IMAGE", study_uid, series_uid)
        if problem:
            return SourceListing(None, problem)
        for m in images:
            uid = str(m.get("SOPInstanceUID", "") or "")
            if uid:
                uids[uid] = str(m.get("SOPClassUID", "") or "")
    return SourceListing(uids)


def study_count(session: Session, study_uid: str) -> int | None:
    """The source's Number of Study Related Instances for one study now (None if it
    gives none): taken again when the IMAGE-level listing comes out shorter than the count
    of the enumeration, which may be days old (instances deleted at the source since)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.NumberOfStudyRelatedInstances = ""
    answer = session.find(ds)
    counts = [m.get("NumberOfStudyRelatedInstances", None) for m in answer.matches
              if str(m.get("StudyInstanceUID", "") or "").strip() == study_uid]
    try:
        return int(counts[0]) if answer.ok and len(counts) == 1 and counts[0] not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass
class Held:
    """What the catalog holds of a study."""

    rows: dict[str, tuple] = field(default_factory=dict)  # uid -> (sop_class, bytes)

    @property
    def bytes(self) -> int:
        return sum(r[1] for r in self.rows.values())


def held(catalog: Catalog, study_uid: str) -> Held:
    _cols, rows = catalog.execute(
        "SELECT sop_instance_uid, sop_class_uid, dataset_length FROM instances WHERE study_instance_uid = ?",
        [study_uid])
    return Held({uid: (cls, int(length or 0)) for uid, cls, length in rows})


def check_content(catalog: Catalog, data_dir: Path, have: Held) -> list[tuple[str, str]]:
    """Re-read every record of the study from the segments (record CRC, then the dataset's
    CRC-32 and length); returns (uid, problem) for those that fail."""
    refs = [Reference(cls, uid) for uid, (cls, _n) in have.rows.items()]
    verdict = judge(catalog, data_dir / "segments", refs)
    return [(ref.sop_instance_uid, f"record fails verification (failure reason 0x{reason:04X})")
            for ref, reason in verdict.failed]
