"""Delivering one destination's queue entries with the sending core of `stowage send`
(engine/transfer/send.py): as stored where the destination accepts the stored transfer
syntax, else converted; `associations` of the remote at once.

Each destination has its own thread, so one that is down or slow holds up nobody else,
and the store path never waits for any of them. Entries of a rule with `deidentify` go out
as de-identified copies (deidentified.py); after a batch, the thread asks for storage
commitment of the studies that are ready for it (commitment.py). Outcomes:
- deleted or rejected (IOCM) since it was queued: cancelled, never sent; a record that
  compaction moved is sent from where the catalog has it now;
- success or warning: done (an audit line each);
- a refusal status from the destination (0xA7xx, 0xA9xx, 0xCxxx...), or a record we can
  never send to it (no presentation context accepted, corrupt, not convertible, not
  de-identified: quarantined): parked, with the status and
  the destination's Error Comment, never retried unless a person asks;
- entries of a rule with a `schedule` wait outside its window;
- no answer (down, association rejected or broken, timeout): the entries stay pending and
  the destination backs off, forward_retry_initial seconds doubling up to forward_retry_max,
  starting again at the oldest entry (order of arrival is kept).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time

from stowage.catalog.reader import Catalog
from stowage.engine.forward.commitment import Commitments
from stowage.engine.forward.deidentified import NOT_DEIDENTIFIED, rewrite_for
from stowage.engine.forward.queue import Entry, Queue
from stowage.engine.forward.scan import Deletions
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import audit_line
from stowage.engine.transfer.requestor import PeerError, peer_of
from stowage.engine.transfer.send import Instance, Outcome, SendResult, Sender

log = logging.getLogger("stowage.forward")

BATCH_PER_ASSOCIATION = 256  # each batch opens its associations and commits once: amortize both
# Failures without a status that retrying cannot cure: parked like refusals.
_PERMANENT = ("accepted no presentation context", "accepts none of the syntaxes", "marked corrupt",
              "stored record unreadable", NOT_DEIDENTIFIED, "cannot convert", "no conversion from",
              "cannot decompress", "cannot encode as", "cannot parse the stored dataset")


def backoff(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` failed attempts in a row (1, 2, ...)."""
    return min(maximum, initial * 2 ** min(failures - 1, 30))


def classify(outcome: Outcome) -> str:
    """done, parked, or retry."""
    if outcome.state != "failed":
        return "done"
    if outcome.status is not None or any(p in outcome.reason for p in _PERMANENT):
        return "parked"
    return "retry"


