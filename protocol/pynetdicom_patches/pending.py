"""Patch 3 (the package's docstring): C-FIND, C-MOVE and C-GET pending responses in one
P-DATA-TF, their command sets encoded once per request or by protocol/dimse.py."""
from __future__ import annotations

from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from stowage.protocol import dimse
from stowage.protocol.pdu import COMMAND_LAST, DATA_LAST
from stowage.protocol.status import PENDING, PENDING_STATUSES

_ORIGINAL_SEND_MSG = DIMSEServiceProvider.send_msg


_RETRIEVE_RSP = {C_MOVE: dimse.C_MOVE_RSP, C_GET: dimse.C_GET_RSP}


def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    kind = type(primitive)
    if (kind in (C_FIND, C_MOVE, C_GET) and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status in PENDING_STATUSES and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        pdvs = _find_pdvs(self, primitive) if kind is C_FIND else _retrieve_pdvs(primitive, _RETRIEVE_RSP[kind])
        if pdvs:
            pdata = P_DATA()
            pdata.presentation_data_value_list.extend((context_id, pdv) for pdv in pdvs)
            self.dul.send_pdu(pdata)
            return
    _ORIGINAL_SEND_MSG(self, primitive, context_id)


def _find_pdvs(provider: DIMSEServiceProvider, primitive: C_FIND) -> list[bytes]:
    if primitive.Identifier is None:
        return []
    data = primitive.Identifier.getvalue()
    command = _find_command_set(provider, primitive)
    limit = provider.maximum_pdu_size
    if not data or (limit and len(command) + len(data) + 12 > limit):
        return []
    return [bytes([COMMAND_LAST]) + command, bytes([DATA_LAST]) + data]


def _find_command_set(provider: DIMSEServiceProvider, primitive: C_FIND) -> bytes:
    key = (str(primitive.AffectedSOPClassUID), primitive.MessageIDBeingRespondedTo, primitive.Status)
    cache = provider.__dict__.setdefault("_stowage_find_commands", {})
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        msg = C_FIND_RSP()
        msg.primitive_to_message(primitive)
        cache[key] = encode(msg.command_set, True, True)
    return cache[key]


def _retrieve_pdvs(primitive: C_MOVE | C_GET, command_field: int) -> list[bytes]:
    if primitive.Identifier is not None or primitive.NumberOfRemainingSuboperations is None:
        return []
    counts = (primitive.NumberOfRemainingSuboperations, primitive.NumberOfCompletedSuboperations or 0,
              primitive.NumberOfFailedSuboperations or 0, primitive.NumberOfWarningSuboperations or 0)
    command = dimse.retrieve_response(command_field, primitive.MessageIDBeingRespondedTo,
                                      str(primitive.AffectedSOPClassUID), primitive.Status, counts)
    return [bytes([COMMAND_LAST]) + command]


def send_retrieve_pending(provider: DIMSEServiceProvider, context_id: int, kind: type, message_id: int,
                          sop_class: str, counts: tuple[int, int, int, int]) -> bool:
    """Send a C-MOVE or C-GET pending response (remaining, completed, failed, warning
    `counts`) in one PDU, with no pynetdicom primitive (whose setters validate the SOP
    Class UID by regular expression every time); False, sending nothing, if the
    association watches EVT_DIMSE_SENT (pynetdicom's `send_msg` must then be used)."""
    if provider.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return False
    command = retrieve_pending_command(kind, message_id, sop_class, counts)
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes([COMMAND_LAST]) + command))
    provider.dul.send_pdu(pdata)
    return True


def retrieve_pending_command(kind: type, message_id: int, sop_class: str, counts: tuple[int, int, int, int]) -> bytes:
    """The command set of a C-MOVE or C-GET (`kind`) pending response (no identifier)."""
    return dimse.retrieve_response(_RETRIEVE_RSP[kind], message_id, sop_class, PENDING, counts)
