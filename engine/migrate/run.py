"""The migration loop: enumerate the source into the checkpoint, then pull, verify and
record each study, several at a time, under the pacing gate, with a progress bar."""
from __future__ import annotations

import fcntl
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm

from stowage.catalog.reader import Catalog
from stowage.engine.transfer.requestor import Peer
from stowage.engine.runtime.config import Config
from stowage.engine.migrate import report
from stowage.engine.migrate.checkpoint import Checkpoint, CheckpointBusy, DateRange, Result, StudyRow, in_range
from stowage.engine.migrate.enumerate import first_windows
from stowage.engine.migrate.options import MigrateError, Options, checkpoint_path
from stowage.engine.migrate.pacing import Gate, retry_delay
from stowage.engine.migrate.scan import Scan
from stowage.engine.migrate.pull import Pulled, get_study, move_study
from stowage.engine.migrate.source import Session, SourceError
from stowage.engine.migrate.verify import SourceListing, check_content, held, list_instances, study_count
from stowage.protocol.status import MOVE_DESTINATION_UNKNOWN

log = logging.getLogger("stowage.migrate")
SLOT_BASE = 200  # migrate's own slots for C-GET (serve: 0.., import: 100..)


def serve_running(data_dir: Path) -> bool:
    """Whether a `stowage serve` holds this data directory (its serve.lock flock)."""
    lock = data_dir / "serve.lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# A study failing while the archive has less than this above its reserve (min_free_bytes)
# failed for want of room: no retry helps until someone frees space.
ROOM_MARGIN = 64 << 20


def archive_full(config: Config) -> str:
    """Why the archive cannot take more (its disk down to min_free_bytes, or its quota
    reached, as Archive.store refuses with 0xA700), or "" when it can."""
    from stowage.engine.store.archive import CATALOG_RESERVE
    from stowage.engine.store.usage import Usage
    if config.min_free_bytes >= 0:
        reserve = max(config.min_free_bytes, CATALOG_RESERVE)
        free = shutil.disk_usage(config.data_dir).free
        if free < reserve + ROOM_MARGIN:
            return (f"the archive's disk is full ({free / 1e6:.0f} MB free of the {reserve / 1e6:.0f} MB "
                    f"min_free_bytes keeps); free space")
    over = Usage(config.data_dir, config.max_storage_bytes, config.quota_policy).refusal(ROOM_MARGIN)
    return f"the archive's quota is reached ({over}); raise it or free space" if over else ""


class _Fatal(Exception):
    """An answer that no retry can fix (the source does not know our AE as a destination)."""


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