class Destination(threading.Thread):
    """Delivers the pending entries of one destination, oldest first, until stopped."""

    def __init__(self, config: Config, name: str, stop: threading.Event, deletions: Deletions | None = None) -> None:
        super().__init__(name=f"forward-{name}", daemon=True)
        self.config, self.destination, self.stop = config, name, stop
        self.deletions = deletions  # the scanner's: whether a batch must be looked up in the catalog
        self.failures = 0  # attempts in a row that reached nobody
        self.commitments = Commitments(config, name) if any(name in r.to and r.commit for r in config.forward) \
            else None
        self.projects: dict = {}  # [projects.NAME] opened for de-identifying rules, kept open
        self.committed_at = 0.0

    def run(self) -> None:
        queue = Queue(self.config.data_dir)
        self.catalog = Catalog(self.config.data_dir / "catalog", self.config.duplicates)
        try:
            while not self.stop.is_set():
                try:
                    delay = self._round(queue)
                except Exception:  # e.g. the queue database busy or the disk full: try again later
                    log.exception("forwarding to %s failed; trying again", self.destination)
                    delay = self.config.forward_retry_initial
                if delay:
                    self.stop.wait(delay)
        finally:
            queue.close()
            self.catalog.close()
            for project in self.projects.values():
                project.close()

    def _project(self, name: str):
        if name not in self.projects:
            from stowage.engine.deidentify.project import open_project
            self.projects[name] = open_project(self.config.projects, name, self.config.data_dir)
        return self.projects[name]

    def _commit(self, queue: Queue, remote) -> None:
        """Storage commitment of the groups ready for it, at most once a second."""
        if self.commitments is None or time.monotonic() - self.committed_at < 1.0:
            return
        self.committed_at = time.monotonic()
        try:
            self.commitments.request_due(queue, peer_of(remote))
        except PeerError as e:
            log.warning("forward: storage commitment with %s: %s", self.destination, e)

    def _served(self, queue: Queue, entries: list[Entry]) -> list[Entry]:
        """The entries whose instance the archive still serves, with its record's place now;
        the others are cancelled."""
        _c, rows = self.catalog.execute('SELECT sop_instance_uid, segment, "offset" FROM instances '
                                        "WHERE sop_instance_uid IN (SELECT unnest(?))",
                                        [[e.sop_instance_uid for e in entries]])
        where = {uid: (segment, offset) for uid, segment, offset in rows}
        gone = [e.id for e in entries if e.sop_instance_uid not in where]
        if gone:
            queue.cancel_ids(gone, "deleted or rejected before it was forwarded")
            log.info("forward: %d entr(ies) for %s cancelled: deleted or rejected since", len(gone),
                     self.destination)
        return [dataclasses.replace(e, segment=where[e.sop_instance_uid][0], offset=where[e.sop_instance_uid][1])
                for e in entries if e.sop_instance_uid in where]

    def _round(self, queue: Queue) -> float:
        """Send one batch; the seconds to wait before the next (0: at once)."""
        remote = self.config.remotes.get(self.destination)
        if remote is None:
            log.warning("forward: %s is no longer in [remotes]; its entries wait", self.destination)
            return self.config.forward_retry_max
        now = datetime.datetime.now()
        waiting = [r.name for r in self.config.forward if not r.sends_at(now)]
        entries = queue.due(self.destination, BATCH_PER_ASSOCIATION * remote.associations, waiting)
        if not entries:
            self._commit(queue, remote)
            return 0.5
        if self.deletions is None or self.deletions.changed():  # else the scanner cancelled what was deleted
            entries = self._served(queue, entries)
            if not entries:
                return 0.0
        try:
            peer = peer_of(remote)
        except PeerError as e:
            return self._failed(queue, entries, str(e))
        by_uid: dict[str, Entry] = {}
        for e in entries:
            by_uid.setdefault(e.sop_instance_uid, e)
        result = SendResult()
        for project in dict.fromkeys(e.project for e in by_uid.values()):  # usually one: none
            try:
                rewrite = rewrite_for(self._project(project)) if project else None
            except ValueError as e:  # the project's key unreadable: nothing of it goes out
                log.warning("forward: project %s for %s: %s", project, self.destination, e)
                continue
            sender = Sender(self.config.data_dir / "segments", peer, self.config.aet,
                            dimse_timeout=self.config.dimse_timeout, acse_timeout=self.config.acse_timeout,
                            max_pdu=self.config.max_pdu, associations=remote.associations,
                            duplicates=self.config.duplicates, max_inflated_bytes=self.config.max_inflated_bytes,
                            rewrite=rewrite)
            part = sender.send(Instance(e.sop_instance_uid, e.sop_class_uid, e.transfer_syntax_uid, e.segment,
                                        e.offset, e.dataset_length) for e in by_uid.values() if e.project == project)
            result.outcomes += part.outcomes
        done, parked, retry = [], [], []
        for o in result.outcomes:
            entry = by_uid.pop(o.instance.sop_instance_uid, None)
            if entry is None:
                continue
            verdict = classify(o)
            if verdict == "done":
                done.append((entry.id, o.status, o.sent_uid))
                audit_line(f"forwarded {entry.sop_instance_uid} to {self.destination}",
                           {"event": "forward", "sop_instance_uid": entry.sop_instance_uid,
                            "destination": self.destination, "status": o.status, "sent_as": o.sent_as,
                            **({"deidentified": entry.project} if entry.project else {})})
            elif verdict == "parked":
                parked.append((entry.id, o.status, o.reason))
                log.warning("forward: %s parked for %s: %s", entry.sop_instance_uid, self.destination, o.reason)
            else:
                retry.append((entry, o.reason))
        retry += [(e, "not attempted") for e in by_uid.values()]
        if retry and not done:
            return self._failed(queue, [e for e, _r in retry], retry[0][1], done, parked)
        self.failures = 0
        # The destination answered others: these few wait on their own back-off (e.g. one
        # instance that times out), not the destination's.
        at = time.time()
        queue.settle(done, parked, [(e.id, at + backoff(e.attempts + 1, self.config.forward_retry_initial,
                                                            self.config.forward_retry_max), None, reason)
                                    for e, reason in retry])
        self._commit(queue, remote)
        return 0.0

    def _failed(self, queue: Queue, entries: list[Entry], reason: str, done: list | None = None,
                parked: list | None = None) -> float:
        """Nobody answered: the entries stay pending and the destination backs off."""
        self.failures += 1
        delay = backoff(self.failures, self.config.forward_retry_initial, self.config.forward_retry_max)
        log.warning("forward: %s unreachable (%s); %d entr(ies) wait, retry in %.0f s (attempt %d)",
                    self.destination, reason, len(entries), delay, self.failures)
        at = time.time() + delay
        queue.settle(done or [], parked or [], [(e.id, at, None, reason) for e in entries])
        return delay
