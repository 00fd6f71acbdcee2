"""IOCM rejection notes against a running archive: a Key Object Selection document with a
CID 7011 title, built with pydicom and sent by DCMTK storescu, hides the instances it
lists (findscu, movescu-free: export and commitment see it too) while the note stays
findable and retrievable; a rejected instance sent again is refused with 0xA771, or
stored again with rejected_reaccept; a note stored without its tombstones (the state a
kill -9 between the two leaves) is applied when the worker starts again, or when the
note is sent again; the rejection survives `stowage rebuild-catalog`."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from conftest import HOST, Server, cli, export_all
from test_delete import audit, delete, find, instances, storescu, uid_of, visible
from test_send import stowage

pytestmark = pytest.mark.timeout(600)
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def rejection_note(out: Path, rejected: list[Path], value: str = "113001",
                   meaning: str = "Rejected for Quality Reasons") -> Path:
    """A KOS (PS3.3 A.35.4) titled `value` that lists `rejected` (of one study) in its
    Current Requested Procedure Evidence Sequence and its content tree."""
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in rejected]
    first = heads[0]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.PatientID, ds.PatientName = first.PatientID, first.PatientName
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = first.StudyInstanceUID, "20260101", "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = generate_uid(), "KO", 99
    ds.InstanceNumber = 1
    ds.ContentDate = datetime.date.today().strftime("%Y%m%d")
    ds.ContentTime = "120000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [code(value, meaning)]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = []
    study = Dataset()
    study.StudyInstanceUID = first.StudyInstanceUID
    study.ReferencedSeriesSequence = []
    by_series: dict[str, list] = {}
    for h in heads:
        by_series.setdefault(str(h.SeriesInstanceUID), []).append(h)
    for series_uid, members in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = []
        for h in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
            series.ReferencedSOPSequence.append(ref)
        study.ReferencedSeriesSequence.append(series)
    ds.CurrentRequestedProcedureEvidenceSequence.append(study)
    ds.ContentSequence = []
    for h in heads:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        item.ReferencedSOPSequence = [ref]
        ds.ContentSequence.append(item)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = KOS, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"note-{ds.SOPInstanceUID[-10:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def store_one(port: int, path: Path):
    """C-STORE one file with pynetdicom; returns the response status dataset."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE("MODALITY")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


@pytest.fixture
def study(tmp_path):
    uid = generate_uid()
    files = instances(tmp_path / "in", "REJ1", uid, generate_uid(), 4) + \
        instances(tmp_path / "in", "REJ1", uid, generate_uid(), 2)
    return uid, files


def test_a_rejection_note_hides_its_instances_and_stays_findable(make_server, tmp_path, study):
    uid, files = study
    server = make_server("--workers", "2")
    storescu(server.port, files)
    note = rejection_note(tmp_path / "notes", files[:3] + files[4:5])
    storescu(server.port, [note])                          # DCMTK storescu sends the note
    note_uid, live = uid_of(note), {uid_of(p) for p in files[3:4] + files[5:]}
    q = tmp_path / "q"
    images = find(server.port, q, "IMAGE", f"StudyInstanceUID={uid}", "SOPInstanceUID=", "SOPClassUID=")
    assert {x.SOPInstanceUID for x in images} == live | {note_uid}
    (s,) = find(server.port, q, "STUDY", f"StudyInstanceUID={uid}", "NumberOfStudyRelatedInstances=",
                "ModalitiesInStudy=")
    assert int(s.NumberOfStudyRelatedInstances) == 3 and "KO" in s.ModalitiesInStudy
    r = export_all(server.data_dir, tmp_path / "export")
    assert r.returncode == 0, r.stderr
    assert {p.stem for p in (tmp_path / "export").glob("*.dcm")} == live | {note_uid}
    (line,) = audit(server.data_dir, "reject")
    assert line["note"] == note_uid and line["code"] == "113001" and line["records"] == 4
    r = cli("query", "--data-dir", str(server.data_dir), "--format", "json", "SELECT DISTINCT reason FROM deleted")
    assert json.loads(r.stdout) == [{"reason": "rejected:113001"}]

    # a rejected instance sent again is refused, saying why; the others are untouched
    for rejected in (files[0], files[4]):
        status = store_one(server.port, rejected)
        assert status.Status == 0xA771
        assert "rejection note" in status.ErrorComment and "113001" in status.ErrorComment
    assert visible(server.data_dir)[uid] == 3
    # the note sent again changes nothing
    assert store_one(server.port, note).Status == 0
    assert visible(server.data_dir)[uid] == 3


