"""Delivering one destination's queue entries with the sending core of `stowage send`
(engine/transfer/send.py): as stored where the destination accepts the stored transfer
syntax, else converted; `associations` of the remote at once.

Each destination has its own thread, so one that is down or slow holds up nobody else,
and the store path never waits for any of them. The thread keeps the queue; the sending
itself runs in the destination's sending process (sending.py), off this process's GIL,
which gets entries as record locations and answers with their outcomes. Entries of a rule with `deidentify` go out
as de-identified copies (deidentified.py); storage commitment of the studies that are ready
for it is asked by another thread (commitment.py), so a wait for a report holds up no
delivery. Outcomes:
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

import datetime
import logging
import threading
import time
from collections import deque

from stowage.catalog.reader import Catalog
from stowage.engine.forward.deidentified import NOT_DEIDENTIFIED
from stowage.engine.forward.queue import Entry, Queue
from stowage.engine.forward.scan import Deletions, Scanned
from stowage.engine.forward.sending import Answer, SendingDied, SendingProcess
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import audit_lines
from stowage.engine.transfer.requestor import PeerError, peer_of
from stowage.engine.transfer.contexts import context_batches
from stowage.engine.transfer.results import Context, Instance

log = logging.getLogger("stowage.forward")

BATCH_PER_ASSOCIATION = 256  # entries in flight per association: the feed is topped up below this
SETTLE_EVERY_S = 0.2  # outcomes are recorded in one queue transaction this often (not one per instance)
# A session's top-ups read only the entries after the last one it read (no re-reading and
# filtering out of what is in flight, which held the GIL from the sending threads); behind
# that mark, entries that became due since (a hold or back-off that ended) are looked for
# this often, and whenever the entries after it run short.
REREAD_EVERY_S = 2.0
SESSION_S = 30.0  # a session's associations are closed after this (another project's entries come between)
# Failures without a status that retrying cannot cure: parked like refusals.
_PERMANENT = ("accepted no presentation context", "accepts none of the syntaxes", "marked corrupt",
              "stored record unreadable", NOT_DEIDENTIFIED, "cannot convert", "no conversion from",
              "cannot decompress", "cannot encode as", "cannot parse the stored dataset")


class _Session:
    """The bookkeeping of one `Destination._round`: which entries are in flight (given to
    the sending process), their outcomes (as it sends them back) settled in the queue every
    SETTLE_EVERY_S, one transaction for all that came in meanwhile."""

    def __init__(self, destination: "Destination", queue: Queue, project: str) -> None:
        self.destination, self.queue, self.project = destination, queue, project
        self.contexts: set[Context] | None = None  # what its associations propose
        self.in_flight: dict[str, Entry] = {}  # SOP Instance UID -> entry given to the sending process
        self.outcomes: deque[Answer] = deque()
        self.retry: list[tuple[Entry, str]] = []  # no answer: settled at the end (back-off of whom?)
        self.done = 0
        self.mark: tuple[int, int] | None = None  # (received_at, id) of the newest entry read
        self.reread_at = 0.0  # monotonic time of the last read that looked behind the mark

    def read(self, entries: list[Entry], whole: bool = False) -> list[Entry]:
        """`entries` as read from the queue (`whole`: from the oldest due), the mark moved past them."""
        if entries:
            last = entries[-1]
            self.mark = max(self.mark or (-1, -1), (last.received_at, last.id))
        if whole:
            self.reread_at = time.monotonic()
        return entries

    def admissible(self, entries: list[Entry]) -> list[tuple]:
        """The instances (as send.py `Instance` fields, for the pipe) of the entries this
        session's associations can carry, taken in flight: the same project, a presentation
        context proposed for them, one record per UID at a time (the rest wait for a later
        session, untouched)."""
        out = []
        for e in entries:
            if e.project != self.project or e.sop_instance_uid in self.in_flight:
                continue
            if self.contexts is not None and (e.sop_class_uid, e.transfer_syntax_uid) not in self.contexts:
                continue
            self.in_flight[e.sop_instance_uid] = e
            out.append(self.instance(e))
        return out

    @staticmethod
    def instance(e: Entry) -> tuple:
        return (e.sop_instance_uid, e.sop_class_uid, e.transfer_syntax_uid, e.segment, e.offset, e.dataset_length)

    def outstanding(self) -> int:
        """Entries given and not answered yet."""
        return len(self.in_flight) - len(self.outcomes)

    def busy(self) -> set[int]:
        """Entries not to be fetched again: in flight, or waiting to be settled as no answer."""
        return {e.id for e in self.in_flight.values()} | {e.id for e, _r in self.retry}

    def settle(self) -> None:
        """Record the outcomes that came in: done and parked now, no answer at the end."""
        done, parked, lines = [], [], []
        name = self.destination.destination
        while self.outcomes:
            o = self.outcomes.popleft()
            entry = self.in_flight.pop(o.sop_instance_uid, None)
            if entry is None:
                continue
            verdict = classify(o)
            if verdict == "done":
                done.append((entry.id, o.status, o.sent_uid))
                lines.append((f"forwarded {entry.sop_instance_uid} to {name}",
                              {"event": "forward", "sop_instance_uid": entry.sop_instance_uid,
                               "destination": name, "status": o.status, "sent_as": o.sent_as,
                               **({"deidentified": entry.project} if entry.project else {})}))
            elif verdict == "parked":
                parked.append((entry.id, o.status, o.reason))
                log.warning("forward: %s parked for %s: %s", entry.sop_instance_uid, name, o.reason)
            else:
                self.retry.append((entry, o.reason))
        if done or parked:
            self.queue.settle(done, parked, [])
            self.done += len(done)
        if lines:  # one write, after the commit: no line claims a delivery the queue could still forget
            audit_lines(lines)

    def finish(self, untried: list[str]) -> float:
        """After the last association closed: the entries that got no answer (or were never
        tried: `untried`) wait; the seconds until the next session."""
        dest = self.destination
        if dest.stop.is_set():  # what was not tried stays as it is, for the next start
            for uid in untried:
                self.in_flight.pop(uid, None)
        retry = self.retry + [(e, "not attempted") for e in self.in_flight.values()]
        if retry and not self.done:
            return dest._failed(self.queue, [e for e, _r in retry], retry[0][1])
        dest.failures = 0
        # The destination answered others: these few wait on their own back-off (e.g. one
        # instance that times out), not the destination's.
        at = time.time()
        if retry:
            self.queue.settle([], [], [(e.id, at + backoff(e.attempts + 1, dest.config.forward_retry_initial,
                                                            dest.config.forward_retry_max), None, reason)
                                      for e, reason in retry])
        return 0.0


def backoff(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` failed attempts in a row (1, 2, ...)."""
    return min(maximum, initial * 2 ** min(failures - 1, 30))


