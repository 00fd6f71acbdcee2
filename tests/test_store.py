"""Verification and Storage SCP against real peers: DCMTK echoscu/storescu and pynetdicom.
What goes in comes out of `stowage export` with identical dataset bytes."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from stowage.workers.contexts import storage_sop_classes, transfer_syntaxes
from conftest import CT, HOST, MR, copies, dataset_bytes, dcmtk, export_all, received_by_dcmtk



def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def assert_exported_identical(data_dir: Path, out: Path, sent: list[Path]) -> None:
    """Export holds exactly the sent instances, each with the dataset bytes that DCMTK
    storescu puts on the wire for that file."""
    r = export_all(data_dir, out)
    assert r.returncode == 0, r.stderr
    wire = received_by_dcmtk(sent, out.parent / f"{out.name}-dcmtk")
    assert len(wire) == len(sent)
    for p in sent:
        uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        got = out / f"{uid}.dcm"
        assert got.exists(), f"{p.name} ({uid}) was acknowledged but is not exported"
        assert dataset_bytes(got) == wire[uid], f"{p.name}: exported dataset bytes differ from those sent"
    assert len(list(out.glob("*.dcm"))) == len(sent)


def test_echoscu(server):
    r = run(dcmtk("echoscu"), "-v", HOST, str(server.port), "-aec", "STOWAGE")
    assert r.returncode == 0, r.stderr
    assert "Received Echo Response (Success)" in r.stderr + r.stdout


def test_storescu_one_association(server, tmp_path):
    files = copies(CT, tmp_path / "in", 20, "ct")
    r = run(dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), *map(str, files))
    assert r.returncode == 0, r.stderr
    assert_exported_identical(server.data_dir, tmp_path / "out", files)


def test_storescu_concurrent_associations(server, tmp_path):
    groups = [copies(MR if i % 2 else CT, tmp_path / "in", 15, f"g{i}") for i in range(4)]
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), *map(str, g)],
                              stderr=subprocess.PIPE, text=True) for g in groups]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert_exported_identical(server.data_dir, tmp_path / "out", [f for g in groups for f in g])


def test_export_selectors(server, tmp_path):
    a = copies(CT, tmp_path / "a", 3, "a")
    b = copies(MR, tmp_path / "b", 2, "b")
    r = run(dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), *map(str, a + b))
    assert r.returncode == 0, r.stderr
    series = pydicom.dcmread(a[0]).SeriesInstanceUID
    r = export_all(server.data_dir, tmp_path / "s", "--series", series)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s").glob("*.dcm"))) == 3
    uid = pydicom.dcmread(b[1]).SOPInstanceUID
    r = export_all(server.data_dir, tmp_path / "i", "--instance", uid)
    assert [p.name for p in (tmp_path / "i").glob("*.dcm")] == [f"{uid}.dcm"]
    pid = pydicom.dcmread(b[0]).PatientID
    r = export_all(server.data_dir, tmp_path / "p", "--patient", pid)
    assert len(list((tmp_path / "p").glob("*.dcm"))) == 2
    r = export_all(server.data_dir, tmp_path / "x", "--study", "1.2.3.4'; DROP TABLE records; --")
    assert r.returncode == 0 and not list((tmp_path / "x").glob("*.dcm"))


def _sendable(path: str) -> tuple[Path, pydicom.Dataset] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or not all(meta.get(k) for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID",
                                                      "MediaStorageSOPInstanceUID")):
        return None  # a C-STORE request cannot be formed without these
    return Path(path), ds


def _should_store(ds: pydicom.Dataset) -> bool:
    meta = ds.file_meta
    return (ds.get("SOPInstanceUID") == meta.MediaStorageSOPInstanceUID
            and ds.get("SOPClassUID") == meta.MediaStorageSOPClassUID
            and bool(ds.get("StudyInstanceUID")) and bool(ds.get("SeriesInstanceUID")))


def test_pydicom_test_data_round_trip(server, tmp_path, monkeypatch):
    """Every readable pydicom test file goes in by C-STORE (its own bytes, its own transfer
    syntax) and comes out of export byte-identical; files that do not identify themselves
    are refused with a failure status."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    files = [s for s in map(_sendable, get_testdata_files()) if s]
    assert len(files) > 50
    ae = AE("ROUNDTRIP")
    last_by_uid: dict[str, Path] = {}
    refused, skipped = [], []
    for path, ds in files:
        meta = ds.file_meta
        ae.requested_contexts = []
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
        if not assoc.is_established:  # only for what we do not claim to store
            assert (meta.MediaStorageSOPClassUID not in storage_sop_classes()
                    or meta.TransferSyntaxUID not in transfer_syntaxes()), path.name
            skipped.append(path.name)
            continue
        status = assoc.send_c_store(path)
        assoc.release()
        if _should_store(ds):
            assert "Status" in status, f"{path.name}: no C-STORE response"
            assert status.Status == 0, f"{path.name}: 0x{status.Status:04X} {status.get('ErrorComment')}"
            last_by_uid[ds.SOPInstanceUID] = path
        else:
            assert "Status" in status, f"{path.name}: no C-STORE response"
            assert status.Status != 0, f"{path.name} lacks identifying UIDs but was accepted"
            assert status.get("ErrorComment"), f"{path.name}: refusal without an Error Comment"
            refused.append(path.name)
    out = tmp_path / "out"
    r = export_all(server.data_dir, out)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.dcm"))) == len(last_by_uid)
    for uid, path in last_by_uid.items():
        got = out / f"{uid}.dcm"
        assert dataset_bytes(got) == dataset_bytes(path), f"{path.name}: dataset bytes differ after export"
        exported_ts = pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert exported_ts == pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


