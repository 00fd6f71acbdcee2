"""The sending core: stored instances to another AE as C-STORE sub-operations, shared by
`stowage send`, C-MOVE and C-GET.

For each SOP class we propose one presentation context per transfer syntax the
instances are stored in, plus Explicit and Implicit VR Little Endian as fallbacks, each
a context of its own so the peer can accept any subset (at most 128 contexts per
association: more SOP classes go on further associations). An instance goes out with
its dataset bytes exactly as received when the peer accepted its stored syntax (read
from its checksum-verified record, never decoded); otherwise it is converted
(engine/transfer/convert.py) to an uncompressed syntax the peer accepted, never to a lossy one.

Associations we open (send, C-MOVE) are lean blocking sockets (protocol/store_scu.py): the
record is read and decompressed in memory by a prefetch thread while the previous
instance is on the wire, and goes out with one `sendmsg` per message. Datasets over
`SPOOL_ABOVE` and converted ones go through a spool file (`sendfile`), so memory stays
bounded. C-GET sends on the requester's pynetdicom association: written the same way from
this thread (`_DirectLink`), or under TLS through pynetdicom from a Part-10 spool file.

A store with no response within `dimse_timeout`, or whose association breaks, is
retried once on a new association. A record marked corrupt (engine/store/integrity.py) is never
sent: it counts as a failed sub-operation, with the mark's reason.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import tempfile
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from pynetdicom.association import Association

from stowage.engine.transfer import convert
from stowage.engine.store import filemeta
from stowage.engine.transfer.requestor import Peer, PeerError
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.store.integrity import marks_of
from stowage.engine.store.locate import Locator, RecordGone
from stowage.catalog.limits import MAX_INFLATED_BYTES
from stowage.engine.runtime.counts import counts as process_counts
from stowage.engine.store.segment import CorruptRecord, OversizedRecord, read_payload, stream_payload
from stowage.protocol import pynetdicom_patches, store_scu
from stowage.protocol.status import STORE_WARNINGS, SUCCESS

log = logging.getLogger("stowage.send")

FALLBACKS = convert.TARGETS  # proposed besides the syntaxes an instance is stored in
MAX_CONTEXTS = 128
SPOOL_ABOVE = 32 << 20  # larger datasets go through a spool file, not memory
PREFETCH = 1  # instances prepared ahead, in as many threads (2 measured slower on 2 cores)
_MAX_REOPEN = 3  # consecutive failed attempts to (re)open an association before giving up


@dataclass(frozen=True)
class Instance:
    """One stored instance, as the catalog locates it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    segment: str
    offset: int
    dataset_length: int = 0


@dataclass(frozen=True)
class Outcome:
    instance: Instance
    state: str                      # "completed" | "warning" | "failed"
    status: int | None = None       # the peer's C-STORE status, if it answered
    reason: str = ""                # why it failed, for a person
    sent_as: str = ""               # the transfer syntax it went out in
    sent_uid: str = ""              # the SOP Instance UID it went out with, if a rewrite changed it


@dataclass
class SendResult:
    outcomes: list[Outcome] = field(default_factory=list)
    remaining: list[Instance] = field(default_factory=list)   # not attempted (cancelled)
    bytes_sent: int = 0

    def count(self, state: str) -> int:
        return sum(1 for o in self.outcomes if o.state == state)

    @property
    def completed(self) -> int:
        return self.count("completed")

    @property
    def warning(self) -> int:
        return self.count("warning")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def converted(self) -> int:
        return sum(1 for o in self.outcomes if o.state != "failed" and o.sent_as != o.instance.transfer_syntax_uid)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]


Context = tuple[str, str]  # (abstract syntax, transfer syntax): one presentation context
# (instance, its record's payload: file meta + dataset) -> (SOP Instance UID, transfer syntax,
# payload) of the copy to send instead; raises RewriteError (the instance fails with its reason).
Rewrite = Callable[[Instance, bytes], tuple[str, str, bytes]]


class RewriteError(ValueError):
    """The rewrite refused an instance; the message says why (e.g. quarantined)."""


def context_batches(instances: Sequence[Instance]) -> list[list[Context]]:
    """Presentation contexts to propose, split into association batches of at most 128.
    Each SOP class lies wholly within one batch."""
    stored: OrderedDict[str, list[str]] = OrderedDict()
    for inst in instances:
        syntaxes = stored.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax_uid not in syntaxes:
            syntaxes.append(inst.transfer_syntax_uid)
    batches: list[list[Context]] = [[]]
    for sop_class, syntaxes in stored.items():
        wanted = syntaxes + [ts for ts in FALLBACKS if ts not in syntaxes]
        contexts = [(sop_class, ts) for ts in wanted[:MAX_CONTEXTS]]
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return [b for b in batches if b]


def accepted_syntaxes(assoc: Association) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes the peer accepted for it (as SCP: we are the SCU)."""
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu is False:  # role selection gave us no SCU role on this context
            continue
        out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return out


@dataclass
class _Prepared:
    """An instance ready to go out, in `syntax`: its record's payload (file meta +
    dataset) in memory, or a Part-10 spool file; or why it cannot go."""

    instance: Instance
    syntax: str = ""
    reason: str = ""
    payload: bytes | None = None
    path: Path | None = None
    sent_uid: str = ""  # the SOP Instance UID it goes out with, when a rewrite gave it a new one

    @property
    def ready(self) -> bool:
        return self.payload is not None or self.path is not None

    @property
    def size(self) -> int:
        """Bytes of it as a Part-10 file."""
        if self.payload is not None:
            return len(PREAMBLE) + len(self.payload)
        return self.path.stat().st_size if self.path is not None else 0

    def outgoing(self) -> store_scu.Dataset:
        """The dataset bytes (no file meta), for the lean association."""
        inst = self.instance
        uid = self.sent_uid or inst.sop_instance_uid
        if self.payload is not None:
            data = memoryview(self.payload)[filemeta.group_length(self.payload):]
            return store_scu.Dataset(inst.sop_class_uid, uid, self.syntax, len(data), data=data)
        assert self.path is not None
        with open(self.path, "rb") as f:
            head = f.read(len(PREAMBLE) + 12)
            start = len(PREAMBLE) + filemeta.group_length(head[len(PREAMBLE):])
            size = os.fstat(f.fileno()).st_size
        return store_scu.Dataset(inst.sop_class_uid, uid, self.syntax, size - start,
                                 path=str(self.path), offset=start)

    def part10(self, spool: Path) -> Path:
        """A Part-10 file of it, for pynetdicom's `send_c_store`."""
        if self.path is None:
            assert self.payload is not None
            self.path = spool / f"{self.instance.sop_instance_uid}.dcm"
            with open(self.path, "wb") as f:
                f.write(PREAMBLE)
                f.write(self.payload)
            self.payload = None
        return self.path

    def discard(self) -> None:
        self.payload = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Link(Protocol):
    """One association that C-STOREs go out on."""

    accepted: dict[str, set[str]]

    def store(self, prepared: _Prepared, originator: tuple[str, int] | None) -> int | None: ...


class _LeanLink:
    """An association we opened (protocol/store_scu.py)."""

    def __init__(self, assoc: store_scu.Association) -> None:
        self.assoc = assoc
        self.comment = ""  # the Error Comment of the last response (forwarding parks it)
        self.accepted: dict[str, set[str]] = {}
        for sop_class, syntax in assoc.accepted:
            self.accepted.setdefault(sop_class, set()).add(syntax)

    def store(self, prepared: _Prepared, originator: tuple[str, int] | None) -> int | None:
        try:
            status, self.comment = self.assoc.store(prepared.outgoing(), originator)
        except store_scu.StoreFailed as e:
            log.info("%s", e)
            return None
        return status

    def release(self) -> None:
        self.assoc.release()


class _PynetdicomLink:
    """An association someone else opened (C-GET: the requester's)."""

    def __init__(self, assoc: Association, spool: Path) -> None:
        self.assoc = assoc
        self.spool = spool
        self.accepted = accepted_syntaxes(assoc)

    def store(self, prepared: _Prepared, originator: tuple[str, int] | None) -> int | None:
        if not self.assoc.is_established:
            return None
        kwargs = {} if originator is None else dict(originator_aet=originator[0], originator_id=originator[1])
        try:
            status = self.assoc.send_c_store(prepared.part10(self.spool), **kwargs)
        except (RuntimeError, ValueError, AttributeError) as e:  # context vanished, association gone
            log.info("send_c_store %s: %s", prepared.instance.sop_instance_uid, e)
            return None
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        """Nothing to undo: the association is its opener's."""


def direct_socket(assoc: Association) -> socket.socket | None:
    """The plain TCP socket of an association someone else opened, when messages may be
    written on it from this thread while pynetdicom's DUL thread reads it; None under TLS
    (one SSL connection must not be read and written from two threads) or once it ended."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None or isinstance(sock, ssl.SSLSocket) or not assoc.is_established:
        return None
    return sock


class _DirectLink:
    """The requester's association (C-GET), written directly: each C-STORE-RQ goes out
    from this thread as one `sendmsg` (or `sendfile`s), where pynetdicom's `send_c_store`
    makes a P-DATA primitive per PDU for its DUL thread to encode and send (33 hand-offs
    for a CT at a 16 KiB PDU, about 5 ms per instance). pynetdicom's DUL thread still does
    the reading; each C-STORE-RSP is decoded there (protocol/pynetdicom_patches/receive.py, `route`) and queued
    for us. Every other message of the C-GET while it runs (the pending responses) must be
    written here too, in turn."""

    def __init__(self, assoc: Association, sock: socket.socket, timeout: float) -> None:
        self.assoc, self.sock, self.timeout = assoc, sock, timeout
        self.responses = pynetdicom_patches.route(assoc)
        self.accepted = accepted_syntaxes(assoc)
        self.context_ids = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
                            for cx in assoc.accepted_contexts if cx.as_scu is not False}
        self.peer_max_pdu = int(assoc.dimse.maximum_pdu_size or 0)  # the peer's, whichever side opened it
        self.message_id = 0

    def store(self, prepared: _Prepared, originator: tuple[str, int] | None) -> int | None:
        ds = prepared.outgoing()
        context_id = self.context_ids.get((ds.sop_class_uid, ds.transfer_syntax_uid))
        if context_id is None or not self._alive():
            return None
        self.message_id = self.message_id % 0xFFFF + 1
        command = store_scu.store_command(self.message_id, ds.sop_class_uid, ds.sop_instance_uid,
                                          originator=originator)
        try:
            store_scu.send_message(self.sock, self.peer_max_pdu, context_id, command, ds)
        except (OSError, store_scu.AssociationError) as e:
            log.info("C-STORE of %s on the requester's association: %s", ds.sop_instance_uid, e)
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                responding_to, status = self.responses.get(timeout=0.5)
            except queue.Empty:
                if not self._alive() or time.monotonic() > deadline:
                    return None  # no response: the association ended, or dimse_timeout passed
                continue
            if responding_to == self.message_id:
                return status
            log.info("a C-STORE-RSP for message %d, not %d: ignored", responding_to, self.message_id)

    def _alive(self) -> bool:
        """Whether a response can still come. `is_established` is not enough: we run in the
        thread that would clear it, so after an A-ABORT only the DUL's state tells."""
        return self.assoc.is_established and self.assoc.dul.state_machine.current_state == "Sta6"

    def close(self) -> None:
        pynetdicom_patches.unroute(self.assoc)


def _unreadable_record(inst: Instance, reason: str, error: Exception) -> "_Prepared":
    """An instance whose record cannot be read is failed, not sent; a frame that claims
    more than its record holds is counted as the limit it ran into."""
    if isinstance(error, OversizedRecord):
        process_counts.refused(error.limit)
    return _Prepared(inst, reason=reason)


class Sender:
    """Sends instances to one peer. One Sender per transfer (its own associations may
    run in several threads; its methods are not to be called from several)."""

    def __init__(self, segments_dir: Path, peer: Peer, calling_aet: str, *, dimse_timeout: float = 30.0,
                 acse_timeout: float = 30.0, max_pdu: int = 262144,
                 retries: int = 1, spool_dir: Path | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 cancelled: Callable[[], bool] | None = None,
                 move_originator: tuple[str, int] | None = None, associations: int = 1,
                 duplicates: str = "keep-newest", max_inflated_bytes: int = MAX_INFLATED_BYTES,
                 rewrite: Rewrite | None = None,
                 read: Callable[[Path, int], bytes | memoryview] = read_payload) -> None:
        self.segments_dir = segments_dir
        self.read = read  # a record's payload (forwarding shares one read among its destinations)
        self.rewrite = rewrite  # e.g. forwarding's de-identification: a new copy goes out, never the record
        self.max_inflated_bytes = max_inflated_bytes  # a Deflated instance converted for the peer
        self.locator = Locator(segments_dir.parent, duplicates)  # for records compacted away meanwhile
        self.associations = max(1, associations)
        self._lock = threading.Lock()
        self.peer = peer
        self.calling_aet = calling_aet
        self.acse_timeout, self.dimse_timeout = acse_timeout, dimse_timeout
        self.max_pdu = max_pdu
        self.retries = retries
        self.spool_dir = spool_dir
        self.on_outcome = on_outcome or (lambda _o: None)
        self.cancelled = cancelled or (lambda: False)
        self.move_originator = move_originator
        # pynetdicom sends Part-10 files from disk in PDU-sized pieces, dataset bytes
        # untouched (STORE_SEND_CHUNKED_DATASET, set by the patches).
        pynetdicom_patches.install()

    def send(self, instances: Iterable[Instance]) -> SendResult:
        """Send on associations of our own to the peer: `associations` of them at once,
        sharing one queue (an association the peer refuses leaves its share to the others)."""
        todo = list(instances)
        result = SendResult()
        with _SpoolDir(self.spool_dir) as spool:
            for contexts in context_batches(todo):
                classes = {sop_class for sop_class, _ts in contexts}
                work = _Work([i for i in todo if i.sop_class_uid in classes])
                # Further associations are opened once the first is established: a
                # peer that takes one at a time (or is down) is then told so only once.
                drivers = [threading.Thread(target=self._drive, args=(work, contexts, spool, result, True),
                                            name=f"send-{n}", daemon=True)
                           for n in range(1, min(self.associations, len(work.items)))]
                for t in drivers:
                    t.start()
                try:
                    self._drive(work, contexts, spool, result)
                finally:
                    work.first_open.set()
                    for t in drivers:
                        t.join()
        self.locator.close()
        return result

    def send_feed(self, feed: "Feed") -> SendResult:
        """Send what `feed` is given while it is given, on `associations` associations of
        our own that stay open until the feed ends (forwarding tops its feed up from the
        queue as outcomes come in, instead of opening new associations for each batch)."""
        result = SendResult()
        with _SpoolDir(self.spool_dir) as spool:
            # As many associations as what was given can use: a trickle keeps to one.
            drivers = [threading.Thread(target=self._drive, args=(feed, feed.contexts, spool, result, True),
                                        name=f"send-{n}", daemon=True)
                       for n in range(1, min(self.associations, len(feed.items)))]
            for t in drivers:
                t.start()
            try:
                self._drive(feed, feed.contexts, spool, result)
            finally:
                feed.first_open.set()
                for t in drivers:
                    t.join()
        self.locator.close()
        result.remaining.extend(feed.drain())  # given after every association had given up
        return result

    def send_on(self, assoc: Association, instances: Iterable[Instance],
                direct: socket.socket | None = None) -> SendResult:
        """Send on an association someone else opened (C-GET: the requester's, with
        SCP/SCU role selection for the storage classes): written on `direct`, its socket
        from `direct_socket` (the caller then writes its own messages there too, in turn),
        else through pynetdicom. No new association is opened: a store without a response
        counts as failed, and the rest are not attempted."""
        work = _Work(list(instances))
        result = SendResult()
        if not work.items:
            return result
        work.attempts = {i.sop_instance_uid: self.retries for i in work.items}  # no retries here
        with _SpoolDir(self.spool_dir) as spool, ThreadPoolExecutor(PREFETCH, thread_name_prefix="send-prepare") as pool:
            link = _DirectLink(assoc, direct, self.dimse_timeout) if direct is not None else \
                _PynetdicomLink(assoc, spool)
            try:
                self._run(link, work, spool, pool, result)
            finally:
                link.close()
                self.locator.close()
        if self.cancelled():
            result.remaining.extend(work.drain())
        for inst in work.drain():
            self._record(result, Outcome(inst, "failed", reason="the association ended before it was sent"))
        return result

    # -- one association ----------------------------------------------------------------

    def _record(self, result: SendResult, outcome: Outcome, size: int = 0) -> None:
        with self._lock:  # outcomes come from every association of a transfer
            result.outcomes.append(outcome)
            result.bytes_sent += size
            if outcome.state == "failed":
                log.warning("sending %s to %s failed: %s", outcome.instance.sop_instance_uid, self.peer,
                            outcome.reason)
            self.on_outcome(outcome)

    def _open(self, contexts: list[Context]) -> _LeanLink:
        p = self.peer
        assoc = store_scu.Association(p.host, p.port, p.ae_title, self.calling_aet, contexts,
                                      max_pdu=self.max_pdu, timeout=self.acse_timeout,
                                      implementation_version=filemeta.IMPLEMENTATION_VERSION_NAME, tls=p.tls)
        try:
            assoc.open()
        except store_scu.AssociationError as e:
            raise PeerError(str(e)) from None
        assoc.set_timeout(self.dimse_timeout)
        return _LeanLink(assoc)

    def _drive(self, work: "_Work", contexts: list[Context], spool: Path, result: SendResult,
               after_first: bool = False) -> None:
        """One association's share of `work`: open, send until the queue is empty, and
        open again after a store that got no response."""
        if after_first:
            work.first_open.wait()
        reopen_failures = 0
        with ThreadPoolExecutor(PREFETCH, thread_name_prefix="send-prepare") as pool:
            while work.unfinished():
                if self.cancelled():
                    result.remaining.extend(work.drain())
                    return
                work.opening()
                try:
                    link = self._open(contexts)
                except PeerError as e:
                    reopen_failures += 1
                    if work.open_failed():  # the others carry on (a peer that takes fewer associations)
                        log.info("%s: one association fewer: %s", self.peer, e)
                        return
                    # The first association of a transfer fails fast (unknown AE, host down);
                    # one that drops mid-transfer gets a few more tries, with a short back-off.
                    if reopen_failures >= _MAX_REOPEN or not work.ever_opened:
                        for inst in work.drain():
                            self._record(result, Outcome(inst, "failed", reason=str(e)))
                        return
                    time.sleep(0.5 * reopen_failures)
                    continue
                reopen_failures = 0
                work.opened()
                try:
                    self._run(link, work, spool, pool, result)
                finally:
                    link.release()
                    work.closed()

    def _run(self, link: _Link, work: "_Work", spool: Path, pool: ThreadPoolExecutor, result: SendResult) -> None:
        """Send from `work` on `link` until it is empty, cancelled, or a store gets no
        response. The next PREFETCH instances are prepared (read, checked, decompressed:
        the costly part) by the pool's threads while this one is on the wire."""
        in_memory = not isinstance(link, _PynetdicomLink)
        ahead: deque[Future] = deque()

        def top_up() -> None:
            while len(ahead) < PREFETCH and not self.cancelled():
                nxt = work.take()
                if nxt is None:
                    return
                ahead.append(pool.submit(self._prepare, nxt, link.accepted, spool, in_memory))
        top_up()
        try:
            while ahead or work.wait_for_more(self.cancelled):
                if not ahead:
                    top_up()
                    continue
                prepared: _Prepared = ahead.popleft().result()
                top_up()
                inst = prepared.instance
                try:
                    if not prepared.ready:
                        self._record(result, Outcome(inst, "failed", reason=prepared.reason))
                        continue
                    if self.cancelled():
                        work.give_back(inst)
                        return
                    status = link.store(prepared, self.move_originator)
                    if status is None:
                        if self._retry(inst, prepared, work, result):
                            work.give_back(inst)
                        return
                    self._record(result, _outcome(inst, status, prepared.syntax, getattr(link, "comment", ""),
                                                  prepared.sent_uid), prepared.size)
                finally:
                    prepared.discard()
        finally:  # prepared but not sent: back to the queue, in order
            for future in reversed(ahead):
                skipped = future.result()
                skipped.discard()
                work.give_back(skipped.instance)

    def _retry(self, inst: Instance, prepared: _Prepared, work: "_Work", result: SendResult) -> bool:
        """After a store that got no response: whether to send it again on a new
        association (else it is recorded as failed, its retries used up)."""
        uid = inst.sop_instance_uid
        with work.lock:
            work.attempts[uid] = attempts = work.attempts.get(uid, 0) + 1
        if attempts > self.retries:
            self._record(result, Outcome(inst, "failed", reason=(
                f"no C-STORE response within {self.dimse_timeout:g} s, or the association broke "
                f"({attempts} attempt(s))"), sent_as=prepared.syntax))
            return False
        log.info("no response for %s from %s: retrying on a new association", uid, self.peer)
        return True

    # -- preparing one instance -------------------------------------------------------

    def _prepare(self, inst: Instance, accepted: dict[str, set[str]], spool: Path, in_memory: bool) -> _Prepared:
        mark = marks_of(self.segments_dir.parent).get(inst.segment, inst.offset)
        if mark is not None:  # found corrupt by verify or the scrub: never sent (engine/store/integrity.py)
            return _Prepared(inst, reason=f"stored record marked corrupt by {mark.by} "
                                          f"({inst.segment} @ {inst.offset}): {mark.problem}")
        syntaxes = accepted.get(inst.sop_class_uid)
        if not syntaxes:
            return _Prepared(inst, reason=f"{self.peer} accepted no presentation context for SOP class "
                                          f"{inst.sop_class_uid}")
        target = None
        if inst.transfer_syntax_uid not in syntaxes:
            target = convert.target_syntax(inst.transfer_syntax_uid, syntaxes)
            if target is None:
                return _Prepared(inst, reason=(f"{self.peer} accepts none of the syntaxes we can convert "
                                               f"{convert.name(inst.transfer_syntax_uid)} to "
                                               f"(accepted: {', '.join(sorted(map(convert.name, syntaxes)))})"))
        try:
            if self.rewrite is not None:
                return self._rewritten(inst, syntaxes, spool, in_memory)
            return self._read(inst, target, spool, in_memory)
        except FileNotFoundError as e:  # its segment compacted away since the transfer looked it up
            try:
                where = self.locator.elsewhere(inst.sop_instance_uid, inst.segment, inst.offset, e)
            except RecordGone as gone:
                return _Prepared(inst, reason=f"{_unreadable(inst)}: {gone}")
        moved = replace(inst, segment=where.segment, offset=where.offset)
        try:
            if self.rewrite is not None:
                return self._rewritten(moved, syntaxes, spool, in_memory)
            return self._read(moved, target, spool, in_memory)
        except FileNotFoundError as e:  # compacted away once more
            return _Prepared(moved, reason=f"{_unreadable(moved)}: {e}")

    def _rewritten(self, inst: Instance, accepted: set[str], spool: Path, in_memory: bool) -> _Prepared:
        """The rewritten copy of the instance ready to send, converted if the peer did not
        accept its syntax; FileNotFoundError if its segment is gone."""
        assert self.rewrite is not None
        try:
            payload = self.read(self.segments_dir / inst.segment, inst.offset)
        except FileNotFoundError:
            raise
        except (OSError, CorruptRecord) as e:
            return _unreadable_record(inst, f"{_unreadable(inst)}: {e}", e)
        try:
            uid, syntax, payload = self.rewrite(inst, payload)
        except RewriteError as e:
            return _Prepared(inst, reason=str(e))
        if syntax in accepted and in_memory:
            return _Prepared(inst, syntax, payload=payload, sent_uid=uid)
        path = spool / f"{uid}.dcm"
        with open(path, "wb") as f:
            f.write(PREAMBLE)
            f.write(payload)
        target = syntax if syntax in accepted else convert.target_syntax(syntax, accepted)
        if target is None:
            path.unlink(missing_ok=True)
            return _Prepared(inst, reason=f"{self.peer} accepts none of the syntaxes we can convert "
                                          f"{convert.name(syntax)} to")
        if target != syntax:
            try:
                convert.convert_file(path, path.with_suffix(".conv.dcm"), target,
                                     max_inflated_bytes=self.max_inflated_bytes)
            except convert.ConversionError as e:
                path.unlink(missing_ok=True)
                path.with_suffix(".conv.dcm").unlink(missing_ok=True)
                return _Prepared(inst, reason=str(e))
            os.replace(path.with_suffix(".conv.dcm"), path)
        return _Prepared(inst, target, path=path, sent_uid=uid)

    def _read(self, inst: Instance, target: str | None, spool: Path, in_memory: bool) -> _Prepared:
        """The instance ready to send: its record read (into memory, or a spool file) and
        converted to `target` if that is not None; FileNotFoundError if its segment is gone."""
        segment = self.segments_dir / inst.segment
        unreadable = _unreadable(inst)
        if target is None and in_memory and inst.dataset_length <= SPOOL_ABOVE:
            try:
                return _Prepared(inst, inst.transfer_syntax_uid, payload=self.read(segment, inst.offset))
            except FileNotFoundError:
                raise
            except (OSError, CorruptRecord) as e:
                return _unreadable_record(inst, f"{unreadable}: {e}", e)
        path = spool / f"{inst.sop_instance_uid}.dcm"
        try:
            with open(path, "wb") as f:
                f.write(PREAMBLE)
                for chunk in stream_payload(segment, inst.offset):
                    f.write(chunk)
        except FileNotFoundError:
            path.unlink(missing_ok=True)
            if segment.exists():  # the spool file, not the segment: a failure of its own
                return _Prepared(inst, reason=f"cannot write to the spool {spool}")
            raise
        except (OSError, CorruptRecord) as e:
            path.unlink(missing_ok=True)
            return _unreadable_record(inst, f"{unreadable}: {e}", e)
        if target is None:
            return _Prepared(inst, inst.transfer_syntax_uid, path=path)
        converted = path.with_suffix(".conv.dcm")
        try:
            convert.convert_file(path, converted, target, max_inflated_bytes=self.max_inflated_bytes)
        except convert.ConversionError as e:
            converted.unlink(missing_ok=True)
            return _Prepared(inst, reason=str(e))
        finally:
            path.unlink(missing_ok=True)
        os.replace(converted, path)
        return _Prepared(inst, target, path=path)


