"""kill -9 of a worker, or of the whole server, in the middle of a multi-association
ingest loses no acknowledged instance; torn and corrupt segment tails are handled."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from conftest import CT, HOST, copies, dataset_bytes, echo_ok, export_all
from stowage.engine.store.segment import iter_records


class Sender(threading.Thread):
    """One association sending files as they are; records what was acknowledged."""

    def __init__(self, port: int, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port, self.paths = port, paths
        self.acked: list[Path] = []
        self.aborted = False

    def run(self) -> None:
        ae = AE("CRASHSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(HOST, self.port, ae_title="STOWAGE")
        if not assoc.is_established:
            self.aborted = True
            return
        for p in self.paths:
            status = assoc.send_c_store(p)
            if not assoc.is_established or "Status" not in status:
                self.aborted = True
                return
            if status.Status == 0:
                self.acked.append(p)
        assoc.release()


def ingest_and(port: int, files: list[list[Path]], action, after_acks: int) -> list[Sender]:
    senders = [Sender(port, f) for f in files]
    for s in senders:
        s.start()
    deadline = time.monotonic() + 120
    while sum(len(s.acked) for s in senders) < after_acks and time.monotonic() < deadline:
        time.sleep(0.01)
    action()
    for s in senders:
        s.join(120)
    return senders


def assert_all_acked_exported(data_dir: Path, out: Path, acked: list[Path]) -> None:
    r = export_all(data_dir, out)
    assert r.returncode == 0, r.stderr
    assert acked, "nothing was acknowledged: the test did not exercise anything"
    for p in acked:
        uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        got = out / f"{uid}.dcm"
        assert got.exists(), f"acknowledged instance {uid} was lost"
        assert dataset_bytes(got) == dataset_bytes(p)


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_kill_one_worker_mid_ingest(make_server, tmp_path, chunked):
    server = make_server("--workers", "2")
    files = [copies(CT, tmp_path / "in", 150, f"s{i}") for i in range(4)]
    victim = server.workers()[0]
    senders = ingest_and(server.port, files, victim.kill, after_acks=60)
    assert any(s.aborted for s in senders), "no sender saw its association die with the worker"
    assert any(len(s.acked) == len(s.paths) for s in senders), "associations on the other worker did not go on"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len([w for w in server.workers() if w.pid != victim.pid]) < 2:
        time.sleep(0.2)
    assert victim.pid not in [w.pid for w in server.workers()] and len(server.workers()) == 2
    assert echo_ok(server.port)
    assert_all_acked_exported(server.data_dir, tmp_path / "out", [p for s in senders for p in s.acked])


def test_kill_whole_server_mid_ingest(make_server, tmp_path, chunked):
    server = make_server("--workers", "2")
    files = [copies(CT, tmp_path / "in", 150, f"s{i}") for i in range(4)]
    senders = ingest_and(server.port, files, server.kill, after_acks=80)
    assert all(s.aborted for s in senders if len(s.acked) < len(s.paths))
    acked = [p for s in senders for p in s.acked]
    restarted = make_server("--workers", "2", data_dir=server.data_dir, port=server.port)
    assert echo_ok(restarted.port)
    assert_all_acked_exported(server.data_dir, tmp_path / "out", acked)
    restarted.stop()


def _store_some(server, tmp_path, n: int, tag: str) -> list[Path]:
    files = copies(CT, tmp_path / tag, n, tag)
    s = Sender(server.port, files)
    s.run()
    assert len(s.acked) == n
    return files


def test_torn_record_is_cut_on_restart(make_server, tmp_path, chunked):
    server = make_server("--workers", "1")
    files = _store_some(server, tmp_path, 5, "a")
    server.kill()
    seg = sorted((server.data_dir / "segments").glob("*.seg"))[-1]
    records = list(iter_records(seg))
    whole = seg.read_bytes()
    with open(seg, "ab") as f:  # half of a record, as if the power went mid-write
        f.write(whole[records[0].offset: records[0].offset + records[0].length // 2])
    restarted = make_server("--workers", "1", data_dir=server.data_dir)
    assert seg.stat().st_size == len(whole), "the torn tail was not cut"
    assert list((seg.parent / "lost+found").glob(f"{seg.name}.*.torn"))
    more = _store_some(restarted, tmp_path, 2, "b")
    assert_all_acked_exported(server.data_dir, tmp_path / "out", files + more)


def test_corrupt_record_is_skipped_and_the_rest_kept(make_server, tmp_path, chunked):
    import subprocess, sys
    server = make_server("--workers", "1")
    files = _store_some(server, tmp_path, 6, "a")
    assert server.stop() == 0
    seg = sorted((server.data_dir / "segments").glob("*.seg"))[-1]
    records = list(iter_records(seg))
    assert len(records) == 6
    victim = records[2]
    with open(seg, "r+b") as f:  # flip bytes inside the third record's payload
        f.seek(victim.payload_offset + victim.payload_length // 2)
        f.write(b"\xff\x00\xff\x00")
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "rebuild-catalog", "--data-dir", str(server.data_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 record(s)" in r.stdout
    lost_uid = victim.header["sop_instance_uid"]
    kept = [p for p in files if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID != lost_uid]
    assert len(kept) == 5
    assert_all_acked_exported(server.data_dir, tmp_path / "out", kept)


def test_rebuild_catalog_from_segments_alone(make_server, tmp_path, chunked):
    import shutil, subprocess, sys
    server = make_server("--workers", "2")
    files = _store_some(server, tmp_path, 12, "a")
    assert server.stop() == 0
    shutil.rmtree(server.data_dir / "catalog")
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "rebuild-catalog", "--data-dir", str(server.data_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "12 record(s)" in r.stdout
    assert_all_acked_exported(server.data_dir, tmp_path / "out", files)


def test_rebuild_catalog_refuses_while_serving(server):
    import subprocess, sys
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "rebuild-catalog", "--data-dir", str(server.data_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "running" in r.stderr and "Traceback" not in r.stderr
