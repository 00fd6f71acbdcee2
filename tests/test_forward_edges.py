"""Forwarding as a PACS administrator gets it wrong or hits its edges: a typo in the
destination of `stowage queue --retry/--cancel`, rules with clashing names, a destination
that rejects our association. Each case is seconds."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, AllStoragePresentationContexts

from conftest import HOST, cli, free_port
from stowage.engine.forward.queue import Queue
from stowage.engine.runtime import config as cfg

REPO = Path(__file__).resolve().parent.parent


def _stowage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def _queue_with_entries(data_dir: Path) -> None:
    q = Queue(data_dir)
    q.start_cursor(0)
    q.add([("RESEARCH", "r", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3", "000-1.seg",
            i * 100, 100, 1000 + i, "1.2.3.9", 0.0) for i in range(3)], 1002)
    ids = [e.id for e in q.due("RESEARCH", 10)]
    q.settle([], [(ids[0], 0xA700, "refused with status 0xA700: no room")], [])
    q.close()


def test_retry_or_cancel_of_a_destination_that_does_not_exist_says_so(tmp_path):
    """`stowage queue --cancel research` (the AE title is RESEARCH) answered "0 entr(ies) of
    research cancelled" and exit 0: the operator believed the destination stopped."""
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[remotes.RESEARCH]\nhost = "{HOST}"\nport = 11112\n'
                      f'[remotes.SPARE]\nhost = "{HOST}"\nport = 11113\n')
    _queue_with_entries(tmp_path / "data")
    for flag in ("--cancel", "--retry"):
        r = _stowage("queue", "--config", str(config), flag, "research")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "research is not a forwarding destination" in r.stderr and "RESEARCH, SPARE" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    q = Queue(tmp_path / "data")
    assert {k: n for k, (n, _o) in q.summary().items()} == {("RESEARCH", "pending"): 2, ("RESEARCH", "parked"): 1}
    q.close()
    # the real names work, a configured remote with nothing queued included
    r = _stowage("queue", "--config", str(config), "--retry", "RESEARCH")
    assert r.returncode == 0 and "1 parked entr(ies) of RESEARCH queued again" in r.stdout, r.stdout + r.stderr
    r = _stowage("queue", "--config", str(config), "--cancel", "SPARE")
    assert r.returncode == 0 and "0 entr(ies) of SPARE cancelled" in r.stdout, r.stdout + r.stderr


def test_two_rules_of_one_name_are_named_in_the_error():
    """A rule named "rule-2" and an unnamed second rule (named rule-2 by default) were
    refused with "two rules have the same name", naming neither."""
    with pytest.raises(cfg.RuleError, match="two rules are named 'rule-2'"):
        cfg.parse_rules([{"name": "rule-2", "to": "A"}, {"to": "A"}], {"A": 1})


def test_queue_says_why_a_destination_s_entries_wait(make_server, tmp_path):
    """A destination that rejects our association (it knows itself by another AE title):
    `stowage queue` showed only "pending 1" and an age, the reason being in serve's log
    alone; it names the destination's answer now, and the attempts."""
    scp = AE("OTHER")
    scp.require_called_aet = True
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server_scp = scp.start_server((HOST, port), block=False)
    try:
        config = tmp_path / "c.toml"
        config.write_text(f'data_dir = "{tmp_path / "data"}"\nforward_retry_initial = 0.2\nforward_retry_max = 1.0\n'
                          f'[remotes.RESEARCH]\nhost = "{HOST}"\nport = {port}\n[[forward]]\nto = "RESEARCH"\n')
        server = make_server("--config", str(config), "--workers", "1", data_dir=tmp_path / "data")
        scu = AE("MODALITY")
        scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = scu.associate(HOST, server.port, ae_title="STOWAGE")
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(get_testdata_file("CT_small.dcm"))).Status == 0
        assoc.release()
        deadline = time.monotonic() + 60
        while True:
            r = cli("queue", "--config", str(config))  # in this process: no interpreter start per poll
            assert r.returncode == 0, r.stderr
            if "retrying RESEARCH:" in r.stdout:
                break
            assert time.monotonic() < deadline, r.stdout
            time.sleep(0.5)
        line = next(x for x in r.stdout.splitlines() if x.startswith("retrying RESEARCH:"))
        assert "reject" in line.lower() and "attempt(s)" in line, line
    finally:
        server_scp.shutdown()


