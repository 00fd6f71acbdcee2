"""De-identification where the archive meets the world (issue #22): C-STORE from DCMTK's
storescu to a project's Called AE title and `stowage import --project` store only the
de-identified instance (same pseudonym, UIDs and date offset from two processes on two
paths); a burned-in instance is refused with a reason; `export --deidentify` and
`send --deidentify` hand out de-identified copies of what was stored as received."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from conftest import CT, HOST, MR, catalog_sealed, dcmtk, echo_ok, export_all, free_port, wait_for
from stowage.engine.deidentify.keys import Keyed

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True, timeout=180)


def _variant(src: Path, out: Path, **attrs) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def _by_uid(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in folder.glob("*.dcm"))}


def test_ingest_import_export_and_send_under_a_project(tmp_path, make_server):
    data = tmp_path / "data"
    config = tmp_path / "stowage.toml"
    config.write_text(f'data_dir = "{data}"\n[projects.TRIAL]\ncalled_ae = "TRIAL"\n'
                      'options = ["retain_longitudinal_modified_dates", "retain_patient_characteristics"]\n')
    server = make_server("--config", str(config), "--workers", "1", data_dir=data)
    original = pydicom.dcmread(CT)
    us = _variant(CT, tmp_path / "us.dcm", Modality="US", SOPInstanceUID=pydicom.uid.generate_uid())
    storescu = dcmtk("storescu")
    r = subprocess.run([storescu, "-aec", "TRIAL", HOST, str(server.port), str(CT)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([storescu, "-aec", "TRIAL", HOST, str(server.port), str(us)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0  # refused (0xC000, Error Comment "quarantined (TRIAL): ..."): nothing stored
    r = subprocess.run([storescu, "-aec", "STOWAGE", HOST, str(server.port), str(MR)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    # The same patient, a later study, through `stowage import` (another process, another path).
    (tmp_path / "in").mkdir()
    later = _variant(CT, tmp_path / "in" / "later.dcm", SOPInstanceUID=pydicom.uid.generate_uid(), StudyInstanceUID=pydicom.uid.generate_uid(),
                     StudyDate="20040301")
    r = _cli("import", "--config", str(config), "--project", "TRIAL", "-q", str(later.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: catalog_sealed(data), 60, "the catalog to seal")

    key = Keyed(bytes.fromhex((data / "projects" / "TRIAL" / "key").read_text()))
    plain = tmp_path / "plain"
    r = export_all(data, plain)
    assert r.returncode == 0, r.stderr
    stored = _by_uid(plain)
    us_uid = pydicom.dcmread(us).SOPInstanceUID
    assert len(stored) == 3 and original.SOPInstanceUID not in stored
    assert us_uid not in stored and key.uid(us_uid) not in stored
    ct = stored[key.uid(original.SOPInstanceUID)]
    imported = stored[key.uid(pydicom.dcmread(later).SOPInstanceUID)]
    assert ct.PatientIdentityRemoved == "YES" and ct.PatientID == imported.PatientID != original.PatientID
    assert ct.StudyInstanceUID == key.uid(original.StudyInstanceUID)
    assert ct.PatientSex == original.PatientSex  # Retain Patient Characteristics
    days = lambda d: dt.datetime.strptime(d, "%Y%m%d")  # noqa: E731
    assert (days(imported.StudyDate) - days(ct.StudyDate)).days == (days("20040301") - days(original.StudyDate)).days
    assert ct.StudyDate != original.StudyDate
    mr = pydicom.dcmread(MR)
    assert stored[mr.SOPInstanceUID].PatientID == mr.PatientID  # not a project's AE: stored as sent
    audit = [json.loads(x) for x in (data / "projects" / "TRIAL" / "audit.jsonl").read_text().splitlines()]
    assert {a["event"] for a in audit} == {"deidentified", "quarantined"}
    assert any("modality US" in a.get("reason", "") for a in audit)
    assert "quarantined (TRIAL)" in server.log()
    assert any(a.get("original_sop_instance_uid") == original.SOPInstanceUID for a in audit)

    # Storage commitment answers for the UID the sender sent (held under its keyed UID).
    from stowage.engine.transfer.commit_scu import request_commitment
    from stowage.engine.transfer.requestor import Peer
    from stowage.engine.transfer.results import Instance
    sent = Instance(original.SOPInstanceUID, original.SOPClassUID, str(original.file_meta.TransferSyntaxUID), "", 0)
    report = request_commitment(Peer("TRIAL", HOST, server.port), "CTSCANNER", [sent], timeout=60)
    assert report.committed == [original.SOPInstanceUID] and not report.failed

    # Re-identification by an operator: one patient, two studies.
    r = _cli("pseudonyms", "--config", str(config), "--project", "TRIAL")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.returncode == 0 and rows == [{"pseudonym": ct.PatientID, "patient_id": original.PatientID,
                                           "patient_name": str(original.PatientName),
                                           "date_offset_days": rows[0]["date_offset_days"]}]
    r = _cli("pseudonyms", "--config", str(config), "--project", "TRIAL", "--studies")
    assert original.StudyInstanceUID in r.stdout and len(r.stdout.splitlines()) == 3

    # On the way out: the MR, stored as received, handed out de-identified; the archive unchanged.
    out = tmp_path / "deid"
    r = _cli("export", "--config", str(config), "--patient", str(mr.PatientID), "--deidentify", "TRIAL",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    (name,) = [p.name for p in out.glob("*.dcm")]
    assert name == f"{key.uid(mr.SOPInstanceUID)}.dcm"
    assert pydicom.dcmread(out / name).PatientID != mr.PatientID
    r = _cli("export", "--config", str(config), "--all", "--deidentify", "NOPE", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no [projects.NOPE]" in r.stderr and "Traceback" not in r.stderr

    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-od", str(received), str(port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: echo_ok(port, aet="ANY-SCP", timeout=1.0), 20, "storescp to listen")
        r = _cli("send", "--config", str(config), "--to", f"{HOST}:{port}", "--patient", str(mr.PatientID),
                 "--deidentify", "TRIAL")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    (got,) = [pydicom.dcmread(p) for p in received.iterdir()]
    assert got.SOPInstanceUID == key.uid(mr.SOPInstanceUID) and got.PatientIdentityRemoved == "YES"
    assert not list((data / "spool").glob("deidentified-*"))
