"""Query/Retrieve FIND SCP (C-FIND) for the Patient Root, Study Root and Patient/Study
Only models: protocol work only. Matching lives in catalog.query, response identifiers
in catalog.responses; this adapter decodes the request, yields one pending response per
match, and stops with Cancel as soon as a C-CANCEL arrives.

Relational queries are served when the requester asks for them in SOP Class Extended
Negotiation (PS3.4 C.5.1.1.1); we accept relational queries and combined date-time
matching, and decline fuzzy semantic matching of person names and timezone adjustment.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt

from stowage.catalog.keys import models
from stowage.catalog.query import QueryError, parse_request, run
from stowage.catalog.reader import Catalog
from stowage.catalog.responses import identifier as response_identifier
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import log_reference
from stowage.engine.runtime.counts import counts as process_counts
from stowage.protocol.status import CANCEL, PENDING, SOP_CLASS_NOT_SUPPORTED, UNABLE_TO_PROCESS

log = logging.getLogger("stowage.find")
audit = logging.getLogger("stowage.audit")

FIND_SOP_CLASSES = tuple(models())
# Extended negotiation bytes (PS3.4 C.5.1.1.1): relational, date-time, fuzzy PN, timezone.
_SUPPORTED = bytes([1, 1, 0, 0])


class Finder:
    """What the C-FIND handler needs: its own view of the catalog (so that queries never
    wait on the store path's lookups), our AE title and the PN matching policy."""

    def __init__(self, config: Config) -> None:
        self.catalog = Catalog(config.data_dir / "catalog", config.duplicates, cluster=config.cluster_view)
        self.ae_title = config.aet
        self.pn_insensitive = config.pn_case_insensitive

    def close(self) -> None:
        self.catalog.close()


# pynetdicom's DUL thread sends what it is given before it reads the socket again, so a
# C-CANCEL waits behind every response queued before it. Every _LISTEN_EVERY responses the
# handler waits for the queue to empty and the DUL thread to look at the socket; this also
# keeps at most that many responses in memory.
_LISTEN_EVERY = 64
_LISTEN_S = 0.0003


def _let_the_peer_speak(assoc: Any, timeout: float = 30.0) -> None:
    queue = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if queue is None:
        return
    deadline = time.monotonic() + timeout
    while not queue.empty() and assoc.is_established and time.monotonic() < deadline:
        time.sleep(_LISTEN_S / 5)
    time.sleep(_LISTEN_S)  # the DUL thread's next turn reads what arrived meanwhile


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]  # LO: 64 characters at most
    return rsp, None


def _asked(assoc: Any, sop_class_uid: str, byte: int) -> bool:
    """Whether the requester set byte `byte` of the class's extended negotiation item to 1
    (and so got it: we accept both bytes we read, _SUPPORTED)."""
    try:
        info = assoc.requestor.sop_class_extended.get(sop_class_uid)
    except Exception:
        return False
    return bool(info) and len(info) > byte and info[byte] == 1


def relational(assoc: Any, sop_class_uid: str) -> bool:
    """Whether the requester asked for (and so got) relational queries for the class."""
    return _asked(assoc, sop_class_uid, 0)


def combined_datetime(assoc: Any, sop_class_uid: str) -> bool:
    """Whether the requester asked for combined date-time matching (byte 2): without it,
    PS3.4 C.2.2.2.5.1 matches a date range and a time range each on its own."""
    return _asked(assoc, sop_class_uid, 1)


def handle_sop_extended(event: evt.Event) -> dict[str, bytes]:
    """Accept what we support of each FIND class's extended negotiation item."""
    return {uid: bytes(a & b for a, b in zip(info, _SUPPORTED))
            for uid, info in (event.app_info or {}).items() if str(uid) in FIND_SOP_CLASSES and info}


def handle_find(event: evt.Event, finder: Finder) -> Iterator[tuple[Any, Dataset | None]]:
    req = event.request
    sop_class = str(req.AffectedSOPClassUID)
    started, count = time.monotonic(), 0
    if sop_class != str(event.context.abstract_syntax):
        yield _failure(SOP_CLASS_NOT_SUPPORTED, "SOP Class differs from the presentation context's")
        return
    try:
        ident = event.identifier
    except Exception:  # undecodable identifier: what pydicom says about it goes to our log only
        ref = log_reference(log, "C-FIND from %s: cannot decode the identifier", event.assoc.requestor.ae_title,
                            level=logging.WARNING)
        yield _failure(UNABLE_TO_PROCESS, f"cannot decode the identifier (archive log reference {ref})")
        return
    try:
        request = parse_request(ident, sop_class, relational(event.assoc, sop_class),
                                combined_datetime(event.assoc, sop_class))
    except QueryError as e:
        log.info("C-FIND from %s refused 0x%04X: %s", event.assoc.requestor.ae_title, e.status, e.comment)
        yield _failure(e.status, e.comment)
        return
    cancelled = False  # event.is_cancelled is true once per C-CANCEL: keep the answer
    try:
        for result in run(finder.catalog, request, finder.pn_insensitive):
            if count and count % _LISTEN_EVERY == 0:
                _let_the_peer_speak(event.assoc)
            cancelled = event.is_cancelled
            if cancelled:
                break
            yield PENDING, response_identifier(request, result, finder.ae_title, finder.pn_insensitive)
            count += 1
    except Exception:  # never let a query take the association down, nor tell the peer our internals
        ref = log_reference(log, "C-FIND from %s failed", event.assoc.requestor.ae_title)
        yield _failure(UNABLE_TO_PROCESS + 1, f"internal error (archive log reference {ref})")
        return
    cancelled = cancelled or event.is_cancelled
    process_counts.add("finds")
    audit.info("C-FIND %s %s from %s: %d match(es)%s in %.1f ms", request.model.name, request.level,
               event.assoc.requestor.ae_title, count, " (cancelled)" if cancelled else "",
               (time.monotonic() - started) * 1000,
               extra={"fields": {"event": "find", "model": request.model.name, "query_level": request.level,
                                 "relational": request.relational, "calling_ae": event.assoc.requestor.ae_title,
                                 "matches": count, "cancelled": cancelled}})
    if cancelled:
        yield CANCEL, None
