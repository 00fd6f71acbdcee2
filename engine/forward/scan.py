"""From stored records to queue entries: the rules applied to what the catalog holds.

The queue is derived from what is already durable: an acknowledged instance is in a
fsync'd segment record, and so in the catalog (its tail, or after a crash the tail that
start-up recovery rebuilds from the segments) before any C-STORE response goes out. The
scanner reads the catalog's records received after its cursor, applies the rules, and
commits the entries and the new cursor in one transaction (engine/forward/queue.py). A
crash between an acknowledgement and that commit therefore loses nothing: the next scan
finds the same records again. The store path does no work at all for forwarding.

A record becomes visible a little after its received_at stamp (it is stamped before its
group commit), so each scan looks back behind the cursor and skips records already seen:
LOOKBACK_US (milliseconds of group commit are plenty) on every scan, and RESCAN_US (a
large instance's slow append) on every FULL_EVERY-th, so that a busy archive's scans read
a couple of seconds of keys, not a minute's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

from stowage.catalog.analytics import dicom_attribute
from stowage.catalog import matching, tombstones
from stowage.catalog.reader import Catalog
from stowage.catalog.schema import KEYWORD_TO_COLUMN
from stowage.engine.forward.queue import Queue
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.forward_rules import ForwardRule, conditions

log = logging.getLogger("stowage.forward")

RESCAN_US = 60_000_000  # a record stamped this long before it became visible is still found
LOOKBACK_US = 2_000_000  # ...and found at the next scan if within this
FULL_EVERY = 20
_KEYS = "sop_instance_uid, epoch_us(received_at)"
_ROW = ("sop_instance_uid, sop_class_uid, transfer_syntax_uid, study_instance_uid, segment, \"offset\", "
        "coalesce(dataset_length, 0), epoch_us(received_at), series_instance_uid, calling_ae, called_ae, modality")


class Rules:
    """The configured rules, their match conditions parsed once."""

    def __init__(self, rules: Iterable[ForwardRule], pn_insensitive: bool = False) -> None:
        self.rules = [(r, conditions(r.match)) for r in rules]
        self.pn_insensitive = pn_insensitive
        self.needs_header = any(kw not in KEYWORD_TO_COLUMN for _r, conds in self.rules for kw, _m in conds)

    def destinations(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        """(destination, rule name) for every rule the record matches."""
        return [(to, rule.name) for rule in self.matching(row) for to in rule.to]

    def matching(self, row: dict[str, Any]) -> list[ForwardRule]:
        return [rule for rule, conds in self.rules if self._matches(rule, conds, row)]

    def _matches(self, rule: ForwardRule, conds: list[tuple[str, matching.Match]], row: dict[str, Any]) -> bool:
        for key, allowed in (("calling_ae", rule.calling_ae), ("called_ae", rule.called_ae),
                             ("sop_class_uid", rule.sop_class), ("modality", rule.modality)):
            if allowed and (row.get(key) or "").strip() not in allowed:
                return False
        for keyword, m in conds:
            column = KEYWORD_TO_COLUMN.get(keyword)
            value = row.get(column) if column else dicom_attribute(row.get("header"), row["transfer_syntax_uid"],
                                                                    keyword)
            values = value.split("\\") if isinstance(value, str) else value
            if not matching.matches(m, values, self.pn_insensitive):
                return False
        return True


class Deletions:
    """How far the scanner has applied deletions and rejections to the queue: the tombstone
    log's stamp up to which every pending entry of a record no longer served was cancelled.
    Shared with the delivering threads, which look a batch up in the catalog only when the
    log has changed since (a catalog query per batch was a fifth of forwarding's CPU)."""

    UNSEEN = ("unseen",)

    def __init__(self, tombstones_dir: Path) -> None:
        self.tombstones_dir = tombstones_dir
        self.reconciled: tuple | None = self.UNSEEN

    def current(self) -> tuple | None:
        return tombstones.stamp_of(self.tombstones_dir)

    def changed(self) -> bool:
        return self.current() != self.reconciled


class Scanned:
    """How far the scanner has looked, shared with the delivering threads: every record
    stamped before `through` (seconds since the epoch; 0 before the first scan) has been
    queued. An entry held for its series' or study's quiet time is released only up to
    it, so a scan that lags (every 2 s during a burst, or a busy machine) cannot let a
    group go out while an instance of it that arrived within the quiet time is unseen."""

    def __init__(self) -> None:
        self.through = 0.0


class Scanner:
    """Turns newly stored records into queue entries; one per forwarding process."""

    def __init__(self, config: Config, queue: Queue, deletions: Deletions | None = None,
                 scanned: Scanned | None = None) -> None:
        self.rules = Rules(config.forward, config.pn_case_insensitive)
        self.projects = {}  # [projects.NAME] of the de-identifying rules: whose AE title made a record
        if any(r.deidentify for r in config.forward):
            from stowage.engine.deidentify.project import parse
            self.projects = parse(config.projects)
        self.queue = queue
        self.scanned = scanned or Scanned()
        self.catalog = Catalog(config.data_dir / "catalog", config.duplicates)
        self.deletions = deletions or Deletions(self.catalog.tombstones_dir)
        self.cursor = queue.start_cursor(time.time_ns() // 1000)
        # Records looked at within RESCAN_US (in memory; at a start, what the queue holds).
        self._seen = dict.fromkeys(queue.queued_since(self.cursor - RESCAN_US))
        self._scans = 0
        columns = {c for _r, conds in self.rules.rules for kw, _m in conds if (c := KEYWORD_TO_COLUMN.get(kw))}
        self._select = f"SELECT {_ROW}" + "".join(f", \"{c}\"" for c in sorted(columns - set(_ROW.split(", "))))
        if self.rules.needs_header:
            self._select += ", header"

    def close(self) -> None:
        self.catalog.close()

    def scan(self) -> int:
        """One pass: the new entries it queued (and, if records were deleted or rejected
        since the last pass, their pending entries cancelled)."""
        stamp = self.deletions.current()
        started = time.time()
        added = self._scan()
        # Records stamped LOOKBACK_US before this scan began were visible to it (a record is
        # visible within that of its stamp: the premise of the lookback itself).
        self.scanned.through = max(self.scanned.through, started - LOOKBACK_US / 1e6)
        if stamp != self.deletions.reconciled:
            self._reconcile()
            self.deletions.reconciled = stamp
        return added

    def _deidentify(self, rule: ForwardRule, row: dict[str, Any]) -> str:
        """The project the rule's copy is de-identified under: none for a record that came in
        through that project's own AE title, as that project already made it (de-identifying it
        again would hash its UIDs twice and shift its dates twice: one patient would reach the
        destination under two pseudonyms, its plain copies' and its project copies')."""
        project = self.projects.get(rule.deidentify)
        if project is not None and project.applies_to(row.get("called_ae") or "", row.get("calling_ae") or ""):
            return ""
        return rule.deidentify

    def _reconcile(self) -> None:
        """Cancel the pending entries of records the archive no longer serves. A record, not
        a UID: an instance deleted and sent again (corrected) under its UID is served again,
        from a new record that has an entry of its own; the deleted one must not go out."""
        pending = self.queue.pending_records()
        if not pending:
            return
        _c, rows = self.catalog.execute("SELECT sop_instance_uid, epoch_us(received_at) FROM instances "
                                        "WHERE sop_instance_uid IN (SELECT unnest(?))",
                                        [sorted({uid for uid, _r in pending})])
        gone = set(pending) - {(uid, at) for uid, at in rows}
        if gone:
            n = self.queue.cancel_records(sorted(gone), "deleted or rejected before it was forwarded")
            log.info("forward: %d entr(ies) cancelled: their instances were deleted or rejected", n)

    def _scan(self) -> int:
        self._scans += 1
        now = time.time_ns() // 1000
        if now + LOOKBACK_US < self.cursor:  # the clock was stepped back: records are stamped behind the cursor
            log.warning("forward: the clock is %.0f s behind the queue's cursor; scanning from now on",
                        (self.cursor - now) / 1e6)
            self.cursor = self.queue.set_cursor(now - RESCAN_US)
        full = self._scans % FULL_EVERY == 1
        since = self.cursor - (RESCAN_US if full else LOOKBACK_US)
        if full:  # forget what no scan looks at any more
            self._seen = {k: None for k in self._seen if k[1] > since}
        if full:  # keys first: a minute of rows, most of them seen already
            _c, keys = self.catalog.execute(f"SELECT {_KEYS} FROM instances WHERE received_at > to_timestamp(?)",
                                            [since / 1e6])
            keys = [(uid, at) for uid, at in keys if at > since]
            fresh = [k for k in keys if k not in self._seen]
            if not fresh:
                return 0
            cols, rows = self.catalog.execute(
                f"{self._select} FROM instances WHERE received_at > to_timestamp(?) "
                "AND sop_instance_uid IN (SELECT unnest(?))", [since / 1e6, [u for u, _a in fresh]])
        else:  # a couple of seconds of rows: one query
            cols, rows = self.catalog.execute(f"{self._select} FROM instances WHERE received_at > to_timestamp(?)",
                                              [since / 1e6])
            fresh = [(r[0], r[7]) for r in rows if r[7] > since and (r[0], r[7]) not in self._seen]
            if not fresh:
                return 0
        newest = max(at for _u, at in fresh)
        wanted = set(fresh)
        entries, holds = [], {}
        for values in rows:
            if (values[0], values[7]) not in wanted:
                continue
            row = dict(zip(cols, values))
            row["received_at"] = values[7]
            # Entries are unique per destination and record: where a de-identifying rule and
            # another send one record to one destination, the de-identified copy is what goes.
            for rule in sorted(self.rules.matching(row), key=lambda r: not r.deidentify):
                # series and study level: not before the group has been quiet for rule.quiet
                uid = values[8] if rule.level == "series" else values[3]
                until = values[7] / 1e6 + rule.quiet if rule.level != "instance" else 0.0
                group = (values[8] if rule.commit_level() == "series" else values[3]) if rule.commit else ""
                for destination in rule.to:
                    if destination == (values[9] or "").strip():
                        continue  # never back to the AE that sent it: two archives forwarding to each other would loop
                    entries.append((destination, rule.name, *values[:8], values[8], until,
                                    self._deidentify(rule, row), group))
                    if until:
                        key = (destination, rule.name, rule.level, uid)
                        holds[key] = max(holds.get(key, 0.0), until)
        # Records that match no rule are not written anywhere: the cursor moving past them
        # is enough (they are rescanned within RESCAN_US, which costs a set lookup each).
        added = self.queue.add(entries, newest, [(*k, until) for k, until in holds.items()])
        self._seen.update(dict.fromkeys(fresh))
        self.cursor = max(self.cursor, newest)
        if added:
            log.debug("queued %d forwarding entr(ies)", added)
        return added
