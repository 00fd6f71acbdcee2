"""Edges of the archive's lifecycle an administrator hits: a deletion given a list with a
mistyped UID in it, and a damaged catalog file met by verify, compact and delete. Real
servers, DCMTK findscu and getscu, the CLI as a user runs it."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import HOST, cli, dcmtk, series_instances, storescu
from stowage.catalog import manifest
from stowage.engine.lifecycle.compaction import JOURNAL
from test_compaction import _INJECT, ENV, check, sent, store, wait_sealed
from test_delete import delete, find, instances

pytestmark = pytest.mark.timeout(600)


def test_a_mistyped_uid_in_a_list_is_not_passed_over_in_silence(make_server, tmp_path):
    server = make_server("--workers", "1")
    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    files = [*instances(tmp_path / "in", "EDGE1", s1, generate_uid(), 2),
             *instances(tmp_path / "in", "EDGE1", s2, generate_uid(), 2),
             *instances(tmp_path / "in", "EDGE2", s3, generate_uid(), 2)]
    storescu(server.port, files)
    typo = s2[:-1] + ("1" if s2[-1] != "1" else "2")
    q = tmp_path / "q"

    asked = delete(server.data_dir, "--study", f"{s1},{typo}", confirm="n\n")
    assert asked.returncode != 0 and f"not found: no stored instance has study {typo}" in asked.stderr, asked

    r = delete(server.data_dir, "--study", f"{s1},{typo}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "deleted 1 patient(s), 1 study(ies), 1 series, 2 instance(s)" in r.stdout
    assert typo in r.stderr and "matched no stored instance" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    studies = {x.StudyInstanceUID for x in find(server.port, q, "STUDY", "PatientID=EDGE*", "StudyInstanceUID=")}
    assert studies == {s2, s3}

    # run again with the right UIDs: the one deleted already is named, the rest deleted, exit 0
    r = delete(server.data_dir, "--study", f"{s1},{s2}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"deleted already: study {s1}" in r.stderr
    studies = {x.StudyInstanceUID for x in find(server.port, q, "STUDY", "PatientID=EDGE*", "StudyInstanceUID=")}
    assert studies == {s3}


@pytest.mark.parametrize("then", ["rebuild-catalog", "serve"])
def test_catalog_deleted_after_a_killed_compaction_loses_nothing(make_server, tmp_path, then):
    """kill -9 of `stowage compact` in the middle of a round (documented crash-safe), then
    catalog/ deleted and rebuilt (by `rebuild-catalog`, or by `serve`'s start-up recovery):
    the half-written round's output must not be what the catalog serves and then be
    removed by the next compaction, taking the instances with it once the segments it
    replaced are reclaimed."""
    server = make_server("--workers", "1", **ENV)
    data = server.data_dir
    files = series_instances(tmp_path / "in", "EDGEC", generate_uid(), generate_uid(), 30)
    store(server.port, files)
    gone = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:12]]
    assert cli("delete", "--data-dir", str(data), "--instance", ",".join(gone), "--yes").returncode == 0
    expected = sent(files[12:], tmp_path / "dcmtk")
    wait_sealed(data)
    server.stop()
    r = subprocess.run([sys.executable, "-c", _INJECT, "rewritten", str(data)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **ENV))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert (data / "segments" / JOURNAL).exists()
    shutil.rmtree(data / "catalog")
    if then == "rebuild-catalog":
        r = cli("rebuild-catalog", "--data-dir", str(data))
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        server.start()
        server.stop()
    r = cli("compact", "--data-dir", str(data), "--ratio", "0.99", "--grace", "0", env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("compact", "--data-dir", str(data), "--ratio", "0.99", "--grace", "0", env=ENV)  # the twins too
    assert r.returncode == 0, r.stdout + r.stderr
    check(data, tmp_path / "out", expected, set(gone))
    server.start()
    got = tmp_path / "get"
    got.mkdir()
    r = subprocess.run([dcmtk("getscu"), "-P", "-aec", "STOWAGE", "-k", "QueryRetrieveLevel=PATIENT", "-k",
                        "PatientID=EDGEC", "-od", str(got), HOST, str(server.port)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list(got.iterdir())) == len(expected), r.stdout + r.stderr


def test_rebuild_catalog_mends_a_manifest_cut_to_nothing(make_server, tmp_path):
    """A damaged catalog is what rebuild-catalog is for: a manifest.json cut to nothing (a
    crash on a filesystem that lost it, a bad sector) must not stop it with a traceback."""
    server = make_server("--workers", "1")
    study = generate_uid()
    storescu(server.port, instances(tmp_path / "in", "EDGEM", study, generate_uid(), 4))
    gone = instances(tmp_path / "in2", "EDGEM", study, generate_uid(), 2)
    storescu(server.port, gone)
    assert delete(server.data_dir, "--series", str(pydicom.dcmread(gone[0]).SeriesInstanceUID)).returncode == 0
    server.stop()
    (server.data_dir / "catalog" / "manifest.json").write_bytes(b"")
    # every other command meets it first: one line naming the file and the remedy, exit 1
    for args in (["query", "SELECT count(*) FROM instances"], ["export", "--out", str(tmp_path / "out"), "--all"],
                 ["verify"]):
        r = cli(args[0], "--data-dir", str(server.data_dir), *args[1:])
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "manifest" in r.stderr and "run `stowage rebuild-catalog`" in r.stderr, (args, r.stderr)
    from conftest import free_port
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(server.data_dir), "--port",
                        str(free_port()), "--http-port", "0"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "run `stowage rebuild-catalog`" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    r = cli("rebuild-catalog", "--data-dir", str(server.data_dir))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "manifest could not be read" in r.stderr and "catalog rebuilt: 6 record(s)" in r.stdout
    server.start()
    images = find(server.port, tmp_path / "q", "IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID=")
    assert len(images) == 4  # the deleted series stays deleted


def test_verify_names_the_instances_of_a_damaged_catalog_file_and_the_rest_is_served(make_server, tmp_path):
    """A sealed catalog file with damaged bytes: `stowage verify` says which file and which
    instances (not a traceback), still verifies every segment, and the archive keeps serving
    the instances whose rows are elsewhere."""
    server = make_server("--workers", "1", **ENV)
    data = server.data_dir
    first = series_instances(tmp_path / "a", "EDGEV1", generate_uid(), generate_uid(), 6)
    store(server.port, first)
    wait_sealed(data)
    sealed_first = set(manifest.load(data / "catalog").files)
    second = series_instances(tmp_path / "b", "EDGEV2", generate_uid(), generate_uid(), 6)
    store(server.port, second)
    one = str(pydicom.dcmread(second[0], stop_before_pixels=True).SOPInstanceUID)
    assert cli("delete", "--data-dir", str(data), "--instance", one, "--yes").returncode == 0  # dead space
    wait_sealed(data)
    server.stop()
    m = manifest.load(data / "catalog")
    assert sealed_first and set(m.files) - sealed_first, m.files  # two files: one damaged, one not
    victim = data / "catalog" / sorted(sealed_first & set(m.files))[0]
    raw = bytearray(victim.read_bytes())
    for i in range(len(raw) // 10, len(raw) // 10 + len(raw) // 8):  # column chunks, not the footer
        raw[i] ^= 0xFF
    victim.write_bytes(bytes(raw))
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in first}

    report = tmp_path / "problems.csv"
    r = cli("verify", "--data-dir", str(data), "-q", "--report", str(report))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "verified 12 record(s)" in r.stdout, r.stdout
    rows = list(csv.DictReader(report.open()))
    assert any(row["segment"] == f"catalog/{victim.name}" for row in rows), rows
    named = {row["sop_instance_uid"] for row in rows if row["segment"].endswith(".seg")}
    assert named == uids, rows

    for args in (("compact", "--ratio", "1"), ("delete", "--patient", "EDGEV1", "--yes")):
        r = cli(*args, "--data-dir", str(data))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert "stowage rebuild-catalog" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    server.start()
    got = tmp_path / "get"
    got.mkdir()
    r = subprocess.run([dcmtk("getscu"), "-P", "-aec", "STOWAGE", "-k", "QueryRetrieveLevel=PATIENT", "-k",
                        "PatientID=EDGEV2", "-od", str(got), HOST, str(server.port)],
                       capture_output=True, text=True, timeout=120)
    assert len(list(got.iterdir())) == 5, r.stdout + r.stderr

    server.stop()  # the remedy verify names: every instance back, nothing wrong
    assert cli("rebuild-catalog", "--data-dir", str(data)).returncode == 0
    r = cli("verify", "--data-dir", str(data), "-q")
    assert r.returncode == 0 and "verified 12 record(s)" in r.stdout, r.stdout + r.stderr


def _drop_catalog_row(catalog_dir: Path, uid: str) -> None:
    """The catalog loses the row of one instance (a damaged file read back without error,
    a row lost by a bug): its sealed file written again without it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    for name in manifest.load(catalog_dir).files:
        table = pq.read_table(catalog_dir / name)
        keep = pc.invert(pc.equal(table["sop_instance_uid"], uid))
        if table.filter(keep).num_rows < table.num_rows:
            pq.write_table(table.filter(keep), catalog_dir / name)
            return
    raise AssertionError(f"no sealed row of {uid}")


def test_compaction_never_destroys_a_record_the_catalog_lacks(make_server, tmp_path):
    """Compaction copies the live rows of a segment and drops the rest: a record whose row
    the catalog lost is neither, and rewriting its segment would destroy an intact,
    acknowledged instance. The segment is left as it is, the command says so, and
    rebuild-catalog brings the instance back."""
    server = make_server("--workers", "1", **ENV)
    data = server.data_dir
    files = series_instances(tmp_path / "in", "EDGEK", generate_uid(), generate_uid(), 24)
    store(server.port, files)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    gone = uids[:12:2]  # sparse segments: candidates
    assert cli("delete", "--data-dir", str(data), "--instance", ",".join(gone), "--yes").returncode == 0
    expected = sent(files, tmp_path / "dcmtk")
    for u in gone:
        del expected[u]
    wait_sealed(data)
    server.stop()
    lost = uids[1]
    _drop_catalog_row(data / "catalog", lost)

    r = cli("compact", "--data-dir", str(data), "--ratio", "1", "--grace", "0", env=ENV)
    assert r.returncode == 1 and "not in the catalog" in r.stderr and "Traceback" not in r.stderr, \
        r.stdout + r.stderr
    assert cli("rebuild-catalog", "--data-dir", str(data)).returncode == 0
    r = cli("compact", "--data-dir", str(data), "--ratio", "1", "--grace", "0", env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    check(data, tmp_path / "out", expected, set(gone))  # the lost row's instance among them
    server.start()
    assert {x.SOPInstanceUID for x in find(server.port, tmp_path / "q", "IMAGE", "PatientID=EDGEK",
                                           "SOPInstanceUID=")} == set(expected)


def test_a_deleted_instance_whose_row_was_lost_stays_deleted_after_compaction_and_rebuild(make_server, tmp_path):
    """A deleted instance (a wrong-patient study) whose catalog row is lost: its tombstone
    seems to hide nothing, but the record is still in its segment. Pruning it would let
    the next rebuild-catalog bring the instance back."""
    server = make_server("--workers", "1", **ENV)
    data = server.data_dir
    files = series_instances(tmp_path / "in", "EDGET", generate_uid(), generate_uid(), 24)
    store(server.port, files)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    wrong = uids[1]
    gone = [wrong, *uids[12:24:2]]  # and dead space elsewhere, for compaction to reclaim
    assert cli("delete", "--data-dir", str(data), "--instance", ",".join(gone), "--yes").returncode == 0
    wait_sealed(data)
    server.stop()
    _drop_catalog_row(data / "catalog", wrong)
    cli("compact", "--data-dir", str(data), "--ratio", "1", "--grace", "0", env=ENV)
    assert cli("rebuild-catalog", "--data-dir", str(data)).returncode == 0
    server.start()
    found = {x.SOPInstanceUID for x in find(server.port, tmp_path / "q", "IMAGE", "PatientID=EDGET", "SOPInstanceUID=")}
    assert found == set(uids) - set(gone), "a deleted instance came back" if wrong in found else found


def test_verify_names_the_instances_whose_deletion_a_damaged_tombstone_line_undid(make_server, tmp_path):
    """A byte flipped in the middle of the tombstone log: the line fails its checksum and
    its deletions silently stop being in force. Verify says so, with the UIDs to delete
    again."""
    server = make_server("--workers", "1")
    study = generate_uid()
    files = instances(tmp_path / "in", "EDGEL", study, generate_uid(), 4)
    storescu(server.port, files)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    assert delete(server.data_dir, "--instance", uids[0]).returncode == 0
    assert delete(server.data_dir, "--instance", uids[1]).returncode == 0
    log = server.data_dir / "tombstones" / "tombstones.log"
    raw = bytearray(log.read_bytes())
    assert raw.index(b'"reason"') < raw.index(b"\n")
    raw[raw.index(b'"reason"') + 1] ^= 0x01  # in the first line, not in a UID
    log.write_bytes(bytes(raw))
    images = find(server.port, tmp_path / "q", "IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID=")
    assert {x.SOPInstanceUID for x in images} == set(uids[2:]) | {uids[0]}  # the deletion undone
    report = tmp_path / "r.csv"
    r = cli("verify", "--data-dir", str(server.data_dir), "-q", "--report", str(report))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    rows = [row for row in csv.DictReader(report.open()) if row["segment"] == "tombstones/tombstones.log"]
    assert [(row["sop_instance_uid"], int(row["offset"])) for row in rows] == [(uids[0], 0)], rows
    assert "delete these instances again" in rows[0]["problem"]
    assert delete(server.data_dir, "--instance", uids[0]).returncode == 0  # as it says
    images = find(server.port, tmp_path / "q", "IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID=")
    assert {x.SOPInstanceUID for x in images} == set(uids[2:])
