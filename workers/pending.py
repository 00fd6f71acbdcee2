"""Pending responses of the Query/Retrieve services, each in one PDU, without pydicom.

pynetdicom sends each DIMSE message as P-DATA primitives of one fragment each, and
encodes its command set with pydicom every time (docs/benchmarks.md): a C-FIND pending response is
two PDUs (two hand-offs to the DUL thread, two socket writes), and a C-MOVE or C-GET
that reports every sub-operation spends as much on its pending responses as on reading
the instance it sent.

- C-FIND pending responses that fit in one PDU go as the command and the identifier in
  two PDVs of one P-DATA-TF (PS3.8 9.3.5 allows several PDVs per PDU, in order), with
  the command set encoded once per request (it is the same for every match).
- C-MOVE and C-GET pending responses (no identifier) are encoded by workers/commands.py
  in microseconds.

- `send_retrieve_pending` sends one straight from its counts, with no pynetdicom
  primitive (whose setters validate the SOP Class UID by regular expression every time):
  the C-MOVE/C-GET SCP (workers/retrieve.py) sends one per sub-operation.

Everything else, and any association that watches EVT_DIMSE_SENT, goes pynetdicom's way.
"""
from __future__ import annotations

from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from stowage.workers import commands

_ORIGINAL_SEND_MSG = DIMSEServiceProvider.send_msg
PENDING = 0xFF00
_PENDING = (PENDING, 0xFF01)
_RETRIEVE_RSP = {C_MOVE: commands.C_MOVE_RSP, C_GET: commands.C_GET_RSP}


def install_pending_responses() -> None:
    DIMSEServiceProvider.send_msg = _send_msg


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    kind = type(primitive)
    if (kind in (C_FIND, C_MOVE, C_GET) and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status in _PENDING and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
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
    return [b"\x03" + command, b"\x02" + data]  # command, last; data set, last


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
    command = commands.retrieve_response(command_field, primitive.MessageIDBeingRespondedTo,
                                         str(primitive.AffectedSOPClassUID), primitive.Status, counts)
    return [b"\x03" + command]


def send_retrieve_pending(provider: DIMSEServiceProvider, context_id: int, kind: type, message_id: int,
                          sop_class: str, counts: tuple[int, int, int, int]) -> bool:
    """Send a C-MOVE or C-GET pending response (remaining, completed, failed, warning
    `counts`) in one PDU; False, sending nothing, if the association watches
    EVT_DIMSE_SENT (pynetdicom's `send_msg` must then be used, for the event)."""
    if provider.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return False
    command = retrieve_pending_command(kind, message_id, sop_class, counts)
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    provider.dul.send_pdu(pdata)
    return True


def retrieve_pending_command(kind: type, message_id: int, sop_class: str, counts: tuple[int, int, int, int]) -> bytes:
    """The command set of a C-MOVE or C-GET pending response (no identifier)."""
    return commands.retrieve_response(_RETRIEVE_RSP[kind], message_id, sop_class, PENDING, counts)