class Migration:
    def __init__(self, config: Config, peer: Peer, opts: Options, cp: Checkpoint) -> None:
        self.config, self.peer, self.opts, self.cp = config, peer, opts, cp
        self.aet = config.aet
        self.catalog: Catalog | None = None
        self.archive = None
        self.slot = None
        self.bar: tqdm | None = None
        self._bar_lock = threading.Lock()
        self.gate = Gate(opts.window, opts.rate)
        self.dates = (opts.since, opts.until)  # studies pulled: those of this run's range only
        self.full = ""  # why the archive can take no more (and what to do): no more studies start

    # -- enumeration ---------------------------------------------------------------

    def enumerate(self) -> None:
        scan = Scan(self.cp, lambda: Session(self.peer, self.aet, timeout=self.opts.stall_timeout),
                    self.opts.find_limit, lambda: self._wait_gate("enumeration"), self.opts.retry_delay)
        scan.run(first_windows(self.opts.since, self.opts.until), self.opts.rescan)

    # -- one study -------------------------------------------------------------------

    def _progress(self, n: int) -> None:
        if self.bar is not None:
            with self._bar_lock:
                self.bar.update(n)

    def study(self, row: StudyRow) -> Result:
        stall = self.opts.stall_timeout
        try:
            if self.opts.method == "move":
                with Session(self.peer, self.aet, timeout=stall) as s:
                    listing, row = _listed(s, row)
                    pulled = move_study(s, row.uid, self.aet, stall, self._progress)
            else:
                with Session(self.peer, self.aet, timeout=stall) as s:
                    listing, row = _listed(s, row)
                key = next(self._keys)
                self.trail.opened(key, str(self.peer))
                outcome = "C-GET: no association"
                try:
                    pulled = get_study(self.peer, self.aet, row.uid, listing.sop_classes, self.scp, key, stall,
                                       self._progress, max_command_bytes=self.config.max_command_bytes)
                    outcome = "C-GET " + pulled.describe()
                finally:
                    self.trail.closed(key, self.peer.ae_title, self.aet, outcome)
        except SourceError as e:
            return Result("failed", error=str(e), busy=True)
        if pulled.status == MOVE_DESTINATION_UNKNOWN:
            gone = self._receiver_gone()  # some sources (pynetdicom's) say 0xA801 when we do not answer
            if gone:
                raise _Fatal(f"stopped: {gone}, then run the same command again: the studies not done are "
                             f"pulled then")
            raise _Fatal(f"{self.peer} does not know {self.aet!r} as a C-MOVE destination (0xA801): add it, "
                         f"with this archive's host and port, to the source's configuration")
        return self._verify(row, listing, pulled)

    def _verify(self, row: StudyRow, listing: SourceListing, pulled: Pulled) -> Result:
        have = held(self.catalog, row.uid)
        received = pulled.completed + pulled.warning
        note = listing.problem
        if listing.uids is not None:
            expected, verified_by = len(listing.uids), "sop-instance-uids"
            present = [u for u in listing.uids if u in have.rows]
            missing = expected - len(present)
            if row.expected is not None and row.expected > expected:
                # The listing is shorter than the study-level count: a SERIES- or IMAGE-level
                # answer the source cut short without saying so (a "max query results" that
                # applies to every level), or instances gone since the enumeration. The listed
                # UIDs alone would certify a study that lacks what was not listed: the archive
                # must hold every listed UID and the count too (--rescan takes a new count).
                note = (f"the source's study-level C-FIND counts {row.expected} instances, its "
                        f"IMAGE-level C-FIND listed {expected}")
                missing = max(missing, row.expected - len(have.rows))
                expected, verified_by, present = row.expected, "instance-count", list(have.rows)
        elif row.expected is not None:
            expected, verified_by = row.expected, "instance-count"
            present = list(have.rows)
            missing = max(0, expected - len(present))
        else:
            expected, verified_by = received + pulled.failed, "retrieve-counts"
            present = list(have.rows)
            missing = max(0, expected - len(present)) + (0 if pulled.ok else 1)
        result = Result("done", expected, received, len(present), sum(have.rows[u][1] for u in present),
                        verified_by, busy=pulled.busy)
        problems = []
        if missing:
            problems.append(f"{missing} of {expected} instances not in the archive")
            if not pulled.ok:
                problems.append(f"C-{self.opts.method.upper()} {pulled.describe()}")
            if note:
                problems.append(f"({note})")
        elif self.opts.verify_content and present:
            bad = check_content(self.catalog, self.config.data_dir, type(have)({u: have.rows[u] for u in present}))
            if bad:
                result.verified -= len(bad)
                problems.append(f"{len(bad)} record(s) fail the content check, e.g. {bad[0][0]}: {bad[0][1]}")
            else:
                result.verified_by += "+content"
        if problems:
            result.state, result.error = "failed", "; ".join(problems)
        return result

    # -- the pull loop ---------------------------------------------------------------

    def _wait_gate(self, what: str, block: bool = True) -> float:
        said = ""
        while True:
            seconds, why = self.gate.wait()
            if seconds <= 0 or not block:
                return seconds
            if why != said:
                log.info("migrate: %s waits %.0f s: %s", what, seconds, why)
                said = why
            time.sleep(min(seconds, 5.0))

    def pull_all(self) -> None:
        """Pull until nothing is due; the first Ctrl-C (or SIGTERM) lets the studies in flight
        finish and be recorded, the second leaves them to the next run."""
        opts, cp = self.opts, self.cp
        running: dict[Future, StudyRow] = {}
        t0, run_bytes, stopping = time.monotonic(), 0, False
        with ThreadPoolExecutor(opts.parallel, thread_name_prefix="migrate") as pool:
            while True:
                try:
                    for f in [f for f in running if f.done()]:
                        run_bytes += self._finish(running.pop(f), f)
                        self._postfix(run_bytes, time.monotonic() - t0)
                    if stopping and not running:
                        return
                    stopping = stopping or bool(self.full)
                    free = 0 if stopping else opts.parallel - len(running)
                    if free > 0 and self._wait_gate("pulling", block=False) <= 0:
                        for row in cp.next_due(free, time.time(), self.dates):
                            cp.start(row.uid)
                            running[pool.submit(self.study, row)] = row
                    if running:
                        wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                        continue
                    due = cp.earliest_retry(self.dates)
                    if due is None:
                        return
                    gate_wait = self._wait_gate("pulling", block=False)
                    time.sleep(max(0.05, min(5.0, max(due - time.time(), gate_wait))))
                except KeyboardInterrupt:
                    if stopping:
                        raise
                    stopping = True
                    log.warning("migrate: stopping: finishing %d study(ies) in flight (interrupt again to leave "
                                "them to the next run)", len(running))

    def _finish(self, row: StudyRow, future: Future) -> int:
        try:
            result = future.result()
        except _Fatal as e:
            self.cp.finish(row.uid, Result("failed", error=str(e)), time.time(), attempts=row.attempts)  # not its fault
            raise MigrateError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - one study's surprise must not end the migration
            log.exception("migrate: study %s", row.uid)
            result = Result("failed", error=f"internal error: {e!r}")
        attempts = row.attempts + 1
        retry_at = None
        if result.state == "failed" and not self.full:
            # every further study would be pulled from the source and refused, or sent nowhere
            self.full = archive_full(self.config) or self._receiver_gone()
            if self.full:
                log.warning("migrate: %s: starting no more studies", self.full)
        if result.state == "failed" and self.full:  # not the study's fault: no attempt spent
            result.error = f"{result.error} ({self.full})"
            self.cp.finish(row.uid, result, time.time(), attempts=row.attempts)
            return 0
        if result.state == "failed" and attempts < self.opts.retries:
            delay = retry_delay(self.opts.retry_delay, attempts, result.busy)
            retry_at = time.time() + delay
            if result.busy:
                self.gate.pause(delay)
        state = self.cp.finish(row.uid, result, retry_at)
        if state == "failed":
            log.warning("migrate: study %s failed after %d attempt(s): %s", row.uid, attempts, result.error)
        elif state == "pending":
            log.info("migrate: study %s: %s; retry %d in %.0f s", row.uid, result.error, attempts + 1,
                     retry_at - time.time())
        self.gate.account(result.received, result.bytes)
        if self.bar is not None and state == "done" and row.expected is None:
            with self._bar_lock:
                self.bar.total += result.expected or 0
        return result.bytes if state == "done" else 0

    def _receiver_gone(self) -> str:
        if self.opts.method == "move" and not serve_running(self.config.data_dir):
            return (f"`stowage serve --data-dir {self.config.data_dir}`, which receives the C-MOVEs, is not "
                    f"running; start it")
        return ""

    def _postfix(self, run_bytes: int, elapsed: float) -> None:
        if self.bar is None:
            return
        with self.cp._mutex:
            counts = dict(self.cp.con.execute("SELECT state, count(*) FROM studies GROUP BY state").fetchall())
        rate = run_bytes / 1e6 / max(elapsed, 1e-3)
        with self._bar_lock:
            self.bar.set_postfix_str(f"studies {counts.get('done', 0)}/{sum(counts.values())} done, "
                                     f"{counts.get('failed', 0)} failed, {rate:.1f} MB/s")

    # -- C-GET storage -----------------------------------------------------------------

    def open_storage(self) -> None:
        self.catalog = Catalog(self.config.data_dir / "catalog", self.config.duplicates)
        if self.opts.method != "get":
            return
        from stowage.engine.store.archive import Archive
        from stowage.engine.store.recovery import recover
        from stowage.engine.store.slots import SlotError, claim_slot
        from stowage.engine.receive import spill
        from stowage.engine.runtime.audit import Trail
        from stowage.engine.receive.store import StorageSCP
        try:
            self.slot = claim_slot(self.config.data_dir, SLOT_BASE)
        except SlotError as e:
            raise MigrateError(str(e)) from None
        recover(self.config.data_dir, self.slot.number)
        self.archive = Archive(self.config, self.slot.number, bulk=True)
        spill.prepare(self.config.data_dir / "spool" / f"{self.slot.number:03d}", self.config.spill_threshold,
                      max_spool_bytes=self.config.max_spool_bytes, min_free_bytes=self.config.min_free_bytes)
        self.trail = Trail()
        self.scp = StorageSCP(self.archive, self.trail)
        self._keys = itertools.count(1)

    def close_storage(self) -> None:
        if self.archive is not None:
            self.archive.close()
        if self.catalog is not None:
            self.catalog.close()


