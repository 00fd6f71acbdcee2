"""C-STORE responses on an association someone else opened and we write C-STOREs on
directly (C-GET: engine/send.py `_DirectLink`): taken off pynetdicom's DUL thread with a
struct decode of the command set, instead of pynetdicom decoding it with pydicom and
building a validated C_STORE primitive (its share of a C-GET's GIL time:
docs/benchmarks.md).

Only while a queue is routed to an association, only a P-DATA that is a whole command set
in one PDV (as every C-STORE-RSP without a dataset is), and only a C-STORE-RSP: everything
else (C-CANCEL, a partly received message, anything odd) goes pynetdicom's way.
"""
from __future__ import annotations

import queue
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider

from stowage.workers import commands

_ORIGINAL_RECEIVE = DIMSEServiceProvider.receive_primitive
_ROUTE = "_stowage_store_responses"


def install() -> None:
    """Patch pynetdicom's DIMSE receive (this process); idempotent."""
    DIMSEServiceProvider.receive_primitive = _receive_primitive


def route(assoc: Any) -> "queue.SimpleQueue[tuple[int, int]]":
    """From now on, C-STORE responses on `assoc` arrive here as (Message ID Being
    Responded To, Status)."""
    install()
    q: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    setattr(assoc, _ROUTE, q)
    return q


def unroute(assoc: Any) -> None:
    setattr(assoc, _ROUTE, None)


def _receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    q = getattr(self.assoc, _ROUTE, None)
    if q is not None and self.message is None:
        pdvs = primitive.presentation_data_value_list
        if len(pdvs) == 1 and len(pdvs[0][1]) > 1 and pdvs[0][1][0] & 0x03 == 0x03:  # command, last fragment
            try:
                fields = commands.decode(pdvs[0][1][1:])
            except commands.CommandError:
                fields = {}
            if fields.get("command_field") == commands.C_STORE_RSP and "status" in fields \
                    and "responding_to" in fields:
                q.put((int(fields["responding_to"]), int(fields["status"])))
                return
    _ORIGINAL_RECEIVE(self, primitive)
