"""De-identification on the way out (issue #22): `stowage export --deidentify NAME` and
`stowage send --deidentify NAME` read stored instances, de-identify a copy under the
project's profile and key, and hand out only the copy; the archive stays as it is.

The files are named by their new SOP Instance UID (never the original's, nor the
patient's name), flat in the out folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from stowage.catalog.reader import Catalog
from stowage.engine.deidentify.folder import write_part10
from stowage.engine.deidentify.project import Project, Quarantined
from stowage.engine.store.integrity import marks_of
from stowage.engine.store.segment import read_payload
from stowage.engine.transfer.selection import select
from stowage.engine.transfer.results import Instance
from stowage.protocol.status import STORE_WARNINGS, SUCCESS


@dataclass
class DeidentifiedResult:
    written: list[Path] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)   # "original UID: reason" (stays on this machine)
    failed: list[str] = field(default_factory=list)


def selected(data_dir: Path, duplicates: str, level: str | None, values: list[str]) -> list[Instance]:
    catalog = Catalog(data_dir / "catalog", duplicates)
    try:
        return select(catalog, level, values)
    finally:
        catalog.close()


def made_by(project: Project, data_dir: Path, duplicates: str, instances: list[Instance]) -> frozenset[str]:
    """The instances `project` made itself on the way in (received through its AE title):
    handed out as stored, not de-identified a second time (their UIDs hashed twice, their
    dates shifted twice: one patient under two pseudonyms beside the plain copies' one)."""
    config = project.config
    if not config.called_ae or not instances:
        return frozenset()
    catalog = Catalog(data_dir / "catalog", duplicates)
    try:
        _cols, rows = catalog.execute("SELECT sop_instance_uid, called_ae, calling_ae FROM instances "
                                      "WHERE sop_instance_uid IN (SELECT unnest(?))",
                                      [[i.sop_instance_uid for i in instances]])
    finally:
        catalog.close()
    return frozenset(uid for uid, called, calling in rows if config.applies_to(called or "", calling or ""))


def write_deidentified(project: Project, data_dir: Path, instances: list[Instance], out: Path,
                       progress: Callable[[], None] | None = None,
                       as_stored: frozenset[str] = frozenset()) -> DeidentifiedResult:
    """A de-identified Part-10 file in `out` for each instance (those of `as_stored`, which
    the project made, as they are)."""
    out.mkdir(parents=True, exist_ok=True)
    marks, result = marks_of(data_dir), DeidentifiedResult()
    for inst in instances:
        uid = inst.sop_instance_uid
        mark = marks.get(inst.segment, inst.offset)
        try:
            if mark is not None:  # found corrupt by verify or the scrub: never handed out
                raise ValueError(f"stored record marked corrupt by {mark.by}: {mark.problem}")
            ds = dcmread(DicomBytesIO(bytes(read_payload(data_dir / "segments" / inst.segment, inst.offset, uid))),
                         force=True)
            if uid in as_stored:
                target = out / f"{uid}.dcm"
            else:
                outcome = project.deidentify_dataset(ds)
                target = out / f"{outcome.sop_instance_uid[1]}.dcm"
            write_part10(ds, target)
            result.written.append(target)
        except Quarantined as e:
            result.quarantined.append(f"{uid}: {e}")
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            result.failed.append(f"{uid}: {type(e).__name__}: {e}")
        if progress is not None:
            progress()
    return result


def send_files(peer, calling_aet: str, files: list[Path]) -> tuple[int, list[str]]:
    """C-STORE the de-identified files to `peer` on one association (pynetdicom), each in
    the transfer syntax it has; (number stored, "file: reason" for the others)."""
    from pynetdicom import AE

    if not files:
        return 0, []
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    for cls, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(cls, [ts])
    tls = (peer.tls, peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    if not assoc.is_established:
        return 0, [f"{f.name}: association with {peer} not established" for f in files]
    sent, failures = 0, []
    try:
        for path, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is not None and (code == SUCCESS or code in STORE_WARNINGS):
                sent += 1
            else:
                failures.append(f"{path.name}: status {'none' if code is None else f'0x{code:04X}'}")
    finally:
        assoc.release()
    return sent, failures