def test_other_key_object_selections_hide_nothing(make_server, tmp_path, study):
    uid, files = study
    server = make_server("--workers", "1")
    storescu(server.port, files)
    of_interest = rejection_note(tmp_path / "n1", files[:2], "113000", "Of Interest")
    wrong_scheme = rejection_note(tmp_path / "n2", files[:2], "113001", "Rejected for Quality Reasons")
    ds = pydicom.dcmread(wrong_scheme)
    ds.ConceptNameCodeSequence[0].CodingSchemeDesignator = "99LOCAL"
    ds.save_as(wrong_scheme, enforce_file_format=True)
    storescu(server.port, [of_interest, wrong_scheme])
    assert visible(server.data_dir)[uid] == len(files) + 2
    assert not audit(server.data_dir, "reject")


@pytest.mark.parametrize("code_value, meaning", [("113037", "Rejected for Patient Safety Reasons"),
                                                 ("113038", "Incorrect Modality Worklist Entry"),
                                                 ("113039", "Data Retention Policy Expired")])
def test_every_cid_7011_code_rejects_and_reaccept_stores_again(make_server, tmp_path, study, code_value, meaning):
    uid, files = study
    server = make_server("--workers", "1", STOWAGE_REJECTED_REACCEPT="true")
    storescu(server.port, files)
    storescu(server.port, [rejection_note(tmp_path / "notes", files[:2], code_value, meaning)])
    assert visible(server.data_dir)[uid] == len(files) - 2 + 1
    assert store_one(server.port, files[0]).Status == 0          # rejected_reaccept: stored again
    assert visible(server.data_dir)[uid] == len(files) - 1 + 1
    q = tmp_path / "q"
    found = {x.SOPInstanceUID for x in find(server.port, q, "IMAGE", f"StudyInstanceUID={uid}", "SOPInstanceUID=")}
    assert uid_of(files[0]) in found and uid_of(files[1]) not in found


def test_a_note_before_its_instances_refuses_them_when_they_come(make_server, tmp_path, study):
    uid, files = study
    server = make_server("--workers", "2")
    storescu(server.port, [rejection_note(tmp_path / "notes", files[:2])])
    assert store_one(server.port, files[0]).Status == 0xA771
    storescu(server.port, files[2:])
    assert visible(server.data_dir)[uid] == len(files) - 2 + 1


def _stored_with_tombstones_blocked(make_server, files: list[Path], workers: str) -> tuple[Server, Path]:
    """A server holding `files` whose next tombstone write fails (a directory where the lock
    file goes): a note is then stored and its tombstones are not, the state a kill -9
    between them leaves. Returns the server and that directory (removing it unblocks)."""
    server = make_server("--workers", workers)
    storescu(server.port, files)
    lock = server.data_dir / "tombstones" / "tombstones.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists():
        lock.unlink()
    lock.mkdir()
    return server, lock


