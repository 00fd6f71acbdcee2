"""Forwarding (docs/forwarding.md) to real archives: Orthanc (the Debian package) down when
the instances arrive, back later, gets every study in order of arrival and answers storage
commitment on a new association; a second `stowage serve` gets de-identified copies and
commits them on the same association, while an instance that must not leave (burned-in
annotation) is parked with the reason."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from conftest import HOST, MR, export_all, free_port, series_instances, wait_for
from stowage.engine.runtime import config as cfg
from test_forward import queue_counts, storescu, stowage, uids, write_config


def commit_counts(data_dir: Path) -> dict[str, list[int]]:
    """`stowage queue`'s commitment table: destination -> [wanted, committed, failed]."""
    r = stowage("queue", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("commitment", 1)[1] if "\ncommitment" in r.stdout else ""
    return {m[1]: [int(n) for n in m.groups()[1:]] for m in re.finditer(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$",
                                                                         table, re.M)}


def restart(orthanc) -> None:
    """Start a stopped Orthanc again on its configuration (same ports, same database)."""
    from stowage.bench.harness.orthanc import executable
    with open(orthanc.log_path, "ab") as log:
        orthanc.proc = subprocess.Popen([executable(), str(orthanc.log_path.parent / "orthanc.json")], stdout=log,
                                        stderr=subprocess.STDOUT)
    orthanc._wait_ready(30)


def orthanc_arrivals(orthanc) -> list[tuple[str, str]]:
    """(Study Instance UID, SOP Instance UID) of every instance Orthanc stored, in the order it
    stored them (its change log)."""
    changes = orthanc.rest("GET", "/changes?since=0&limit=10000")["Changes"]
    out = []
    for change in changes:
        if change["ChangeType"] == "NewInstance":
            tags = orthanc.rest("GET", f"/instances/{change['ID']}/simplified-tags")
            out.append((tags["StudyInstanceUID"], tags["SOPInstanceUID"]))
    return out


def test_orthanc_down_then_back_gets_each_study_in_order_and_commits(make_server, orthancs, tmp_path):
    """Two studies arrive interleaved while Orthanc is down; once it is back every instance
    arrives, each study's in the order stowage received them, and Orthanc's storage
    commitment report (on a new association to the rule's commit_port) marks them committed."""
    commit_port = free_port()
    orthanc = orthancs(tmp_path / "orthanc", {"stowage": ("STOWAGE", HOST, commit_port)})
    orthanc.stop()  # down when the instances arrive
    conf = write_config(tmp_path / "f.toml", {"ORTHANC": orthanc.dicom_port},
                        f'[[forward]]\nto = "ORTHANC"\nmodality = "CT"\ncommit = true\ncommit_port = {commit_port}\n'
                        'quiet = 1\n')
    a = series_instances(tmp_path / "a", "PA", generate_uid(), generate_uid(), 6)
    b = series_instances(tmp_path / "b", "PB", generate_uid(), generate_uid(), 4)
    mr = series_instances(tmp_path / "mr", "PC", generate_uid(), generate_uid(), 1, src=MR)
    order = [a[0], b[0], a[3], a[1], b[3], b[1], mr[0], a[5], a[2], b[2], a[4]]  # as the modalities send
    server = make_server("--workers", "2", "--config", str(conf), STOWAGE_BIND=HOST)
    for f in order:
        storescu(server.port, [f])
    wait_for(lambda: queue_counts(server.data_dir).get("ORTHANC", [0])[0] == 10 and "ORTHANC unreachable"
             in server.log(), 30, lambda: f"entries not pending for the stopped Orthanc:\n{server.log()}")

    restart(orthanc)
    wait_for(lambda: len(orthanc.rest("GET", "/instances")) == 10, 60,
             lambda: f"Orthanc did not get the 10 CT:\n{server.log()}")
    arrived = orthanc_arrivals(orthanc)
    assert {uid for _s, uid in arrived} == uids(a + b)  # and not the MR
    sent = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in order if f != mr[0]]
    study_of = {uid: study for study, uid in arrived}
    for study in set(study_of.values()):
        assert [u for _s, u in arrived if _s == study] == [u for u in sent if study_of[u] == study]
    wait_for(lambda: commit_counts(server.data_dir).get("ORTHANC") == [0, 10, 0], 90,
             lambda: f"not committed:\n{stowage('queue', '--data-dir', str(server.data_dir)).stdout}\n{server.log()}")
    assert queue_counts(server.data_dir)["ORTHANC"] == [0, 10, 0, 0]


def test_deidentified_forwarding_to_stowage_committed_and_quarantine_parked(make_server, tmp_path):
    """A rule with deidentify = "TRIAL" sends a second archive de-identified copies only (new
    UIDs, no patient name); their commitment comes back on the same association; an instance
    with burned-in annotation is parked with the reason and never leaves."""
    dest = make_server("--workers", "1", data_dir=tmp_path / "dest")
    conf = write_config(tmp_path / "f.toml", {"RESEARCH": dest.port},
                        '[projects.TRIAL]\n[[forward]]\nto = "RESEARCH"\ndeidentify = "TRIAL"\ncommit = true\n'
                        'quiet = 1\nlevel = "study"\n')
    conf.write_text(conf.read_text().replace("[remotes.RESEARCH]", '[remotes.RESEARCH]\nae_title = "STOWAGE"'))
    study = generate_uid()
    files = series_instances(tmp_path / "s", "SECRET-ID", study, generate_uid(), 3, PatientName="SECRET^NAME")
    burned = series_instances(tmp_path / "burned", "SECRET-ID", study, generate_uid(), 1, BurnedInAnnotation="YES")
    source = make_server("--workers", "1", "--config", str(conf), data_dir=tmp_path / "source")
    storescu(source.port, files + burned)
    wait_for(lambda: queue_counts(source.data_dir).get("RESEARCH") == [0, 3, 1, 0], 60,
             lambda: f"not 3 done and 1 parked:\n{source.log()}")
    r = stowage("queue", "--data-dir", str(source.data_dir), "--parked")
    parked = [line for line in r.stdout.splitlines() if line.startswith("parked ")]
    assert len(parked) == 1 and str(pydicom.dcmread(burned[0]).SOPInstanceUID) in parked[0], r.stdout
    assert "not de-identified under project TRIAL (quarantined): Burned In Annotation" in parked[0], r.stdout

    r = export_all(dest.data_dir, tmp_path / "got")
    assert r.returncode == 0, r.stderr
    got = [pydicom.dcmread(p) for p in (tmp_path / "got").iterdir()]
    assert len(got) == 3
    originals = uids(files + burned)
    for ds in got:
        assert str(ds.SOPInstanceUID) not in originals and str(ds.StudyInstanceUID) != study
        assert "SECRET" not in str(ds.get("PatientName", "")) + str(ds.get("PatientID", ""))
        assert ds.PatientIdentityRemoved == "YES"
    wait_for(lambda: commit_counts(source.data_dir).get("RESEARCH") == [0, 3, 0], 60,
             lambda: f"not committed:\n{stowage('queue', '--data-dir', str(source.data_dir)).stdout}\n{source.log()}")


def test_a_rule_naming_an_unknown_project_is_one_clear_line(tmp_path):
    conf = write_config(tmp_path / "f.toml", {"DEST": 104}, '[[forward]]\nto = "DEST"\ndeidentify = "NOPE"\n')
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "queue", "--config", str(conf), "--data-dir",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "forward rule 'rule-1': deidentify = 'NOPE' is not a configured [projects.NAME]" in r.stderr, r.stderr


