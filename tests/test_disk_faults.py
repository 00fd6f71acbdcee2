"""Faults of the archive's disk while it receives, as an administrator meets them: the
file system fills up in the middle of a large dataset, and the like. Every check is
one a sender or an operator makes: the status and Error Comment the sender sees, that
the association and the server go on, and what `stowage export` returns afterwards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from conftest import HOST, cli, dataset_bytes, dcmtk, echo_ok
from test_bad_input import CT_STORAGE, EXPLICIT_LE, exported, incompressible_ct, part10, request_uid, tmpfs  # noqa: F401,E501 (fixture)
from test_import import counts, report_of

pytestmark = pytest.mark.timeout(300)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def ct(path: Path, side: int = 0) -> Path:
    """A copy of CT_small with fresh UIDs, with side x side 16-bit random pixels if `side`
    (4000: 32 MB, past spill_threshold), without its Data Set Trailing Padding, which DCMTK
    storescu leaves out when it sends: what it sends is then the file byte for byte."""
    part10(path, pixels=os.urandom(side * side * 2) if side else None)
    ds = pydicom.dcmread(path)
    del ds[0xFFFC, 0xFFFC]
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_disk_filling_while_a_large_dataset_spools_refuses_it_and_the_association_goes_on(
        make_server, tmpfs, tmp_path):
    """min_free_bytes 0 (or another writer filling the disk between two looks at its free
    space): the spool file of a 32 MB dataset meets ENOSPC on a 24 MB file system. That
    C-STORE is answered 0xA700 with an Error Comment, on the lean receive path (DCMTK
    storescu) and on pynetdicom's (an association that proposes a query class too), and
    the small instances after it on the same association are stored."""
    data_dir = tmpfs(tmp_path / "disk", "24m") / "data"
    server = make_server("--workers", "1", data_dir=data_dir, STOWAGE_MIN_FREE_BYTES="0")
    big = ct(tmp_path / "in" / "big.dcm", side=4000)
    small = [ct(tmp_path / "in" / f"small-{i}.dcm") for i in range(4)]

    # the lean path: a storage-only association
    r = subprocess.run([dcmtk("storescu"), "-d", "-nh", "-aec", "STOWAGE", HOST, str(server.port),
                        str(big), str(small[0]), str(small[1])], capture_output=True, text=True, timeout=120)
    said = r.stdout + r.stderr
    responses = [line for line in said.splitlines() if "DIMSE Status" in line]
    assert len(responses) == 3, f"not every C-STORE was answered:\n{said[-3000:]}\n{server.log()[-3000:]}"
    assert "0xa700: Refused: Out of resources" in responses[0], responses
    assert "No space left on device" in said, said[-3000:]
    assert all("0x0000: Success" in line for line in responses[1:]), responses

    # pynetdicom's path: storage and a query class on one association
    ae = AE("DISKFULL")
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(big)
        assert "Status" in refused, f"no C-STORE response\n{server.log()[-3000:]}"
        assert refused.Status == 0xA700, hex(refused.Status)
        assert "No space left on device" in str(refused.get("ErrorComment", "")), refused
        for f in small[2:]:
            status = assoc.send_c_store(f)
            assert assoc.is_established and "Status" in status and status.Status == 0, status
    finally:
        assoc.release()

    assert echo_ok(server.port)
    assert not list((data_dir / "spool").rglob("rx-*")), "a refused dataset left its spool file"
    got = exported(data_dir, tmp_path / "out")
    assert set(got) == {request_uid(f) for f in small}
    for f in small:
        assert dataset_bytes(got[request_uid(f)]) == dataset_bytes(f)
    assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_import_of_a_large_file_onto_a_full_disk_stops_and_says_so(tmpfs, tmp_path):
    """A file past spill_threshold is copied into the archive's spool first; on a full disk
    that copy fails. It is the archive's disk, not the file: the report says so with
    0xA700, as for a store refused for want of space, the import stops starting files,
    and once there is room a re-run imports everything."""
    disk = tmpfs(tmp_path / "disk", "24m")
    data = disk / "data"
    src = tmp_path / "src"
    big = ct(src / "a-big.dcm", side=4000)  # walked first: one process, one thread
    small = [ct(src / f"b-small-{i}.dcm") for i in range(3)]
    env = dict(os.environ, STOWAGE_MIN_FREE_BYTES="0")
    cmd = [sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q",
           "--processes", "1", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    report = report_of(r.stdout)
    outcome, why = report[str(big)]
    assert outcome == "refused" and "0xA700" in why and "No space left on device" in why, why
    assert "unreadable" not in why, why
    assert {report[str(f)][0] for f in small} == {"not-attempted"}, report
    assert not [p for p in (data / "spool").rglob("*") if p.is_file()], "the failed copy was left in the spool"

    r = subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr  # room again
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert counts(r.stdout)["stored"] == 4, r.stdout
    got = exported(data, tmp_path / "out")
    assert set(got) == {request_uid(f) for f in [big, *small]}
    for f in [big, *small]:
        assert dataset_bytes(got[request_uid(f)]) == dataset_bytes(f)


def catalog_row(i: int) -> dict:
    from stowage.catalog.schema import SCHEMA
    row = {f.name: None for f in SCHEMA}
    row.update(sop_instance_uid=f"1.2.826.0.1.3680043.9.7777.{i}", study_instance_uid="1.2.826.0.1.3680043.9.7777",
               series_instance_uid="1.2.826.0.1.3680043.9.7777.0", segment="000-00000001.seg", offset=i * 1000,
               record_length=1000, received_at=i, patient_id="FULLDISK")
    return row


def unnamed_catalog_files(directory: Path) -> list[str]:
    """Parquet files in the catalog directory that the manifest does not name (sealed
    files or their study summaries)."""
    from stowage.catalog import manifest, studies
    named = set(manifest.load(directory).files)
    named |= {studies.companion(n) for n in named}
    return sorted(p.name for p in directory.glob("*.parquet") if p.name not in named)


def test_a_seal_that_fails_on_a_full_disk_leaves_no_file_behind(tmpfs, tmp_path):
    """A seal writes its Parquet file (and study summary) first, then swaps the manifest;
    when the disk fills in between, the files it wrote are not named by any manifest and
    would stay for ever, holding the space its next try needs. They go; the rows stay in
    the tail, and the seal after space came back catalogues them once."""
    from stowage.catalog import manifest
    from stowage.catalog.reader import Catalog
    from stowage.catalog.sealer import Sealer
    disk = tmpfs(tmp_path / "catalog-disk", "200k")
    directory = disk / "catalog"
    sealer = Sealer(directory, 0)
    sealer.commit([catalog_row(i) for i in range(200)])
    with pytest.raises(OSError):
        sealer.seal()  # the uid filter's pages (or the Parquet file itself) do not fit
    assert unnamed_catalog_files(directory) == [], "a failed seal left its files"
    assert not list(directory.glob(".*.tmp")), "a failed seal left a temporary file"

    r = subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr  # room again
    sealer.seal()
    sealer.close()
    assert unnamed_catalog_files(directory) == []
    assert sum(manifest.load(directory).files.values()) == 200
    catalog = Catalog(directory, "keep-newest")
    try:
        _cols, rows = catalog.execute("SELECT count(*), count(DISTINCT sop_instance_uid) FROM records")
    finally:
        catalog.close()
    assert rows == [(200, 200)]


def test_a_removed_newest_segment_does_not_lose_what_is_stored_next(make_server, tmp_path):
    """The newest segment of a worker's slot is gone (moved away by an administrator, lost
    with a disk, a backup restored without it). The next segment the worker opens must not
    take its name: the manifest still holds the old file's sealed watermark, so recovery
    after a kill -9 would skip every record below it (acknowledged, then lost), and the old
    catalog rows would name the new file's records (another instance served under their
    UIDs). What was stored after is all there after the crash; what was in the removed
    file fails, and nothing is exported under another instance's name."""
    server = make_server("--workers", "1")
    data = server.data_dir
    before = [ct(tmp_path / "before" / f"ct-{i}.dcm") for i in range(5)]
    after = [ct(tmp_path / "after" / f"ct-{i}.dcm") for i in range(5)]
    for f in before:
        assert store_one(server.port, f) == 0
    assert server.stop() == 0
    (newest,) = [p for p in (data / "segments").glob("000-*.seg") if p.stat().st_size]
    newest.rename(tmp_path / newest.name)  # moved away

    again = make_server("--workers", "1", data_dir=data, STOWAGE_SEAL_INTERVAL="60")  # nothing sealed before the kill
    for f in after:
        assert store_one(again.port, f) == 0
    again.kill()  # kill -9 of the whole server
    make_server("--workers", "1", data_dir=data)
    out = tmp_path / "out"
    from conftest import export_all
    export_all(data, out)  # exit 1: the instances of the removed segment cannot be exported
    got = {p.stem: p for p in out.glob("*.dcm")}
    for name, path in got.items():
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == name, \
            f"{name}.dcm holds another instance"
    assert {request_uid(f) for f in after} <= set(got), "acknowledged instances lost after the kill"
    for f in after:
        assert dataset_bytes(got[request_uid(f)]) == dataset_bytes(f)
    assert not {request_uid(f) for f in before} & set(got)


