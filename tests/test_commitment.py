"""Storage Commitment Push Model SCP, with pynetdicom playing the modality (N-ACTION SCU,
N-EVENT-REPORT receiver on its own association or, accepting the SCP role, on a new one)."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from conftest import CT, HOST, MR, copies, free_port, wait_for
from test_send import config_with, flip_payload, store

pytestmark = pytest.mark.timeout(180)
SCPM = "1.2.840.10008.1.20.1"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]


@dataclass
class Report:
    event_type: int
    info: Dataset
    same_association: bool
    after_n_action_response: bool

    def committed(self) -> set[str]:
        return {i.ReferencedSOPInstanceUID for i in self.info.get("ReferencedSOPSequence", [])}

    def failed(self) -> dict[str, int]:
        return {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in self.info.get("FailedSOPSequence", [])}


class Modality:
    """Asks for storage commitment and collects the reports it is sent."""

    def __init__(self, aet: str = "MODALITY") -> None:
        self.aet = aet
        self.port = free_port()
        self.reports: queue.Queue[Report] = queue.Queue()
        self.server = None
        self.responded = False
        self._answering: list[Report] = []   # reports received on the requester's association
        self._answered: list[Report] = []    # ... whose answer is queued, not yet on the wire

    def _on_report(self, event: evt.Event, same: bool):
        report = Report(event.event_type, event.event_information, same, self.responded)
        if same:  # handed out once the answer is on its way (`_on_sent`)
            self._answering.append(report)
        else:
            self.reports.put(report)
        return 0x0000, None

    def _on_sent(self, event: evt.Event):
        """On the requester's own association a report is handed to the test only once its
        N-EVENT-REPORT-RSP is on the wire: a test that releases on seeing the report would
        otherwise release before the answer goes out (pynetdicom then aborts, and stowage
        rightly sends the report again on a new association)."""
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP" and self._answering:
            self._answered.append(self._answering.pop(0))

    def _on_pdu_sent(self, event: evt.Event):
        if type(event.pdu).__name__ == "P_DATA_TF" and self._answered:  # the answer's one PDU (no data set)
            self.reports.put(self._answered.pop(0))

    def listen(self) -> "Modality":
        ae = AE(self.aet)
        ae.add_supported_context(SCPM, SYNTAXES, scu_role=True, scp_role=True)
        self.server = ae.start_server((HOST, self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report, [False])])
        return self

    def request(self, stowage_port: int, refs: list[tuple[str, str]], *, release: bool,
                transaction_uid: str | None = None, action_type: int = 1, info: Dataset | None = None):
        """N-ACTION; returns (status, association) (released if `release`)."""
        ae = AE(self.aet)
        ae.add_requested_context(SCPM, SYNTAXES)
        ae.dimse_timeout = ae.acse_timeout = 30
        assoc = ae.associate(HOST, stowage_port, ae_title="STOWAGE",
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report, [True]),
                                           (evt.EVT_DIMSE_SENT, self._on_sent),
                                           (evt.EVT_PDU_SENT, self._on_pdu_sent)])
        assert assoc.is_established
        if info is None:
            info = Dataset()
            info.TransactionUID = transaction_uid or generate_uid()
            info.ReferencedSOPSequence = []
            for cls, inst in refs:
                item = Dataset()
                item.ReferencedSOPClassUID = cls
                item.ReferencedSOPInstanceUID = inst
                info.ReferencedSOPSequence.append(item)
        status, _reply = assoc.send_n_action(info, action_type, SCPM, WELL_KNOWN)
        self.responded = True
        if release:
            assoc.release()
        return status, assoc

    def report(self, timeout: float) -> Report:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no N-EVENT-REPORT within {timeout} s") from None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def modality():
    m = Modality()
    yield m
    m.stop()


def refs_of(paths: list[Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def commitment_server(make_server, tmp_path: Path, modality: Modality, same: bool = True, **kw):
    cfg = config_with(tmp_path, MODALITY=(HOST, modality.port))
    if not same:
        cfg.write_text(cfg.read_text() + "commitment_same_association = false\n")
    return make_server("--workers", "2", "--config", str(cfg), **kw)


def stored_copies(server, tmp_path: Path, n: int) -> list[Path]:
    """n copies of CT (one series), stored in `server`."""
    files = copies(CT, tmp_path / "ct", n, "ct")
    store(server.port, files)
    return files


def reported(modality: Modality, port: int, refs: list[tuple[str, str]], *, release: bool, **request):
    """Commitment of `refs` asked for (the N-ACTION succeeds), and the report that comes of it;
    returns (report, the requester's association)."""
    status, assoc = modality.request(port, refs, release=release, **request)
    assert status.Status == 0
    return modality.report(30), assoc


def audit_events(data_dir: Path, kind: str) -> list[dict]:
    lines = (data_dir / "audit.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if d.get("event") == kind]


def test_all_present_reported_on_the_same_association(make_server, tmp_path, modality):
    server = commitment_server(make_server, tmp_path, modality)
    files = stored_copies(server, tmp_path, 5)
    refs = refs_of(files)
    uid = generate_uid()
    report, assoc = reported(modality, server.port, refs, release=False, transaction_uid=uid)
    assoc.release()
    assert report.same_association and report.after_n_action_response
    assert report.event_type == 1
    assert report.info.TransactionUID == uid
    assert report.committed() == {i for _c, i in refs} and not report.failed()
    wait_for(lambda: audit_events(server.data_dir, "commitment-report"), 10, "the audit line")
    (req,) = audit_events(server.data_dir, "commitment-request")
    assert req["transaction_uid"] == uid and req["instances"] == 5 and req["calling_ae"] == "MODALITY"
    (rep,) = audit_events(server.data_dir, "commitment-report")
    assert rep["committed"] == 5 and rep["failed"] == 0 and rep["association"] == "same"
    wait_for(lambda: not list((server.data_dir / "commitment" / "pending").glob("*.json")), 10, "queue empty")


def test_missing_and_mismatched_instances_fail_with_the_standard_reasons(make_server, tmp_path, modality):
    server = commitment_server(make_server, tmp_path, modality)
    files = stored_copies(server, tmp_path, 3)
    present = refs_of(files)
    missing = [(present[0][0], generate_uid()), (present[0][0], generate_uid())]
    wrong_class = [(pydicom.dcmread(MR, stop_before_pixels=True).SOPClassUID, present[2][1])]
    report, assoc = reported(modality, server.port, present[:2] + missing + wrong_class, release=False)
    assoc.release()
    assert report.event_type == 2
    assert report.committed() == {present[0][1], present[1][1]}
    assert report.failed() == {missing[0][1]: 0x0112, missing[1][1]: 0x0112, present[2][1]: 0x0119}


def test_corrupt_record_is_reported_as_processing_failure(make_server, tmp_path, modality):
    server = commitment_server(make_server, tmp_path, modality)
    files = stored_copies(server, tmp_path, 3)
    refs = refs_of(files)
    flip_payload(server.data_dir, refs[1][1])
    report, assoc = reported(modality, server.port, refs, release=False)
    assoc.release()
    assert report.event_type == 2
    assert report.failed() == {refs[1][1]: 0x0110}
    assert report.committed() == {refs[0][1], refs[2][1]}


def test_report_on_a_new_association_after_the_requester_released(make_server, tmp_path, modality):
    server = commitment_server(make_server, tmp_path, modality)
    modality.listen()
    files = stored_copies(server, tmp_path, 4)
    report, _assoc = reported(modality, server.port, refs_of(files), release=True)
    assert not report.same_association and report.after_n_action_response
    assert report.event_type == 1 and len(report.committed()) == 4
    assert report.info.RetrieveAETitle == "STOWAGE"


def test_config_can_forbid_the_same_association(make_server, tmp_path, modality):
    server = commitment_server(make_server, tmp_path, modality, same=False)
    modality.listen()
    files = stored_copies(server, tmp_path, 2)
    report, assoc = reported(modality, server.port, refs_of(files), release=False)
    assert assoc.is_established, "the requester's association should have been left alone"
    assoc.release()
    assert not report.same_association and report.event_type == 1


def test_requester_unreachable_at_first_then_reachable(make_server, tmp_path, modality):
    server = commitment_server(make_server, tmp_path, modality)
    files = stored_copies(server, tmp_path, 2)
    status, _assoc = modality.request(server.port, refs_of(files), release=True)
    assert status.Status == 0
    wait_for(lambda: "not delivered (attempt 2)" in server.log(), 30, "two failed delivery attempts")
    modality.listen()
    report = modality.report(60)
    assert report.event_type == 1 and len(report.committed()) == 2 and not report.same_association


def test_pending_report_survives_kill_and_restart(make_server, tmp_path, modality):
    from stowage.workers.commitment import _SCAN_INTERVAL_S
    server = commitment_server(make_server, tmp_path, modality)
    files = stored_copies(server, tmp_path, 3)
    transaction = generate_uid()
    status, _assoc = modality.request(server.port, refs_of(files), release=True, transaction_uid=transaction)
    assert status.Status == 0
    pending = server.data_dir / "commitment" / "pending"
    assert len(list(pending.glob("*.json"))) == 1, "the request was not persisted before the response"
    server.kill()
    assert modality.reports.empty()
    server.start()
    modality.listen()
    report = modality.report(60)
    assert report.event_type == 1 and len(report.committed()) == 3 and report.info.TransactionUID == transaction
    wait_for(lambda: not list(pending.glob("*.json")), 10, "the delivered report to leave the queue")
    wait_for(lambda: audit_events(server.data_dir, "commitment-report"), 10, "the delivery's audit line")
    # Exactly one worker adopted the orphan and delivered it once.
    adopted = [x for x in server.log().splitlines() if f"commitment report {transaction}" in x and "adopted" in x]
    assert len(adopted) == 1, server.log()[-3000:]
    assert [e["transaction_uid"] for e in audit_events(server.data_dir, "commitment-report")] == [transaction]
    # And no worker sends it again: nothing may arrive while every worker's periodic scan of
    # the queue (workers/commitment.py, every _SCAN_INTERVAL_S) comes round. This wait is an
    # observation window for something that must not happen, not a wait for a condition: no
    # event marks a worker's scan. A report that does arrive ends it at once.
    try:
        again = modality.reports.get(timeout=_SCAN_INTERVAL_S + 1.0)
    except queue.Empty:
        again = None
    assert again is None, f"the report was sent again (same association: {again.same_association})"
    assert [e["transaction_uid"] for e in audit_events(server.data_dir, "commitment-report")] == [transaction]


def test_malformed_requests_get_failure_statuses(server, tmp_path, modality):
    files = stored_copies(server, tmp_path, 1)
    no_uid = Dataset()
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = refs_of(files)[0]
    no_uid.ReferencedSOPSequence = [item]
    status, _ = modality.request(server.port, [], release=True, info=no_uid)
    assert status.Status == 0x0120
    empty = Dataset()
    empty.TransactionUID = generate_uid()
    empty.ReferencedSOPSequence = []
    status, _ = modality.request(server.port, [], release=True, info=empty)
    assert status.Status == 0x0121
    status, _ = modality.request(server.port, refs_of(files), release=True, action_type=2)
    assert status.Status == 0x0123
    assert not list((server.data_dir / "commitment" / "pending").glob("*.json"))


def test_send_commit_against_stowage(make_server, tmp_path):
    """`stowage send --commit` from one archive to another: the verdict is printed."""
    source = make_server("--workers", "1", data_dir=tmp_path / "a")
    dest = make_server("--workers", "1", data_dir=tmp_path / "b")
    files = stored_copies(source, tmp_path, 4)
    cfg = config_with(tmp_path, ARCHIVE_B=(HOST, dest.port))
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "send", "--config", str(cfg), "--data-dir",
                        str(source.data_dir), "--to", "ARCHIVE_B", "--aec", "STOWAGE", "--study", study, "-q",
                        "--commit", "--commit-timeout", "30"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 committed, 0 failed (event type 1, same association)" in r.stdout, r.stdout


def test_orthanc_sends_and_asks_stowage_for_commitment(make_server, tmp_path, orthancs):
    port = free_port()
    orthanc = orthancs(tmp_path / "orthanc", {"stowage": ("STOWAGE", HOST, port)})
    cfg = config_with(tmp_path, ORTHANC=(HOST, orthanc.dicom_port))
    make_server("--workers", "2", "--config", str(cfg), port=port)
    files = copies(CT, tmp_path / "ct", 3, "ct")
    ids = [orthanc.rest("POST", "/instances", f.read_bytes())["ID"] for f in files]
    job = orthanc.rest("POST", "/modalities/stowage/store", {"Resources": ids, "StorageCommitment": True,
                                                            "Synchronous": True})
    assert job["InstancesCount"] == 3 and job["FailedInstancesCount"] == 0
    transaction = job["StorageCommitmentTransactionUID"]
    deadline = time.monotonic() + 60
    while True:
        verdict = orthanc.rest("GET", f"/storage-commitment/{transaction}")
        if verdict["Status"] != "Pending" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert verdict["Status"] == "Success", verdict
    assert {s["SOPInstanceUID"] for s in verdict["Success"]} == {i for _c, i in refs_of(files)}
    assert not verdict["Failures"]


def test_send_commit_to_orthanc_with_a_report_on_a_new_association(server, tmp_path, orthancs):
    """`stowage send --commit --commit-port`: Orthanc, as commitment SCP, answers on a new
    association to the port we listen on."""
    commit_port = free_port()
    orthanc = orthancs(tmp_path / "orthanc", {"stowcli": ("STOWCLI", HOST, commit_port)})
    files = stored_copies(server, tmp_path, 3)
    cfg = config_with(tmp_path, ORTHANC=(HOST, orthanc.dicom_port))
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "send", "--config", str(cfg), "--data-dir",
                        str(server.data_dir), "--to", "ORTHANC", "--aet", "STOWCLI", "--study", study, "-q",
                        "--commit", "--commit-port", str(commit_port), "--commit-timeout", "60"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, STOWAGE_BIND=HOST))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 completed" in r.stdout
    assert "3 committed, 0 failed (event type 1, new association)" in r.stdout, r.stdout


