"""Association establishment (PS3.8 7.1, 9.3.2-9.3.3) read and answered by the worker:
the A-ASSOCIATE-RQ is read and decoded with pynetdicom's PDU classes and negotiated with
pynetdicom's `negotiate_as_acceptor`; a storage-only association is then answered here
and served by the lean receive path (engine/receive/ingest.py); anything else is handed to
pynetdicom with the request bytes pushed back in front of the socket."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu, A_ASSOCIATE_RQ as RqPdu
from pynetdicom.pdu_primitives import (A_ASSOCIATE, AsynchronousOperationsWindowNegotiation,
                                       ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from stowage.protocol.acse import APPLICATION_CONTEXT_NAME, user_information
from stowage.protocol.pdu import A_ABORT_UNEXPECTED_PDU, A_ASSOCIATE_RQ, HEADER, ProtocolError, read_pdu

# Items the lean path answers itself; anything else (role selection, extended negotiation,
# user identity) goes to pynetdicom.
_PLAIN_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
                ImplementationVersionNameNotification, AsynchronousOperationsWindowNegotiation)


@dataclass
class Request:
    """A received A-ASSOCIATE-RQ: its bytes as they came and its decoded primitive."""

    raw: bytes
    primitive: A_ASSOCIATE

    @property
    def calling_ae(self) -> str:
        return str(self.primitive.calling_ae_title).strip()

    @property
    def called_ae(self) -> str:
        return str(self.primitive.called_ae_title).strip()

    @property
    def peer_max_pdu(self) -> int:
        for item in self.primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                return item.maximum_length_received or 0
        return 0


def read_request(sock: socket.socket, limit: int, deadline: float | None = None) -> Request:
    """The peer's A-ASSOCIATE-RQ, read whole by `deadline` (time.monotonic(); else
    DeadlinePassed from protocol.pdu), so a peer trickling it in cannot hold its
    association slot for longer than association_request_timeout."""
    pdu_type, body = read_pdu(sock, limit, deadline)
    if pdu_type != A_ASSOCIATE_RQ:
        raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", A_ABORT_UNEXPECTED_PDU)
    raw = bytes(HEADER.pack(pdu_type, len(body)) + body)
    request = RqPdu()
    try:
        request.decode(raw)
        primitive = request.to_primitive()
    except Exception as e:  # pynetdicom raises assorted errors on malformed items
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {e}") from None
    for cx in primitive.presentation_context_definition_list:  # PS3.8 9.3.2.2: one abstract, 1+ transfer syntaxes
        if cx.abstract_syntax is None or not cx.transfer_syntax:  # (pynetdicom's negotiation raises on these)
            raise ProtocolError(f"A-ASSOCIATE-RQ: presentation context {cx.context_id} without an abstract syntax "
                                "or a transfer syntax")
    return Request(raw, primitive)


def storage_only(req: Request, storage: frozenset[str]) -> bool:
    """Whether the lean path can serve this association: every proposed abstract syntax is
    a storage or verification class and no negotiation item needs pynetdicom."""
    p = req.primitive
    if str(p.application_context_name) != APPLICATION_CONTEXT_NAME:
        return False
    if not all(isinstance(item, _PLAIN_ITEMS) for item in p.user_information):
        return False
    return all(str(cx.abstract_syntax) in storage for cx in p.presentation_context_definition_list)


@dataclass
class Accepted:
    ac: bytes                                  # the A-ASSOCIATE-AC PDU to send
    contexts: dict[int, tuple[str, str]]       # context ID -> (abstract syntax, transfer syntax)


def _keep_senders_encoding(proposed: list[PresentationContext], results: list[PresentationContext],
                           supported: list[PresentationContext]) -> None:
    """Accept the requestor's first transfer syntax where it is an encapsulated one we
    support: the sender holds the instance that way, and our own preference (the
    uncompressed syntaxes first) would make it decompress, or fail to (a C-MOVE source such
    as dcmqrscp proposes RLE and the uncompressed syntaxes in one context; 0xA702 when it
    cannot convert). Where the sender lists an uncompressed syntax first, ours stands.

    Deflated Explicit VR Little Endian is not kept that way: proposed beside an uncompressed
    syntax, the uncompressed one is accepted (our order, which puts Deflated after them), so
    a sender cannot make us inflate what it could send plain (an inflation bomb costs it
    kilobytes, us max_inflated_bytes); any sender can inflate, losslessly. Proposed alone, or
    only beside encapsulated syntaxes (which could be lossy to convert to), Deflated is
    accepted as before. PS3.8 9.3.3.2 leaves the choice among proposed syntaxes to the acceptor."""
    ours = {str(cx.abstract_syntax): set(map(str, cx.transfer_syntax)) for cx in supported}
    first = {cx.context_id: str(cx.transfer_syntax[0]) for cx in proposed if cx.transfer_syntax}
    for cx in results:
        wanted = first.get(cx.context_id)
        if (cx.result == 0x00 and wanted and UID(wanted).is_encapsulated
                and wanted in ours.get(str(cx.abstract_syntax), ()) and str(cx.transfer_syntax[0]) != wanted):
            cx.transfer_syntax = [UID(wanted)]


def accept(req: Request, supported: list[PresentationContext], max_pdu: int,
           implementation_class_uid: str, implementation_version_name: str) -> Accepted:
    """Negotiate the presentation contexts and build the A-ASSOCIATE-AC."""
    p = req.primitive
    results, _roles = negotiate_as_acceptor(p.presentation_context_definition_list, supported, {})
    _keep_senders_encoding(p.presentation_context_definition_list, results, supported)
    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    ac.calling_ae_title = p.calling_ae_title
    ac.called_ae_title = p.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    ac.user_information = user_information(max_pdu, implementation_class_uid, implementation_version_name)
    pdu = AcPdu()
    pdu.from_primitive(ac)
    accepted = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00}
    return Accepted(pdu.encode(), accepted)