class _RecordingSCP:
    """A pynetdicom Storage SCP on a port chosen beforehand (the destination comes up later),
    keeping the Patient's Name of every instance it is sent, in order."""

    def __init__(self, port: int) -> None:
        from pynetdicom import evt
        self.got: list[tuple[str, str]] = []
        self.datasets: list = []
        ae = AE("DEST")
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event):
            self.got.append((str(event.request.AffectedSOPInstanceUID), str(event.dataset.PatientName)))
            self.datasets.append(event.dataset)
            return 0x0000
        self.server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


def _store(port: int, ds, calling: str = "MODALITY", called: str = "STOWAGE") -> None:
    scu = AE(calling)
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate(HOST, port, ae_title=called)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def test_an_instance_deleted_and_sent_again_corrected_goes_out_corrected_only(make_server, tmp_path):
    """Sent under the wrong patient while the destination was down, deleted, sent again
    corrected under the same SOP Instance UID: the entry of the deleted record was not
    cancelled (its UID is served again) and went out first, from the deleted record, so
    the destination got the wrong patient, and one that keeps the first copy of a UID
    (Orthanc's default) kept it."""
    from conftest import wait_for
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nforward_retry_initial = 0.2\nforward_retry_max = 1.0\n'
                      f'[remotes.DEST]\nhost = "{HOST}"\nport = {port}\n[[forward]]\nto = "DEST"\n')
    server = make_server("--config", str(config), "--workers", "1", data_dir=tmp_path / "data")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "WRONG^PATIENT"
    _store(server.port, ds)
    wait_for(lambda: "retrying DEST:" in cli("queue", "--config", str(config)).stdout, 60,
             "the entry was not tried")
    # The forwarding process paused (SIGSTOP, by its PID: a busy machine) while both happen,
    # so that its next scan sees the deletion and the new record at once.
    import psutil
    forwarding = next(p for p in psutil.Process(server.proc.pid).children(recursive=True)
                      if "stowage.engine.forward.process" in " ".join(p.cmdline()))
    forwarding.suspend()
    try:
        r = cli("delete", "--config", str(config), "--instance", str(ds.SOPInstanceUID), "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        ds.PatientName = "RIGHT^PATIENT"
        _store(server.port, ds)
    finally:
        forwarding.resume()
    time.sleep(2)  # the scanner sees the deletion and the new record
    dest = _RecordingSCP(port)
    try:
        wait_for(lambda: ("RIGHT^PATIENT" in {n for _u, n in dest.got}), 60,
                 lambda: f"the corrected instance did not arrive: {dest.got}\n{server.log()}")
        time.sleep(2)
        assert [n for _u, n in dest.got] == ["RIGHT^PATIENT"], dest.got
    finally:
        dest.stop()


def test_an_instance_is_never_forwarded_back_to_the_ae_that_sent_it(make_server, tmp_path):
    """A rule sending everything to PEER sent PEER's own instances back to it: two archives
    forwarding to each other (a research site's two-way sync) passed each instance back and
    forth for ever, a new record and a new entry at each turn."""
    from conftest import wait_for
    port = free_port()
    peer = _RecordingSCP(port)
    try:
        config = tmp_path / "c.toml"
        config.write_text(f'data_dir = "{tmp_path / "data"}"\n[remotes.PEER]\nhost = "{HOST}"\nport = {port}\n'
                          '[[forward]]\nto = "PEER"\n')
        server = make_server("--config", str(config), "--workers", "1", data_dir=tmp_path / "data")
        from_peer = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        from_modality = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        from_modality.SOPInstanceUID = from_modality.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        _store(server.port, from_peer, calling="PEER")
        _store(server.port, from_modality)
        wait_for(lambda: peer.got, 60, lambda: f"nothing forwarded:\n{server.log()}")
        time.sleep(2)  # the scan that saw both has queued whatever it would
        assert [uid for uid, _n in peer.got] == [str(from_modality.SOPInstanceUID)], peer.got
    finally:
        peer.stop()


def test_a_de_identifying_rule_sends_what_its_project_made_at_ingest_as_it_is(make_server, tmp_path):
    """A rule de-identifying everything under TRIAL, and a study whose instances came in both
    through the plain AE title and through TRIAL's (de-identified on the way in): the
    ingested copies were de-identified a second time, so the destination got one patient
    under two pseudonyms and one study under two Study Instance UIDs (UIDs hashed twice)."""
    from conftest import wait_for
    port = free_port()
    peer = _RecordingSCP(port)
    try:
        config = tmp_path / "c.toml"
        config.write_text(f'data_dir = "{tmp_path / "data"}"\n[remotes.PEER]\nhost = "{HOST}"\nport = {port}\n'
                          '[projects.TRIAL]\ncalled_ae = "TRIAL"\n'
                          '[[forward]]\nto = "PEER"\ndeidentify = "TRIAL"\n')
        server = make_server("--config", str(config), "--workers", "1", data_dir=tmp_path / "data")
        plain = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        through_trial = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # the same patient and study
        through_trial.SOPInstanceUID = through_trial.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        _store(server.port, plain)
        _store(server.port, through_trial, called="TRIAL")
        wait_for(lambda: len(peer.datasets) >= 2, 60, lambda: f"not both forwarded:\n{server.log()}")
        time.sleep(1)
        got = peer.datasets
        assert len(got) == 2, [str(ds.SOPInstanceUID) for ds in got]
        assert {str(ds.PatientID) for ds in got} != {str(plain.PatientID)}
        assert len({str(ds.PatientID) for ds in got}) == 1, [str(ds.PatientID) for ds in got]
        assert len({str(ds.StudyInstanceUID) for ds in got}) == 1, [str(ds.StudyInstanceUID) for ds in got]
        assert len({str(ds.get("StudyDate", "")) for ds in got}) == 1, [str(ds.get("StudyDate")) for ds in got]
        # the TRIAL copy went out as the archive holds it (de-identified once, at ingest)
        held = cli("query", "--data-dir", str(tmp_path / "data"), "--format", "csv",
                   "SELECT sop_instance_uid FROM instances WHERE called_ae = 'TRIAL'")
        assert held.returncode == 0, held.stderr
        trial_uid = held.stdout.split()[-1]
        assert trial_uid in {str(ds.SOPInstanceUID) for ds in got}, (held.stdout, got)
        for ds in got:
            assert str(ds.SOPInstanceUID) not in (str(plain.SOPInstanceUID), str(through_trial.SOPInstanceUID))
    finally:
        peer.stop()


def test_export_deidentify_hands_out_what_its_project_made_at_ingest_as_it_is(make_server, tmp_path):
    """`export --deidentify TRIAL` of a patient's instances, one received plainly and one
    through TRIAL's AE title: the second was de-identified again (two pseudonyms and two
    Study Instance UIDs for one patient and study in the export)."""
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[projects.TRIAL]\ncalled_ae = "TRIAL"\n')
    server = make_server("--config", str(config), "--workers", "1", data_dir=tmp_path / "data")
    plain = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    through_trial = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    through_trial.SOPInstanceUID = through_trial.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    _store(server.port, plain)
    _store(server.port, through_trial, called="TRIAL")
    held = cli("query", "--config", str(config), "--format", "csv",
               "SELECT sop_instance_uid FROM instances WHERE called_ae = 'TRIAL'")
    assert held.returncode == 0, held.stderr
    trial_uid = held.stdout.split()[-1]
    r = cli("export", "--config", str(config), "--deidentify", "TRIAL", "--out", str(tmp_path / "out"),
            "--instance", str(plain.SOPInstanceUID), "--instance", trial_uid)
    assert r.returncode == 0, r.stdout + r.stderr
    got = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").glob("*.dcm"))]
    assert len(got) == 2, r.stdout
    assert len({str(ds.PatientID) for ds in got}) == 1, [str(ds.PatientID) for ds in got]
    assert len({str(ds.StudyInstanceUID) for ds in got}) == 1, [str(ds.StudyInstanceUID) for ds in got]
    assert trial_uid in {str(ds.SOPInstanceUID) for ds in got}
    assert str(plain.PatientID) not in {str(ds.PatientID) for ds in got}
