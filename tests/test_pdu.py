"""The fixed PDUs we build ourselves (protocol/pdu.py) are byte for byte those pynetdicom
encodes for the same parameters."""
from __future__ import annotations

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ

from stowage.protocol import pdu


def _abort(source: int, reason: int) -> bytes:
    p = A_ABORT_RQ()
    p.source, p.reason_diagnostic = source, reason
    return p.encode()


def test_a_abort_as_pynetdicom_encodes_it():
    assert pdu.A_ABORT_INVALID_PDU == _abort(2, 6)
    assert pdu.A_ABORT_UNEXPECTED_PDU == _abort(2, 2)
    assert pdu.A_ABORT_USER == _abort(0, 0)
    assert pdu.a_abort(pdu.ABORT_SERVICE_PROVIDER) == _abort(2, 0)


def test_a_associate_rj_as_pynetdicom_encodes_it():
    rj = A_ASSOCIATE_RJ()
    rj.result, rj.source, rj.reason_diagnostic = 2, 3, 2  # transient, presentation, local limit exceeded
    assert pdu.A_ASSOCIATE_RJ_LIMIT == rj.encode()


def test_a_release_as_pynetdicom_encodes_it():
    assert pdu.A_RELEASE_RQ_PDU == A_RELEASE_RQ().encode()
    assert pdu.A_RELEASE_RP_PDU == A_RELEASE_RP().encode()


def test_p_data_carries_one_whole_command():
    assert pdu.p_data(5, b"\x01\x02") == bytes([0x04, 0, 0, 0, 0, 8, 0, 0, 0, 4, 5, 0x03, 1, 2])
