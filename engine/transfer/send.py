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
this thread (engine/transfer/links.py `DirectLink`), or under TLS through pynetdicom from a Part-10 spool file.

A store with no response within `dimse_timeout`, or whose association breaks, is
retried once on a new association. A record marked corrupt (engine/store/integrity.py) is never
sent: it counts as a failed sub-operation, with the mark's reason; so does one deleted after the
transfer made its selection (engine/transfer/deleted.py: `deleted`, started before it).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from pynetdicom.association import Association

from stowage.catalog.limits import MAX_INFLATED_BYTES
from stowage.engine.store import filemeta
from stowage.engine.store.filemeta import PREAMBLE
from stowage.engine.store.integrity import marks_of
from stowage.engine.store.locate import Locator, RecordGone
from stowage.engine.store.segment import CorruptRecord, read_payload, stream_payload
from stowage.engine.transfer import convert
from stowage.engine.transfer.contexts import context_batches
from stowage.engine.transfer.deleted import DeletionWatch
from stowage.engine.transfer.links import DirectLink, LeanLink, Link, PynetdicomLink
from stowage.engine.transfer.prepared import Prepared, unreadable, unreadable_record
from stowage.engine.transfer.requestor import Peer, PeerError
from stowage.engine.transfer.results import Context, Instance, Outcome, Rewrite, RewriteError, SendResult, outcome_of
from stowage.engine.transfer.work import Feed, Work
from stowage.protocol import pynetdicom_patches, store_scu

log = logging.getLogger("stowage.send")