def test_kill_9_while_draining_resends_only_what_was_in_flight(make_server, tmp_path):
    """A full queue (the destination was down) is draining into a pynetdicom SCP when serve
    is killed -9; after the restart every instance has arrived, and the only ones the
    destination got twice are entries that were not yet marked done at the kill."""
    import sqlite3
    import threading
    import time as _time
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def on_store(event):
        _time.sleep(0.005)  # a destination slower than us: the kill lands mid-drain
        with lock:
            uid = str(event.request.AffectedSOPInstanceUID)
            calls[uid] = calls.get(uid, 0) + 1
        return 0x0000
    def done() -> set[str]:  # read from the queue itself: polled, a `stowage queue` per poll is slow
        path = server.data_dir / "forward" / "queue.sqlite"
        if not path.is_file():
            return set()
        db = sqlite3.connect(path, timeout=10)
        try:
            return {u for u, in db.execute("SELECT sop_instance_uid FROM entries WHERE state = 'done'")}
        except sqlite3.OperationalError:  # not created yet
            return set()
        finally:
            db.close()

    def pending() -> int:
        db = sqlite3.connect(server.data_dir / "forward" / "queue.sqlite", timeout=10)
        try:
            return db.execute("SELECT count(*) FROM entries WHERE state = 'pending'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()
    n = 300  # more than one batch (256 entries per association)
    port = free_port()
    conf = write_config(tmp_path / "f.toml", {"SLOW": port}, '[[forward]]\nto = "SLOW"\n')
    files = series_instances(tmp_path / "mr", "PK", generate_uid(), generate_uid(), n, src=MR)
    server = make_server("--workers", "1", "--config", str(conf))
    storescu(server.port, files)
    wait_for(lambda: (server.data_dir / "forward" / "queue.sqlite").is_file() and pending() == n, 60,
             "entries not queued")
    ae = AE("SLOW")
    ae.supported_contexts = AllStoragePresentationContexts
    scp = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        wait_for(lambda: 0 < len(done()) < n, 60, "the drain did not start", interval=0.02)
        server.kill()
        done_at_kill = done()
        assert 0 < len(done_at_kill) < n
        server = make_server("--workers", "1", "--config", str(conf), data_dir=server.data_dir, port=server.port)
        wait_for(lambda: len(done()) == n, 90, lambda: f"not every entry delivered after the restart:\n{server.log()}")
        assert queue_counts(server.data_dir)["SLOW"] == [0, n, 0, 0]
    finally:
        scp.shutdown()
    assert set(calls) == uids(files)
    twice = {u for u, n in calls.items() if n > 1}
    assert not twice & done_at_kill, "an entry marked done before the kill was sent again"
    assert all(n <= 2 for n in calls.values())


def test_commitment_verdicts_failed_and_refused_are_recorded(tmp_path):
    """The verdicts a commitment SCP can give, recorded per entry: a pynetdicom SCP that
    commits one instance and fails the other (0x0112, no such object instance) in a report
    on the same association; then an SCP that does not offer the service at all."""
    import threading
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification
    from stowage.engine.forward.commitment import Commitments
    from stowage.engine.forward.queue import Queue
    from stowage.engine.transfer.requestor import Peer
    commitment = "1.2.840.10008.1.20.1"

    def on_action(event):
        info = event.action_information
        refs = list(info.ReferencedSOPSequence)

        def report():
            reply = pydicom.Dataset()
            reply.TransactionUID = info.TransactionUID
            reply.ReferencedSOPSequence = refs[:1]
            failed = pydicom.Dataset()
            failed.ReferencedSOPClassUID = refs[1].ReferencedSOPClassUID
            failed.ReferencedSOPInstanceUID = refs[1].ReferencedSOPInstanceUID
            failed.FailureReason = 0x0112
            reply.FailedSOPSequence = [failed]
            event.assoc.send_n_event_report(reply, 2, commitment, "1.2.840.10008.1.20.1.1")
        threading.Timer(0.2, report).start()
        return 0x0000, None

    config = cfg.load(write_config(tmp_path / "f.toml", {"SCP": 104},
                                   '[[forward]]\nname = "c"\nto = "SCP"\ncommit = true\nquiet = 0\n'), env={},
                      overrides={"data_dir": tmp_path / "d"})
    q = Queue(tmp_path / "d")
    q.start_cursor(0)
    rows = [("SCP", "c", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3", "000-1.seg",
             i, 100, 1000 + i, "1.2.3.9", 0.0, "", "1.2.3") for i in range(2)]
    assert q.add(rows, 1001) == 2
    q.settle([(e.id, 0) for e in q.due("SCP", 10)], [], [])
    for offers in (True, False):
        ae = AE("SCP")
        ae.add_supported_context(commitment if offers else Verification)
        port = free_port()
        scp = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)])
        try:
            assert Commitments(config, "SCP").request_due(q, Peer("SCP", HOST, port)) == 1
        finally:
            scp.shutdown()
        if offers:
            assert q.commitments() == {("SCP", "committed"): 1, ("SCP", "failed"): 1}
            (_d, uid, reason), = q.not_committed()
            assert uid == "1.2.3.1" and reason.startswith("failure reason 0x0112 (transaction ")
            q.record_commitment([(e, "wanted", "") for e in (1, 2)])  # ask again, of a peer without the service
    assert q.commitments() == {("SCP", "failed"): 2}
    assert all("aborted the association request (does it offer Storage Commitment Push Model as SCP?)" in r
               for _d, _u, r in q.not_committed())
    q.close()


