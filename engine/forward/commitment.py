"""Storage commitment after forwarding, for a rule with `commit = true`: once every entry of
a study (a series, at series level) for a destination was answered and none of it arrived
for the rule's `quiet` seconds, the destination's committing thread (Committer, beside its
delivering thread, so that waiting for a report never holds up deliveries) asks it to commit what
it took (N-ACTION, engine/transfer/commit_scu.py), waits up to the rule's `commit_timeout`
for the report, and records the verdict per entry: committed, or failed with the
destination's Failure Reason. A request that gets no report in time is counted on its
entries ("no report within N s") and asked again later, with back-off; after the rule's
`commit_tries` such requests the entries are failed with that reason (a person can ask
again with `stowage queue --retry`). A destination that cannot be reached is asked again
without counting; one that refuses the request, or does not offer the service, gets the
entries marked failed with its answer."""
from __future__ import annotations

import logging
import re
import threading
import time

from stowage.engine.forward.queue import Queue
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.forward_rules import ForwardRule
from stowage.engine.runtime.logs import audit_line
from stowage.engine.transfer.commit_scu import CommitError, request_commitment
from stowage.engine.transfer.requestor import Peer, PeerError, peer_of
from stowage.engine.transfer.results import Instance

log = logging.getLogger("stowage.forward")

# Answers that asking again does not change: the destination took the association but not
# the service (with no accepted context pynetdicom aborts the request), or refused the request.
_REFUSED = ("does not offer", "refused the request", "aborted the association request")
# The request was taken but no report came (commit_scu.py's words): counted towards commit_tries.
_NO_REPORT = ("no report from", "without a report")


class Commitments:
    """The commitment requests of one destination (used by its committing thread only)."""

    def __init__(self, config: Config, destination: str) -> None:
        self.config, self.destination = config, destination
        self.not_before: dict[tuple[str, str], float] = {}  # (rule, group) -> next try after no answer
        self.failures: dict[tuple[str, str], int] = {}

    def request_due(self, queue: Queue, peer: Peer, now: float | None = None) -> int:
        """Ask for commitment of every group that is ready; the number of requests answered."""
        now = time.time() if now is None else now
        rules = {r.name: r for r in self.config.forward}
        answered = 0
        for rule_name, group, newest in queue.commit_groups(self.destination):
            rule = rules.get(rule_name)
            quiet = rule.quiet if rule is not None else 60.0
            if newest + quiet > now or self.not_before.get((rule_name, group), 0.0) > now:
                continue
            answered += self._request(queue, peer, rule, rule_name, group)
        return answered

    def _request(self, queue: Queue, peer: Peer, rule: ForwardRule | None, rule_name: str, group: str) -> int:
        members = queue.commit_members(self.destination, rule_name, group)
        if not members:
            queue.record_commitment([], self.destination, rule_name, group)
            return 0
        instances = [Instance(uid, sop_class, "", "", 0) for _id, sop_class, uid in members]
        port = rule.commit_port if rule is not None and rule.commit_port else None
        timeout = rule.commit_timeout if rule is not None else 60.0
        try:
            report = request_commitment(peer, self.config.aet, instances, timeout=timeout, listen_port=port,
                                        bind=self.config.bind)
        except CommitError as e:
            if any(r in str(e) for r in _REFUSED):
                queue.record_commitment([(i, "failed", str(e)) for i, _c, _u in members])
                log.warning("forward: %s refused storage commitment of %s: %s", self.destination, group, e)
                return 1
            if any(r in str(e) for r in _NO_REPORT):
                tries = rule.commit_tries if rule is not None else 3
                why = _no_report(str(e), timeout)
                n = queue.no_report([i for i, _c, _u in members], f"{why}; asked again later")
                if n >= tries:
                    reason = f"{why}, {n} request(s)"
                    queue.record_commitment([(i, "failed", reason) for i, _c, _u in members])
                    log.warning("forward: storage commitment of %s by %s failed: %s", group, self.destination, reason)
                    audit_line(f"storage commitment of {group} by {self.destination}: no report",
                               {"event": "forward-commitment", "destination": self.destination, "group": group,
                                "committed": 0, "failed": len(members), "reason": reason})
                    self.failures.pop((rule_name, group), None)
                    self.not_before.pop((rule_name, group), None)
                    return 1
            key = (rule_name, group)
            self.failures[key] = n = self.failures.get(key, 0) + 1
            delay = min(self.config.forward_retry_max, self.config.forward_retry_initial * 2 ** min(n - 1, 30))
            self.not_before[key] = time.time() + delay
            log.warning("forward: no storage commitment verdict from %s for %s (%s); asking again in %.0f s",
                        self.destination, group, e, delay)
            return 0
        self.failures.pop((rule_name, group), None)
        self.not_before.pop((rule_name, group), None)
        failed = dict(report.failed)
        committed = set(report.committed)
        verdicts = []
        for entry_id, _c, uid in members:
            if uid in committed:
                verdicts.append((entry_id, "committed", ""))
            elif uid in failed:
                verdicts.append((entry_id, "failed", f"failure reason 0x{failed[uid]:04X} "
                                                     f"(transaction {report.transaction_uid})"))
            else:
                verdicts.append((entry_id, "failed", f"not in the report of transaction {report.transaction_uid}"))
        queue.record_commitment(verdicts, self.destination, rule_name, group)
        n_ok = sum(1 for _i, s, _c in verdicts if s == "committed")
        audit_line(f"storage commitment of {group} by {self.destination}: {n_ok} committed, "
                   f"{len(verdicts) - n_ok} failed",
                   {"event": "forward-commitment", "destination": self.destination, "group": group,
                    "transaction_uid": report.transaction_uid, "committed": n_ok,
                    "failed": len(verdicts) - n_ok})
        return 1


class Committer(threading.Thread):
    """Asks one destination for storage commitment of the groups ready for it, once a second,
    on a queue connection of its own: a request waits up to commit_timeout for its report,
    and the destination's deliveries go on meanwhile."""

    def __init__(self, config: Config, destination: str, stop: threading.Event) -> None:
        super().__init__(name=f"forward-{destination}-commit", daemon=True)
        self.config, self.destination, self.stop = config, destination, stop
        self.commitments = Commitments(config, destination)

    def run(self) -> None:
        queue = Queue(self.config.data_dir)
        try:
            while not self.stop.wait(1.0):
                self.once(queue)
        finally:
            queue.close()

    def once(self, queue: Queue) -> None:
        remote = self.config.remotes.get(self.destination)
        if remote is None:  # deliver.py says so
            return
        try:
            self.commitments.request_due(queue, peer_of(remote))
        except PeerError as e:
            log.warning("forward: storage commitment with %s: %s", self.destination, e)
        except Exception:  # e.g. the queue database busy: asked again in a second
            log.exception("forward: storage commitment with %s failed; trying again", self.destination)


def committers(config: Config, destinations: list[str], stop: threading.Event) -> list[Committer]:
    """A committing thread for each destination some rule asks to commit (`commit = true`)."""
    return [Committer(config, name, stop) for name in destinations
            if any(name in r.to and r.commit for r in config.forward)]


def _no_report(error: str, timeout: float) -> str:
    """A request without a report, in the words `stowage queue --parked` shows."""
    transaction = re.search(r"transaction ([0-9.]+)", error)
    if "no report from" in error:
        return f"no report within {timeout:g} s" + (f" (transaction {transaction[1]})" if transaction else "")
    return ("the destination closed the association without a report (give the rule a commit_port if it "
            "reports on a new association)")
