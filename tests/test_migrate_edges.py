"""`stowage migrate` at the edges a PACS administrator meets moving an old archive out: a
source whose IMAGE-level answers are cut short without a word, a migration planned in
date ranges, studies that gain instances at the source after they were migrated, a
damaged checkpoint. The source is a pynetdicom Study Root Q/R SCP run in this process
(its answers shaped by each test); `stowage migrate` runs as a subprocess, by C-GET, into
a real data directory, and what the archive holds is checked through the catalog."""
from __future__ import annotations

import json
from fnmatch import fnmatchcase
import os
import subprocess
import sys
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from conftest import HOST, cli, free_port, fresh_uid, series_instances, wait_for
from refusing_qr_scp import find_response, in_range
from test_cli_interrupt import _ctrl_c_as_from_a_terminal


def migrate(data_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data_dir), "-q",
                           "--method", "get", "--retry-delay", "0.1", *args], capture_output=True, text=True,
                          timeout=timeout)


def held(data_dir: Path) -> dict[str, int]:
    """Instances the archive holds, per study (the catalog, through `stowage query`)."""
    r = cli("query", "--data-dir", str(data_dir), "--format", "json",
            "SELECT study_instance_uid AS s, count(*) AS n FROM instances GROUP BY 1")
    assert r.returncode == 0, r.stderr
    return {row["s"]: row["n"] for row in json.loads(r.stdout)}


@dataclass
class Source:
    """A legacy archive: Study Root C-FIND (STUDY, SERIES, IMAGE) and C-GET over `files`,
    on a free loopback port, in a thread of this process. `image_cap`: answer at most that
    many IMAGE-level matches, with success (a "max query results" that says nothing);
    `lost`: SOP Instance UIDs in the index but not sent (their files are gone);
    `find_delay`: seconds before each C-FIND answer (a slow, busy archive); `gate`: each
    C-FIND waits until it is set (a test holds one there), `finds` counts them."""

    files: list[Path]
    aet: str = "OLDPACS"
    image_cap: int = 0
    lost: set[str] = field(default_factory=set)
    find_delay: float = 0.0
    move_port: int = 0  # where STOWAGE, the C-MOVE destination, listens
    odd_uids: list[str] = field(default_factory=list)  # more STUDY-level matches, with these UIDs
    gate: threading.Event = field(default_factory=threading.Event)
    finds: int = 0

    def __post_init__(self) -> None:
        self.port = free_port()
        self.items = [pydicom.dcmread(p, stop_before_pixels=True) for p in self.files]
        self.paths = {ds.SOPInstanceUID: p for ds, p in zip(self.items, self.files)}
        self.sent = 0  # C-STORE sub-operations of C-GETs and C-MOVEs
        self.gate.set()

    def add(self, files: list[Path]) -> None:
        """New instances arrive at the source (while, or after, it is migrated)."""
        for p in files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            self.items.append(ds)
            self.paths[ds.SOPInstanceUID] = p

    def _find(self, event):
        self.finds += 1
        self.gate.wait(120)
        time.sleep(self.find_delay)
        q = event.identifier
        level = q.QueryRetrieveLevel
        study, series = str(q.get("StudyInstanceUID", "") or ""), str(q.get("SeriesInstanceUID", "") or "")
        seen: set[str] = set()
        if level == "STUDY":
            for uid in self.odd_uids:  # a broken index: a wildcard, a list, nothing
                odd = Dataset()
                odd.QueryRetrieveLevel, odd.StudyInstanceUID, odd.PatientID = level, uid, "ODD"
                yield 0xFF00, odd
        for ds in list(self.items):
            if study and not fnmatchcase(ds.StudyInstanceUID, study) or series and ds.SeriesInstanceUID != series:
                continue  # a sloppy SCP: wildcards in a UID key match
            if not in_range(str(ds.get("StudyDate", "")), str(q.get("StudyDate", "") or "")):
                continue
            key = {"STUDY": ds.StudyInstanceUID, "SERIES": ds.SeriesInstanceUID}.get(level, ds.SOPInstanceUID)
            if key in seen:
                continue
            if level == "IMAGE" and self.image_cap and len(seen) >= self.image_cap:
                break
            seen.add(key)
            yield 0xFF00, find_response(level, ds, sum(d.StudyInstanceUID == ds.StudyInstanceUID for d in self.items))

    def _move(self, event):
        if event.move_destination.strip() != "STOWAGE":
            yield None, None
            return
        yield HOST, self.move_port
        yield from self._get(event)

    def _get(self, event):
        study = str(event.identifier.get("StudyInstanceUID", ""))
        uids = [ds.SOPInstanceUID for ds in self.items if fnmatchcase(ds.StudyInstanceUID, study) and
                ds.SOPInstanceUID not in self.lost]
        yield len(uids)
        for uid in uids:
            self.sent += 1
            yield 0xFF00, pydicom.dcmread(self.paths[uid])

    def __enter__(self) -> "Source":
        ae = AE(self.aet)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.requested_contexts = StoragePresentationContexts  # C-MOVE: we open the association
        for cx in StoragePresentationContexts:  # C-GET: the requestor takes the SCP role for these
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=False)
        self.server = ae.start_server((HOST, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get),
                                                    (evt.EVT_C_MOVE, self._move)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    @property
    def address(self) -> str:
        return f"{self.aet}@{HOST}:{self.port}"


def study(root: Path, n: int, date: str, series: int = 1) -> list[Path]:
    """A study of `n` CT instances (in `series` series) on `date`, as Part-10 files."""
    uid, patient = fresh_uid(), f"P{date}"
    files: list[Path] = []
    for s in range(series):
        files += series_instances(root / uid[-10:] / str(s), patient, uid, fresh_uid(), n // series,
                                  StudyDate=date, PatientName=f"DOE^{date}")
    return files


def test_a_study_whose_image_level_answer_is_cut_short_is_not_called_done(tmp_path):
    """The source counts 6 instances at study level, but answers IMAGE-level C-FIND with at
    most 2 (success, no word of a cap) and sends 5 of the 6 (one file lost): the 2 listed
    are there, yet the study is not verified, and the report says why. (It was "done",
    exit status 0, one instance short.) A study whose instances all arrive is done, its
    size checked against the study-level count."""
    short, whole = study(tmp_path / "src", 6, "20190304", series=2), study(tmp_path / "src", 4, "20190305")
    lost = pydicom.dcmread(short[-1], stop_before_pixels=True).SOPInstanceUID
    data = tmp_path / "data"
    with Source(short + whole, image_cap=2, lost={lost}) as source:
        r = migrate(data, "--from", source.address, "--retries", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "studies: 2 found, 1 done, 1 failed" in r.stdout, r.stdout
    failed = [line for line in r.stdout.splitlines() if "failed study" in line]
    assert len(failed) == 1 and "1 of 6 instances not in the archive" in failed[0], failed
    assert "study-level C-FIND counts 6 instances, its IMAGE-level C-FIND listed" in failed[0], failed
    short_uid = pydicom.dcmread(short[0], stop_before_pixels=True).StudyInstanceUID
    whole_uid = pydicom.dcmread(whole[0], stop_before_pixels=True).StudyInstanceUID
    assert held(data) == {short_uid: 5, whole_uid: 4}
    assert "instances: 10 expected" in r.stdout and "9 verified" in r.stdout, r.stdout


def test_instances_deleted_at_the_source_after_the_enumeration(tmp_path):
    """The enumeration counted 4 instances; one is deleted at the source before the study's
    turn comes: the listing's 3 are all there, the source's count taken again says 3, and
    the study is done (a short listing alone is not trusted, a fresh count is)."""
    files = study(tmp_path / "src", 4, "20210707")
    data = tmp_path / "data"
    with Source(files) as source:
        dry = migrate(data, "--from", source.address, "--dry-run")
        assert dry.returncode == 0 and "4 instances expected" in dry.stdout, dry.stdout + dry.stderr
        source.items.pop()
        r = migrate(data, "--from", source.address, "--retries", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "studies: 1 found, 1 done, 0 failed" in r.stdout and "3 expected" in r.stdout, r.stdout
    assert sum(held(data).values()) == 3


def test_study_uids_with_wildcards_or_lists_are_left_out_and_said(tmp_path):
    """A source whose index answers studies with StudyInstanceUID "*", "1.2.3?" or a list
    (and that wildcard-matches a UID key when asked to retrieve): those are left out with a
    warning naming them; the others migrate, each instance sent once (the "*" study was
    retrieved as every study of the archive, again at every attempt)."""
    files = study(tmp_path / "src", 2, "20180101") + study(tmp_path / "src", 2, "20180102")
    data = tmp_path / "data"
    with Source(files, odd_uids=["*", "1.2.3?", "1.2.3\\1.2.4"]) as source:
        r = migrate(data, "--from", source.address, "--find-limit", "100")
        sent = source.sent
    assert r.returncode == 0, r.stdout + r.stderr
    assert "studies: 2 found, 2 done, 0 failed" in r.stdout, r.stdout
    for odd in ("'*'", "'1.2.3?'"):
        assert f"StudyInstanceUID {odd} (patient 'ODD'): a wildcard or a list names no one study; left out" \
            in r.stderr, r.stderr
    assert sent == len(files) and sum(held(data).values()) == len(files)


def test_a_migration_planned_in_date_ranges(tmp_path):
    """The last years first (--since), then everything: the second run finds and pulls the
    older studies (it reused the first run's enumeration, reported every study done and
    exited 0 with the older ones never asked for). A run with a range pulls only the
    studies of that range, even those an earlier run found, and says what it left."""
    dates = ["20240110", "20231231", "20150606", "19990101"]
    studies = {d: study(tmp_path / "src", 2, d) for d in dates}
    uid = {d: pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID for d, f in studies.items()}
    data = tmp_path / "data"
    with Source([p for files in studies.values() for p in files]) as source:
        dry = migrate(data, "--from", source.address, "--dry-run")  # everything found, nothing pulled
        assert dry.returncode == 0 and "dry run: 4 of 4 studies to pull" in dry.stdout, dry.stdout + dry.stderr
        recent = migrate(data, "--from", source.address, "--since", "2023-12-31")
        assert recent.returncode == 0, recent.stdout + recent.stderr
        assert held(data) == {uid["20240110"]: 2, uid["20231231"]: 2}
        assert "2 study(ies) not done are outside --since/--until" in recent.stdout, recent.stdout
        middle = migrate(data, "--from", source.address, "--since", "2000-01-01", "--until", "20230101", "--dry-run")
        assert middle.returncode == 0 and "dry run: 1 of 1 studies to pull" in middle.stdout, middle.stdout
        rest = migrate(data, "--from", source.address)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "studies: 4 found, 4 done, 0 failed" in rest.stdout, rest.stdout
    assert held(data) == {uid[d]: 2 for d in dates}


def test_fresh_ranges_are_enumerated_too(tmp_path):
    """A first run limited to recent years never asked the source for older studies; a run
    of everything afterwards must (the checkpoint's windows were reused as they were)."""
    old, new = study(tmp_path / "src", 2, "20010101"), study(tmp_path / "src", 2, "20250101")
    data = tmp_path / "data"
    with Source(old + new) as source:
        first = migrate(data, "--from", source.address, "--since", "2020-01-01")
        assert first.returncode == 0 and "studies: 1 found, 1 done" in first.stdout, first.stdout + first.stderr
        everything = migrate(data, "--from", source.address)
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert "studies: 2 found, 2 done, 0 failed" in everything.stdout, everything.stdout
    assert sum(held(data).values()) == 4


def test_rescan_pulls_what_a_done_study_gained_at_the_source(tmp_path):
    """A study migrated, then a late series arrives at the source (a report, a
    reconstruction): --rescan pulls that study again, and the archive ends with every
    instance, the old ones stored once (--rescan kept it done, exit status 0, the new
    series never pulled)."""
    files = study(tmp_path / "src", 3, "20220202")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    patient = pydicom.dcmread(files[0], stop_before_pixels=True).PatientID
    data = tmp_path / "data"
    with Source(files) as source:
        first = migrate(data, "--from", source.address)
        assert first.returncode == 0, first.stdout + first.stderr
        assert held(data) == {study_uid: 3}
        source.add(series_instances(tmp_path / "late", patient, study_uid, fresh_uid(), 2, StudyDate="20220202"))
        again = migrate(data, "--from", source.address)  # no --rescan: what was done stays done
        assert again.returncode == 0 and held(data) == {study_uid: 3}, again.stdout + again.stderr
        rescan = migrate(data, "--from", source.address, "--rescan")
    assert rescan.returncode == 0, rescan.stdout + rescan.stderr
    assert "studies: 1 found, 1 done, 0 failed" in rescan.stdout and "5 verified" in rescan.stdout, rescan.stdout
    assert held(data) == {study_uid: 5}
    r = cli("query", "--data-dir", str(data), "--format", "csv", "SELECT count(*) AS n FROM records")
    assert r.stdout.split() == ["n", "5"], r.stdout  # the three already held were not stored again


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_one_line_saying_what_to_do(tmp_path, damage):
    """A checkpoint overwritten or cut short (a disk error, a bad copy): migrate and
    --status each say so in one line with what to do, never a traceback."""
    files = study(tmp_path / "src", 2, "20200101")
    data = tmp_path / "data"
    with Source(files) as source:
        r = migrate(data, "--from", source.address)
        assert r.returncode == 0, r.stdout + r.stderr
        (path,) = (data / "migrate").glob("*.sqlite")
        raw = path.read_bytes()
        path.write_bytes(os.urandom(len(raw)) if damage == "garbage" else raw[:len(raw) // 3 * 2 // 4096 * 4096 or 100])
        for p in path.parent.glob(path.name + "-*"):
            p.unlink()
        again = migrate(data, "--from", source.address)
    status = subprocess.run([sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data), "--status"],
                            capture_output=True, text=True, timeout=120)
    for out in (again, status):
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert f"checkpoint {path} cannot be read" in out.stderr and "move it aside" in out.stderr, out.stderr


def test_a_full_archive_disk_stops_the_migration_instead_of_failing_every_study(tmp_path):
    """The archive's disk reaches min_free_bytes overnight: the migration stops starting
    studies, says so in one line with what to do, and spends no study's attempts (it went
    on pulling every remaining study from the source, each refused 0xA700, until all were
    "failed"). Once there is room, the same command pulls everything."""
    import shutil
    files = [p for d in ("20200101", "20200102", "20200103", "20200104", "20200105")
             for p in study(tmp_path / "src", 2, d)]
    data = tmp_path / "data"
    data.mkdir()
    no_room = str(shutil.disk_usage(data).free + (1 << 30))
    with Source(files) as source:
        r = subprocess.run([sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data), "-q",
                            "--method", "get", "--from", source.address, "--parallel", "1", "--retries", "2",
                            "--retry-delay", "0.1"], capture_output=True, text=True, timeout=240,
                           env=dict(os.environ, STOWAGE_MIN_FREE_BYTES=no_room))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "stopped: the archive's disk is full" in r.stderr, r.stderr
        assert "studies: 5 found, 0 done, 0 failed" in r.stdout, r.stdout
        status = cli("migrate", "--data-dir", str(data), "--status")
        assert "(1 waiting to retry)" not in status.stdout, status.stdout  # the attempt was given back
        assert held(data) == {}
        again = migrate(data, "--from", source.address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "studies: 5 found, 5 done, 0 failed" in again.stdout, again.stdout
    assert sum(held(data).values()) == 10


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_the_enumeration(tmp_path, sig):
    """Ctrl-C (or a service stop) while the source is still being enumerated: one line
    saying the next run goes on from there, exit status 130, as during the pulls (it was
    click's bare "Aborted!", or a traceback from SIGTERM); the re-run finishes the job."""
    files = [p for d in ("20200101", "20210101", "20220101") for p in study(tmp_path / "src", 1, d)]
    data = tmp_path / "data"
    with Source(files) as source:
        source.gate.clear()  # the enumeration's first C-FIND is held while the signal comes
        # SIGINT to its default in the child: pytest-xdist's workers ignore it, and a child
        # inherits that (its Ctrl-C was ignored under ops/test.sh: the migration ran to its end)
        proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data), "-q",
                                 "--method", "get", "--from", source.address, "--since", "2020-01-01"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ctrl_c_as_from_a_terminal)
        try:
            deadline = time.monotonic() + 120
            while source.finds == 0 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert source.finds, "the migration never asked the source"
            proc.send_signal(sig)
            time.sleep(0.5)  # the signal taken while the C-FIND waits; then its answer comes
            source.gate.set()
            out, err = proc.communicate(timeout=60)
        finally:
            source.gate.set()
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, out + err
        assert "Traceback" not in err and "Aborted" not in err, err
        assert "interrupted" in out + err and "run the same command again" in out + err, out + err
        again = migrate(data, "--from", source.address, "--since", "2020-01-01")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "studies: 3 found, 3 done, 0 failed" in again.stdout, again.stdout


def test_serve_stopping_mid_migration_stops_a_c_move_migration(make_server, tmp_path):
    """C-MOVE into `stowage serve`, and serve dies midway (an upgrade, the OOM killer): the
    migration stops starting studies and says to start serve again, the studies not done
    keep their attempts (every remaining study was moved to nobody, failed and backed off
    until all were "failed"); with serve back, the same command finishes."""
    files = [p for d in range(1, 9) for p in study(tmp_path / "src", 2, f"202001{d:02d}")]
    server = make_server("--workers", "1")
    data = server.data_dir
    with Source(files, move_port=server.port) as source:
        proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data), "-q",
                                 "--from", source.address, "--parallel", "1", "--max-rate", "4",
                                 "--retry-delay", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def done() -> int:
                try:
                    r = cli("migrate", "--data-dir", str(data), "--status")
                except Exception:  # noqa: BLE001 - not there yet
                    return 0
                return "studies: 8 found, 1 done" in r.stdout or "studies: 8 found, 2 done" in r.stdout
            wait_for(done, 120, "a study or two migrated")
            server.kill()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, out + err
        assert "stopped: `stowage serve --data-dir" in err and "is not running; start it" in err, err
        assert "Traceback" not in err, err
        status = cli("migrate", "--data-dir", str(data), "--status")
        assert ", 0 failed," in status.stdout and "waiting to retry" not in status.stdout, status.stdout
        make_server("--workers", "1", data_dir=data, port=server.port)
        again = migrate(data, "--from", source.address, "--method", "move")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "studies: 8 found, 8 done, 0 failed" in again.stdout, again.stdout
    assert sum(held(data).values()) == 16


def test_two_migrations_of_one_source_named_two_ways(tmp_path):
    """The same archive named twice (127.0.0.1 and localhost, here under two AE titles, which
    most archives answer alike): the second migration is refused in one line while the first
    runs (each had its own checkpoint, and both pulled everything); the same name twice
    was refused already."""
    files = study(tmp_path / "src", 2, "20200101")
    data = tmp_path / "data"
    with Source(files, find_delay=2.0) as source:
        cmd = [sys.executable, "-m", "stowage.cli", "migrate", "--data-dir", str(data), "-q", "--method", "get"]
        first = subprocess.Popen([*cmd, "--from", source.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            wait_for(lambda: list((data / "migrate").glob("*.sqlite")), 60, "the first migration's checkpoint")
            for other in (source.address, f"OTHER@localhost:{source.port}"):
                second = subprocess.run([*cmd, "--from", other], capture_output=True, text=True, timeout=120)
                assert second.returncode == 1, second.stdout + second.stderr
                assert "another stowage migrate is running from" in second.stderr, second.stderr
                assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
            out, err = first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0, out + err
    assert [p.name for p in (data / "migrate").glob("*.sqlite")] == [f"OLDPACS_{HOST}_{source.port}.sqlite"]
