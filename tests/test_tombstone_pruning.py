"""Tombstones are pruned once compaction has removed every record they hide, and kept while
one may still be read (catalog/tombstones.py `prune`, engine/lifecycle/tombstone_pruning.py):
what a long-lived process holds of them follows the live archive, not every instance ever
deleted; a deleted instance never comes back (rebuild-catalog included); a rejected UID
stays rejected."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import psutil
import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from conftest import MR, cli, copies, free_port
from stowage.catalog import tombstones
from stowage.catalog.reader import Catalog


def test_prune_keeps_rejections_and_what_is_not_gone(tmp_path):
    tombstones.append(tmp_path, [tombstones.Tombstone("1.1", 10), tombstones.Tombstone("1.2", 20),
                                 tombstones.Tombstone("1.3", 30, reason="rejected:113001"),
                                 tombstones.Tombstone("1.4", None, reason="rejected:113001")])
    reader = tombstones.TombstoneReader(tombstones.directory(tmp_path))
    assert reader.read().num_rows == 4
    assert tombstones.prune(tmp_path, {("1.1", 10), ("1.3", 30), ("9.9", 1)}) == 2
    table = reader.read()
    assert reader.generation == 2  # the log was replaced: read afresh
    assert sorted(zip(table["sop_instance_uid"].to_pylist(), [t and t.value for t in table["received_at"]])) == \
        [("1.2", 20), ("1.3", None), ("1.4", None)]
    assert tombstones.rejected_uids(table) == {"1.3", "1.4"}  # still rejected, hiding nothing
    assert tombstones.prune(tmp_path, {("1.1", 10)}) == 0
    tombstones.append(tmp_path, [tombstones.Tombstone("1.5", 50)])  # appends go on after a prune
    assert tombstones.load(tmp_path)["sop_instance_uid"].to_pylist() == ["1.2", "1.5"]


_ENV = {"STOWAGE_SEGMENT_SIZE": "50000", "STOWAGE_COMPACT_GRACE": "0"}


def _cli(data_dir: Path, *args: str) -> str:
    """`stowage *args` as a process of its own."""
    r = subprocess.run([sys.executable, "-m", "stowage.cli", *args, "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, **_ENV))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _in_process(data_dir: Path, *args: str) -> str:
    """`stowage *args` run in this process (conftest.cli), where no tombstone reader of the
    test's lives: a new interpreter's imports cost 2-4 s a command on the loaded 2-core
    machine."""
    r = cli(*args, "--data-dir", str(data_dir), env=_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_delete_and_compact_in_a_loop_holds_tombstones_of_the_live_archive_only(tmp_path):
    data = tmp_path / "data"
    catalog = None
    held, logged = [], []
    try:
        for rnd in range(3):
            files = copies(MR, tmp_path / f"r{rnd}", 24, f"r{rnd}")
            _cli(data, "import", "-q", "--processes", "1", str(files[0].parent))
            uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
            _cli(data, "delete", "--yes", "--instance", ",".join(uids))
            _cli(data, "compact")
            if catalog is None:  # a long-lived reader, as every serving process holds one
                catalog = Catalog(data / "catalog")
            held.append(catalog.execute("SELECT count(*) FROM tombstones")[1][0][0])
            logged.append(tombstones.load(data).num_rows)
            assert catalog.execute("SELECT count(*) FROM instances")[1][0][0] == 0
        # 72 instances deleted; only those still in the active segment (50 kB: a few MR)
        # keep a tombstone, round after round
        assert all(n <= 8 for n in held) and held == logged, (held, logged)
        print("tombstones held after each round:", held)
        assert _cli(data, "verify").count("all intact") == 1
        _cli(data, "rebuild-catalog")
        assert _cli(data, "query", "--format", "csv", "SELECT count(*) AS n FROM instances").split()[1:] == ["0"]
    finally:
        if catalog is not None:
            catalog.close()


# --- resident memory, measured on a serving archive ---------------------------------------------

_ROUNDS, _PER_ROUND = 6, 4000
_REASON = "r" * 200  # the longest comment a tombstone keeps (stowage delete --reason): a costly tombstone


def _instances(out: Path, study: str, series: str, n: int) -> None:
    """n tiny Part-10 files of one series, their 64-character SOP Instance UIDs set in the
    bytes of one template (pydicom writing each would take longer than storing them)."""
    out.mkdir(parents=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.PatientID, ds.PatientName, ds.Modality = "TOMB", "TOMB^STONE", "OT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    placeholder = "9" * 64
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = placeholder
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    template = buf.getvalue()
    middle = "1" * (64 - len(series) - 8)  # series . 111… . 1xxxxx: 64 characters
    for i in range(n):
        uid = f"{series}.{middle}.{100000 + i}"
        (out / f"{i:05d}.dcm").write_bytes(template.replace(placeholder.encode(), uid.encode()))


def _scratch(tmp_path: Path) -> Path:
    """A folder for the rounds' source files: on /dev/shm when it is a memory file system with
    room (the 4,000 files of a round take ~16 MiB there), else under tmp_path. Made and
    removed on the disk the archive fsyncs to, they took 20-25 s a round on the loaded
    2-core machine (0.7 s alone): time spent on nothing this test checks."""
    shm = Path("/dev/shm")
    try:
        usage = shutil.disk_usage(shm)
        fits = os.access(shm, os.W_OK) and usage.free > 256 << 20 and \
            any(p.mountpoint == str(shm) and p.fstype == "tmpfs" for p in psutil.disk_partitions(all=True))
    except OSError:
        fits = False
    return Path(tempfile.mkdtemp(prefix="stowage-tombstones-", dir=shm)) if fits else tmp_path


def _holders_rss(server) -> int:
    """Resident bytes of the processes that hold tombstones (the acceptor, its workers and its
    HTTP process), the median of five readings."""
    procs = [psutil.Process(server.proc.pid)] + [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                                                 if "workers.worker" in " ".join(p.cmdline())
                                                 or "web.process" in " ".join(p.cmdline())]
    readings = []
    for _ in range(5):
        readings.append(sum(p.memory_info().rss for p in procs))
        time.sleep(0.1)
    return statistics.median(readings)


def _read_tombstones(server, http_port: int) -> None:
    """Make every holder follow the tombstone log: a C-FIND (the worker) and a QIDO-RS (the
    HTTP process) read the catalog, which reads the log's new entries first."""
    ae = AE("TOMBSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="STOWAGE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "TOMB", ""
    assert [s.Status for s, _ in assoc.send_c_find(query, "1.2.840.10008.5.1.4.1.2.2.1")] == [0]  # none live
    assoc.release()
    r = requests.get(f"http://127.0.0.1:{http_port}/dicom-web/studies?PatientID=TOMB", timeout=30)
    assert r.status_code == 204, r.text


def test_resident_memory_follows_the_live_archive_while_deleting_and_compacting(tmp_path, make_server):
    """Rounds of: 4,000 instances imported while serving, all deleted, compacted. Without
    pruning, every process that holds tombstones would keep each one: at least its UIDs and
    comment (about 330 bytes; DuckDB's table holds some 600), 4,000 more each round. The
    resident size of those processes after the last round may not exceed its size after the
    second (by then every pool and cache has been used) by what the 16,000 tombstones of the
    rounds in between would hold at the very least in the worker and the HTTP process
    (9.2 MiB). Measured on the shared 2-core machine: pruned, -3.4 and +1.2 MiB in two runs
    (readings 6.3 MiB apart at most); with pruning turned off, +28.4 MiB, and the log holding
    all 24,000. Series metadata is not made ahead here (metadata_stable_seconds 0): its look
    at the catalog every 2.5 s has the HTTP process check each new tail row's UID in the
    sealed-UID filter (catalog/sealed_uids.py), a 32 MiB file every process maps, whose pages
    then count in its resident size (+31 MiB of shared page cache, not its own memory; its
    anonymous memory rose ~7 MiB over the rounds): read from /proc/<pid>/smaps, unrelated to
    tombstones."""
    http_port = free_port()
    server = make_server("--workers", "1", "--http-port", str(http_port), STOWAGE_HTTP_PROCESSES="1",
                         STOWAGE_SEGMENT_SIZE="200000", STOWAGE_COMPACT_GRACE="0", STOWAGE_COMPACT_INTERVAL="0",
                         STOWAGE_METADATA_STABLE_SECONDS="0")
    holders = 1 + 1  # its worker and its HTTP process (the acceptor is measured too, not counted)
    rss, held = [], []
    scratch = _scratch(tmp_path)
    try:
        _rounds(server, http_port, scratch, rss, held)
    finally:
        if scratch != tmp_path:
            shutil.rmtree(scratch, ignore_errors=True)
    study = f"1.2.826.0.1.3680043.8.498.{_ROUNDS}.1"  # the last round's
    per_tombstone = 64 + len(study) + len(_REASON) + len("deleted") + len("cli")  # what each one holds at least
    bound = (_ROUNDS - 2) * _PER_ROUND * per_tombstone * holders
    growth = rss[-1] - rss[1]
    print(f"tombstones in the log after each round: {held}; resident MiB of the acceptor, worker and HTTP process: "
          f"{[round(r / 2**20, 1) for r in rss]}; growth {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert max(held) < _PER_ROUND, held  # pruned: the log holds only what an unfinished segment may hide
    assert growth < bound, (rss, bound)
    assert server.stop() == 0 and "Traceback" not in server.log()


def _rounds(server, http_port: int, scratch: Path, rss: list[int], held: list[int]) -> None:
    """The rounds of the test above: the holders' resident size and the tombstones logged
    after each, appended to `rss` and `held`."""
    data = server.data_dir
    for rnd in range(_ROUNDS):
        study, series = f"1.2.826.0.1.3680043.8.498.{rnd + 1}.1", f"1.2.826.0.1.3680043.8.498.{rnd + 1}.2"
        folder = scratch / f"round{rnd}"
        _instances(folder, study, series, _PER_ROUND)
        steps = [time.monotonic()]
        assert f"{_PER_ROUND} stored" in _cli(data, "import", "-q", str(folder))
        steps.append(time.monotonic())
        deleted = _in_process(data, "delete", "--yes", "--series", series, "--reason", _REASON)
        assert str(_PER_ROUND) in deleted, deleted
        steps.append(time.monotonic())
        _in_process(data, "compact")
        steps.append(time.monotonic())
        _read_tombstones(server, http_port)
        steps.append(time.monotonic())
        held.append(tombstones.load(data).num_rows)
        rss.append(_holders_rss(server))
        shutil.rmtree(folder)
        print(f"round {rnd}: import, delete, compact, queries took "
              f"{', '.join(f'{b - a:.1f}' for a, b in zip(steps, steps[1:]))} s", flush=True)
