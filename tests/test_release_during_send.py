"""A pynetdicom send_*() waiting for its response gives way when the peer asks to release
(protocol/pynetdicom_patches/reactors.py, patch 10): the peer, having sent its A-RELEASE-RQ, may
send no more P-DATA (PS3.8 Sta7), so the response cannot come. The peer gets its
A-RELEASE-RP at once, the send returns with no response, and the association ends
released, not aborted. Unpatched, the release waited for the sender's DIMSE timeout and
ended in an A-ABORT (here 60 s; the peer is given 10).

The sender is pynetdicom as every stowage process runs it (conftest installs the patches);
the peer is a raw socket, so it does exactly what a releasing requester does and nothing
more. Each case takes well under a second. Then the case that found it, end to end: a
Storage Commitment requester releasing while its report waits on its association is
answered, and gets its report on a new association (a few seconds: one serve)."""
from __future__ import annotations

import queue
import socket
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from conftest import HOST, free_port, wait_for
from test_commitment import Modality
from test_send import config_with
from stowage.protocol import pdu
from stowage.protocol.acse import APPLICATION_CONTEXT_NAME, user_information

pytestmark = pytest.mark.timeout(60)
WELL_KNOWN = "1.2.840.10008.1.20.1.1"  # Storage Commitment Push Model SOP Instance
PEER_PATIENCE_S = 10.0  # how long the peer waits for its A-RELEASE-RP (the sender's DIMSE timeout: 60 s)


def associate_rq(abstract: str, *, acceptor_may_be_scu: bool) -> bytes:
    """The peer's A-ASSOCIATE-RQ: one context, and if asked a role selection that lets the
    acceptor act as SCU of it (for a C-ECHO sent to the requester)."""
    p = A_ASSOCIATE()
    p.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    p.calling_ae_title, p.called_ae_title = "PEER", "SENDER"
    cx = PresentationContext()
    cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 1, abstract, [ImplicitVRLittleEndian]
    p.presentation_context_definition_list = [cx]
    p.user_information = user_information(16384, "1.2.826.0.1.3680043.9.1", "PEER_1")
    if acceptor_may_be_scu:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = abstract, True, True
        p.user_information.append(role)
    rq = AssociateRqPdu()
    rq.from_primitive(p)
    return rq.encode()


def read_message(sock: socket.socket, deadline: float, with_data: bool) -> None:
    """Read P-DATA-TF PDUs until a whole DIMSE message has come (its command set's last
    fragment, and its data set's if it has one)."""
    done = {pdu.COMMAND_LAST: False, pdu.DATA_LAST: not with_data}
    while not all(done.values()):
        kind, body = pdu.read_pdu(sock, 1 << 20, deadline)
        assert kind == pdu.P_DATA_TF, f"PDU type 0x{kind:02X} instead of the request"
        at = 0
        while at < len(body):
            length, _context_id, control = pdu.PDV_HEADER.unpack_from(body, at)
            if control & pdu.LAST:
                done[control & (pdu.COMMAND | pdu.LAST)] = True
            at += 4 + length


def send_once_associated(peer: socket.socket, server, abstract: str, send, with_data: bool,
                         result: queue.Queue):
    """Associate from the raw `peer`, start `send(assoc)` on the sender's side in a thread
    (its return value into `result`), and read the request it sends: the send then waits for
    its response. Returns the sender's association."""
    peer.sendall(associate_rq(abstract, acceptor_may_be_scu=abstract == str(Verification)))
    kind, _body = pdu.read_pdu(peer, 1 << 20, time.monotonic() + PEER_PATIENCE_S)
    assert kind == pdu.A_ASSOCIATE_AC
    (assoc,) = server.active_associations
    # the A-ASSOCIATE-AC can reach the peer before the association counts as established
    wait_for(lambda: assoc.is_established, PEER_PATIENCE_S, "the association never established")
    threading.Thread(target=lambda: result.put(send(assoc)), daemon=True).start()
    read_message(peer, time.monotonic() + PEER_PATIENCE_S, with_data)
    return assoc


def event_report(assoc) -> tuple[Dataset, Dataset | None]:
    info = Dataset()
    info.TransactionUID = generate_uid()
    return assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, WELL_KNOWN)


def echo(assoc) -> tuple[Dataset, None]:
    return assoc.send_c_echo(), None