def _unreadable(inst: Instance) -> str:
    return f"stored record unreadable ({inst.segment} @ {inst.offset})"


def _outcome(inst: Instance, status: int, syntax: str, comment: str = "", sent_uid: str = "") -> Outcome:
    if status == SUCCESS:
        return Outcome(inst, "completed", status, sent_as=syntax, sent_uid=sent_uid)
    if status in STORE_WARNINGS:
        return Outcome(inst, "warning", status, sent_as=syntax, sent_uid=sent_uid)
    return Outcome(inst, "failed", status, reason=f"refused with status 0x{status:04X}"
                   + (f": {comment.strip()}" if comment.strip() else ""), sent_as=syntax)


class _Work:
    """The instances of one transfer batch still to send, shared by its associations."""

    def __init__(self, items: list[Instance]) -> None:
        self.items: deque[Instance] = deque(items)
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)  # a Feed was given more, or ended
        self.open_ended = False  # a Feed: more may come until it ends
        self.attempts: dict[str, int] = {}
        self.links = 0              # associations open on it now
        self.pending_opens = 0      # associations being opened now
        self.ever_opened = False
        self.first_open = threading.Event()

    def take(self) -> Instance | None:
        with self.lock:
            return self.items.popleft() if self.items else None

    def give_back(self, inst: Instance) -> None:
        with self.lock:
            self.items.appendleft(inst)

    def unfinished(self) -> bool:
        """Whether there is, or may still be, something to send."""
        with self.lock:
            return bool(self.items) or self.open_ended

    def wait_for_more(self, cancelled: Callable[[], bool]) -> bool:
        """Whether there is something to take now: for a Feed, after waiting until it is
        given more or ends (or the transfer is cancelled)."""
        with self.lock:
            while not self.items and self.open_ended and not cancelled():
                self.arrived.wait(0.2)
            return bool(self.items) and not cancelled()

    def drain(self) -> list[Instance]:
        with self.lock:
            out = list(self.items)
            self.items.clear()
            return out

    def opening(self) -> None:
        with self.lock:
            self.pending_opens += 1

    def opened(self) -> None:
        with self.lock:
            self.pending_opens -= 1
            self.links += 1
            self.ever_opened = True
            self.first_open.set()

    def open_failed(self) -> bool:
        """Whether other associations are open or being opened (they carry the work)."""
        with self.lock:
            self.pending_opens -= 1
            return self.links + self.pending_opens > 0

    def closed(self) -> None:
        with self.lock:
            self.links -= 1


class Feed(_Work):
    """Instances for `Sender.send_feed`, given (`give`) before and while it sends. Its
    associations propose the presentation contexts of `expected` (their SOP classes as
    `send` would, up to 128 contexts); `fits` says which instances they can carry."""

    def __init__(self, expected: Sequence[Instance]) -> None:
        batches = context_batches(expected)
        self.contexts: list[Context] = batches[0] if batches else []
        self._fit = set(self.contexts)
        super().__init__([])
        self.open_ended = True

    def fits(self, inst: Instance) -> bool:
        return (inst.sop_class_uid, inst.transfer_syntax_uid) in self._fit

    def give(self, instances: Iterable[Instance]) -> None:
        """More to send (each one that `fits`), after what was given before."""
        with self.lock:
            self.items.extend(instances)
            self.arrived.notify_all()

    def end(self) -> None:
        """Nothing more will be given: the associations close once what was given is sent."""
        with self.lock:
            self.open_ended = False
            self.arrived.notify_all()


class _SpoolDir:
    """A private spool directory for one transfer, emptied and removed at the end."""

    def __init__(self, parent: Path | None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="send-", dir=parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        for p in self.path.iterdir():
            p.unlink(missing_ok=True)
        self.path.rmdir()