def classify(outcome: Answer) -> str:
    """done, parked, or retry."""
    if outcome.state != "failed":
        return "done"
    if outcome.status is not None or any(p in outcome.reason for p in _PERMANENT):
        return "parked"
    return "retry"


class Destination(threading.Thread):
    """Delivers the pending entries of one destination, oldest first, until stopped."""

    def __init__(self, config: Config, name: str, stop: threading.Event, deletions: Deletions | None = None,
                 scanned: Scanned | None = None) -> None:
        super().__init__(name=f"forward-{name}", daemon=True)
        self.config, self.destination, self.stop = config, name, stop
        self.deletions = deletions  # the scanner's: whether a batch must be looked up in the catalog
        self.scanned = scanned  # the scanner's: held series and studies are released only up to where it looked
        self.failures = 0  # attempts in a row that reached nobody
        self.deaths = 0  # sessions in a row whose sending process died
        self.sending = SendingProcess(config, name)
        self.projects: dict = {}  # [projects.NAME] opened for de-identifying rules, kept open
        self.last_due = time.monotonic()  # when entries were last due (the sending process's idle time)

    def run(self) -> None:
        queue = Queue(self.config.data_dir)
        self.catalog = Catalog(self.config.data_dir / "catalog", self.config.duplicates)
        try:
            try:
                self.sending.ensure()  # now: its imports are done before the first entry is due
            except OSError:  # a session tries again
                log.exception("forward: starting the sending process for %s failed", self.destination)
            while not self.stop.is_set():
                try:
                    delay = self._round(queue)
                except Exception:  # e.g. the queue database busy or the disk full: try again later
                    log.exception("forwarding to %s failed; trying again", self.destination)
                    delay = self.config.forward_retry_initial
                self._stop_idle_sender()
                if delay:
                    self.stop.wait(delay)
        finally:
            self.sending.close()
            queue.close()
            self.catalog.close()
            for project in self.projects.values():
                project.close()

    def _stop_idle_sender(self) -> None:
        """Stop the sending process once nothing has been due for forward_sender_idle
        seconds: ~120 MB resident per destination, for nothing; the next session starts
        it again (a second or two of imports before the first entry goes)."""
        idle = self.config.forward_sender_idle
        if idle and self.sending.running() and time.monotonic() - self.last_due > idle:
            self.sending.close()
            log.info("forward: sending process for %s stopped: nothing due for %.0f s", self.destination, idle)

    def _project(self, name: str):
        if name not in self.projects:
            from stowage.engine.deidentify.project import open_project
            self.projects[name] = open_project(self.config.projects, name, self.config.data_dir)
        return self.projects[name]

    def _served(self, queue: Queue, entries: list[Entry]) -> list[Entry]:
        """The entries whose instance the archive still serves, with its record's place now;
        the others are cancelled."""
        _c, rows = self.catalog.execute('SELECT sop_instance_uid, epoch_us(received_at), segment, "offset" '
                                        "FROM instances WHERE sop_instance_uid IN (SELECT unnest(?))",
                                        [[e.sop_instance_uid for e in entries]])
        # by record: an instance deleted and sent again under its UID is another record (with
        # an entry of its own); the deleted one's entry is cancelled, never sent from it
        where = {(uid, at): (segment, offset) for uid, at, segment, offset in rows}
        gone = [e.id for e in entries if (e.sop_instance_uid, e.received_at) not in where]
        if gone:
            queue.cancel_ids(gone, "deleted or rejected before it was forwarded")
            log.info("forward: %d entr(ies) for %s cancelled: deleted or rejected since", len(gone),
                     self.destination)
        return [e._replace(segment=where[(e.sop_instance_uid, e.received_at)][0],
                           offset=where[(e.sop_instance_uid, e.received_at)][1])
                for e in entries if (e.sop_instance_uid, e.received_at) in where]

    def _due(self, queue: Queue, limit: int, exclude: set[int] | frozenset = frozenset(),
             after: tuple[int, int] | None = None) -> list[Entry]:
        """Up to `limit` due entries, oldest first (after the entry `after`, if given), but
        those in `exclude` (in flight); the ones deleted or rejected since they were queued
        cancelled."""
        now = datetime.datetime.now()
        waiting = [r.name for r in self.config.forward if not r.sends_at(now)]
        entries = [e for e in queue.due(self.destination, limit + len(exclude), waiting,
                                        scanned_through=self.scanned.through if self.scanned is not None else None,
                                        after=after)
                   if e.id not in exclude]
        if entries and (self.deletions is None or self.deletions.changed()):  # else the scanner cancelled them
            entries = self._served(queue, entries)
        return entries

    def _round(self, queue: Queue) -> float:
        """One session: associations opened for the oldest due entries and kept open while
        the queue has more they can carry, its outcomes recorded as they come; the seconds
        to wait before the next (0: at once)."""
        remote = self.config.remotes.get(self.destination)
        if remote is None:
            log.warning("forward: %s is no longer in [remotes]; its entries wait", self.destination)
            return self.config.forward_retry_max
        window = BATCH_PER_ASSOCIATION * remote.associations
        entries = self._due(queue, window)
        if not entries:
            return 0.5
        self.last_due = time.monotonic()
        try:
            peer_of(remote)  # the remote's address is usable (the sending process makes its own)
        except PeerError as e:
            return self._failed(queue, entries, str(e))
        project = entries[0].project  # one project (usually none) per session: one rewrite
        try:
            if project:
                self._project(project)  # its key is readable (the sending process opens its own copy)
        except ValueError as e:  # the project's key unreadable: nothing of it goes out
            log.warning("forward: project %s for %s: %s", project, self.destination, e)
            return self._failed(queue, [e for e in entries if e.project == project], str(e))
        session = _Session(self, queue, project)
        session.read(entries, whole=True)
        expected = [Instance(*session.instance(e)) for e in entries if e.project == project]
        contexts = context_batches(expected)
        session.contexts = set(contexts[0]) if contexts else set()
        try:
            self.sending.ensure()
            self.sending.send("open", project, [session.instance(e) for e in entries if e.project == project],
                              session.admissible(entries))
            untried = self._exchange(queue, session, window)
        except SendingDied as e:
            session.settle()  # what it answered before it died
            return self._sending_died(session, str(e))
        session.settle()
        self.deaths = 0
        return session.finish(untried)

    def _exchange(self, queue: Queue, session: _Session, window: int) -> list[str]:
        """The session's messages with the sending process until it closed its associations:
        outcomes recorded every SETTLE_EVERY_S, the entries in flight topped up to `window`
        whenever a quarter of them were answered (at 4,000 instances/s the rest last about
        0.1 s: time for a top-up on a busy machine); the UIDs it was given but did not try."""
        sending = self.sending
        started = time.monotonic()
        settle_at = started + SETTLE_EVERY_S
        ended = cancelled = False
        while True:
            for message in sending.receive(max(0.0, settle_at - time.monotonic())):
                if message[0] == "outcomes":
                    session.outcomes.extend(map(Answer._make, message[1]))
                elif message[0] == "closed":
                    return message[1]
            if time.monotonic() >= settle_at:
                session.settle()
                settle_at = time.monotonic() + SETTLE_EVERY_S
            if self.stop.is_set() and not cancelled:
                sending.send("cancel")
                cancelled = ended = True
            if ended:
                continue
            if time.monotonic() - started > SESSION_S:
                sending.send("end")  # a long session ends now and then: other projects
                ended = True
            elif session.outstanding() <= window * 3 // 4:
                more = session.admissible(self._more(queue, window - session.outstanding(), session))
                if more:
                    sending.send("give", more)
                elif not session.in_flight:
                    sending.send("end")  # nothing more it can carry: the queue is empty, or the rest waits
                    ended = True

    def _sending_died(self, session: _Session, reason: str) -> float:
        """The sending process ended mid-session (killed, crashed): the entries it had and
        did not answer were never settled, so they are pending still, and go out again,
        oldest first, with a new process after a back-off (one that dies on every session
        is not restarted in a tight loop)."""
        self.deaths += 1
        how = self.sending.exit_status()
        self.sending.close()
        delay = backoff(self.deaths, self.config.forward_retry_initial, self.config.forward_retry_max)
        log.error("forward: the sending process for %s ended (%s: %s); %d entr(ies) it had stay pending, "
                  "sent again by a new one in %.1f s", self.destination, how, reason, len(session.in_flight), delay)
        return delay

    def _more(self, queue: Queue, window: int, session: _Session) -> list[Entry]:
        """A top-up's entries: those after the session's mark; all due ones but those in
        flight when that runs short or REREAD_EVERY_S has passed (what became due behind
        the mark: a hold or a back-off that ended)."""
        if session.mark is not None and time.monotonic() - session.reread_at < REREAD_EVERY_S:
            entries = session.read(self._due(queue, window, after=session.mark))
            if len(entries) == window:
                return entries
        return session.read(self._due(queue, window, session.busy()), whole=True)

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
