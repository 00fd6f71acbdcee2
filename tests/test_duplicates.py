"""The same SOP Instance UID sent again: stored once when identical; otherwise the
`duplicates` policy decides, and the event is in the audit log."""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from conftest import CT, HOST, copies, dataset_bytes, export_all
from stowage.engine.store.segment import iter_records


@pytest.fixture(autouse=True)
def chunked(monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send(port: int, path: Path) -> pydicom.Dataset:
    """One association, one C-STORE of the file's bytes as they are."""
    ae = AE("DUPSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return status


def variant(src: Path, out: Path) -> Path:
    """Same SOP Instance UID, different content."""
    ds = pydicom.dcmread(src)
    ds.StudyDescription = "changed"
    ds.save_as(out, enforce_file_format=True)
    return out


def record_count(data_dir: Path) -> int:
    return sum(1 for seg in (data_dir / "segments").glob("*.seg") for _ in iter_records(seg))


def audit_lines(data_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (data_dir / "audit.jsonl").read_text().splitlines()]


def exported(server, tmp_path: Path, uid: str) -> bytes:
    out = tmp_path / "out"
    r = export_all(server.data_dir, out)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.glob("*.dcm")] == [f"{uid}.dcm"]
    return dataset_bytes(out / f"{uid}.dcm")


def test_identical_resend_is_stored_once(make_server, tmp_path):
    server = make_server("--workers", "1")
    (f,) = copies(CT, tmp_path / "in", 1, "a")
    assert send(server.port, f).Status == 0
    assert send(server.port, f).Status == 0
    assert record_count(server.data_dir) == 1
    uid = pydicom.dcmread(f).SOPInstanceUID
    assert exported(server, tmp_path, uid) == dataset_bytes(f)
    assert any("identical" in l["msg"] and uid in l["msg"] for l in audit_lines(server.data_dir))


def test_identical_resend_after_restart_is_stored_once(make_server, tmp_path):
    server = make_server("--workers", "2")
    (f,) = copies(CT, tmp_path / "in", 1, "a")
    assert send(server.port, f).Status == 0
    assert server.stop() == 0
    again = make_server("--workers", "2", data_dir=server.data_dir, port=server.port)
    assert send(again.port, f).Status == 0
    assert record_count(server.data_dir) == 1


@pytest.mark.parametrize("policy,status,kept", [("keep-newest", 0x0000, "new"),
                                                 ("keep-first", 0x0000, "old"),
                                                 ("reject", 0x0111, "old")])
def test_different_content_follows_policy(make_server, tmp_path, policy, status, kept):
    server = make_server("--workers", "1", "--duplicates", policy)
    (old,) = copies(CT, tmp_path / "in", 1, "a")
    new = variant(old, tmp_path / "new.dcm")
    assert send(server.port, old).Status == 0
    rsp = send(server.port, new)
    assert rsp.Status == status
    if status:
        assert "reject" in rsp.ErrorComment
    uid = pydicom.dcmread(old).SOPInstanceUID
    assert exported(server, tmp_path, uid) == dataset_bytes(new if kept == "new" else old)
    assert any("different content" in l["msg"] and policy in l["msg"] for l in audit_lines(server.data_dir))


def test_a_study_sent_again_is_stored_once_and_a_new_version_is_still_one(make_server, tmp_path):
    """A resumed migration: a whole study again after a restart (its duplicate checks
    are answered a study at a time); a changed instance among it is a new version under
    keep-newest, and sending that version again is then the identical case."""
    server = make_server("--workers", "1")
    files = copies(CT, tmp_path / "in", 12, "s")
    for f in files:
        assert send(server.port, f).Status == 0
    assert server.stop() == 0
    again = make_server("--workers", "1", data_dir=server.data_dir, port=server.port)
    for f in files:
        assert send(again.port, f).Status == 0
    assert record_count(server.data_dir) == 12
    changed = variant(files[5], tmp_path / "changed.dcm")
    assert send(again.port, changed).Status == 0
    assert send(again.port, changed).Status == 0
    assert send(again.port, files[6]).Status == 0
    assert record_count(server.data_dir) == 13
    identical = [l for l in audit_lines(server.data_dir) if l.get("event") == "duplicate" and l.get("identical")]
    assert len(identical) == 14
    uid = pydicom.dcmread(changed, stop_before_pixels=True).SOPInstanceUID
    out = tmp_path / "out"
    assert export_all(server.data_dir, out, "--instance", uid).returncode == 0
    assert dataset_bytes(out / f"{uid}.dcm") == dataset_bytes(changed)
