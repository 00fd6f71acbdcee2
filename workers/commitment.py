"""Storage Commitment Push Model SCP: N-ACTION in, N-EVENT-REPORT out (PS3.4 J.3).

The handler validates the request, persists it (engine/store/commitment.py: fsync'd before the
N-ACTION-RSP goes out), and returns at once. A delivery loop per worker (with a few
sender threads) then judges the references and sends the report:
  - on the requester's own association, if it is still open and the requester's
    `[remotes.AE] commitment_same_association` allows it (true by default; a requester
    with no remotes entry can only be answered there);
  - else on a new association to the requester's configured host:port, proposing
    Storage Commitment Push Model with SCP role selection, TCP_NODELAY;
  - with exponential back-off (1 s doubling to 5 min) while it fails, for up to 7 days.
Limits (issue #25), each refused with REFUSED_BY_LIMIT before anything is queued:
  - more than `max_commitment_references` references in one request: judging reads
    every referenced record, so one request must not ask for an unbounded number;
  - `max_pending_commitments` reports to the requester's AE title already in the queue
    (accepted, not yet delivered nor given up): an AE that never takes its reports
    cannot make the archive retry an unbounded number of them for 7 days.
Reports never precede the N-ACTION-RSP: the delivery thread waits until pynetdicom has
sent it (EVT_DIMSE_SENT), and a report on the same association goes through the
association's reactor, which queues it behind the response. A requester that releases
its association while its report waits there for the N-EVENT-REPORT-RSP (PS3.8 Sta7: it
may send none) has its release answered at once and the report ends with no response
(protocol/pynetdicom_patches/reactors.py, patch 10); the report then goes on a new association.

After a crash or restart, whichever worker first finds a pending report no process
holds a lock on adopts and delivers it (every worker scans every few seconds).
Delivery is at least once: a crash between sending a report and forgetting it sends
that report again.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from stowage.engine.store import commitment as sc
from stowage.engine.store.archive import Archive, valid_uid
from stowage.engine.transfer.requestor import Peer, PeerError, associate, new_ae, peer_of
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import log_reference
from stowage.engine.runtime.counts import counts as process_counts
from stowage.protocol.status import (INVALID_ARGUMENT_VALUE, MISSING_ATTRIBUTE, MISSING_ATTRIBUTE_VALUE,
                                     NO_SUCH_ACTION_TYPE, NO_SUCH_SOP_INSTANCE, PROCESSING_FAILURE, SUCCESS)

# A request refused by a limit. PS3.4 J.3 defines no status of its own for the Storage
# Commitment N-ACTION, so it is one of PS3.7's N-ACTION statuses (10.1.4.1.10): "Resource
# limitation" 0x0213 ("not performed due to resource limitation") is the one that says
# why. 0xA700 and 0xA701/0xA702 ("Out of Resources") are C-STORE, C-FIND, C-MOVE and C-GET
# statuses that an N-ACTION requester need not know. Until protocol/status.py names
# RESOURCE_LIMITATION, Processing failure (0x0110, also an N-ACTION failure) stands in.
from stowage.protocol.status import RESOURCE_LIMITATION as REFUSED_BY_LIMIT

log = logging.getLogger("stowage.commitment")
audit = logging.getLogger("stowage.audit")

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
_SCAN_INTERVAL_S = 3.0
_TICK_S = 0.1
_RESPONSE_WAIT_S = 5.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 1.0, 300.0
_DELIVERY_THREADS = 4


@dataclass
class _Pending:
    claim: sc.Claim
    assoc: object | None = None               # the requester's association, while we know it
    message_id: int | None = None
    responded: threading.Event = field(default_factory=threading.Event)
    accepted: float = field(default_factory=time.monotonic)
    attempts: int = 0
    next_attempt: float = 0.0
    verdict: sc.Verdict | None = None


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    log.warning("N-ACTION refused 0x%04X: %s", status, comment)
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp, None


def _reference_count(info: Dataset | None) -> int:
    return len(info.get("ReferencedSOPSequence") or []) if info is not None else 0


def _refusal(limit: str, requester: str, why: str) -> None:
    """Count a refusal by one of the limits (stowage_limit_refusals) and log it, naming
    the configuration key for our operator (the peer's Error Comment has no room for it)."""
    process_counts.refused(limit)
    log.warning("commitment request from %s refused by a limit: %s", requester, why)


def parse_request(info: Dataset | None) -> tuple[str, list[sc.Reference]] | tuple[int, str]:
    """(transaction UID, references), or (failure status, why)."""
    if info is None:
        return MISSING_ATTRIBUTE, "no Action Information"
    uid = str(info.get("TransactionUID", "") or "")
    if "TransactionUID" not in info:
        return MISSING_ATTRIBUTE, "no Transaction UID (0008,1195)"
    if not valid_uid(uid):
        return INVALID_ARGUMENT_VALUE, "Transaction UID (0008,1195) is not a valid UID"
    if "ReferencedSOPSequence" not in info:
        return MISSING_ATTRIBUTE, "no Referenced SOP Sequence (0008,1199)"
    refs = []
    for item in info.ReferencedSOPSequence:
        cls, inst = item.get("ReferencedSOPClassUID"), item.get("ReferencedSOPInstanceUID")
        if not cls or not inst:
            return MISSING_ATTRIBUTE_VALUE, "a Referenced SOP Sequence item lacks a class or instance UID"
        refs.append(sc.Reference(str(cls), str(inst)))
    if not refs:
        return MISSING_ATTRIBUTE_VALUE, "empty Referenced SOP Sequence (0008,1199)"
    return uid, refs


def event_information(config: Config, transaction_uid: str, verdict: sc.Verdict) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.RetrieveAETitle = config.aet
    if verdict.committed:
        ds.ReferencedSOPSequence = []
        for ref in verdict.committed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            ds.ReferencedSOPSequence.append(item)
    if verdict.failed:
        ds.FailedSOPSequence = []
        for ref, reason in verdict.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds


class Commitment:
    """This worker's commitment SCP: the N-ACTION handler and the delivery thread."""

    def __init__(self, config: Config, archive: Archive) -> None:
        self.config = config
        self.archive = archive
        self.queue = sc.ReportQueue(config.data_dir / "commitment")
        self._projects = None  # engine/deidentify Router, made when a report is first judged
        self._pending: dict[str, _Pending] = {}
        self._watched: weakref.WeakSet = weakref.WeakSet()  # associations whose sent messages we watch
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # A few reports at a time, so one requester that is slow to answer (or a host that
        # drops our SYNs until the connect timeout) does not hold up the others.
        self._pool = ThreadPoolExecutor(_DELIVERY_THREADS, thread_name_prefix="commitment-report")
        self._in_flight: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="commitment-delivery", daemon=True)
        self._thread.start()

    def _aliases(self, requester: str):
        """A sender's UIDs as the projects it may store into keep them (keyed, engine/deidentify):
        commitment answers for the SOP Instance UID the sender sent (issue #22)."""
        if not self.config.projects:
            return None
        from stowage.engine.deidentify.ingest import Router
        if self._projects is None:
            self._projects = Router(self.config.projects, self.config.data_dir)
        projects = [self._projects.project(name) for name, c in self._projects.configs.items()
                    if c.called_ae and (not c.calling_aes or requester in c.calling_aes)
                    and "retain_uids" not in c.options]
        return (lambda uid: [p.profile.keyed.uid(uid) for p in projects]) if projects else None

    # -- N-ACTION ---------------------------------------------------------------------

    def handle_n_action(self, event: evt.Event):
        req = event.request
        requester = event.assoc.requestor.ae_title.strip()
        if str(req.RequestedSOPInstanceUID) != sc.WELL_KNOWN_INSTANCE:
            return _failure(NO_SUCH_SOP_INSTANCE, f"Requested SOP Instance is not {sc.WELL_KNOWN_INSTANCE}")
        if event.action_type != 1:
            return _failure(NO_SUCH_ACTION_TYPE, f"Action Type {event.action_type} (only 1 is defined)")
        try:
            info = event.action_information
        except Exception:  # undecodable Action Information: pydicom's words go to our log only
            ref = log_reference(log, "N-ACTION from %s: cannot decode Action Information", requester,
                                level=logging.WARNING)
            return _failure(INVALID_ARGUMENT_VALUE, f"Action Information undecodable (archive log reference {ref})")
        n, limit = _reference_count(info), self.config.max_commitment_references
        if n > limit:  # counted before any reference is parsed or a record read
            _refusal("commitment_references", requester, f"{n} references, max_commitment_references = {limit}")
            return _failure(REFUSED_BY_LIMIT, f"{n} references; at most {limit} per request: split the request")
        parsed = parse_request(info)
        if isinstance(parsed[0], int):
            return _failure(*parsed)  # type: ignore[arg-type]
        transaction_uid, refs = parsed  # type: ignore[misc]
        peer = "%s:%s" % (event.assoc.requestor.address, event.assoc.requestor.port)
        request = sc.Request(transaction_uid, requester, peer, refs)
        try:
            claim = self.queue.add(request, self.config.max_pending_commitments)
        except sc.PendingLimit as e:
            _refusal("commitments_pending_per_ae", requester,
                     f"{e.count} reports pending, max_pending_commitments = {self.config.max_pending_commitments}")
            return _failure(REFUSED_BY_LIMIT, f"AE {requester} has {e.count} commitment requests not yet reported")
        except OSError:
            ref = log_reference(log, "commitment request %s from %s not persisted", transaction_uid, requester)
            return _failure(PROCESSING_FAILURE, f"cannot persist the request (archive log reference {ref})")
        pending = _Pending(claim, event.assoc, int(req.MessageID))
        self._watch(event.assoc)
        with self._lock:
            self._pending[request.id] = pending
        audit.info("commitment request %s from %s: %d instance(s)", transaction_uid, requester, len(refs),
                   extra={"fields": {"event": "commitment-request", "transaction_uid": transaction_uid,
                                     "calling_ae": requester, "peer": peer, "instances": len(refs)}})
        self._wake.set()
        return SUCCESS, None

    def _watch(self, assoc) -> None:
        """Learn when the N-ACTION-RSP has gone out on `assoc` (bound once per association)."""
        with self._lock:
            if assoc in self._watched:
                return
            self._watched.add(assoc)
        assoc.bind(evt.EVT_DIMSE_SENT, self._on_sent)

    def _on_sent(self, event: evt.Event) -> None:
        msg = event.message
        if not isinstance(msg, N_ACTION_RSP):
            return
        answered = msg.command_set.MessageIDBeingRespondedTo
        with self._lock:
            for p in self._pending.values():
                if p.assoc is event.assoc and p.message_id == answered:
                    p.responded.set()
        self._wake.set()

    # -- delivery ---------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                self._adopt_orphans()
                next_scan = now + _SCAN_INTERVAL_S
            with self._lock:
                due = [p for rid, p in self._pending.items() if rid not in self._in_flight and self._ready(p, now)]
                self._in_flight.update(p.claim.request.id for p in due)
            for p in due:
                self._pool.submit(self._attempt_guarded, p)
            self._wake.wait(_TICK_S)
            self._wake.clear()

    def _attempt_guarded(self, p: _Pending) -> None:
        try:
            if not self._stop.is_set():
                self._attempt(p)
        except Exception:
            log.exception("commitment report %s: delivery attempt failed", p.claim.request.transaction_uid)
            self._reschedule(p, "internal error")
        finally:
            with self._lock:
                self._in_flight.discard(p.claim.request.id)
            self._wake.set()

    @staticmethod
    def _ready(p: _Pending, now: float) -> bool:
        if p.next_attempt > now:
            return False
        # Never before the N-ACTION-RSP: wait for it (bounded, in case it never goes out).
        return p.assoc is None or p.responded.is_set() or now - p.accepted > _RESPONSE_WAIT_S

    def _adopt_orphans(self) -> None:
        with self._lock:
            owned = set(self._pending)
        try:
            for claim in self.queue.claim_orphans(owned):
                r = claim.request
                log.info("commitment report %s for %s: adopted after a restart", r.transaction_uid, r.requester_ae)
                with self._lock:
                    self._pending[r.id] = _Pending(claim)
        except OSError as e:
            log.error("commitment: scanning pending reports failed: %s", e)

    def _attempt(self, p: _Pending) -> None:
        r = p.claim.request
        if time.time() - r.accepted_at > sc.MAX_AGE_S:
            self._finish(p)
            self.queue.give_up(p.claim)
            audit.error("commitment report %s to %s undeliverable after %d attempts: given up", r.transaction_uid,
                        r.requester_ae, p.attempts, extra={"fields": {
                            "event": "commitment-undeliverable", "transaction_uid": r.transaction_uid,
                            "calling_ae": r.requester_ae, "attempts": p.attempts}})
            return
        if p.verdict is None:
            p.verdict = sc.judge(self.archive.catalog, self.config.data_dir / "segments", r.references,
                                 sync=self.config.durability == "os-buffer", aliases=self._aliases(r.requester_ae))
        info = event_information(self.config, r.transaction_uid, p.verdict)
        remote = self.config.remotes.get(r.requester_ae)
        same_ok = remote is None or remote.commitment_same_association
        assoc = p.assoc
        p.attempts += 1
        if assoc is not None and same_ok and assoc.is_established:
            status = self._send(assoc, info, p.verdict.event_type)
            if status == SUCCESS:
                return self._delivered(p, "same")
            log.warning("commitment report %s on the requester's association: %s", r.transaction_uid,
                        "no response" if status is None else f"status 0x{status:04X}")
        if remote is None:
            return self._reschedule(p, f"{r.requester_ae} has closed its association and has no "
                                       f"[remotes.{r.requester_ae}] entry to reach it at")
        try:
            status = self._send_new(peer_of(remote, r.requester_ae), info, p.verdict.event_type)
        except PeerError as e:
            return self._reschedule(p, str(e))
        if status == SUCCESS:
            return self._delivered(p, "new")
        self._reschedule(p, "no response" if status is None else f"answered status 0x{status:04X}")

    def _send(self, assoc, info: Dataset, event_type: int) -> int | None:
        try:
            rsp, _reply = assoc.send_n_event_report(info, event_type, sc.SOP_CLASS, sc.WELL_KNOWN_INSTANCE)
        except (RuntimeError, ValueError) as e:  # association gone, no context
            log.info("N-EVENT-REPORT not sent: %s", e)
            return None
        return int(rsp.Status) if "Status" in rsp else None

    def _send_new(self, peer: Peer, info: Dataset, event_type: int) -> int | None:
        ae = new_ae(self.config.aet, acse_timeout=self.config.acse_timeout,
                    dimse_timeout=min(self.config.dimse_timeout, 30.0), network_timeout=self.config.network_timeout)
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sc.SOP_CLASS
        role.scu_role, role.scp_role = False, True
        assoc = associate(ae, peer, [build_context(sc.SOP_CLASS, SYNTAXES)], ext_neg=[role])
        try:
            return self._send(assoc, info, event_type)
        finally:
            if assoc.is_established:
                assoc.release()

    def _reschedule(self, p: _Pending, why: str) -> None:
        delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** max(0, p.attempts - 1))
        p.next_attempt = time.monotonic() + delay
        p.assoc = None if p.assoc is not None and not p.assoc.is_established else p.assoc
        r = p.claim.request
        log.warning("commitment report %s to %s not delivered (attempt %d): %s; next try in %.0f s",
                    r.transaction_uid, r.requester_ae, p.attempts, why, delay)

    def _delivered(self, p: _Pending, route: str) -> None:
        r, v = p.claim.request, p.verdict
        assert v is not None
        self._finish(p)
        self.queue.done(p.claim)
        audit.info("commitment report %s to %s: %d committed, %d failed", r.transaction_uid, r.requester_ae,
                   len(v.committed), len(v.failed), extra={"fields": {
                       "event": "commitment-report", "transaction_uid": r.transaction_uid,
                       "calling_ae": r.requester_ae, "committed": len(v.committed), "failed": len(v.failed),
                       "event_type": v.event_type, "association": route, "attempts": p.attempts}})

    def _finish(self, p: _Pending) -> None:
        with self._lock:
            self._pending.pop(p.claim.request.id, None)


def handle_n_action(event: evt.Event, commitment: Commitment):
    return commitment.handle_n_action(event)
