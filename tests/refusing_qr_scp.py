"""A small legacy archive for tests, run as its own process: a pynetdicom Study Root
Query/Retrieve SCP (C-FIND at STUDY, SERIES and IMAGE level; C-MOVE and C-GET) over the
DICOM files of a folder, which answers the C-MOVE or C-GET of chosen studies with 0xA702
(Refused: Out of Resources - Unable to perform sub-operations, with a Failed SOP Instance
UID List), as an overloaded archive does, and holds the retrieve of others without a word
(a hung archive): `stall:UID`; `abort:UID` sends the first instance of the study, then
aborts the association. `cap:N` answers at most N matches to a C-FIND, with success, as
archives with a silent cap do.

    python refusing_qr_scp.py PORT AET FOLDER DEST_AET:HOST:PORT [REFUSED_STUDY_UID | stall:UID | abort:UID | cap:N ...]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)


def load(folder: Path) -> list[tuple[Path, Dataset]]:
    return [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.rglob("*.dcm"))]


def in_range(value: str, wanted: str) -> bool:
    """Whether a DA or TM value matches a C-FIND key: single value or range, either end open."""
    if not wanted:
        return True
    if "-" not in wanted:
        return value == wanted
    lo, hi = wanted.split("-", 1)
    return bool(value) and (not lo or value >= lo) and (not hi or value <= hi)


def find_response(level: str, ds: Dataset, study_instances: int) -> Dataset:
    """The C-FIND match of `ds` at `level` (STUDY, SERIES or IMAGE), with the keys a
    migration reads; `study_instances`: its Number of Study Related Instances."""
    rsp = Dataset()
    rsp.QueryRetrieveLevel = level
    rsp.StudyInstanceUID = ds.StudyInstanceUID
    if level == "STUDY":
        rsp.PatientID, rsp.PatientName = ds.PatientID, ds.PatientName
        rsp.StudyDate, rsp.StudyTime = ds.get("StudyDate", ""), ds.get("StudyTime", "")
        rsp.ModalitiesInStudy = ds.Modality
        rsp.NumberOfStudyRelatedInstances = study_instances
    if level in ("SERIES", "IMAGE"):
        rsp.SeriesInstanceUID = ds.SeriesInstanceUID
    if level == "IMAGE":
        rsp.SOPInstanceUID, rsp.SOPClassUID = ds.SOPInstanceUID, ds.SOPClassUID
    return rsp


def main() -> None:
    port, aet, folder, dest = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    refused = {a for a in sys.argv[5:] if ":" not in a}
    cap = max([int(a[len("cap:"):]) for a in sys.argv[5:] if a.startswith("cap:")] or [0])
    stalled = {a[len("stall:"):] for a in sys.argv[5:] if a.startswith("stall:")}
    aborted = {a[len("abort:"):] for a in sys.argv[5:] if a.startswith("abort:")}
    dest_aet, dest_host, dest_port = dest.split(":")
    items = load(folder)

    def on_find(event):
        q = event.identifier
        level = q.QueryRetrieveLevel
        study = str(q.get("StudyInstanceUID", "") or "")
        series = str(q.get("SeriesInstanceUID", "") or "")
        seen = set()
        for _path, ds in items:
            if study and ds.StudyInstanceUID != study or series and ds.SeriesInstanceUID != series:
                continue
            if not in_range(str(ds.get("StudyDate", "")), str(q.get("StudyDate", "") or "")):
                continue
            if not in_range(str(ds.get("StudyTime", "")), str(q.get("StudyTime", "") or "")):
                continue
            modality = str(q.get("ModalitiesInStudy", "") or "")
            if modality and modality != ds.Modality:
                continue
            name = str(q.get("PatientName", "") or "").rstrip("*")
            if name and not str(ds.PatientName).startswith(name):
                continue
            key = {"STUDY": ds.StudyInstanceUID, "SERIES": ds.SeriesInstanceUID}.get(level, ds.SOPInstanceUID)
            if key in seen:
                continue
            seen.add(key)
            if cap and len(seen) > cap:
                return
            yield 0xFF00, find_response(level, ds, sum(d.StudyInstanceUID == ds.StudyInstanceUID for _p, d in items))

    def sub_operations(event):
        study = str(event.identifier.get("StudyInstanceUID", ""))
        paths = [p for p, ds in items if ds.StudyInstanceUID == study]
        yield len(paths)
        if study in refused:
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = [str(ds.SOPInstanceUID) for _p, ds in items
                                               if ds.StudyInstanceUID == study]
            yield 0xA702, failed
            return
        if study in stalled:
            time.sleep(60)
        if study in aborted:
            yield 0xFF00, pydicom.dcmread(paths[0])
            event.assoc.abort()
            return
        for p in paths:
            yield 0xFF00, pydicom.dcmread(p)

    def on_move(event):
        if event.move_destination.strip() != dest_aet:
            yield None, None
            return
        yield dest_host, int(dest_port)
        yield from sub_operations(event)

    ae = AE(aet)
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts:  # C-GET: the requestor takes the SCP role for these
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=False)
    ae.requested_contexts = StoragePresentationContexts
    print(f"listening on {port}", flush=True)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move),
                                                       (evt.EVT_C_GET, sub_operations)])


if __name__ == "__main__":
    main()