def test_a_commitment_that_never_comes_back_ends_failed_with_the_reason(tmp_path):
    """A destination that takes the N-ACTION but never sends the N-EVENT-REPORT: each
    request waits the rule's commit_timeout; the entries stay wanted with the reason
    ("no report within 1 s") until commit_tries requests went unanswered, then their
    commitment is failed with it; `stowage queue --retry` asks again."""
    from pynetdicom import AE, evt
    from stowage.engine.forward.commitment import Commitments
    from stowage.engine.forward.queue import Queue
    from stowage.engine.transfer.requestor import Peer
    actions = []

    def on_action(event):
        actions.append(str(event.action_information.TransactionUID))
        return 0x0000, None  # taken; no report will follow

    data = tmp_path / "d"
    config = cfg.load(write_config(tmp_path / "f.toml", {"SILENT": 104},
                                   '[[forward]]\nname = "c"\nto = "SILENT"\ncommit = true\nquiet = 0\n'
                                   'commit_timeout = 1\ncommit_tries = 2\n'), env={}, overrides={"data_dir": data})
    q = Queue(data)
    q.start_cursor(0)
    assert q.add([("SILENT", "c", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3",
                   "000-1.seg", i, 100, 1000 + i, "1.2.3.9", 0.0, "", "1.2.3") for i in range(2)], 1001) == 2
    q.settle([(e.id, 0) for e in q.due("SILENT", 10)], [], [])
    ae = AE("SILENT")
    ae.add_supported_context("1.2.840.10008.1.20.1")
    port = free_port()
    scp = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    try:
        commitments = Commitments(config, "SILENT")
        peer = Peer("SILENT", HOST, port)
        assert commitments.request_due(q, peer) == 0  # no verdict yet
        assert q.commitments() == {("SILENT", "wanted"): 2}
        assert [r for _d, _u, r in q.not_committed(state="wanted")] == \
            [f"no report within 1 s (transaction {actions[0]}); asked again later"] * 2
        assert commitments.request_due(q, peer, now=time.time() + config.forward_retry_max + 1) == 1
        assert len(actions) == 2
        assert q.commitments() == {("SILENT", "failed"): 2}
        assert [r for _d, _u, r in q.not_committed()] == [f"no report within 1 s (transaction {actions[1]}), "
                                                          "2 request(s)"] * 2
    finally:
        scp.shutdown()
    r = stowage("queue", "--data-dir", str(data), "--parked")
    assert r.stdout.count("not committed SILENT 1.2.3.") == 2 and "no report within 1 s" in r.stdout, r.stdout
    q.retry_parked("SILENT")  # what `stowage queue --retry SILENT` does
    assert q.commitments() == {("SILENT", "wanted"): 2}
    q.close()


def test_a_pending_commitment_holds_up_no_delivery(make_server, tmp_path):
    """A destination takes study 1 and its N-ACTION but sends its report late (here: never,
    within a commit_timeout of 60 s): study 2, stored while that request waits, is delivered
    meanwhile, not after the wait."""
    from pynetdicom import AE, StoragePresentationContexts, evt
    arrived: list[tuple[str, float]] = []
    actions: list[float] = []

    def on_store(event):
        arrived.append((str(event.dataset.StudyInstanceUID), time.monotonic()))
        return 0x0000

    def on_action(event):
        actions.append(time.monotonic())
        return 0x0000, None  # taken; the report is left to the timeout

    ae = AE("SLOW")
    ae.supported_contexts = StoragePresentationContexts
    ae.add_supported_context("1.2.840.10008.1.20.1")
    port = free_port()
    scp = ae.start_server((HOST, port), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)])
    try:
        conf = write_config(tmp_path / "f.toml", {"SLOW": port},
                            '[[forward]]\nto = "SLOW"\ncommit = true\nquiet = 0\ncommit_timeout = 60\n')
        source = make_server("--workers", "1", "--config", str(conf), data_dir=tmp_path / "source")
        first, second = generate_uid(), generate_uid()
        storescu(source.port, series_instances(tmp_path / "s1", "P1", first, generate_uid(), 1))
        wait_for(lambda: actions, 60, lambda: f"no commitment request for study 1:\n{source.log()}")
        storescu(source.port, series_instances(tmp_path / "s2", "P2", second, generate_uid(), 1))
        got = wait_for(lambda: [t for study, t in arrived if study == second], 70,
                       lambda: f"study 2 not delivered:\n{source.log()}")
        # delivered while the first request still waited for its report (it waits 60 s)
        assert got[0] - actions[0] < 50, f"study 2 arrived {got[0] - actions[0]:.0f} s after the request"
        assert "no report" not in source.log(), source.log()
    finally:
        scp.shutdown()