@pytest.mark.parametrize("send, abstract, with_data", [
    (event_report, StorageCommitmentPushModel, True),  # a commitment report on the requester's association
    (echo, Verification, False),
], ids=["n-event-report", "c-echo"])
def test_peer_releasing_while_a_send_waits_is_answered_and_the_send_ends(send, abstract, with_data):
    ae = AE("SENDER")
    ae.add_supported_context(abstract, ImplicitVRLittleEndian, scu_role=True, scp_role=True)
    ae.dimse_timeout = 60  # unpatched, the release is answered (by an A-ABORT) only after this
    port = free_port()
    server = ae.start_server((HOST, port), block=False)
    result: queue.Queue = queue.Queue()
    try:
        with socket.create_connection((HOST, port), timeout=PEER_PATIENCE_S) as peer:
            assoc = send_once_associated(peer, server, str(abstract), send, with_data, result)
            peer.sendall(pdu.A_RELEASE_RQ_PDU)  # instead of a response
            try:
                kind, _body = pdu.read_pdu(peer, 1 << 20, time.monotonic() + PEER_PATIENCE_S)
            except (pdu.DeadlinePassed, TimeoutError):
                pytest.fail(f"no answer to the A-RELEASE-RQ within {PEER_PATIENCE_S:g} s: the waiting send held it")
            assert kind == pdu.A_RELEASE_RP, f"PDU type 0x{kind:02X} instead of the A-RELEASE-RP"
        try:
            status, reply = result.get(timeout=PEER_PATIENCE_S)
        except queue.Empty:
            pytest.fail("the release was answered, but the send still waits for its response")
        assert "Status" not in status and reply is None, "the send should end with no response"
        assert assoc.is_released and not assoc.is_aborted
    finally:
        server.shutdown()


def test_commitment_requester_releasing_while_its_report_waits_gets_it_on_a_new_association(make_server, tmp_path):
    """The requester takes the N-EVENT-REPORT-RQ on its association but releases instead of
    answering (its handler holds the response back until the end): the release is
    answered, not left to the requester's ACSE timeout and an abort, and the report comes
    again on a new association (workers/commitment.py's fallback on no response)."""
    modality = Modality("MODALITY").listen()  # where the report may come on a new association
    arrived, let_go = threading.Event(), threading.Event()

    def held(event: evt.Event) -> tuple[int, None]:  # pynetdicom runs it in a thread of its own
        arrived.set()
        let_go.wait(PEER_PATIENCE_S)
        return 0x0000, None

    try:
        server = make_server("--workers", "1", "--config", str(config_with(tmp_path, MODALITY=(HOST, modality.port))))
        ae = AE("MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel, ImplicitVRLittleEndian)
        ae.dimse_timeout, ae.acse_timeout = 30, PEER_PATIENCE_S  # unanswered, its release aborts after this
        assoc = ae.associate(HOST, server.port, ae_title="STOWAGE", evt_handlers=[(evt.EVT_N_EVENT_REPORT, held)])
        assert assoc.is_established
        info = Dataset()
        info.TransactionUID = transaction = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        info.ReferencedSOPSequence = [item]
        status, _reply = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0000
        assert arrived.wait(30), "no N-EVENT-REPORT-RQ on the requester's association"
        assoc.release()  # the report now waits for a response that cannot come
        assert assoc.is_released and not assoc.is_aborted, "the A-RELEASE-RQ was not answered"
        report = modality.report(30)
        assert not report.same_association and str(report.info.TransactionUID) == transaction
        assert report.event_type == 2 and report.failed() == {item.ReferencedSOPInstanceUID: 0x0112}
    finally:
        let_go.set()
        modality.stop()


def test_a_response_we_cannot_decode_aborts_and_ends_the_waiting_send_at_once():
    """The peer answers a C-ECHO with a command set pynetdicom cannot decode (no Command
    Field): we abort the association (patch 9, one log line), and the send_c_echo() waiting
    for its response returns with none at once, not after its DIMSE timeout (60 s here): a
    C-MOVE sub-operation or a forwarded instance moves on to its next association."""
    ae = AE("SENDER")
    ae.add_supported_context(Verification, ImplicitVRLittleEndian, scu_role=True, scp_role=True)
    ae.dimse_timeout = 60
    port = free_port()
    server = ae.start_server((HOST, port), block=False)
    result: queue.Queue = queue.Queue()
    try:
        with socket.create_connection((HOST, port), timeout=PEER_PATIENCE_S) as peer:
            assoc = send_once_associated(peer, server, str(Verification), echo, False, result)
            # Affected SOP Class UID alone (implicit VR little endian): no Command Field
            peer.sendall(pdu.p_data(1, b"\x00\x00\x02\x00\x12\x00\x00\x00" + b"1.2.840.10008.1.1\x00"))
            kind, _body = pdu.read_pdu(peer, 1 << 20, time.monotonic() + PEER_PATIENCE_S)
            assert kind == pdu.A_ABORT, f"PDU type 0x{kind:02X} instead of an A-ABORT"
        try:
            status, _reply = result.get(timeout=PEER_PATIENCE_S)
        except queue.Empty:
            pytest.fail(f"aborted, but the send still waits for its response after {PEER_PATIENCE_S:g} s")
        assert "Status" not in status, "the send should end with no response"
        assert assoc.is_aborted and not assoc.is_established
    finally:
        server.shutdown()
