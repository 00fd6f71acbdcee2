"""Query/Retrieve MOVE and GET SCP (C-MOVE, C-GET) for the Patient Root, Study Root and
Patient/Study Only models, at every level the model has.

The instances are chosen from the request identifier's unique keys (the level's and the
levels' above it, UID lists included) over the catalog, which sees every acknowledged
store (sealed Parquet plus tails). Sub-operations go through the shared sending core
(engine/transfer/send.py): byte-exact when the destination accepts the stored transfer syntax,
converted otherwise (never to a lossy syntax), a failed one counted with its reason in
the log. C-MOVE opens its own association to the destination from `[remotes.AE]`
(TCP_NODELAY, a store without response retried once on a new association); C-GET sends
on the requester's association, on the storage contexts it proposed with SCP role.

pynetdicom's own MOVE/GET SCP takes only decoded `Dataset`s from the handler and opens
the sub-association itself, so the worker replaces its two methods with `scp`
(protocol/pynetdicom_patches/pending.py): pending responses with the
remaining/completed/failed/warning counts, after the first sub-operation and then at most
one per `pending_interval` (PS3.4 C.4.2.3.1 and C.4.3.3.1 make them optional; 0 sends one
per sub-operation), then the final one (success, 0xB000 with a Failed SOP Instance UID
List, 0xA702 when none succeeded, or Cancel 0xFE00 after a C-CANCEL).
"""
from __future__ import annotations

import functools
import logging
import time
from io import BytesIO
from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    PatientStudyOnlyQueryRetrieveInformationModelGet,
    PatientStudyOnlyQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from stowage.catalog.reader import Catalog
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.runtime.logs import log_reference
from stowage.engine.transfer.requestor import Peer, PeerError, peer_of
from stowage.engine.transfer.deleted import DeletionWatch
from stowage.engine.transfer.links import direct_socket
from stowage.engine.transfer.results import Instance, Outcome
from stowage.engine.transfer.send import Sender
from stowage.protocol.dimse import suboperations
from stowage.protocol.pdu import p_data
from stowage.protocol.pynetdicom_patches import retrieve_pending_command, send_retrieve_pending
from stowage.protocol.status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    SUBOPERATIONS_COMPLETE_WITH_FAILURES,
    SUCCESS,
    UNABLE_TO_PERFORM_SUBOPERATIONS,
    UNABLE_TO_PROCESS,
)

log = logging.getLogger("stowage.retrieve")
audit = logging.getLogger("stowage.audit")

_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_UNIQUE = {"PATIENT": ("PatientID", "patient_id"), "STUDY": ("StudyInstanceUID", "study_instance_uid"),
           "SERIES": ("SeriesInstanceUID", "series_instance_uid"), "IMAGE": ("SOPInstanceUID", "sop_instance_uid")}
_MODELS = (  # (C-MOVE SOP class, C-GET SOP class, levels) of each Query/Retrieve model
    (PatientRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelGet, _LEVELS),
    (StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet, _LEVELS[1:]),
    (PatientStudyOnlyQueryRetrieveInformationModelMove, PatientStudyOnlyQueryRetrieveInformationModelGet, _LEVELS[:2]))
MOVE_SOP_CLASSES = tuple(move for move, _get, _levels in _MODELS)
GET_SOP_CLASSES = tuple(get for _move, get, _levels in _MODELS)
_ROOTS = {move.rsplit(".", 1)[0]: levels for move, _get, levels in _MODELS}  # a model's classes differ in the last part
_FIELDS = ("sop_instance_uid, sop_class_uid, transfer_syntax_uid, segment, \"offset\", dataset_length, "
           "epoch_us(received_at)")


class RetrieveError(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


def select(catalog: Catalog, sop_class_uid: str, identifier: Dataset) -> tuple[str, list[Instance]]:
    """The level and the kept instances the identifier names, in segment order."""
    levels = _ROOTS.get(sop_class_uid.rsplit(".", 1)[0])
    if levels is None:
        raise RetrieveError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"not a retrieve SOP class: {sop_class_uid}")
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level == "PATIENT" and levels == _LEVELS[1:]:
        # Orthanc retrieves a patient in the Study Root model (PS3.4 has no PATIENT level
        # there): served as in the Patient Root one, rather than refusing its "retrieve patient"
        levels = _LEVELS
    if level not in levels:
        raise RetrieveError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                            f"Query/Retrieve Level {level!r} is not one of {'/'.join(levels)} in this model")
    where, params = [], []
    for lvl in levels[: levels.index(level) + 1]:
        keyword, column = _UNIQUE[lvl]
        raw = identifier.get(keyword)
        values = [str(v).strip() for v in (raw if isinstance(raw, (list, tuple)) or
                                           type(raw).__name__ == "MultiValue" else [raw])
                  if v is not None and str(v).strip()] if raw is not None else []
        if not values:
            if lvl == level:
                raise RetrieveError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is required at the {level} level")
            continue
        if any("*" in v or "?" in v for v in values):
            raise RetrieveError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword}: no wildcards in a retrieve")
        where.append(f"{column} IN (SELECT unnest(?))")
        params.append(values)
    sql = f"SELECT {_FIELDS} FROM instances WHERE {' AND '.join(where)} ORDER BY segment, \"offset\""
    _cols, rows = catalog.execute(sql, params)
    return level, [Instance(*r[:5], dataset_length=r[5] or 0, received_at=r[6]) for r in rows]


