"""The legacy archive we migrate from: naming it, and one association to it that offers
Study Root C-FIND and C-MOVE (C-GET has an association of its own: engine/migrate/pull.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as FIND,
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)

from stowage.engine.transfer.requestor import Peer, PeerError, associate, new_ae, peer_of
from stowage.engine.runtime.config import Config
from stowage.protocol.status import PENDING_STATUSES, SUCCESS

_AE_AT = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")


class SourceError(RuntimeError):
    """The source cannot be named or reached; the message says which and why."""


def parse_source(text: str, config: Config) -> Peer:
    """`AE@host:port`, or the name of a configured remote (`[remotes.NAME]`)."""
    remote = config.remotes.get(text)
    if remote is not None:
        try:
            return peer_of(remote)
        except PeerError as e:
            raise SourceError(str(e)) from None
    m = _AE_AT.match(text)
    if not m or not 0 < int(m["port"]) < 65536:
        known = ", ".join(sorted(config.remotes)) or "none configured"
        raise SourceError(f"--from {text!r}: expected AE@host:port or a configured remote (known: {known})")
    return Peer(m["ae"].strip(), m["host"].strip("[]"), int(m["port"]))


def slug(peer: Peer) -> str:
    """A file-name-safe name for the source (its checkpoint and reports are named so)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{peer.ae_title}@{peer.host}_{peer.port}")


@dataclass
class Answer:
    """All responses of one C-FIND: matches, the final status, and its comment."""

    matches: list[Any]  # what `convert` made of each match (None results are not kept)
    status: int | None  # None: no final response (timeout, abort)
    comment: str = ""
    count: int = -1     # matches the source sent (-1: len(matches))

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = len(self.matches)

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class Session:
    """One association to the source; use as a context manager."""

    def __init__(self, peer: Peer, calling_aet: str, *, timeout: float = 60.0) -> None:
        self.peer = peer
        self.ae = new_ae(calling_aet, acse_timeout=min(timeout, 30.0), dimse_timeout=timeout,
                         network_timeout=max(timeout, 60.0))
        try:
            self.assoc: Association = associate(self.ae, peer, [build_context(FIND), build_context(MOVE)])
        except PeerError as e:
            raise SourceError(str(e)) from None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, abort: bool = False) -> None:
        """Release the association; `abort` it instead when a C-FIND may still be answering
        (an interrupted enumeration: a release would wait out the ACSE timeout, 30 s, behind
        the answer's remaining responses)."""
        if self.assoc.is_established:
            if abort:
                self.assoc.abort()
                return
            try:
                self.assoc.release()
            except Exception:  # noqa: BLE001 - a peer gone mid-release needs no more from us
                self.assoc.abort()

    def find(self, identifier: Dataset, convert: Callable[[Dataset], Any] = lambda ds: ds) -> Answer:
        """Every match of a Study Root C-FIND, and how it ended. Each match is converted as
        it arrives (a large answer is not held as datasets)."""
        matches: list[Any] = []
        count = 0
        for status, ident in self.assoc.send_c_find(identifier, FIND):
            code = status.get("Status") if status else None
            if code is None:
                return Answer(matches, None, "no response from the source (timeout or association lost)", count)
            if code in PENDING_STATUSES:
                if ident is not None:
                    count += 1
                    kept = convert(ident)
                    if kept is not None:
                        matches.append(kept)
                continue
            return Answer(matches, int(code), str(status.get("ErrorComment", "") or ""), count)
        return Answer(matches, None, "the source ended the C-FIND without a final status", count)

    def moved(self, identifier: Dataset, move_aet: str) -> Iterator[tuple[Dataset, Any]]:
        """The responses of a C-MOVE to `move_aet`, as pynetdicom yields them."""
        return self.assoc.send_c_move(identifier, move_aet, MOVE)

    @property
    def established(self) -> bool:
        return self.assoc.is_established