def test_a_note_stored_without_its_tombstones_is_applied_on_restart(make_server, tmp_path, study):
    uid, files = study
    server, lock = _stored_with_tombstones_blocked(make_server, files, "2")
    note = rejection_note(tmp_path / "notes", files[:2])
    status = store_one(server.port, note)
    assert status.Status == 0xA700 and "send it again" in status.ErrorComment
    assert visible(server.data_dir)[uid] == len(files) + 1      # the note is stored, nothing hidden yet
    server.kill()                                                # kill -9 before anyone sends it again
    lock.rmdir()
    server.start()
    assert visible(server.data_dir)[uid] == len(files) - 2 + 1
    assert store_one(server.port, files[0]).Status == 0xA771
    # a restart after that applies nothing twice
    server.kill()
    server.start()
    assert len(audit(server.data_dir, "reject")) == 1
    # and a catalog rebuild keeps the rejection
    assert server.stop() == 0
    r = stowage("rebuild-catalog", "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stderr
    server.start()
    assert visible(server.data_dir)[uid] == len(files) - 2 + 1
    q = tmp_path / "q"
    found = {x.SOPInstanceUID for x in find(server.port, q, "IMAGE", f"StudyInstanceUID={uid}", "SOPInstanceUID=")}
    assert found == {uid_of(p) for p in files[2:]} | {uid_of(note)}


def test_a_note_sent_again_after_a_failed_rejection_is_applied(make_server, tmp_path, study):
    uid, files = study
    server, lock = _stored_with_tombstones_blocked(make_server, files, "1")
    note = rejection_note(tmp_path / "notes", files[:3])
    assert store_one(server.port, note).Status == 0xA700
    lock.rmdir()
    assert store_one(server.port, note).Status == 0              # identical: "already stored", and applied
    assert visible(server.data_dir)[uid] == len(files) - 3 + 1


def test_deleting_the_instances_of_a_rejected_study_and_resending_the_note(make_server, tmp_path, study):
    """Delete and rejection together: `stowage delete` of the note's study hides the note
    too; the rejection stays (a re-sent rejected instance is still refused)."""
    uid, files = study
    server = make_server("--workers", "1")
    storescu(server.port, files)
    storescu(server.port, [rejection_note(tmp_path / "notes", files[:1])])
    assert delete(server.data_dir, "--study", uid).returncode == 0
    assert visible(server.data_dir).get(uid) is None
    assert store_one(server.port, files[0]).Status == 0xA771
    assert store_one(server.port, files[1]).Status == 0          # deleted, not rejected: stored again
    assert visible(server.data_dir)[uid] == 1


def test_kill_9_while_a_note_is_stored_never_leaves_it_unapplied(make_server, tmp_path):
    """The server killed at random moments while DCMTK storescu sends a rejection note:
    after the restart, either the note is not held and nothing is hidden, or it is held
    and what it rejects is hidden; never a held note with its instances still served, and
    never a note storescu saw acknowledged that is not held. A last round kills only once
    the note is acknowledged: it must be held and applied."""
    import random
    import subprocess
    from conftest import dcmtk
    rng = random.Random(7011)
    server = make_server("--workers", "2")
    outcomes = []  # (acknowledged to storescu, held after the restart), per round
    rounds = 7
    for round_ in range(rounds):
        after_ack = round_ == rounds - 1
        study = generate_uid()
        files = instances(tmp_path / f"in{round_}", f"REJK{round_}", study, generate_uid(), 4)
        storescu(server.port, files)
        note = rejection_note(tmp_path / f"notes{round_}", files[:2])
        sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", "STOWAGE", HOST, str(server.port), str(note)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if after_ack:
            said = sender.communicate(timeout=60)[0]
            assert sender.returncode == 0, said
        else:
            # Not a wait for anything: the kill lands at a random moment of the note's store,
            # which is what this test is about.
            time.sleep(rng.uniform(0.0, 0.4))
        server.kill()
        if not after_ack:
            said = sender.communicate(timeout=30)[0]
        acknowledged = "Received Store Response (Success)" in said
        server.start()
        v = visible(server.data_dir).get(study, 0)
        note_held = cli("query", "--data-dir", str(server.data_dir), "--format", "json",
                        f"SELECT count(*) AS n FROM instances WHERE sop_instance_uid = '{uid_of(note)}'")
        held = json.loads(note_held.stdout)[0]["n"] == 1
        assert v == (2 + 1 if held else 4), f"round {round_}: note held {held}, {v} instances served"
        assert held or not acknowledged, f"round {round_}: the note was acknowledged, and lost by the kill:\n{said}"
        outcomes.append((acknowledged, held))
    # the round killed after the acknowledgement: the note is held, and applied (checked above)
    assert outcomes[-1] == (True, True), outcomes