def _why(failures: list[Outcome], peer: Peer) -> str:
    """An Error Comment (LO, 64 characters) saying why sub-operations failed: the first
    failure's reason, the destination named by its AE title alone (the requester knows
    where it is), the rest counted; the log has every reason."""
    if not failures:
        return ""
    reason = failures[0].reason.replace(f"{peer} ", f"{peer.ae_title} ", 1) or "failed"
    reason = reason.replace(" accepted no presentation context for SOP class ", " took no context for ", 1)
    others = sum(1 for o in failures[1:] if o.reason != failures[0].reason)
    if others:
        reason = f"{reason} (+{others} other reasons in our log)"
    return reason if len(reason) <= 64 else reason[:61] + "..."


class Retriever:
    """What the MOVE and GET SCP need: a catalog view, the remotes, timeouts."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = Catalog(config.data_dir / "catalog", config.duplicates, cluster=config.cluster_view)

    def close(self) -> None:
        self.catalog.close()

    def sender(self, peer: Peer, **kwargs: Any) -> Sender:
        c = self.config
        return Sender(c.data_dir / "segments", peer, c.aet, dimse_timeout=c.dimse_timeout,
                      acse_timeout=c.acse_timeout, duplicates=c.duplicates,
                      max_inflated_bytes=c.max_inflated_bytes, cluster=c.cluster_view, **kwargs)


def scp(retriever: Retriever) -> Callable[[QueryRetrieveServiceClass, Any, Any, type], None]:
    """pynetdicom's C-MOVE and C-GET SCP, replaced by ours serving from `retriever`
    (protocol/pynetdicom_patches/, `install(retrieve_scp=...)`)."""
    return functools.partial(_serve, retriever)


def _serve(retriever: Retriever, service: QueryRetrieveServiceClass, req: Any, context: Any, kind: type) -> None:
    name = "C-MOVE" if kind is C_MOVE else "C-GET"
    cx_id = context.context_id
    ts = context.transfer_syntax[0]
    assoc = service.assoc
    requestor = assoc.requestor.ae_title
    started = time.monotonic()

    def respond(status: int, counts: tuple[int, int, int, int] | None = None,
                failed_uids: list[str] | None = None, comment: str = "") -> None:
        rsp = kind()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        rsp.Status = status
        if counts is not None:
            remaining, completed, failed, warning = counts
            if status == PENDING or status == CANCEL:
                rsp.NumberOfRemainingSuboperations = suboperations(remaining)
            rsp.NumberOfCompletedSuboperations = suboperations(completed)
            rsp.NumberOfFailedSuboperations = suboperations(failed)
            rsp.NumberOfWarningSuboperations = suboperations(warning)
        if comment:
            rsp.ErrorComment = comment[:64]
        if failed_uids:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed_uids
            rsp.Identifier = BytesIO(encode(ds, ts.is_implicit_VR, ts.is_little_endian))
        service.dimse.send_msg(rsp, cx_id)

    try:
        identifier = decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    except Exception:
        ref = log_reference(log, "%s from %s: cannot decode the identifier", name, requestor, level=logging.WARNING)
        respond(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                comment=f"cannot decode the identifier (archive log reference {ref})")
        return

    if kind is C_MOVE:
        dest = (req.MoveDestination or b"")
        dest = (dest.decode("ascii", "replace") if isinstance(dest, bytes) else str(dest)).strip()
        remote = retriever.config.remotes.get(dest)
        if remote is None:
            log.info("C-MOVE from %s to unknown destination %r refused", requestor, dest)
            audit.info("C-MOVE from %s: unknown destination %r", requestor, dest,
                       extra={"fields": {"event": "move", "calling_ae": requestor, "destination": dest,
                                         "status": MOVE_DESTINATION_UNKNOWN}})
            respond(MOVE_DESTINATION_UNKNOWN, comment=f"unknown move destination {dest!r}")
            return
        try:
            peer = peer_of(remote)
        except PeerError:  # our configuration of the destination (its TLS files): nothing the peer can mend
            ref = log_reference(log, "C-MOVE from %s to %s", requestor, dest)
            respond(UNABLE_TO_PROCESS, comment=f"internal error (archive log reference {ref})")
            return
        associations = remote.associations
    else:
        associations = 1
        dest = requestor
        host, port = assoc.requestor.address, assoc.requestor.port
        peer = Peer(requestor, str(host), int(port or 0))

    deleted = DeletionWatch(retriever.config.data_dir)  # before the selection: nothing deleted slips between
    try:
        level, instances = select(retriever.catalog, str(req.AffectedSOPClassUID), identifier)
    except RetrieveError as e:
        respond(e.status, comment=e.comment)
        return
    except Exception:
        ref = log_reference(log, "%s from %s: selection failed", name, requestor)
        respond(UNABLE_TO_PROCESS, comment=f"internal error (archive log reference {ref})")
        return

    total = len(instances)
    counts = {"completed": 0, "failed": 0, "warning": 0}
    failed_uids: list[str] = []
    cancelled = [False]

    def is_cancelled() -> bool:
        if not cancelled[0] and service.is_cancelled(req.MessageID):
            cancelled[0] = True
        return cancelled[0]

    sop_class = str(req.AffectedSOPClassUID)
    direct = direct_socket(assoc) if kind is C_GET else None  # the C-GET's C-STOREs and pendings go there
    interval = retriever.config.pending_interval
    last_pending = [-interval]

    def on_outcome(outcome: Outcome) -> None:
        counts[outcome.state] += 1
        if outcome.state == "failed":
            failed_uids.append(outcome.instance.sop_instance_uid)
        done = sum(counts.values())
        now = time.monotonic()
        if done < total and now - last_pending[0] >= interval and assoc.is_established:
            last_pending[0] = now
            pending = (total - done, counts["completed"], counts["failed"], counts["warning"])
            if direct is not None:  # C-GET: in turn with the C-STOREs written on the same socket
                command = retrieve_pending_command(kind, req.MessageID, sop_class, pending)
                try:
                    direct.sendall(p_data(cx_id, command))
                except OSError:
                    pass  # the next C-STORE finds the association gone
            elif not send_retrieve_pending(service.dimse, cx_id, kind, req.MessageID, sop_class, pending):
                respond(PENDING, pending)

    sender = retriever.sender(peer, on_outcome=on_outcome, cancelled=is_cancelled,
                               move_originator=(requestor, req.MessageID) if kind is C_MOVE else None,
                               associations=associations, deleted=deleted)
    try:
        if kind is C_MOVE:
            result = sender.send(instances)
        else:
            result = sender.send_on(assoc, instances, direct)
    except Exception:  # never let a retrieve take the association down silently
        ref = log_reference(log, "%s from %s to %s failed", name, requestor, dest)
        respond(UNABLE_TO_PROCESS, (0, counts["completed"], counts["failed"], counts["warning"]),
                failed_uids, comment=f"internal error (archive log reference {ref})")
        return
    remaining = len(result.remaining)
    c, f, w = counts["completed"], counts["failed"], counts["warning"]
    if remaining or cancelled[0]:
        status = CANCEL
        uids = failed_uids + [i.sop_instance_uid for i in result.remaining]
    elif f == 0 and w == 0:
        status, uids = SUCCESS, []
    elif c + w == 0:
        status, uids = UNABLE_TO_PERFORM_SUBOPERATIONS, failed_uids
    else:
        status, uids = SUBOPERATIONS_COMPLETE_WITH_FAILURES, failed_uids
    for o in result.failures[:20]:
        log.warning("%s %s to %s: %s failed: %s", name, level, dest, o.instance.sop_instance_uid, o.reason)
    comment = _why(result.failures, peer) if status in (UNABLE_TO_PERFORM_SUBOPERATIONS,
                                                         SUBOPERATIONS_COMPLETE_WITH_FAILURES) else ""
    seconds = time.monotonic() - started
    process_counts.retrieved(name, c, f, w, result.bytes_sent)
    audit.info("%s %s from %s to %s: %d completed, %d failed, %d warning, %d remaining (%d converted) "
               "in %.2f s, status 0x%04X", name, level, requestor, dest, c, f, w, remaining, result.converted,
               seconds, status,
               extra={"fields": {"event": name.lower(), "query_level": level, "calling_ae": requestor,
                                 "destination": dest, "completed": c, "failed": f, "warning": w,
                                 "remaining": remaining, "converted": result.converted,
                                 "bytes": result.bytes_sent, "seconds": round(seconds, 3),
                                 "status": status}})
    if assoc.is_established:
        respond(status, (remaining, c, f, w), uids, comment)
