"""`stowage migrate`: whole legacy archives moved into stowage over DICOM, from real peers
on loopback (Orthanc, DCMTK dcmqrscp, a pynetdicom Q/R SCP that refuses some moves), with
`stowage serve` and `stowage migrate` run as subprocesses, as users run them."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from stowage.bench.corpus import generate
from conftest import DCMTK_NODELAY, HOST, cli, copies, dataset_bytes, dcmtk, echo_ok, export_all, free_port, wait_for

SAME_DAY = "20200301"
DEFLATE = "1.2.840.10008.1.2.1.99"
# (kind, syntax, count, patients, studies per patient, series per study, seed): 236 instances,
# 21 studies over 13 patients, in Explicit/Implicit VR LE, Deflate, RLE, JPEG 2000, plus
# JPEG baseline, JPEG lossy, JPEG 2000 and big endian files from pydicom's test data.
SHAPES = [("small", "explicit", 96, 4, 2, 2, 1), ("small", "implicit", 48, 2, 2, 2, 2),
          ("small", "rle", 32, 2, 1, 2, 3), ("small", "j2k", 24, 1, 2, 1, 4), ("small", "deflate", 24, 1, 1, 2, 5)]
TEST_FILES = ["SC_rgb_jpeg_gdcm.dcm", "JPEG-lossy.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """The legacy archive's content. Seven studies share one day (hours 08-14), so a source
    capped at 5 C-FIND matches must be asked hour by hour to give them all."""
    root = tmp_path_factory.mktemp("corpus")
    files: list[Path] = []
    for kind, syntax, count, pats, studies, series, seed in SHAPES:
        files += generate(root / syntax, kind, count, patients=pats, studies_per_patient=studies,
                          series_per_study=series, seed=seed, transfer_syntax=syntax)
    for i, name in enumerate(TEST_FILES):
        files += copies(Path(get_testdata_file(name)), root / f"testdata{i}", 3, f"t{i}")
    by_study: dict[str, list[Path]] = {}
    for f in files:
        by_study.setdefault(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID, []).append(f)
    for hour, study in enumerate(sorted(by_study)[:7]):
        for f in by_study[study]:
            ds = pydicom.dcmread(f)
            ds.StudyDate, ds.StudyTime = SAME_DAY, f"{8 + hour:02d}1500"
            ds.save_as(f, enforce_file_format=True)
    return files


def study_uids(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}


_PROPOSE = {"1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.2": "-xb",
            "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv",
            "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.51": "-xx",
            "1.2.840.10008.1.2.4.50": "-xy"}


def storescu(port: int, aec: str, files: list[Path]) -> None:
    """Load a legacy archive through its DICOM port with DCMTK storescu, one run per transfer
    syntax, proposing that syntax (so that nothing is converted on the way in). storescu runs
    with TCP_NODELAY=1, and so does dcmqrscp (start_dcmqrscp): between two DCMTK peers with
    Nagle on, each C-STORE waits out delayed ACKs (about 90 ms). (Orthanc, DCMTK inside too,
    is left as it is: with TCP_NODELAY=1 its C-MOVE to stowage was slower here, 20-24 s
    instead of 14-15.)"""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID), []).append(f)
    for ts, group in groups.items():
        r = subprocess.run([dcmtk("storescu"), "-aec", aec, "-aet", "LOADER", _PROPOSE[ts], HOST, str(port),
                            *map(str, group)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, **DCMTK_NODELAY))
        assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr[-3000:]


def migrate(data_dir: Path, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data_dir), "-q",
                           *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def query(data_dir: Path, sql: str) -> list[dict]:
    """`stowage query`, run in this process (conftest.cli: no new interpreter's imports, 2-4 s
    on the loaded 2-core machine)."""
    r = cli("query", "--data-dir", str(data_dir), "--format", "json", sql)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def comparable(path: Path) -> bytes:
    """A Part-10 file's dataset bytes; inflated for Deflated Explicit VR Little Endian, whose
    deflate stream a sender may redo (DCMTK deflates on the fly) without changing a byte of
    the dataset."""
    raw = dataset_bytes(path)
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return zlib.decompress(raw, -15) if ts == DEFLATE else raw


def exported(data_dir: Path, out: Path) -> dict[str, bytes]:
    r = export_all(data_dir, out)
    assert r.returncode == 0, r.stderr
    return {p.stem: comparable(p) for p in out.iterdir()}


def checkpoint(data_dir: Path) -> sqlite3.Connection:
    (path,) = (data_dir / "migrate").glob("*.sqlite")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def orthanc_files(orthanc) -> dict[str, bytes]:
    """What Orthanc holds, per SOP Instance UID: the dataset bytes of its stored files."""
    out = {}
    for iid in orthanc.rest("GET", "/instances"):
        raw = _raw(orthanc, iid)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"orthanc-{iid}.dcm"
        path.write_bytes(raw)
        try:
            out[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = comparable(path)
        finally:
            path.unlink()
    return out


def _raw(orthanc, iid: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/{iid}/file", timeout=60) as r:
        return r.read()


@contextmanager
def old_pacs(folder: Path, destination: str, *behaviour: str) -> Iterator[int]:
    """tests/refusing_qr_scp.py as OLDPACS on a free port, serving `folder`, moving to
    `destination` (AET:HOST:PORT), misbehaving as `behaviour` says; yields its port once it
    answers C-ECHO, and kills it after."""
    port = free_port()
    scp = subprocess.Popen([sys.executable, str(Path(__file__).with_name("refusing_qr_scp.py")), str(port), "OLDPACS",
                            str(folder), destination, *behaviour],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not echo_ok(port, "OLDPACS", 1.0):
            assert scp.poll() is None and time.monotonic() < deadline, "the Q/R SCP did not start"
            time.sleep(0.2)
        yield port
    finally:
        scp.kill()
        scp.wait(10)


def loaded_orthanc(orthancs, tmp_path: Path, corpus: list[Path], stowage_port: int, **extra):
    orthanc = orthancs(tmp_path / "orthanc", {"stowage": ("STOWAGE", HOST, stowage_port)}, **extra)
    storescu(orthanc.dicom_port, "ORTHANC", corpus)
    assert len(orthanc.rest("GET", "/instances")) == len(corpus)
    return orthanc


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, corpus):
    """One Orthanc loaded with the corpus for the tests that only read from it (loading it
    costs more than most of them); each points its `stowage` modality at its own archive
    (pointed_at). Migrations never change what the source holds."""
    from orthanc import Orthanc
    o = Orthanc(tmp_path_factory.mktemp("legacy"), {"stowage": ("STOWAGE", HOST, free_port())})
    try:
        storescu(o.dicom_port, "ORTHANC", corpus)
        assert len(o.rest("GET", "/instances")) == len(corpus)
        yield o
    finally:
        o.stop()


@pytest.fixture(scope="module")
def legacy_files(legacy) -> dict[str, bytes]:
    return orthanc_files(legacy)


def pointed_at(orthanc, stowage_port: int):
    """`orthanc` with its C-MOVE destination STOWAGE at `stowage_port` (its REST API)."""
    orthanc.rest("PUT", "/modalities/stowage", {"AET": "STOWAGE", "Host": HOST, "Port": stowage_port})
    return orthanc


def test_migrate_from_orthanc_by_move(make_server, tmp_path, corpus, legacy, legacy_files):
    """Every instance arrives byte for byte as Orthanc holds it, every study is verified
    against Orthanc's IMAGE-level C-FIND, the source AE is recorded, and a re-run pulls
    nothing again."""
    server = make_server("--workers", "2")
    orthanc = pointed_at(legacy, server.port)
    src = f"ORTHANC@{HOST}:{orthanc.dicom_port}"
    r = migrate(server.data_dir, "--from", src, "--parallel", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    n_studies = len(study_uids(corpus))
    assert f"studies: {n_studies} found, {n_studies} done, 0 failed" in r.stdout, r.stdout
    assert f"{len(corpus)} received, {len(corpus)} verified" in r.stdout, r.stdout
    source = legacy_files
    got = exported(server.data_dir, tmp_path / "out")
    assert set(got) == set(source)
    assert [uid for uid in source if got[uid] != source[uid]] == []
    assert query(server.data_dir, "SELECT calling_ae, count(*) AS n FROM instances GROUP BY 1") == \
        [{"calling_ae": "ORTHANC", "n": len(corpus)}]
    with checkpoint(server.data_dir) as con:
        assert con.execute("SELECT DISTINCT verified_by FROM studies").fetchall() == [("sop-instance-uids",)]
        attempts = con.execute("SELECT sum(attempts) FROM studies").fetchone()[0]
    assert attempts == n_studies
    again = migrate(server.data_dir, "--from", src)
    assert again.returncode == 0, again.stdout + again.stderr
    with checkpoint(server.data_dir) as con:
        assert con.execute("SELECT sum(attempts) FROM studies").fetchone()[0] == n_studies  # nothing re-pulled
    records = query(server.data_dir, "SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS u FROM records")
    assert records == [{"n": len(corpus), "u": len(corpus)}]
    report = json.loads(next((server.data_dir / "migrate").glob("*-report.json")).read_text())
    assert report["studies_done"] == n_studies and report["instances_verified"] == len(corpus)


def test_capped_find_still_finds_every_study_and_dry_run_pulls_nothing(tmp_path, corpus, orthancs):
    """Orthanc answers at most 5 C-FIND matches (LimitFindResults). The enumeration splits all
    dates -> decades -> years -> months -> the crowded day -> its hours, and finds every
    study; --dry-run lists them and stores nothing."""
    orthanc = loaded_orthanc(orthancs, tmp_path, corpus, free_port(), LimitFindResults=5)
    src = f"ORTHANC@{HOST}:{orthanc.dicom_port}"
    ae = AE("STOWAGE")  # the AE Orthanc knows
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, orthanc.dicom_port, ae_title="ORTHANC")
    ident = pydicom.Dataset()
    ident.QueryRetrieveLevel, ident.StudyInstanceUID = "STUDY", ""
    answers = [(s.Status, i) for s, i in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind)]
    assoc.release()
    assert len([i for _s, i in answers if i is not None]) == 5  # capped, and ends with Cancel (0xFE00)
    assert answers[-1][0] == 0xFE00
    blind = migrate(tmp_path / "blind", "--from", src, "--dry-run")
    assert blind.returncode == 0, blind.stderr
    assert {line.split()[2] for line in blind.stdout.splitlines() if line.startswith("would pull ")} == \
        study_uids(corpus)  # without --find-limit: the Cancel status gives the cap away
    data = tmp_path / "data"
    r = migrate(data, "--from", src, "--dry-run", "--find-limit", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {line.split()[2] for line in r.stdout.splitlines() if line.startswith("would pull ")}
    assert listed == study_uids(corpus)
    assert "possibly incomplete" not in r.stdout
    with checkpoint(data) as con:
        states = dict(con.execute("SELECT state, count(*) FROM windows GROUP BY 1").fetchall())
        hours = con.execute("SELECT key, found FROM windows WHERE key LIKE '%\"hour\"%' AND found > 0").fetchall()
        assert con.execute("SELECT count(*) FROM studies WHERE state = 'pending' AND attempts = 0").fetchone()[0] \
            == len(listed)
    assert states.get("split", 0) >= 4 and "incomplete" not in states and "pending" not in states, states
    assert sum(n for _k, n in hours) == 7  # the seven studies of the crowded day, found hour by hour
    assert not (data / "catalog").exists() and not (data / "segments").exists()
    status = cli("migrate", "--data-dir", str(data), "--status")
    assert status.returncode == 0, status.stderr
    assert f"studies: {len(listed)} found, 0 done, 0 failed, 0 in flight, {len(listed)} pending" in status.stdout


def test_method_get_from_orthanc_without_a_running_archive(tmp_path, corpus, legacy, legacy_files):
    """C-GET: the migrate process receives and stores the instances itself, in its own slot,
    recording Orthanc's AE title as their calling AE; byte for byte as Orthanc holds them."""
    orthanc = legacy
    data = tmp_path / "data"
    r = migrate(data, "--from", f"ORTHANC@{HOST}:{orthanc.dicom_port}", "--method", "get", "--verify-content")
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(study_uids(corpus))
    assert f"studies: {n} found, {n} done, 0 failed" in r.stdout, r.stdout
    source = legacy_files
    got = exported(data, tmp_path / "out")
    assert set(got) == set(source)
    assert [uid for uid in source if got[uid] != source[uid]] == []
    assert query(data, "SELECT calling_ae, count(*) AS n FROM instances GROUP BY 1") == \
        [{"calling_ae": "ORTHANC", "n": len(corpus)}]
    with checkpoint(data) as con:
        assert con.execute("SELECT DISTINCT verified_by FROM studies").fetchall() == [("sop-instance-uids+content",)]


