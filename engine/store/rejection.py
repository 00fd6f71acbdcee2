"""IOCM rejection notes (PS3.3 A.35.4 Key Object Selection Document; IHE RAD TF IOCM):
a KOS whose Concept Name Code Sequence holds a code of CID 7011 hides the instances its
Current Requested Procedure Evidence Sequence lists, as `stowage delete` does (reason
`rejected:<code>`); the note itself is stored and served like any instance.

Order and crash safety. The note is appended to its segment (durably) first, then its
tombstones are appended (fsync'd), then the C-STORE is answered. A crash in between
leaves a stored note without tombstones; `recover_notes`, run when a worker's Archive
opens, applies again every KOS of that worker's slot received since its checkpoint
(`tombstones/notes-NNN.checked`). Applying is idempotent: it hides only records that no
tombstone hides yet and that were received before the note (a copy accepted again after
the rejection, with rejected_reaccept on, stays). An identical re-send of a note, answered
"already stored", applies it again as well.

References the archive does not hold are recorded as tombstones with no received_at
(they hide nothing): with rejected_reaccept off, such an instance is refused when it
arrives later, as a re-sent rejected instance is.

Store path: only a C-STORE whose SOP class is KOS is parsed here; the check for a
re-sent rejected instance (`Rejections.holds`) is one stat() and a set lookup.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import KeyObjectSelectionDocumentStorage as KOS

from stowage.catalog.durable import replace_durably
from stowage.catalog import tombstones
from stowage.catalog.reader import Catalog
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.runtime.logs import audit_line
from stowage.engine.store.segment import stream_payload

log = logging.getLogger("stowage.rejection")

# CID 7011 Rejected for Quality Reasons and its siblings (scheme DCM).
REJECTION_CODES = {"113001": "Rejected for Quality Reasons", "113037": "Rejected for Patient Safety Reasons",
                   "113038": "Incorrect Modality Worklist Entry", "113039": "Data Retention Policy Expired"}
_TAGS = [0x00080016, 0x00080018, 0x0020000D, 0x0040A043, 0x0040A375]
_MAX_NOTE_BYTES = 16 << 20


@dataclass
class RejectionNote:
    sop_instance_uid: str
    code: str
    references: list[tuple[str, str, str]] = field(default_factory=list)  # (study, series, SOP instance)

    @property
    def reason(self) -> str:
        return f"rejected:{self.code}"


@dataclass
class Applied:
    hidden: int = 0           # records hidden now
    referenced: int = 0       # distinct instances the note lists
    not_held: int = 0         # of them, held in no record


def parse(part10: bytes) -> RejectionNote | None:
    """The rejection note in a Part-10 file's bytes (preamble, meta, dataset), or None
    when it is not one (another KOS, or unreadable: logged)."""
    try:
        ds = pydicom.dcmread(BytesIO(part10), specific_tags=_TAGS)
        if str(ds.get("SOPClassUID", "")) != KOS:
            return None
        code = None
        for item in ds.get("ConceptNameCodeSequence", []) or []:
            value, scheme = str(item.get("CodeValue", "")).strip(), str(item.get("CodingSchemeDesignator", "")).strip()
            if value in REJECTION_CODES and scheme == "DCM":
                code = value
        if code is None:
            return None
        refs = []
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
            study_uid = str(study.get("StudyInstanceUID", ""))
            for series in study.get("ReferencedSeriesSequence", []) or []:
                series_uid = str(series.get("SeriesInstanceUID", ""))
                for sop in series.get("ReferencedSOPSequence", []) or []:
                    uid = str(sop.get("ReferencedSOPInstanceUID", ""))
                    if uid:
                        refs.append((study_uid, series_uid, uid))
        return RejectionNote(str(ds.SOPInstanceUID), code, refs)
    except Exception as e:  # a KOS we cannot read is stored, and is no rejection
        log.warning("a Key Object Selection document could not be read as a rejection note: %s", e)
        return None


def apply(data_dir: Path, catalog: Catalog, note: RejectionNote, note_received_at: int, actor: str,
          audit_nothing: bool = True, rejections: "Rejections | None" = None) -> Applied:
    """Hide the records the note rejects (received before it, not yet hidden), durably;
    record the references not held. Raises OSError when the tombstones cannot be written.
    `audit_nothing`: write the audit line even when nothing new was hidden; `rejections`:
    the caller's follower of the log (else one is made here when needed)."""
    uids = sorted({ref[2] for ref in note.references if ref[2] != note.sop_instance_uid})
    wanted = {ref[2]: (ref[0], ref[1]) for ref in note.references}
    _cols, rows = catalog.execute(
        "SELECT sop_instance_uid, epoch_us(received_at), study_instance_uid, series_instance_uid FROM records r "
        "WHERE sop_instance_uid IN (SELECT unnest(?)) AND NOT EXISTS (SELECT 1 FROM tombstones t "
        "WHERE t.sop_instance_uid = r.sop_instance_uid AND t.received_at = r.received_at)", [uids])
    _cols, held_rows = catalog.execute("SELECT DISTINCT sop_instance_uid FROM records "
                                       "WHERE sop_instance_uid IN (SELECT unnest(?))", [uids])
    held = {r[0] for r in held_rows}
    entries = []
    for uid, received_at, study, series in rows:
        ref_study, ref_series = wanted[uid]
        if received_at < note_received_at and (not ref_study or ref_study == study) \
                and (not ref_series or ref_series == series):
            entries.append(tombstones.Tombstone(uid, received_at, note.reason, study or "", actor=actor))
    if len(held) < len(uids) and rejections is None:
        rejections = Rejections(data_dir)
    for uid in uids:
        if uid not in held and rejections.code(uid) is None:
            entries.append(tombstones.Tombstone(uid, None, note.reason, wanted[uid][0], actor=actor))
    tombstones.append(data_dir, entries)
    result = Applied(hidden=sum(e.received_at is not None for e in entries), referenced=len(uids),
                     not_held=len(uids) - len(held))
    if not entries and not audit_nothing:
        return result
    audit_line(f"rejection note {note.sop_instance_uid} ({note.code} {REJECTION_CODES[note.code]}): "
               f"{result.hidden} record(s) hidden", {
                   "event": "reject", "note": note.sop_instance_uid, "code": note.code, "reason": note.reason,
                   "actor": actor, "referenced": result.referenced, "records": result.hidden,
                   "not_held": result.not_held})
    log.info("rejection note %s (%s): %d instance(s) referenced, %d record(s) hidden, %d not held",
             note.sop_instance_uid, note.code, result.referenced, result.hidden, result.not_held)
    return result


