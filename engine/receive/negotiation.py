"""Association establishment (PS3.8 7.1, 9.3.2-9.3.3) read and answered by the worker:
the A-ASSOCIATE-RQ is read by protocol/acse.py's lean reader; a storage-only association
is negotiated and answered here, as pynetdicom's `negotiate_as_acceptor` would answer it
(tests/test_negotiation.py holds the two to the same bytes), and served by the lean
receive path (engine/receive/ingest.py). A request the lean reader leaves alone (role
selection, extended negotiation, user identity, anything malformed) is decoded with
pynetdicom's PDU classes, and anything not storage-only is handed to pynetdicom with the
request bytes pushed back in front of the socket."""
from __future__ import annotations

import functools
import socket
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_RQ as RqPdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from stowage.protocol.acse import APPLICATION_CONTEXT_NAME, AssociateRequest, Unusual, associate_ac, parse_associate_rq
from stowage.protocol.pdu import A_ABORT_UNEXPECTED_PDU, A_ASSOCIATE_RQ, HEADER, ProtocolError, read_pdu


@dataclass
class Request:
    """A received A-ASSOCIATE-RQ: its bytes as they came, what the lean reader read of it
    (None when it left the request to pynetdicom), and pynetdicom's primitive of it,
    decoded only when something asks for it."""

    raw: bytes
    lean: AssociateRequest | None = None
    _primitive: A_ASSOCIATE | None = field(default=None, repr=False)

    @property
    def primitive(self) -> A_ASSOCIATE:
        if self._primitive is None:
            self._primitive = _decode(self.raw)
        return self._primitive

    @property
    def calling_ae(self) -> str:
        return self.lean.calling_ae if self.lean else str(self.primitive.calling_ae_title).strip()

    @property
    def called_ae(self) -> str:
        return self.lean.called_ae if self.lean else str(self.primitive.called_ae_title).strip()

    @property
    def abstract_syntaxes(self) -> set[str]:
        """The abstract syntaxes of the proposed presentation contexts."""
        if self.lean:
            return {abstract for _id, abstract, _syntaxes in self.lean.contexts}
        return {str(cx.abstract_syntax) for cx in self.primitive.presentation_context_definition_list}

    @property
    def peer_max_pdu(self) -> int:
        if self.lean:
            return self.lean.max_pdu
        for item in self.primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                return item.maximum_length_received or 0
        return 0


def _decode(raw: bytes) -> A_ASSOCIATE:
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
    return primitive


def read_request(sock: socket.socket, limit: int, deadline: float | None = None) -> Request:
    """The peer's A-ASSOCIATE-RQ, read whole by `deadline` (time.monotonic(); else
    DeadlinePassed from protocol.pdu), so a peer trickling it in cannot hold its
    association slot for longer than association_request_timeout."""
    pdu_type, body = read_pdu(sock, limit, deadline)
    if pdu_type != A_ASSOCIATE_RQ:
        raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", A_ABORT_UNEXPECTED_PDU)
    raw = bytes(HEADER.pack(pdu_type, len(body)) + body)
    try:
        return Request(raw, parse_associate_rq(body))
    except Unusual:
        return Request(raw, None, _decode(raw))  # pynetdicom reads it, or refuses it as before


def storage_only(req: Request, storage: frozenset[str]) -> bool:
    """Whether the lean path can serve this association: every proposed abstract syntax is
    a storage or verification class and no negotiation item needs pynetdicom."""
    if req.lean is None:
        return False  # role selection, extended negotiation, user identity: pynetdicom's
    return req.lean.application_context == APPLICATION_CONTEXT_NAME and req.abstract_syntaxes <= storage


@dataclass
class Accepted:
    ac: bytes                                  # the A-ASSOCIATE-AC PDU to send
    contexts: dict[int, tuple[str, str]]       # context ID -> (abstract syntax, transfer syntax)


def accept(req: Request, supported: list[PresentationContext], max_pdu: int,
           implementation_class_uid: str, implementation_version_name: str) -> Accepted:
    """Negotiate the presentation contexts of a storage-only request and build the
    A-ASSOCIATE-AC: per context, our first transfer syntax the requestor proposed
    (0x00), else 0x04 (no transfer syntax), or 0x03 (abstract syntax not supported), as
    pynetdicom's negotiate_as_acceptor; then `_senders_encoding`'s rule."""
    assert req.lean is not None, "storage_only() first: only a lean-read request is negotiated here"
    ours = _preferences(supported)
    proposed: dict[tuple[int, str], list[str]] = {}
    for context_id, abstract, syntaxes in req.lean.contexts:
        proposed[(context_id, abstract)] = syntaxes
    results, accepted = [], {}
    for (context_id, abstract), syntaxes in proposed.items():
        ranked = ours.get(abstract)
        if ranked is None:
            results.append((context_id, 0x03, syntaxes[0]))
            continue
        chosen = next((ts for ts in ranked if ts in syntaxes), None)
        if chosen is None:
            results.append((context_id, 0x04, syntaxes[0]))
            continue
        chosen = _senders_encoding(syntaxes[0], chosen, ranked)
        results.append((context_id, 0x00, chosen))
        accepted[context_id] = (abstract, chosen)
    results.sort(key=lambda r: r[0])
    ac = associate_ac(req.lean, results, max_pdu, implementation_class_uid, implementation_version_name)
    return Accepted(ac, accepted)


def _senders_encoding(first: str, chosen: str, ranked: tuple[str, ...]) -> str:
    """The syntax to accept: the requestor's first transfer syntax where it is an
    encapsulated one we support: the sender holds the instance that way, and our own preference (the
    uncompressed syntaxes first) would make it decompress, or fail to (a C-MOVE source such
    as dcmqrscp proposes RLE and the uncompressed syntaxes in one context; 0xA702 when it
    cannot convert). Where the sender lists an uncompressed syntax first, ours stands.

    Deflated Explicit VR Little Endian is not kept that way: proposed beside an uncompressed
    syntax, the uncompressed one is accepted (our order, which puts Deflated after them), so
    a sender cannot make us inflate what it could send plain (an inflation bomb costs it
    kilobytes, us max_inflated_bytes); any sender can inflate, losslessly. Proposed alone, or
    only beside encapsulated syntaxes (which could be lossy to convert to), Deflated is
    accepted as before. PS3.8 9.3.3.2 leaves the choice among proposed syntaxes to the acceptor."""
    return first if first != chosen and first in ranked and _encapsulated(first) else chosen


@functools.lru_cache(maxsize=256)
def _encapsulated(uid: str) -> bool:
    return UID(uid).is_encapsulated


_preferences_of: dict[int, tuple[list[PresentationContext], dict[str, tuple[str, ...]]]] = {}


def _preferences(supported: list[PresentationContext]) -> dict[str, tuple[str, ...]]:
    """Abstract syntax -> our transfer syntaxes in order of preference, worked out once per
    list of supported contexts (a worker keeps one for its life)."""
    cached = _preferences_of.get(id(supported))
    if cached is None or cached[0] is not supported:
        table = {str(cx.abstract_syntax): tuple(map(str, cx.transfer_syntax)) for cx in supported}
        cached = _preferences_of[id(supported)] = (supported, table)
    return cached[1]
