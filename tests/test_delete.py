"""`stowage delete` against a running archive, with real peers: what it deletes (each
level) is gone at once for DCMTK findscu (counts included), movescu, getscu, `stowage
export` and `send`, and storage commitment (0x0112); both workers see it at once; a copy
sent again is stored again; kill -9 of the delete and of the server, and a catalog
rebuild, neither lose a live instance nor bring a deleted one back."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from conftest import CT, HOST, cli, dcmtk, export_all, series_instances
from stowage.engine.store.segment import iter_records
from test_commitment import Modality, refs_of
from test_find import findscu, storescu
from test_get import getscu
from test_move import movescu
from test_send import config_with, scps, stowage  # noqa: F401  (scps: fixture)

pytestmark = pytest.mark.timeout(600)
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def instances(out: Path, patient: str, study: str, series: str, n: int, src: Path = CT) -> list[Path]:
    """n instances of one series (fresh SOP Instance UIDs) of the given patient and study;
    the patient is named `<patient>^T`."""
    return series_instances(out, patient, study, series, n, src, PatientName=f"{patient}^T")


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def delete(data_dir: Path, *args: str, confirm: str | None = None) -> subprocess.CompletedProcess:
    """`stowage delete`, run in this process (conftest.cli: the same command code, without a new
    interpreter's imports, ~3-4 s a delete on the loaded 2-core machine); `confirm` answers
    its question, else it runs with --yes."""
    return cli("delete", "--data-dir", str(data_dir), *args, *([] if confirm is not None else ["--yes"]),
               input=confirm)


def delete_process(data_dir: Path, *args: str) -> subprocess.Popen:
    """`stowage delete --yes` as a process of its own, to be killed."""
    return subprocess.Popen([sys.executable, "-m", "stowage.cli", "delete", "--data-dir", str(data_dir), *args,
                             "--yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def find(port: int, out: Path, level: str, *keys: str, model: str = "-S") -> list[Dataset]:
    for p in out.glob("rsp*.dcm") if out.exists() else ():
        p.unlink()
    r, results = findscu(port, model, out, f"QueryRetrieveLevel={level}", *keys)
    assert r.returncode == 0, r.stderr
    return results


def visible(data_dir: Path) -> dict[str, int]:
    """Instances the catalog serves, per study (`stowage query`, as an administrator asks; run
    in this process: the kill -9 tests ask after every round, and a new interpreter's imports
    cost ~3 s a question on the loaded 2-core machine)."""
    r = cli("query", "--data-dir", str(data_dir), "--format", "json",
            "SELECT study_instance_uid AS s, count(*) AS n FROM instances GROUP BY 1")
    assert r.returncode == 0, r.stderr
    return {row["s"]: row["n"] for row in json.loads(r.stdout or "[]")}


def audit(data_dir: Path, event: str) -> list[dict]:
    return [d for d in map(json.loads, (data_dir / "audit.jsonl").read_text().splitlines()) if d.get("event") == event]


@pytest.fixture
def corpus(tmp_path):
    """Patient P1: study S1 (series A: 3, series B: 2), study S2 (series C: 2);
    patient P2: study S3 (series D: 3)."""
    u = {k: generate_uid() for k in ("S1", "S2", "S3", "A", "B", "C", "D")}
    files = {"A": instances(tmp_path / "in", "DELP1", u["S1"], u["A"], 3),
             "B": instances(tmp_path / "in", "DELP1", u["S1"], u["B"], 2),
             "C": instances(tmp_path / "in", "DELP1", u["S2"], u["C"], 2),
             "D": instances(tmp_path / "in", "DELP2", u["S3"], u["D"], 3)}
    return u, files


def test_each_level_is_gone_for_find_move_get_export_and_send(make_server, tmp_path, scps, corpus):  # noqa: F811
    u, files = corpus
    dest = scps(tmp_path / "rx", "+xa")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    server = make_server("--workers", "2", "--config", str(cfg))
    storescu(server.port, [p for ps in files.values() for p in ps])
    q = tmp_path / "q"

    def study_counts(patient: str) -> dict[str, int]:
        return {r.StudyInstanceUID: int(r.NumberOfStudyRelatedInstances)
                for r in find(server.port, q, "STUDY", f"PatientID={patient}", "StudyInstanceUID=",
                              "NumberOfStudyRelatedInstances=")}

    assert study_counts("DELP1") == {u["S1"]: 5, u["S2"]: 2}

    # instance
    gone = uid_of(files["A"][0])
    plan = delete(server.data_dir, "--instance", gone, confirm="n\n")
    assert plan.returncode != 0 and "1 instance(s)" in plan.stdout       # asked, answered no: nothing done
    assert len(find(server.port, q, "IMAGE", f"SeriesInstanceUID={u['A']}", "SOPInstanceUID=")) == 3
    r = delete(server.data_dir, "--instance", gone)
    assert r.returncode == 0, r.stderr
    assert "deleted 1 patient(s), 1 study(ies), 1 series, 1 instance(s)" in r.stdout
    images = find(server.port, q, "IMAGE", f"StudyInstanceUID={u['S1']}", f"SeriesInstanceUID={u['A']}",
                  "SOPInstanceUID=")
    assert {x.SOPInstanceUID for x in images} == {uid_of(p) for p in files["A"][1:]}
    assert study_counts("DELP1") == {u["S1"]: 4, u["S2"]: 2}
    series = find(server.port, q, "SERIES", f"StudyInstanceUID={u['S1']}", "SeriesInstanceUID=",
                  "NumberOfSeriesRelatedInstances=")
    assert {x.SeriesInstanceUID: int(x.NumberOfSeriesRelatedInstances) for x in series} == {u["A"]: 2, u["B"]: 2}

    # series
    assert delete(server.data_dir, "--series", u["B"]).returncode == 0
    series = find(server.port, q, "SERIES", f"StudyInstanceUID={u['S1']}", "SeriesInstanceUID=")
    assert [x.SeriesInstanceUID for x in series] == [u["A"]]
    assert study_counts("DELP1") == {u["S1"]: 2, u["S2"]: 2}

    # study
    assert delete(server.data_dir, "--study", u["S2"]).returncode == 0
    assert study_counts("DELP1") == {u["S1"]: 2}

    # patient
    r = delete(server.data_dir, "--patient", "DELP2", "--reason", "consent  withdrawn")
    assert r.returncode == 0 and "1 study(ies), 1 series, 3 instance(s)" in r.stdout, r.stdout + r.stderr
    r = cli("query", "--data-dir", str(server.data_dir), "--format", "json",
            "SELECT DISTINCT patient_id, reason, comment FROM deleted WHERE patient_id = 'DELP2'")
    assert json.loads(r.stdout) == [{"patient_id": "DELP2", "reason": "deleted", "comment": "consent withdrawn"}]
    patients = find(server.port, q, "PATIENT", "PatientID=", "NumberOfPatientRelatedStudies=", model="-P")
    assert [(p.PatientID, int(p.NumberOfPatientRelatedStudies)) for p in patients] == [("DELP1", 1)]

    # C-MOVE and C-GET send what is left, and nothing of what is gone
    r = movescu(server.port, "S", "DEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": u["S1"]})
    assert r.returncode == 0, r.stderr
    live = {uid_of(p) for p in files["A"][1:]}
    assert set(dest.received()) == live
    r = movescu(server.port, "S", "DEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": u["S2"]})
    r2 = movescu(server.port, "P", "DEST", {"QueryRetrieveLevel": "PATIENT", "PatientID": "DELP2"})
    assert set(dest.received()) == live, r.stderr + r2.stderr
    got = tmp_path / "get"
    r = getscu(server.port, "S", got, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": u["S1"]})
    assert r.returncode == 0, r.stderr
    getscu(server.port, "S", got, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": u["S1"],
                                   "SeriesInstanceUID": u["B"]})
    getscu(server.port, "S", got, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": u["S1"],
                                   "SeriesInstanceUID": u["A"], "SOPInstanceUID": gone})
    assert {uid_of(p) for p in got.iterdir()} == live

    # export and send
    r = export_all(server.data_dir, tmp_path / "export")
    assert r.returncode == 0, r.stderr
    assert {p.stem for p in (tmp_path / "export").glob("*.dcm")} == live
    r = stowage("send", "--config", str(cfg), "--data-dir", str(server.data_dir), "--to", "DEST", "-q",
                "--study", f"{u['S1']},{u['S2']},{u['S3']}")
    assert r.returncode == 0 and "2 completed, 0 warning, 0 failed" in r.stdout, r.stdout + r.stderr

    lines = audit(server.data_dir, "delete")
    assert [(d["scope"], d["instances"], d["actor"].startswith("cli:")) for d in lines] == [
        ("instance", 1, True), ("series", 2, True), ("study", 2, True), ("patient", 3, True)]
    assert lines[-1]["comment"] == "consent withdrawn"
    r = delete(server.data_dir, "--study", u["S2"])  # nothing left of it
    assert r.returncode != 0 and "nothing to delete" in r.stderr and "Traceback" not in r.stderr


def test_bad_selection_gets_one_clear_line(make_server, tmp_path):
    server = make_server("--workers", "1")
    for args, words in ((("--study", "1.2.x"), "not a valid UID"), ((), "choose exactly one"),
                        (("--study", "1.2.3", "--series", "1.2.4"), "choose exactly one"),
                        (("--instance", "1.2.3"), "nothing to delete")):
        r = delete(server.data_dir, *args)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_commitment_of_a_deleted_instance_fails_with_no_such_object(make_server, tmp_path):
    modality = Modality().listen()
    try:
        cfg = config_with(tmp_path, MODALITY=(HOST, modality.port))
        server = make_server("--workers", "2", "--config", str(cfg))
        files = instances(tmp_path / "in", "DELC", generate_uid(), generate_uid(), 3)
        storescu(server.port, files)
        refs = refs_of(files)
        assert delete(server.data_dir, "--instance", refs[1][1]).returncode == 0
        status, assoc = modality.request(server.port, refs, release=False)
        assert status.Status == 0
        report = modality.report(30)
        assoc.release()
        assert report.event_type == 2
        assert report.committed() == {refs[0][1], refs[2][1]}
        assert report.failed() == {refs[1][1]: 0x0112}
    finally:
        modality.stop()


def _find_assoc(port: int):
    ae = AE("FINDTEST")
    ae.add_requested_context(STUDY_FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    return assoc


def _images(assoc, study: str) -> set[str]:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.SOPInstanceUID = "IMAGE", study, ""
    out = set()
    for status, ident in assoc.send_c_find(ds, STUDY_FIND):
        assert status and status.Status in (0xFF00, 0xFF01, 0x0000), status
        if status.Status in (0xFF00, 0xFF01):
            out.add(ident.SOPInstanceUID)
    return out


def _worker_of(server, assoc) -> int:
    """PID of the worker process holding the association's server-side socket."""
    local_port = assoc.dul.socket.socket.getsockname()[1]
    for w in server.workers():
        for c in w.net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == local_port:
                return w.pid
    raise AssertionError("no worker holds the association")


def test_both_workers_see_a_delete_at_once(make_server, tmp_path):
    server = make_server("--workers", "2")
    study = generate_uid()
    files = instances(tmp_path / "in", "DELW", study, generate_uid(), 6)
    storescu(server.port, files)
    assocs, by_worker = [], {}
    try:
        for _ in range(8):  # associations held open at once land on the least-loaded worker
            a = _find_assoc(server.port)
            assocs.append(a)
            by_worker.setdefault(_worker_of(server, a), a)
            if len(by_worker) == 2:
                break
        assert len(by_worker) == 2, "could not reach both workers"
        for a in by_worker.values():  # each worker has read the catalog (and holds its views)
            assert _images(a, study) == {uid_of(p) for p in files}
        r = delete(server.data_dir, "--instance", uid_of(files[0]), "--instance", uid_of(files[1]))
        assert r.returncode == 0, r.stderr
        for a in by_worker.values():  # the next request, on each worker, without waiting
            assert _images(a, study) == {uid_of(p) for p in files[2:]}
    finally:
        for a in assocs:
            a.release()


def test_an_identical_copy_sent_again_after_a_delete_is_stored_again(make_server, tmp_path):
    server = make_server("--workers", "1")
    study = generate_uid()
    files = instances(tmp_path / "in", "DELR", study, generate_uid(), 3)
    storescu(server.port, files)
    storescu(server.port, files)  # identical: "already stored" (and the worker caches what the study holds)

    def records() -> int:
        return sum(1 for seg in (server.data_dir / "segments").glob("*.seg") for _ in iter_records(seg))

    assert records() == 3
    assert delete(server.data_dir, "--study", study).returncode == 0
    assert visible(server.data_dir).get(study) is None
    storescu(server.port, files)
    assert records() == 6, "the copies sent after the deletion were answered 'already stored'"
    assert visible(server.data_dir)[study] == 3
    q = tmp_path / "q"
    assert len(find(server.port, q, "IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID=")) == 3
    r = export_all(server.data_dir, tmp_path / "export")
    assert r.returncode == 0 and len(list((tmp_path / "export").glob("*.dcm"))) == 3
    # and delete it again: the new copies are hidden, the old tombstones stay
    assert delete(server.data_dir, "--study", study).returncode == 0
    assert visible(server.data_dir).get(study) is None


@pytest.mark.parametrize("policy", ["keep-newest", "keep-first"])
@pytest.mark.parametrize("sealed", [False, True])
def test_catalog_views_leave_tombstoned_records_out(tmp_path, policy, sealed):
    """The reader alone (no server): a tombstone hides its record in `instances` and in
    the study summaries behind C-FIND counts, from the tails and from sealed files; under
    either duplicates policy a copy received after the deletion is the one served."""
    import find_corpus as fc
    from stowage.catalog import tombstones
    from stowage.catalog.reader import Catalog
    from stowage.catalog.sealer import Sealer
    catalog_dir = tmp_path / "catalog"
    sealer = Sealer(catalog_dir, 0, compact_min_files=100)
    dss = fc.datasets()
    rows = fc.rows(dss)
    sealer.commit(rows)
    if sealed:
        sealer.seal()
    c = Catalog(catalog_dir, policy)

    def counts() -> dict[str, int]:
        _cols, got = c.execute("SELECT study_instance_uid, sum(instances) FROM study_parts GROUP BY 1")
        _cols, direct = c.execute("SELECT study_instance_uid, count(*) FROM instances GROUP BY 1")
        assert dict(got) == dict(direct)  # the summaries agree with the instances they summarise
        return dict(got)

    before = counts()
    victim = rows[0]
    tombstones.append(tmp_path, [tombstones.Tombstone(victim["sop_instance_uid"], victim["received_at"],
                                                      study_instance_uid=victim["study_instance_uid"])])
    assert c.lookup(victim["sop_instance_uid"]) is None
    assert counts() == {**before, victim["study_instance_uid"]: before[victim["study_instance_uid"]] - 1}
    _cols, deleted = c.execute("SELECT sop_instance_uid, reason FROM deleted")
    assert deleted == [(victim["sop_instance_uid"], "deleted")]
    again = fc.rows(dss[:1], segment="001-00000001.seg", start=10_000)  # the same instance, received later
    sealer.commit(again)
    if sealed:
        sealer.seal()
    assert c.lookup(victim["sop_instance_uid"])["received_at"] == c.versions(victim["sop_instance_uid"])[-1][
        "received_at"]
    assert counts() == before
    c.close()
    sealer.close()


def _storer(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(port), *map(str, files)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_9_during_deletes_loses_nothing_live_and_brings_nothing_back(make_server, tmp_path):
    """Deletes killed at random moments (and the server killed now and then), while stores
    go on: a study whose delete returned stays gone; a killed delete hides all of its study
    or none of it (one tombstone line); every other study keeps every instance; the same
    after a restart and after `stowage rebuild-catalog`."""
    rng = random.Random(1207)
    server = make_server("--workers", "2")
    per_study = 8
    studies = [generate_uid() for _ in range(12)]
    for i, s in enumerate(studies):
        storescu(server.port, instances(tmp_path / f"in{i}", f"K{i % 3}", s, generate_uid(), per_study))
    deleted, maybe, untouched = set(), set(), set(studies)
    extra = [instances(tmp_path / f"live{j}", "LIVE", generate_uid(), generate_uid(), 10) for j in range(6)]
    stored_live: set[str] = set()

    def check() -> None:
        v = visible(server.data_dir)
        for s in deleted:
            assert s not in v, "a deleted study came back"
        for s in untouched:
            assert v.get(s) == per_study, "a live instance was lost"
        for s in maybe:
            assert v.get(s, 0) in (0, per_study), "a killed delete hid part of a study"
        for s in stored_live:
            assert v.get(s) == 10, "a stored live instance was lost"

    # One delete left to finish tells how long one takes here; the others are killed at
    # random moments within that (or just after it).
    t0 = time.monotonic()
    first = delete_process(server.data_dir, "--study", studies[0])
    assert first.communicate(timeout=120) and first.returncode == 0
    duration = time.monotonic() - t0
    deleted.add(studies[0])
    untouched.discard(studies[0])
    check()
    for round_, study in enumerate(studies[1:10]):
        storer = _storer(server.port, extra[round_ % len(extra)]) if round_ < len(extra) else None
        proc = delete_process(server.data_dir, "--study", study)
        untouched.discard(study)
        time.sleep(rng.uniform(0.05, 1.2) * duration)
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        (deleted if proc.returncode == 0 else maybe).add(study)
        if storer is not None:
            storer.wait(120)
            if storer.returncode == 0:
                stored_live.add(pydicom.dcmread(extra[round_][0], stop_before_pixels=True).StudyInstanceUID)
        if round_ % 3 == 2:  # and the server, at any moment
            server.kill()
            server.start()
        check()
    assert maybe, "no delete was killed before it returned"
    server.kill()
    server.start()
    check()
    assert server.stop() == 0
    r = stowage("rebuild-catalog", "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stderr
    check()
    server.start()
    check()
    q = tmp_path / "q"
    found = {x.StudyInstanceUID for x in find(server.port, q, "STUDY", "StudyInstanceUID=")}
    assert not found & deleted and untouched <= found