class Rejections:
    """For the store path: which SOP Instance UIDs a rejection note rejected, followed
    incrementally from the tombstone log (one stat() per question)."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = tombstones.directory(data_dir)
        self._log = os.fspath(self._dir / tombstones.LOG)  # a str: no Path work per question
        self._reader = tombstones.TombstoneReader(self._dir, keep=False)  # only the rejected UIDs are kept
        self._stamp: tuple | None = None
        self._generation = -1
        self._uids: dict[str, str] = {}  # uid -> code
        self._lock = threading.Lock()

    def code(self, uid: str) -> str | None:
        """The CID 7011 code that rejected `uid`, or None."""
        try:
            st = os.stat(self._log)
            stamp = st.st_ino, st.st_size, st.st_mtime_ns  # as tombstones.stamp_of
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            with self._lock:
                self._reader.read()
                fresh = self._reader.fresh  # everything, after a reset
                if self._reader.generation != self._generation:
                    self._uids = {}
                    self._generation = self._reader.generation
                for rejected, reason in zip(fresh["sop_instance_uid"].to_pylist(), fresh["reason"].to_pylist()):
                    if reason and reason.startswith("rejected:"):
                        self._uids[rejected] = reason[len("rejected:"):]
                self._stamp = stamp
        return self._uids.get(uid)


def _checkpoint_path(data_dir: Path, slot: int) -> Path:
    return tombstones.directory(data_dir) / f"notes-{slot:03d}.checked"


def recover_notes(data_dir: Path, catalog: Catalog, slot: int) -> int:
    """Apply again the rejection notes of slot `slot` received since its checkpoint (a
    crash may have come between storing one and writing its tombstones); returns how
    many notes were applied. The caller owns the slot (no store of it runs meanwhile)."""
    path = _checkpoint_path(data_dir, slot)
    try:
        since = int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        since = 0
    _cols, rows = catalog.execute(
        "SELECT segment, \"offset\", epoch_us(received_at), record_length FROM records r WHERE sop_class_uid = ? "
        "AND segment LIKE ? AND epoch_us(received_at) > ? AND NOT EXISTS (SELECT 1 FROM tombstones t "
        "WHERE t.sop_instance_uid = r.sop_instance_uid AND t.received_at = r.received_at) "
        "ORDER BY received_at", [KOS, f"{slot:03d}-%", since])
    applied, newest = 0, since
    rejections = Rejections(data_dir)
    for segment, offset, received_at, length in rows:
        newest = max(newest, received_at)
        if length and length > _MAX_NOTE_BYTES:
            continue
        try:
            data = PREAMBLE + b"".join(stream_payload(data_dir / "segments" / segment, offset))
        except (OSError, ValueError) as e:
            log.error("rejection note at %s@%d unreadable (%s); not applied", segment, offset, e)
            continue
        note = parse(data)
        if note is not None:
            apply(data_dir, catalog, note, received_at, actor=f"recovery note:{note.sop_instance_uid}",
                  audit_nothing=False, rejections=rejections)
            applied += 1
    if newest > since:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(path, str(newest))
    return applied