def _listed(session: Session, row: StudyRow) -> tuple[SourceListing, StudyRow]:
    """The study's instances at the source, and its row with the source's count of them
    taken again if the listing is shorter than the enumeration's count said (a listing
    cut short, or instances deleted since: the fresh count tells them apart)."""
    listing = list_instances(session, row.uid)
    if listing.uids is not None and row.expected is not None and len(listing.uids) < row.expected:
        fresh = study_count(session, row.uid)
        if fresh is not None:
            row = replace(row, expected=fresh)
    return listing, row


def _quiet() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("stowage").setLevel(logging.ERROR)
    mine = logging.getLogger("stowage.migrate")
    mine.setLevel(logging.INFO)
    mine.propagate = False
    if not mine.handlers:
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        mine.addHandler(h)


def _terminate_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(config: Config, peer: Peer, opts: Options, echo: Callable[[str], None] = print) -> int:
    """The whole migration; returns the exit status (0: every study done and verified)."""
    _quiet()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # systemd stop: as Ctrl-C
    data_dir = config.data_dir
    if opts.method == "move" and not opts.dry_run and not serve_running(data_dir):
        raise MigrateError(f"--method move needs `stowage serve --data-dir {data_dir}` running to receive the "
                           f"C-MOVE (the source sends to AE {config.aet!r}); start it, or use --method get")
    path = checkpoint_path(data_dir, peer)
    try:
        address = _hold_address(path.parent, peer)  # noqa: F841 - held (flock) until the process ends
        cp = Checkpoint(path)
    except CheckpointBusy as e:
        raise MigrateError(str(e)) from None
    m = Migration(config, peer, opts, cp)
    try:
        cp.set_meta(source=str(peer), method=opts.method)
        again = cp.resume(retry_failed=not opts.dry_run)
        if again:
            log.info("migrate: %d study(ies) were in flight when the last run stopped; pulling them again", again)
        try:
            m.enumerate()
        except SourceError as e:
            raise MigrateError(str(e)) from None
        except KeyboardInterrupt:  # each window is one transaction: the next run asks the next one
            _interrupted(cp, echo, "the enumeration goes on from the next window of the source")
        if opts.dry_run:
            return _dry_run(cp, echo, m.dates)
        m.open_storage()
        try:
            _run_pulls(m, opts)
        except KeyboardInterrupt:
            _interrupted(cp, echo, "the studies in flight are pulled again")
        finally:
            m.close_storage()
        s = report.summary(cp.con)
        for line in report.lines(s):
            echo(line)
        csv_path, json_path = report.write(path, s, cp.con)
        echo(f"report: {csv_path} and {json_path}")
        if m.full:
            raise MigrateError(f"stopped: {m.full}, then run the same command again: the studies not done "
                               f"are pulled then")
        incomplete = [w for w in s["incomplete_windows"] if w["state"] != "pending"]
        outside = cp.outside(m.dates)
        if outside:
            echo(f"{outside} study(ies) not done are outside --since/--until: a run with their dates pulls them")
        unfinished = s["studies_pending"] + s["studies_in_flight"] - outside
        if unfinished and not s["studies_failed"]:
            echo(f"stopped with {unfinished} study(ies) not done: run the same command again to continue")
        return 1 if s["studies_failed"] or incomplete or unfinished else 0
    finally:
        cp.close()