def test_report_queue_owner_lock_and_adoption(tmp_path):
    """A report is owned by one process at a time; an orphan (its owner died) is adopted
    exactly once; a delivered one is never adopted again."""
    from stowage.engine.store.commitment import Reference, ReportQueue, Request
    queue_dir = tmp_path / "commitment"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.');"
        "from stowage.engine.store.commitment import ReportQueue, Request, Reference;"
        f"q = ReportQueue(__import__('pathlib').Path({str(queue_dir)!r}));"
        "c = q.add(Request('1.2.3', 'MODALITY', '127.0.0.1:1', [Reference('1.2', '1.2.3.4')]));"
        "print('added', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        assert child.stdout.readline().strip() == "added"
        q = ReportQueue(queue_dir)
        assert list(q.claim_orphans(set())) == [], "a report its live owner holds was adopted"
    finally:
        child.kill()
        child.wait(10)
    (claim,) = list(q.claim_orphans(set()))
    assert claim.request.requester_ae == "MODALITY" and claim.request.references == [Reference("1.2", "1.2.3.4")]
    assert list(ReportQueue(queue_dir).claim_orphans(set())) == [], "adopted twice"
    q.done(claim)
    assert list(ReportQueue(queue_dir).claim_orphans(set())) == []
    mine = q.add(Request("1.2.4", "MODALITY", "127.0.0.1:1", [Reference("1.2", "1.2.3.5")]))
    assert list(q.claim_orphans(set())) == [], "this process's own report was adopted again"
    mine.release()
    assert [c.request.transaction_uid for c in q.claim_orphans(set())] == ["1.2.4"]