def store_one(port: int, path: Path) -> int:
    """The status of one C-STORE of the file, on an association of its own."""
    return int(c_store(port, path, "SEGMENTS", 30).Status)


def c_store(port: int, path: Path, calling: str, timeout: float) -> Dataset:
    """The C-STORE response (status, Error Comment) of one store of a CT file, on an
    association of its own."""
    ae = AE(calling)
    ae.add_requested_context(CT_STORAGE, [EXPLICIT_LE])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def test_an_import_whose_ledger_disk_is_full_finishes_and_reports(tmpfs, tmp_path):
    """The import ledger is a cache (docs/import.md): when it cannot be written ("database
    or disk is full", here its own 64 KB file system), the import goes on, prints its
    summary and writes its report, exit status 0 (every file is in the archive); the next
    run reads the files the ledger missed again and finds them already held."""
    from test_import import clones
    src = tmp_path / "src"
    clones(src, 24, 25, seed=7)  # 600 files, of 24 generated instances (pydicom writes each in 10-60 ms)
    data = tmp_path / "data"
    ledger_disk = tmpfs(data / "import", "64k")
    cmd = [sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q",
           "--report", str(tmp_path / "report.csv")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert counts(r.stdout)["stored"] == 600, r.stdout
    assert "ledger" in r.stderr and "database or disk is full" in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "report.csv").exists()

    r = subprocess.run(["mount", "-o", "remount,size=16m", str(ledger_disk)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr  # room again
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr[-3000:]
    again = counts(r.stdout)
    assert again["stored"] == 0 and again["held"] + again["unchanged"] == 600, r.stdout
    assert len(exported(data, tmp_path / "out")) == 600


def test_a_dataset_whose_compression_meets_a_full_disk_leaves_nothing_in_the_spool(make_server, tmpfs, tmp_path):
    """A spooled dataset in a native syntax is compressed into a file beside its spool
    file before it is appended. When that write meets a full disk (here the spool has a
    file system of its own, 16 MB, for 10 MB datasets: as when concurrent associations
    fill the disk between the free-space check and the write), the C-STORE is refused
    0xA700 and the part written goes: left behind, it held that space until a restart,
    and the next large dataset could not even be spooled."""
    data = tmp_path / "data"
    spool = tmpfs(data / "spool", "16m")
    server = make_server("--workers", "1", data_dir=data, STOWAGE_MIN_FREE_BYTES="0",
                         STOWAGE_SPILL_THRESHOLD=str(1 << 20))
    big = [ct(tmp_path / "in" / f"big-{i}.dcm", side=2236) for i in range(2)]  # 10 MB each, incompressible
    small = ct(tmp_path / "in" / "small.dcm")
    for f in big:
        status = c_store(server.port, f, "ZSTFULL", 60)
        assert status.Status == 0xA700, hex(status.Status)
        assert "No space left on device" in str(status.get("ErrorComment", "")), status
        left = [p.name for p in spool.rglob("*") if p.is_file()]
        assert not left, f"left in the spool after the refusal: {left}"
    assert store_one(server.port, small) == 0
    got = exported(data, tmp_path / "out")
    assert set(got) == {request_uid(small)}


@pytest.fixture
def ext4(tmp_path):
    """mount() -> (mount point, its /sys/fs/ext4 name): a 64 MB ext4 file system on a loop
    device that turns read-only on an error (errors=remount-ro), as a data disk does."""
    mounted: list[Path] = []

    def mount() -> tuple[Path, str]:
        image, where = tmp_path / "ext4.img", tmp_path / "ext4"
        where.mkdir()
        for cmd in (["truncate", "-s", "64M", str(image)], ["mkfs.ext4", "-q", "-m", "0", str(image)],
                    ["mount", "-o", "loop,errors=remount-ro", str(image), str(where)]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                pytest.skip(f"cannot make an ext4 file system: {' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
        mounted.append(where)
        device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(where)], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        return where, Path(device).name

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_a_disk_turned_read_only_serves_on_and_stops_cleanly(make_server, ext4, tmp_path):
    """The data disk hits an error and the kernel makes it read-only (errors=remount-ro).
    Stores are refused 0xA700 with an Error Comment, queries and retrieves go on, and
    with everything acknowledged already sealed, the stop is clean (exit 0): a worker
    that could not remove its empty catalog tail said it could not seal and exited 1."""
    where, device = ext4()
    trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"no {trigger}")
    data = where / "data"
    server = make_server("--workers", "2", data_dir=data, STOWAGE_MIN_FREE_BYTES="0")
    stored = [ct(tmp_path / "in" / f"ct-{i}.dcm") for i in range(3)]
    for f in stored:
        assert store_one(server.port, f) == 0
    from conftest import catalog_sealed, wait_for
    wait_for(lambda: catalog_sealed(data), 60, "the sealers to catalogue what was stored")
    trigger.write_text("1")  # the file system is read-only from now on
    status = c_store(server.port, ct(tmp_path / "in" / "late.dcm"), "READONLY", 30)
    assert status.Status == 0xA700 and str(status.get("ErrorComment", "")).strip(), status
    got = exported(data, tmp_path / "out")
    assert set(got) == {request_uid(f) for f in stored}
    assert server.stop() == 0, server.log()[-3000:]
    assert "could not seal" not in server.log(), server.log()[-3000:]


def test_compaction_on_a_nearly_full_disk_keeps_the_stores_reserve(tmpfs, tmp_path):
    """An administrator deletes to make room and compacts. Each round writes a new segment
    while the ones it replaced wait out compact_grace (an hour), so on a nearly full disk
    the rounds used to eat the free space the stores need (min_free_bytes). Compaction now
    stops before a round that would, says why and what to do, and `--grace 0` frees the
    replaced segments at once, round after round."""
    data = tmpfs(tmp_path / "disk", "32m") / "data"
    loose = tmp_path / "loose.toml"
    loose.write_text("min_free_bytes = 0\nsegment_size = 2000000\n")
    files = [incompressible_ct(tmp_path / "in" / f"{i:02d}.dcm") for i in range(36)]  # ~520 KB each
    r = cli("import", "--config", str(loose), "--data-dir", str(data), "--processes", "1", "-q", str(tmp_path / "in"))
    assert r.returncode == 0, r.stdout + r.stderr
    dead = [request_uid(f) for i, f in enumerate(files) if i % 3]
    d = cli("delete", "--config", str(loose), "--data-dir", str(data), "--yes", *[a for u in dead for a in ("--instance", u)])
    assert d.returncode == 0, d.stdout + d.stderr

    free = shutil.disk_usage(data).free
    reserve = free - 3_000_000  # room for one round (about one 2 MB segment of live records), not for two
    tight = tmp_path / "tight.toml"
    tight.write_text(f"min_free_bytes = {reserve}\nsegment_size = 2000000\n")
    c = cli("compact", "--config", str(tight), "--data-dir", str(data), "--ratio", "0.6")
    assert c.returncode == 1, c.stdout + c.stderr
    line = c.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: compaction stopped short of disk space: ") and "not rewritten" in line, c.stderr
    assert "--grace 0" in line, line
    assert not c.stdout.startswith("rewrote 0 "), c.stdout  # the rounds that had room ran (which: the import's order)
    assert shutil.disk_usage(data).free >= reserve, "compaction ate into the stores' reserve"

    g = cli("compact", "--config", str(tight), "--data-dir", str(data), "--ratio", "0.6", "--grace", "0")
    assert g.returncode == 0, g.stdout + g.stderr
    assert shutil.disk_usage(data).free > free  # the dead records' space is back
    got = exported(data, tmp_path / "out")
    assert set(got) == {request_uid(f) for i, f in enumerate(files) if not i % 3}