def _hold_address(folder: Path, peer: Peer) -> TextIO:
    """A lock on the source's address (IP and port), beside the checkpoint's own: the
    same archive named otherwise (localhost and 127.0.0.1, a host name and its IP, another
    AE title) has another checkpoint, and two migrations of it at once would pull
    everything twice, each on its own associations."""
    try:
        ip = socket.getaddrinfo(peer.host, peer.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:  # no IPv4 address (or none at all: the first association will say so)
        ip = peer.host
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{ip}_{peer.port}")
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / f".address-{name}.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CheckpointBusy(f"another stowage migrate is running from {ip}:{peer.port}, the address of "
                             f"{peer.host}:{peer.port} (named otherwise there); see it with --status") from None
    return f


def _interrupted(cp: Checkpoint, echo: Callable[[str], None], what: str) -> None:
    """Ctrl-C or SIGTERM: one line, exit status 130."""
    cp.close()
    echo(f"interrupted: {what} when you run the same command again")
    os._exit(130)  # pynetdicom's threads of abandoned associations would hold the exit


def _run_pulls(m: Migration, opts: Options) -> None:
    cp = m.cp
    with cp._mutex:
        expected, done = cp.con.execute(
            "SELECT coalesce(sum(coalesce(expected, 0)), 0), coalesce(sum(CASE WHEN state = 'done' "
            "THEN coalesce(expected, 0) END), 0) FROM studies").fetchone()
    if opts.progress:
        m.bar = tqdm(total=expected, initial=done, unit="inst", desc="migrate", dynamic_ncols=True,
                     file=sys.stderr, smoothing=0.1)
    try:
        m.pull_all()
    finally:
        if m.bar is not None:
            m.bar.close()


def _dry_run(cp: Checkpoint, echo: Callable[[str], None], dates: DateRange) -> int:
    where, params = in_range(dates)
    with cp._mutex:
        rows = cp.con.execute("SELECT uid, patient_id, study_date, modalities, expected, state FROM studies "
                              f"WHERE {where} ORDER BY study_date, uid", params).fetchall()
    todo = [r for r in rows if r[5] != "done"]
    for uid, patient, date, mods, expected, _state in todo:
        echo(f"would pull {uid}  patient {patient}  {date or 'no date'}  {mods or '-'}  "
             f"{expected if expected is not None else '?'} instances")
    s = report.summary(cp.con)
    echo(f"dry run: {len(todo)} of {len(rows)} studies to pull, "
         f"{sum(r[4] or 0 for r in todo)} instances expected; nothing was pulled")
    for w in s["incomplete_windows"]:
        if w["state"] != "pending":
            echo(f"  possibly incomplete window {w['window']}: {w['state']} ({w['note']})")
    return 0