def test_move_without_a_running_archive_is_refused_in_one_line(tmp_path):
    r = migrate(tmp_path / "data", "--from", f"LEGACY@{HOST}:{free_port()}")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "needs `stowage serve" in r.stderr and "--method get" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_kill_9_midway_then_resume(make_server, tmp_path, corpus, legacy):
    """kill -9 during a paced migration; the re-run pulls again only what was not done, and
    in the end every instance is there, each stored once."""
    server = make_server("--workers", "2")
    orthanc = pointed_at(legacy, server.port)
    src = f"ORTHANC@{HOST}:{orthanc.dicom_port}"
    cmd = [sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(server.data_dir), "-q", "--from", src,
           "--parallel", "1", "--max-rate", "25"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done_before: dict[str, tuple] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list((server.data_dir / "migrate").glob("*.sqlite")):
                with checkpoint(server.data_dir) as con:
                    rows = con.execute("SELECT uid, attempts, updated FROM studies WHERE state = 'done'").fetchall()
                if len(rows) >= 3:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with checkpoint(server.data_dir) as con:
        done_before = {u: (a, t) for u, a, t in
                       con.execute("SELECT uid, attempts, updated FROM studies WHERE state = 'done'")}
        total = con.execute("SELECT count(*) FROM studies").fetchone()[0]
    assert 3 <= len(done_before) < total, "the migration was not interrupted midway"
    r = migrate(server.data_dir, "--from", src, "--parallel", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    with checkpoint(server.data_dir) as con:
        rows = con.execute("SELECT uid, attempts, updated FROM studies WHERE uid IN (SELECT value FROM json_each(?))",
                           (json.dumps(list(done_before)),))
        after = {u: (a, t) for u, a, t in rows}
        assert con.execute("SELECT count(*) FROM studies WHERE state != 'done'").fetchone()[0] == 0
    assert after == done_before  # finished studies were not pulled again
    records = query(server.data_dir, "SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS u FROM records")
    assert records == [{"n": len(corpus), "u": len(corpus)}]


@pytest.mark.parametrize("method", ["move", "get"])
def test_source_that_refuses_some_moves(make_server, tmp_path, corpus, method):
    """A Q/R SCP (pynetdicom, its own process) answers the C-MOVE or C-GET of two studies
    with 0xA702 (and a Failed SOP Instance UID List) and sits silent on a third: those end
    failed after their retries, listed with the reason (the silent one as a stall); the
    others are done."""
    server = make_server("--workers", "2", start=method == "move")
    folder = corpus[0].parent  # the Explicit VR Little Endian part: 8 studies
    studies = sorted(study_uids([p for p in corpus if p.parent == folder]))
    refused, hung = studies[:2], studies[2]
    with old_pacs(folder, f"STOWAGE:{HOST}:{server.port}", *refused, f"stall:{hung}") as port:
        r = migrate(server.data_dir, "--from", f"OLDPACS@{HOST}:{port}", "--method", method, "--retries", "2",
                    "--retry-delay", "0.1", "--stall-timeout", "3")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"studies: {len(studies)} found, {len(studies) - 3} done, 3 failed" in r.stdout, r.stdout
    failed = {line.split()[2]: line for line in r.stdout.splitlines() if line.strip().startswith("failed study")}
    assert sorted(failed) == sorted([*refused, hung])
    assert all("0xA702" in failed[uid] and "2 attempts" in failed[uid] for uid in refused), failed
    assert "stall timeout" in failed[hung] and "2 attempts" in failed[hung], failed[hung]
    held = query(server.data_dir, "SELECT DISTINCT study_instance_uid AS s FROM instances ORDER BY 1")
    assert [row["s"] for row in held] == studies[3:]
    report = (server.data_dir / "migrate" / f"OLDPACS_{HOST}_{port}-report.csv").read_text()
    assert all(uid in report for uid in [*refused, hung])


def test_a_source_that_aborts_a_c_get_midway(tmp_path, corpus):
    """A source that sends one instance of a study by C-GET and then aborts: that study is
    failed (after its retries) with the abort as its reason, the instance that did arrive is
    kept, and every other study is done."""
    folder = corpus[0].parent
    studies = sorted(study_uids([p for p in corpus if p.parent == folder]))
    data = tmp_path / "data"
    with old_pacs(folder, f"STOWAGE:{HOST}:1", f"abort:{studies[0]}") as port:
        r = migrate(data, "--from", f"OLDPACS@{HOST}:{port}", "--method", "get", "--retries", "2",
                    "--retry-delay", "0.1", "--stall-timeout", "10")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"studies: {len(studies)} found, {len(studies) - 1} done, 1 failed" in r.stdout, r.stdout
    failed = [line for line in r.stdout.splitlines() if line.strip().startswith("failed study")]
    assert len(failed) == 1 and studies[0] in failed[0] and "aborted" in failed[0], failed
    held = query(data, "SELECT study_instance_uid AS s, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1")
    assert [row["s"] for row in held] == studies
    assert held[0]["n"] == 1


def test_a_source_that_does_not_know_us_stops_the_migration_with_what_to_configure(make_server, tmp_path, corpus):
    """0xA801 (move destination unknown) cannot be fixed by retrying: one line, exit 1."""
    server = make_server("--workers", "1")
    folder = corpus[0].parent
    with old_pacs(folder, f"SOMEONE:{HOST}:{server.port}") as port:
        r = migrate(server.data_dir, "--from", f"OLDPACS@{HOST}:{port}", "--parallel", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "does not know 'STOWAGE' as a C-MOVE destination (0xA801)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    status = cli("migrate", "--data-dir", str(server.data_dir), "--status")
    assert "0 done" in status.stdout and "0 failed" in status.stdout, status.stdout  # nothing counted against studies


def test_a_silent_cap_is_suspected_proven_and_split_under(tmp_path, corpus):
    """A source that answers at most 3 C-FIND matches with plain success, and nobody said so
    (no --find-limit): the first answer's count is suspected, proven once more studies turn
    up, and every window is split under it; --dry-run then lists every study."""
    folder = corpus[0].parent
    studies = study_uids([p for p in corpus if p.parent == folder])
    with old_pacs(folder, f"STOWAGE:{HOST}:1", "cap:3") as port:
        r = migrate(tmp_path / "data", "--from", f"OLDPACS@{HOST}:{port}", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {line.split()[2] for line in r.stdout.splitlines() if line.startswith("would pull ")} == studies
    assert "answers at most 3 C-FIND matches without saying so" in r.stderr, r.stderr


def start_dcmqrscp(tmp_path: Path, stowage_port: int, dcmtk_args: list[str]) -> tuple[subprocess.Popen, int, Path]:
    """DCMTK dcmqrscp with a configuration written here: one storage area (AE LEGACY) and
    STOWAGE in its host table, so that it can C-MOVE to us."""
    storage = tmp_path / "dcmqrscp" / "LEGACY"
    storage.mkdir(parents=True)
    port = free_port()
    cfg = tmp_path / "dcmqrscp" / "dcmqrscp.cfg"
    cfg.write_text(f"""NetworkTCPPort = {port}
MaxPDUSize = 16384
MaxAssociations = 16

HostTable BEGIN
stowage = (STOWAGE, {HOST}, {stowage_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
LEGACY {storage} RW (1000, 1024mb) ANY
AETable END
""")
    proc = subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(cfg), *dcmtk_args], cwd=cfg.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **DCMTK_NODELAY))
    deadline = time.monotonic() + 20
    while not echo_ok(port, "LEGACY", 1.0):
        assert proc.poll() is None and time.monotonic() < deadline, "dcmqrscp did not start"
        time.sleep(0.1)
    return proc, port, storage


@pytest.mark.parametrize("method,spill", [("move", None), ("get", None), ("get", "1024")])
def test_migrate_from_dcmqrscp(make_server, tmp_path, corpus, method, spill):
    """DCMTK's archive as the source: loaded with storescu, migrated by C-MOVE (to a running
    archive) or C-GET (stored by the migrate process, in PDUs of 16 kB); every instance
    arrives with the dataset bytes dcmqrscp holds in its storage area. (Explicit VR Little
    Endian only: dcmqrscp proposes one context per SOP class listing several syntaxes and
    converts to whichever the destination picks, so other syntaxes would not arrive as held.)
    With a spill threshold of 1 kB every C-GET dataset goes to the spool on its way in,
    and the spool is empty after."""
    server = make_server("--workers", "2", start=method == "move")
    files = [p for p in corpus if p.parent.name == "explicit"]
    proc, port, storage = start_dcmqrscp(tmp_path, server.port, [])
    try:
        storescu(port, "LEGACY", files)
        cfg = tmp_path / "stowage.toml"
        cfg.write_text(f'[remotes.LEGACY]\nhost = "{HOST}"\nport = {port}\n')
        r = migrate(server.data_dir, "--config", str(cfg), "--from", "LEGACY", "--method", method,
                    "--verify-content", "--retry-delay", "1", env={"STOWAGE_SPILL_THRESHOLD": spill} if spill else None)
    finally:
        proc.kill()
        proc.wait(10)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(study_uids(files))
    assert f"studies: {n} found, {n} done, 0 failed" in r.stdout, r.stdout
    assert f"{len(files)} received, {len(files)} verified" in r.stdout, r.stdout
    held = {}
    for p in storage.iterdir():
        if p.name != "index.dat":
            held[pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID] = comparable(p)
    got = exported(server.data_dir, tmp_path / "out")
    assert set(got) == set(held) and len(held) == len(files)
    assert [uid for uid in held if got[uid] != held[uid]] == []
    assert query(server.data_dir, "SELECT calling_ae, count(*) AS n FROM instances GROUP BY 1") == \
        [{"calling_ae": "LEGACY", "n": len(files)}]
    assert not [p for p in (server.data_dir / "spool").rglob("*") if p.is_file()]


def test_window_splitting_reaches_the_leaves():
    """The split ladder, as a capped source forces it: each level narrows, a one-day window
    goes by hour (and "no time"), then Modality, then Patient Name initial, then nothing;
    a leaf still capped is reported as possibly incomplete."""
    from stowage.engine.migrate.enumerate import Window, enumerate_window, split
    from stowage.engine.migrate.source import Answer
    today = dt.date(2026, 6, 1)
    top = split(Window(everything=True), today)
    assert [str(w) for w in top] == ["no date", "…..1899-12-31", "1900-01-01..2027-12-31", "2028-01-01..…"]
    decades = split(top[2], today)
    assert (decades[0].lo, decades[0].hi, decades[-1].lo) == ("1900-01-01", "1909-12-31", "2020-01-01")
    years = split(Window("2020-01-01", "2029-12-31"), today)
    assert len(years) == 10 and years[3] == Window("2023-01-01", "2023-12-31")
    months = split(years[3], today)
    assert len(months) == 12 and months[1] == Window("2023-02-01", "2023-02-28")
    days = split(months[1], today)
    assert len(days) == 28 and days[0] == Window("2023-02-01", "2023-02-01")
    hours = split(days[0], today)
    assert len(hours) == 25 and hours[10].identifier().StudyTime == "100000-105959.999999" and hours[-1].no_time
    by_modality = split(hours[10], today)
    assert by_modality[0].identifier().ModalitiesInStudy == "CT" and by_modality[0].hour == 10
    leaves = split(by_modality[0], today)
    assert leaves[0].identifier().PatientName == "A*" and split(leaves[0], today) == []
    def capped(_identifier, convert):
        return Answer([convert(_match(f"1.2.{i}")) for i in range(5)], 0x0000)
    outcome, studies, children, _note, count = enumerate_window(capped, leaves[0], 5)
    assert (outcome, len(studies), children, count) == ("incomplete", 5, [], 5)
    outcome, _s, children, _n, _c = enumerate_window(capped, hours[10], 5)
    assert outcome == "split" and len(children) == len(by_modality)
    outcome, *_rest = enumerate_window(capped, hours[10], 6)
    assert outcome == "done"


def _match(uid: str):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.StudyInstanceUID, ds.StudyDate, ds.NumberOfStudyRelatedInstances = uid, "20230201", 3
    return ds


def test_time_window_and_rate():
    from stowage.engine.migrate.pacing import PacingError, Rate, TimeWindow, retry_delay
    night = TimeWindow.parse("19:00-07:00")
    assert night.is_open(dt.datetime(2026, 1, 1, 23, 0)) and night.is_open(dt.datetime(2026, 1, 2, 6, 59))
    assert not night.is_open(dt.datetime(2026, 1, 1, 12, 0))
    assert night.seconds_until_open(dt.datetime(2026, 1, 1, 18, 0)) == 3600
    assert TimeWindow.parse("08:00-17:30").seconds_until_open(dt.datetime(2026, 1, 1, 18, 0)) == 14 * 3600
    assert Rate.parse("20MB/s") == Rate(20.0, "MB") and Rate.parse("50") == Rate(50.0, "instances")
    for bad in ("25:00-07:00", "7-19"):
        with pytest.raises(PacingError):
            TimeWindow.parse(bad)
    with pytest.raises(PacingError):
        Rate.parse("fast")
    assert [retry_delay(30, n, False) for n in (1, 2, 3)] == [30, 60, 120]
    assert retry_delay(30, 1, True) == 120 and retry_delay(30, 20, False) == 3600


def test_sigterm_finishes_the_studies_in_flight_and_says_how_to_continue(make_server, tmp_path, corpus, legacy):
    server = make_server("--workers", "2")
    orthanc = pointed_at(legacy, server.port)
    # 10 instances/s: the 248 take 25 s, so the --status call and the signal below land
    # mid-way even on a loaded machine (at 25/s a slow --status once let it finish first)
    cmd = [sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(server.data_dir), "-q", "--from",
           f"ORTHANC@{HOST}:{orthanc.dicom_port}", "--parallel", "2", "--max-rate", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list((server.data_dir / "migrate").glob("*.sqlite")):
                with checkpoint(server.data_dir) as con:
                    if con.execute("SELECT count(*) FROM studies WHERE state = 'done'").fetchone()[0] >= 2:
                        break
            time.sleep(0.2)
        # in this process (conftest.cli): a new interpreter's imports took long enough on the
        # loaded machine (load 10) for the migration to end before the signal below
        status = cli("migrate", "--data-dir", str(server.data_dir), "--status")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status.returncode == 0 and "in flight" in status.stdout and "done" in status.stdout, status.stderr
    assert proc.returncode == 1, out + err
    assert "study(ies) not done: run the same command again to continue" in out, out + err
    with checkpoint(server.data_dir) as con:
        states = dict(con.execute("SELECT state, count(*) FROM studies GROUP BY 1").fetchall())
    assert "in-flight" not in states and states.get("pending", 0) > 0 and states["done"] >= 2, states


def test_outside_the_time_window_nothing_starts(tmp_path):
    """--window: outside it, not even the enumeration talks to the source; it says why and
    waits."""
    import socket
    import threading
    now = dt.datetime.now()
    opens = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    closes = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    with socket.socket() as source:  # the source's port: it listens, and never accepts
        source.bind((HOST, 0))
        source.listen(8)
        cmd = [sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(tmp_path / "data"), "-q", "--method",
               "get", "--from", f"LEGACY@{HOST}:{source.getsockname()[1]}", "--window", f"{opens}-{closes}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True)
        reader.start()
        try:
            wait_for(lambda: any("outside the window" in line for line in said) or proc.poll() is not None, 60,
                     lambda: f"migrate to say it waits for the window: {said}")
            assert proc.poll() is None, f"exited {proc.returncode}: {said}"  # waiting, not failing
            source.setblocking(False)
            with pytest.raises(BlockingIOError):  # and it has not even connected to the source
                source.accept()[0].close()
        finally:
            proc.kill()
            proc.wait(30)
            reader.join(30)
    assert any(f"outside the window {opens}-{closes}" in line for line in said), said
