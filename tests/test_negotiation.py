"""The lean A-ASSOCIATE-RQ reader and A-ASSOCIATE-AC writer (protocol/acse.py,
engine/receive/negotiation.py) answer every storage association byte for byte as
pynetdicom's PDU classes and negotiate_as_acceptor did before them: requests built by
pynetdicom with random contexts, and the request DCMTK's storescu really sends."""
from __future__ import annotations

import random
import socket
import subprocess
import threading

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu, A_ASSOCIATE_RQ as RqPdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from conftest import dcmtk
from stowage.engine.receive import negotiation
from stowage.engine.runtime.config import Config
from stowage.protocol.acse import APPLICATION_CONTEXT_NAME, Unusual, parse_associate_rq, user_information
from stowage.workers.contexts import storage_sop_classes, transfer_syntaxes
from stowage.workers.services import build_ae

IMPL_UID, IMPL_VERSION, MAX_PDU = "1.2.826.0.1.3680043.9.1", "TEST_1", 262144


def reference_accept(raw: bytes, supported: list[PresentationContext]) -> tuple[bytes, dict]:
    """How the worker answered before the lean path: pynetdicom decodes, negotiates and
    encodes; then the requestor's first encapsulated syntax where we support it."""
    rq = RqPdu()
    rq.decode(raw)
    p = rq.to_primitive()
    results, _roles = negotiate_as_acceptor(p.presentation_context_definition_list, supported, {})
    ours = {str(cx.abstract_syntax): set(map(str, cx.transfer_syntax)) for cx in supported}
    first = {cx.context_id: str(cx.transfer_syntax[0]) for cx in p.presentation_context_definition_list}
    for cx in results:
        wanted = first.get(cx.context_id)
        # (membership first: the worker's old order asked pydicom whether an unknown UID was
        # encapsulated, and the association failed on its ValueError)
        if (cx.result == 0 and wanted in ours.get(str(cx.abstract_syntax), ()) and UID(wanted).is_encapsulated
                and str(cx.transfer_syntax[0]) != wanted):
            cx.transfer_syntax = [UID(wanted)]
    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    ac.calling_ae_title, ac.called_ae_title = p.calling_ae_title, p.called_ae_title
    ac.result, ac.result_source = 0, 1
    ac.presentation_context_definition_results_list = results
    ac.user_information = user_information(MAX_PDU, IMPL_UID, IMPL_VERSION)
    pdu = AcPdu()
    pdu.from_primitive(ac)
    return pdu.encode(), {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                          for cx in results if cx.result == 0}


def request(contexts: list[tuple[str, list[str]]], calling: str = "SENDER", called: str = "STOWAGE",
            extra_items: list | None = None) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it."""
    p = A_ASSOCIATE()
    p.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    p.calling_ae_title, p.called_ae_title = calling, called
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        cxs.append(cx)
    p.presentation_context_definition_list = cxs
    p.user_information = user_information(16384, "1.2.3.4", "SENDER_1") + (extra_items or [])
    pdu = RqPdu()
    pdu.from_primitive(p)
    return pdu.encode()


def lean_accept(raw: bytes, supported) -> tuple[bytes, dict]:
    req = negotiation.Request(raw, parse_associate_rq(raw[6:]))
    accepted = negotiation.accept(req, supported, MAX_PDU, IMPL_UID, IMPL_VERSION)
    return accepted.ac, accepted.contexts


@pytest.fixture(scope="module")
def supported():
    return build_ae(Config()).supported_contexts


def test_random_requests_get_pynetdicoms_answer(supported):
    rng = random.Random(7)
    classes = [*storage_sop_classes(), "1.2.3.4.5.6.7", "1.2.840.10008.1.1"]  # one we do not support
    syntaxes = [*transfer_syntaxes(), "1.2.840.10008.1.2.4.999", "1.2.840.10008.1.2.5"]
    for _ in range(300):
        contexts = [(rng.choice(classes), rng.sample(syntaxes, rng.randint(1, 4))) for _ in range(rng.randint(1, 60))]
        raw = request(contexts, calling=rng.choice(["A", "SENDER", "X" * 16]))
        assert lean_accept(raw, supported) == reference_accept(raw, supported)


def test_storescus_own_request_gets_pynetdicoms_answer(supported, tmp_path):
    """The request DCMTK's storescu sends (120-odd contexts), caught by a listener that
    closes once it has it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    caught: list[bytes] = []

    def catch() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            caught.append(data)

    t = threading.Thread(target=catch)
    t.start()
    subprocess.run([dcmtk("storescu"), "-to", "5", "127.0.0.1", str(port), get_testdata_file("CT_small.dcm")],
                   capture_output=True, timeout=30)
    t.join(30)
    listener.close()
    (raw,) = caught
    lean = parse_associate_rq(raw[6:])
    assert len(lean.contexts) > 100
    assert lean_accept(raw, supported) == reference_accept(raw, supported)


def test_what_the_lean_reader_leaves_to_pynetdicom(supported):
    """Role selection (a C-GET requester's), and malformed items: not read leanly, so the
    worker hands them to pynetdicom as before."""
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = storage_sop_classes()[0], False, True
    raw = request([(storage_sop_classes()[0], ["1.2.840.10008.1.2"])], extra_items=[role])
    with pytest.raises(Unusual):
        parse_associate_rq(raw[6:])
    good = request([(storage_sop_classes()[0], ["1.2.840.10008.1.2"])])
    for broken in (good[6:60], good[6:-3], good[6:74] + b"\x20\x00\xff\xff" + good[78:]):
        with pytest.raises(Unusual):
            parse_associate_rq(broken)
