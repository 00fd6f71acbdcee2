"""Patches 4 and 9 (the package's docstring): C-STORE responses routed to a queue on
associations we write C-STOREs on directly, and command sets bounded in size."""
from __future__ import annotations

import logging
import queue
import socket
from typing import Any, Callable

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider

from stowage.protocol import dimse
from stowage.protocol.pdu import A_ABORT_USER, COMMAND, COMMAND_LAST
from stowage.protocol.pynetdicom_patches.reactors import abort

log = logging.getLogger("stowage.reactor")
_ORIGINAL_RECEIVE = DIMSEServiceProvider.receive_primitive
_max_command_bytes = 0  # 9: 0 until install() is given a limit
_on_command_limit: Callable[[str], None] | None = None


def limit_command_sets(max_bytes: int, on_limit: Callable[[str], None] | None) -> None:
    """9: abort an association whose command set grows past `max_bytes`, telling `on_limit(peer)`."""
    global _max_command_bytes, _on_command_limit
    _max_command_bytes, _on_command_limit = max_bytes, on_limit


_ROUTE = "_stowage_store_responses"


def route(assoc: Association) -> "queue.SimpleQueue[tuple[int, int]]":
    """From now on, C-STORE responses on `assoc` arrive here as (Message ID Being
    Responded To, Status). Through the package's `route`, which installs the patches first."""
    q: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    setattr(assoc, _ROUTE, q)
    return q


def unroute(assoc: Association) -> None:
    setattr(assoc, _ROUTE, None)


def receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    command = _command_fragment_bytes(primitive) if _max_command_bytes else 0  # 9
    held = getattr(self.message, _COMMAND_BYTES, 0) if command else 0
    if held + command > _max_command_bytes > 0:
        _refuse_command(self)
        return
    q = getattr(self.assoc, _ROUTE, None)
    if q is not None and self.message is None:
        pdvs = primitive.presentation_data_value_list
        if len(pdvs) == 1 and len(pdvs[0][1]) > 1 and pdvs[0][1][0] & COMMAND_LAST == COMMAND_LAST:
            try:
                fields = dimse.decode(pdvs[0][1][1:])
            except dimse.CommandError:
                fields = {}
            if fields.get("command_field") == dimse.C_STORE_RSP and "status" in fields \
                    and "responding_to" in fields:
                q.put((int(fields["responding_to"]), int(fields["status"])))
                return
    try:
        _ORIGINAL_RECEIVE(self, primitive)
    except Exception as e:  # a command set pynetdicom cannot decode (no Command Field, bad values)
        _refuse_undecodable(self, e)
        return
    if command and self.message is not None:  # still being reassembled: keep its running count
        setattr(self.message, _COMMAND_BYTES, held + command)


_COMMAND_BYTES = "_stowage_command_bytes"  # on a DIMSEMessage being reassembled


def _command_fragment_bytes(primitive: Any) -> int:
    """Command-set bytes in a P-DATA primitive (its PDVs with the command bit; one or two)."""
    return sum(len(pdv) - 1 for _cx, pdv in primitive.presentation_data_value_list if pdv and pdv[0] & COMMAND)


def _refuse_undecodable(provider: DIMSEServiceProvider, error: Exception) -> None:
    """pynetdicom raised decoding a message (a command set without a Command Field, say):
    it would end the DUL thread with a traceback and drop the connection unannounced. One
    log line instead, and an A-ABORT (the association's message stream is lost)."""
    assoc = provider.assoc
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    log.warning("peer %s:%s: undecodable DIMSE message (%s: %s); aborting", remote.address, remote.port,
                type(error).__name__, str(error)[:200])
    provider.message = None
    abort(provider.dul, A_ABORT_USER)
    try:
        provider.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass


def _refuse_command(provider: DIMSEServiceProvider) -> None:
    """The command set being reassembled grew past _max_command_bytes: drop it, abort the
    association and stop reading its socket."""
    assoc = provider.assoc
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    peer = f"{remote.address}:{remote.port}"
    log.warning("peer %s: command set longer than max_command_bytes (%d bytes) without its last fragment; "
                "aborting", peer, _max_command_bytes)
    if _on_command_limit is not None:
        _on_command_limit(peer)
    provider.message = None  # what was buffered goes
    abort(provider.dul, A_ABORT_USER)
    try:
        provider.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass
