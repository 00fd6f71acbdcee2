"""The command sets we encode ourselves (protocol/dimse.py) are byte for byte those
pynetdicom encodes from the same primitive, so peers cannot tell the two paths apart."""
from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom import dimse_messages as msgs
from pynetdicom import dimse_primitives as prims
from pynetdicom.dsutils import encode

from stowage.protocol import dimse

CT = "1.2.840.10008.5.1.4.1.1.2"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def pynetdicom_bytes(primitive, message_class) -> bytes:
    msg = message_class()
    msg.primitive_to_message(primitive)
    return encode(msg.command_set, True, True)


def test_store_request_with_and_without_move_originator():
    for originator in (None, ("MOVESCU", 9)):
        p = prims.C_STORE()
        p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Priority = 3, CT, "1.2.3.4", 0
        p.DataSet = BytesIO(b"\x08\x00")
        if originator:
            p.MoveOriginatorApplicationEntityTitle, p.MoveOriginatorMessageID = originator
        assert dimse.store_request(3, CT, "1.2.3.4", 0, originator) == pynetdicom_bytes(p, msgs.C_STORE_RQ)


@pytest.mark.parametrize("status, comment", [(0x0000, ""), (0xA700, "disk full: 10 MB left")])
def test_store_response(status, comment):
    p = prims.C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Status = 5, CT, "1.2.3", status
    if comment:
        p.ErrorComment = comment
    assert dimse.store_response(5, CT, "1.2.3", status, comment) == pynetdicom_bytes(p, msgs.C_STORE_RSP)


@pytest.mark.parametrize("kind, message_class, field", [(prims.C_MOVE, msgs.C_MOVE_RSP, dimse.C_MOVE_RSP),
                                                        (prims.C_GET, msgs.C_GET_RSP, dimse.C_GET_RSP)])
def test_pending_retrieve_response(kind, message_class, field):
    p = kind()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 7, MOVE, 0xFF00
    (p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations,
     p.NumberOfFailedSuboperations, p.NumberOfWarningSuboperations) = (499, 1, 2, 3)
    assert dimse.retrieve_response(field, 7, MOVE, 0xFF00, (499, 1, 2, 3)) == pynetdicom_bytes(p, message_class)
    decoded = dimse.decode(dimse.retrieve_response(field, 7, MOVE, 0xFF00, (499, 1, 2, 3)))
    assert decoded["command_field"] == field and decoded["status"] == 0xFF00
