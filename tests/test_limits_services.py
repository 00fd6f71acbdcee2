"""Issue #25, resource limits of the services: storage commitment requests are capped in
references (`max_commitment_references`) and in reports pending per requesting AE
(`max_pending_commitments`), refused with an Error Comment a person can act on and never
queued; a retrieve or query that fails inside the archive tells the peer a reference into
the archive's log, never the exception's text or a path."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)

from conftest import CT, HOST, copies, free_port
from stowage.engine.store.commitment import Reference, ReportQueue, Request
from test_commitment import Modality, wait_for
from test_metrics import scrape
from test_move import identifier
from test_send import config_with, store

pytestmark = pytest.mark.timeout(180)
CT_CLASS = str(pydicom.dcmread(CT, stop_before_pixels=True).SOPClassUID)
REFUSED = 0x0213  # PS3.7's N-ACTION status "Resource limitation"
REFERENCE = re.compile(r"^internal error \(archive log reference ([0-9a-f]{8})\)$")


def limits_config(tmp_path: Path, **remotes: tuple) -> Path:
    """A configuration with small commitment limits (10 references, 3 pending per AE)."""
    cfg = config_with(tmp_path, **remotes)
    cfg.write_text("max_commitment_references = 10\nmax_pending_commitments = 3\n\n" + cfg.read_text())
    return cfg


def references(n: int) -> list[tuple[str, str]]:
    """n references to CT instances (stored or not: a refusal never looks)."""
    return [(CT_CLASS, generate_uid()) for _ in range(n)]


def pending_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "commitment" / "pending").glob("*.json"))


def refusals(metrics_port: int, limit: str, want: float) -> float | None:
    """stowage_limit_refusals{limit} once it reaches `want` (the workers report every second)."""
    name = f'stowage_limit_refusals_total{{limit="{limit}"}}'
    deadline = time.monotonic() + 15
    while True:
        got = scrape(metrics_port).get(name)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture
def modalities():
    started: list[Modality] = []

    def make(aet: str) -> Modality:
        m = Modality(aet)
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


def test_commitment_request_over_the_reference_limit_is_refused_and_not_queued(make_server, tmp_path, modalities):
    modality = modalities("MODALITY").listen()
    metrics_port = free_port()
    cfg = limits_config(tmp_path, MODALITY=(HOST, modality.port))
    server = make_server("--workers", "2", "--config", str(cfg), "--metrics-port", str(metrics_port))
    assert REFUSED in (0x0213, 0x0110)
    status, _assoc = modality.request(server.port, references(11), release=True)
    assert status.Status == REFUSED, status
    assert status.ErrorComment == "11 references; at most 10 per request: split the request"
    assert not pending_files(server.data_dir), "a refused request was queued"
    assert refusals(metrics_port, "commitment_references", 1) == 1
    status, _assoc = modality.request(server.port, references(10), release=True)
    assert status.Status == 0x0000, "a request of exactly max_commitment_references was refused"
    report = modality.report(30)  # none stored: all fail, but the request was served
    assert report.event_type == 2 and len(report.failed()) == 10


def test_an_ae_whose_reports_cannot_be_delivered_gets_no_more_than_its_share(make_server, tmp_path, modalities):
    """MODALITY's reports go to a port nobody listens on: its fourth request is refused while
    they wait, and another AE is still served and sent its report."""
    closed_port = free_port()
    metrics_port = free_port()
    other = modalities("OTHER").listen()
    cfg = limits_config(tmp_path, OTHER=(HOST, other.port), MODALITY=(HOST, closed_port))  # MODALITY last
    cfg.write_text(cfg.read_text() + "commitment_same_association = false\n")  # into [remotes.MODALITY]
    server = make_server("--workers", "2", "--config", str(cfg), "--metrics-port", str(metrics_port))
    modality = modalities("MODALITY")
    for _ in range(3):
        status, _assoc = modality.request(server.port, references(2), release=True)
        assert status.Status == 0x0000
    wait_for(lambda: "not delivered (attempt 1)" in server.log(), 30, "a failed delivery attempt")
    status, _assoc = modality.request(server.port, references(2), release=True)
    assert status.Status == REFUSED, status
    assert status.ErrorComment == "AE MODALITY has 3 commitment requests not yet reported"
    assert len(pending_files(server.data_dir)) == 3, "the refused request was queued"
    status, assoc = other.request(server.port, references(2), release=True)
    assert status.Status == 0x0000, "another AE was refused because of MODALITY's backlog"
    # Its report, judged at once (the catalog open), was tried on this association as it was
    # being released: the release is answered, not left to time out (30 s) and abort.
    assert assoc.is_released and not assoc.is_aborted, "OTHER's A-RELEASE-RQ was not answered"
    report = other.report(30)  # none stored: both fail, but OTHER was served to the end
    assert report.event_type == 2 and len(report.failed()) == 2
    # (OTHER's own pending file may already be gone: its report was delivered.)
    assert len([p for p in pending_files(server.data_dir) if p.name.split(".")[1] == b"MODALITY".hex()]) == 3
    assert refusals(metrics_port, "commitments_pending_per_ae", 1) == 1
    assert refusals(metrics_port, "commitment_references", 0) == 0


def test_report_queue_counts_pending_reports_per_ae(tmp_path):
    """The per-AE count holds across processes (it is read from the queue's file names), a
    delivered report frees its place, and a file named as before this limit is still adopted."""
    from stowage.engine.store.commitment import PendingLimit
    queue = ReportQueue(tmp_path / "commitment")
    ref = [Reference("1.2", "1.2.3")]

    def add(transaction_uid: str, ae_title: str):
        return queue.add(Request(transaction_uid, ae_title, "127.0.0.1:1", ref), max_pending=2)

    first, held = add("1.2.1", "MODALITY"), [add("1.2.2", "MODALITY")]
    with pytest.raises(PendingLimit) as refused:
        add("1.2.3", "MODALITY")
    assert refused.value.count == 2
    assert queue.pending_for("MODALITY") == 2 and queue.pending_for("MODALITY2") == 0
    held.append(add("1.2.4", "MODALITY2"))
    queue.done(first)
    held.append(add("1.2.5", "MODALITY"))
    legacy = Request("1.2.6", "OLD", "127.0.0.1:1", ref)
    (queue.pending / f"{legacy.id}.json").write_bytes(legacy.to_json())
    for claim in held:
        claim.release()  # as if this process had died
    orphans = ReportQueue(tmp_path / "commitment").claim_orphans(set())
    adopted = {c.request.transaction_uid: c.request.id for c in orphans}
    assert sorted(adopted) == ["1.2.2", "1.2.4", "1.2.5", "1.2.6"]
    assert adopted["1.2.6"] == legacy.id


def _damage_the_sealed_catalog(data_dir: Path) -> None:
    """Cut every sealed Parquet file of the catalog in half, as a failing disk might, once
    the manifest names them (until then the rows are read from the tails)."""
    catalog = data_dir / "catalog"

    def sealed() -> list[str]:
        try:
            return list(json.loads((catalog / "manifest.json").read_bytes())["files"])
        except (FileNotFoundError, ValueError):
            return []  # not written yet, or replaced as we read it
    wait_for(sealed, 30, "the catalog to be sealed")
    for name in sealed():
        path = catalog / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _get(port: int, keys: dict[str, str]) -> list:
    ae = AE("PYNGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=[build_role(CTImageStorage, scp_role=True)])
    assert assoc.is_established
    try:
        return [s for s, _i in assoc.send_c_get(identifier(keys), StudyRootQueryRetrieveInformationModelGet)]
    finally:
        if assoc.is_established:
            assoc.release()


def _find(port: int, keys: dict[str, str]) -> list:
    ae = AE("PYNFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        return [s for s, _i in assoc.send_c_find(identifier(keys), StudyRootQueryRetrieveInformationModelFind)]
    finally:
        if assoc.is_established:
            assoc.release()


def _move(port: int, dest: str, keys: dict[str, str]) -> list:
    ae = AE("PYNMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        return [s for s, _i in assoc.send_c_move(identifier(keys), dest, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        if assoc.is_established:
            assoc.release()


def _logged_reference(server, comment: str, *leaks: str) -> str:
    """The log reference an internal-error comment names, once the archive's log holds it;
    the comment must hold none of `leaks` (the exception's words, paths)."""
    m = REFERENCE.match(comment)
    assert m, f"not a fixed internal-error comment: {comment!r}"
    for leak in leaks:
        assert leak.lower() not in comment.lower(), comment
    wait_for(lambda: f"(reference {m[1]})" in server.log(), 10, f"reference {m[1]} in the archive's log")
    return m[1]


def test_retrieve_and_find_failing_inside_the_archive_tell_the_peer_a_log_reference(make_server, tmp_path):
    server = make_server("--workers", "1")
    files = copies(CT, tmp_path / "ct", 3, "ct")
    store(server.port, files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    _damage_the_sealed_catalog(server.data_dir)
    final = _get(server.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})[-1]
    assert final.Status == 0xC000, final
    leaks = ("arrow", "parquet", "error:", str(server.data_dir), "/")
    get_ref = _logged_reference(server, str(final.ErrorComment), *leaks)
    log = server.log()
    assert "ArrowInvalid" in log[log.index(f"(reference {get_ref})"):], "the log should hold the exception"
    statuses = _find(server.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
    final = statuses[-1]
    assert 0xC000 <= final.Status <= 0xCFFF, final
    assert _logged_reference(server, str(final.ErrorComment), *leaks) != get_ref


def test_move_to_a_destination_misconfigured_here_tells_the_peer_a_log_reference(make_server, tmp_path):
    """A C-MOVE destination whose TLS CA file is not a certificate: ssl's words and the file
    stay in the archive's log."""
    ca = tmp_path / "not-a-ca.pem"
    ca.write_text("not a certificate\n")
    cfg = config_with(tmp_path, DEST=(HOST, free_port()))
    cfg.write_text(cfg.read_text() + f'tls = true\ntls_ca = "{ca}"\n')  # into [remotes.DEST]
    server = make_server("--workers", "1", "--config", str(cfg))
    final = _move(server.port, "DEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": generate_uid()})[-1]
    assert final.Status == 0xC000, final
    _logged_reference(server, str(final.ErrorComment), "x509", "ssl", "certificate", str(ca), "/")