SPOOL_ABOVE = 32 << 20  # larger datasets go through a spool file, not memory
PREFETCH = 1  # instances prepared ahead, in as many threads (2 measured slower on 2 cores)
_MAX_REOPEN = 3  # consecutive failed attempts to (re)open an association before giving up


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
                 read: Callable[[Path, int, str], bytes | memoryview] = read_payload,
                 deleted: DeletionWatch | None = None, cluster: bool = False) -> None:
        self.segments_dir = segments_dir
        self.read = read  # a record's payload (forwarding shares one read among its destinations)
        self.rewrite = rewrite  # e.g. forwarding's de-identification: a new copy goes out, never the record
        self.max_inflated_bytes = max_inflated_bytes  # a Deflated instance converted for the peer
        # for records compacted away meanwhile (with `cluster`, another node's too: catalog/cluster_view.py)
        self.locator = Locator(segments_dir.parent, duplicates, cluster)
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
        self.deleted = deleted  # tombstones added since the selection: those records stay home
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
                work = Work([i for i in todo if i.sop_class_uid in classes])
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

    def send_feed(self, feed: Feed) -> SendResult:
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
        work = Work(list(instances))
        result = SendResult()
        if not work.items:
            return result
        work.attempts = {i.sop_instance_uid: self.retries for i in work.items}  # no retries here
        with _SpoolDir(self.spool_dir) as spool, ThreadPoolExecutor(PREFETCH, thread_name_prefix="send-prepare") as pool:
            link = DirectLink(assoc, direct, self.dimse_timeout) if direct is not None else \
                PynetdicomLink(assoc, spool)
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

    def _open(self, contexts: list[Context]) -> LeanLink:
        p = self.peer
        assoc = store_scu.Association(p.host, p.port, p.ae_title, self.calling_aet, contexts,
                                      max_pdu=self.max_pdu, timeout=self.acse_timeout,
                                      implementation_version=filemeta.IMPLEMENTATION_VERSION_NAME, tls=p.tls)
        try:
            assoc.open()
        except store_scu.AssociationError as e:
            raise PeerError(str(e)) from None
        assoc.set_timeout(self.dimse_timeout)
        return LeanLink(assoc)

    def _drive(self, work: Work, contexts: list[Context], spool: Path, result: SendResult,
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

    def _run(self, link: Link, work: Work, spool: Path, pool: ThreadPoolExecutor, result: SendResult) -> None:
        """Send from `work` on `link` until it is empty, cancelled, or a store gets no
        response. The next PREFETCH instances are prepared (read, checked, decompressed:
        the costly part) by the pool's threads while this one is on the wire."""
        in_memory = not isinstance(link, PynetdicomLink)
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
                prepared: Prepared = ahead.popleft().result()
                top_up()
                inst = prepared.instance
                try:
                    if not prepared.ready:
                        self._record(result, Outcome(inst, "failed", reason=prepared.reason))
                        continue
                    if self.cancelled():
                        work.give_back(inst)
                        return
                    why = self.deleted.why_deleted(inst) if self.deleted is not None else None
                    if why is not None:
                        self._record(result, Outcome(inst, "failed", reason=why))
                        continue
                    status = link.store(prepared, self.move_originator)
                    if status is None:
                        if self._retry(inst, prepared, work, result):
                            work.give_back(inst)
                        return
                    self._record(result, outcome_of(inst, status, prepared.syntax, getattr(link, "comment", ""),
                                                  prepared.sent_uid), prepared.size)
                finally:
                    prepared.discard()
        finally:  # prepared but not sent: back to the queue, in order
            for future in reversed(ahead):
                skipped = future.result()
                skipped.discard()
                work.give_back(skipped.instance)

    def _retry(self, inst: Instance, prepared: Prepared, work: Work, result: SendResult) -> bool:
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

    def _prepare(self, inst: Instance, accepted: dict[str, set[str]], spool: Path, in_memory: bool) -> Prepared:
        mark = marks_of(self.segments_dir.parent).get(inst.segment, inst.offset)
        if mark is not None:  # found corrupt by verify or the scrub: never sent (engine/store/integrity.py)
            return Prepared(inst, reason=f"stored record marked corrupt by {mark.by} "
                                          f"({inst.segment} @ {inst.offset}): {mark.problem}")
        syntaxes = accepted.get(inst.sop_class_uid)
        if not syntaxes:
            return Prepared(inst, reason=f"{self.peer} accepted no presentation context for SOP class "
                                          f"{inst.sop_class_uid}")
        target = None
        if inst.transfer_syntax_uid not in syntaxes:
            target = convert.target_syntax(inst.transfer_syntax_uid, syntaxes)
            if target is None:
                return Prepared(inst, reason=(f"{self.peer} accepts none of the syntaxes we can convert "
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
                return Prepared(inst, reason=f"{unreadable(inst)}: {gone}")
        moved = replace(inst, segment=where.segment, offset=where.offset)
        try:
            if self.rewrite is not None:
                return self._rewritten(moved, syntaxes, spool, in_memory)
            return self._read(moved, target, spool, in_memory)
        except FileNotFoundError as e:  # compacted away once more
            return Prepared(moved, reason=f"{unreadable(moved)}: {e}")

    def _rewritten(self, inst: Instance, accepted: set[str], spool: Path, in_memory: bool) -> Prepared:
        """The rewritten copy of the instance ready to send, converted if the peer did not
        accept its syntax; FileNotFoundError if its segment is gone."""
        assert self.rewrite is not None
        try:
            payload = self.read(self.segments_dir / inst.segment, inst.offset, inst.sop_instance_uid)
        except FileNotFoundError:
            raise
        except (OSError, CorruptRecord) as e:
            return unreadable_record(inst, f"{unreadable(inst)}: {e}", e)
        try:
            uid, syntax, payload = self.rewrite(inst, payload)
        except RewriteError as e:
            return Prepared(inst, reason=str(e))
        if syntax in accepted and in_memory:
            return Prepared(inst, syntax, payload=payload, sent_uid=uid)
        path = spool / f"{uid}.dcm"
        with open(path, "wb") as f:
            f.write(PREAMBLE)
            f.write(payload)
        target = syntax if syntax in accepted else convert.target_syntax(syntax, accepted)
        if target is None:
            path.unlink(missing_ok=True)
            return Prepared(inst, reason=f"{self.peer} accepts none of the syntaxes we can convert "
                                          f"{convert.name(syntax)} to")
        if target != syntax:
            try:
                convert.convert_file(path, path.with_suffix(".conv.dcm"), target,
                                     max_inflated_bytes=self.max_inflated_bytes)
            except convert.ConversionError as e:
                path.unlink(missing_ok=True)
                path.with_suffix(".conv.dcm").unlink(missing_ok=True)
                return Prepared(inst, reason=str(e))
            os.replace(path.with_suffix(".conv.dcm"), path)
        return Prepared(inst, target, path=path, sent_uid=uid)

    def _read(self, inst: Instance, target: str | None, spool: Path, in_memory: bool) -> Prepared:
        """The instance ready to send: its record read (into memory, or a spool file) and
        converted to `target` if that is not None; FileNotFoundError if its segment is gone."""
        segment = self.segments_dir / inst.segment
        why = unreadable(inst)
        if target is None and in_memory and inst.dataset_length <= SPOOL_ABOVE:
            try:
                return Prepared(inst, inst.transfer_syntax_uid, payload=self.read(segment, inst.offset, inst.sop_instance_uid))
            except FileNotFoundError:
                raise
            except (OSError, CorruptRecord) as e:
                return unreadable_record(inst, f"{why}: {e}", e)
        path = spool / f"{inst.sop_instance_uid}.dcm"
        try:
            with open(path, "wb") as f:
                f.write(PREAMBLE)
                for chunk in stream_payload(segment, inst.offset, inst.sop_instance_uid):
                    f.write(chunk)
        except FileNotFoundError:
            path.unlink(missing_ok=True)
            if segment.exists():  # the spool file, not the segment: a failure of its own
                return Prepared(inst, reason=f"cannot write to the spool {spool}")
            raise
        except (OSError, CorruptRecord) as e:
            path.unlink(missing_ok=True)
            return unreadable_record(inst, f"{why}: {e}", e)
        if target is None:
            return Prepared(inst, inst.transfer_syntax_uid, path=path)
        converted = path.with_suffix(".conv.dcm")
        try:
            convert.convert_file(path, converted, target, max_inflated_bytes=self.max_inflated_bytes)
        except convert.ConversionError as e:
            converted.unlink(missing_ok=True)
            return Prepared(inst, reason=str(e))
        finally:
            path.unlink(missing_ok=True)
        os.replace(converted, path)
        return Prepared(inst, target, path=path)


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