def test_pynetdicom_concurrent_senders(server, tmp_path):
    files = [copies(CT, tmp_path / "in", 10, f"t{i}") for i in range(3)]
    failures: list[str] = []

    def send(paths: list[Path]) -> None:
        ae = AE("PYSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
        if not assoc.is_established:
            failures.append("association not established")
            return
        for p in paths:
            st = assoc.send_c_store(pydicom.dcmread(p))
            if not st or st.Status != 0:
                failures.append(p.name)
        assoc.release()

    threads = [threading.Thread(target=send, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    r = export_all(server.data_dir, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 30


def test_every_conformance_storage_class_and_syntax_is_accepted(server):
    """The conformance target's storage SOP classes (retired and trial included) and every
    transfer syntax pydicom knows are accepted in negotiation."""
    import csv
    from importlib import resources
    with resources.files("workers").joinpath("storage_sop_classes.csv").open() as f:
        classes = [r["sop_class_uid"] for r in csv.DictReader(f) if r["sop_class_uid"] != "1.2.840.10008.1.1"]
    syntaxes = transfer_syntaxes()
    proposals = [(c, [ts]) for c in classes for ts in syntaxes[:2]] + \
                [("1.2.840.10008.5.1.4.1.1.2", [ts]) for ts in syntaxes]
    for start in range(0, len(proposals), 120):
        ae = AE("NEGOTIATE")
        for uid, ts in proposals[start:start + 120]:
            ae.add_requested_context(uid, ts)
        assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
        assert assoc.is_established
        rejected = [(cx.abstract_syntax, cx.transfer_syntax) for cx in assoc.rejected_contexts]
        assoc.release()
        assert not rejected


def test_read_your_writes_from_another_process(server, tmp_path, monkeypatch):
    """The moment a C-STORE is acknowledged, a catalog reader in another process sees it."""
    from stowage.catalog.reader import Catalog
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = copies(CT, tmp_path / "in", 5, "r")
    catalog = Catalog(server.data_dir / "catalog")
    ae = AE("RYW")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    for f in files:
        assert assoc.send_c_store(f).Status == 0
        row = catalog.lookup(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert row is not None and row["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        assert row["calling_ae"] == "RYW" and row["patient_id"] == pydicom.dcmread(f).PatientID
    assoc.release()
    catalog.close()


def test_segments_roll_at_the_configured_size(make_server, tmp_path):
    server = make_server("--workers", "1", STOWAGE_SEGMENT_SIZE="100000")
    files = copies(CT, tmp_path / "in", 12, "roll")
    r = run(dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), *map(str, files))
    assert r.returncode == 0, r.stderr
    assert len(list((server.data_dir / "segments").glob("*.seg"))) > 1
    assert_exported_identical(server.data_dir, tmp_path / "out", files)


def _audit_lines(data_dir: Path, calling_ae: str) -> list[dict]:
    """The audit log once the association line of `calling_ae` is in (it is written as
    the association ends, a moment after the release)."""
    import json
    lines: list[dict] = []
    for _ in range(50):
        lines = [json.loads(l) for l in (data_dir / "audit.jsonl").read_text().splitlines()]
        if any(l.get("event") == "association" and l["calling_ae"] == calling_ae for l in lines):
            break
        time.sleep(0.1)
    return lines


def _assert_audited(lines: list[dict], calling_ae: str, files: list[Path], path: str) -> None:
    stores = [l for l in lines if l.get("event") == "store" and l["calling_ae"] == calling_ae]
    assert sorted(l["sop_instance_uid"] for l in stores) == \
        sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    assert all(l["status"] == "0x0000" for l in stores)
    (assoc,) = [l for l in lines if l.get("event") == "association" and l["calling_ae"] == calling_ae]
    assert assoc["path"] == path
    assert assoc["outcome"] == "released" and assoc["stored"] == len(files) and assoc["refused"] == 0, assoc


def test_audit_log_has_associations_and_stores(server, tmp_path):
    files = copies(CT, tmp_path / "in", 2, "audit")
    r = run(dcmtk("storescu"), "-aet", "AUDITSCU", "-aec", "STOWAGE", HOST, str(server.port), *map(str, files))
    assert r.returncode == 0, r.stderr
    _assert_audited(_audit_lines(server.data_dir, "AUDITSCU"), "AUDITSCU", files, "lean")
    # An association that also proposes C-FIND is served by pynetdicom: its line counts
    # its stores too.
    files = copies(CT, tmp_path / "in2", 3, "audit2")
    ae = AE("AUDITPYN")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(f).Status == 0
    assoc.release()
    _assert_audited(_audit_lines(server.data_dir, "AUDITPYN"), "AUDITPYN", files, "pynetdicom")
