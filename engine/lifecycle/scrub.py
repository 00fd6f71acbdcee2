"""The background scrub of `stowage serve`: one low-priority process that verifies every
record again, pass after pass, at `scrub_rate` (engine/lifecycle/verify.py), and marks what it
finds corrupt (engine/store/integrity.py: commitment then fails it, retrieve never sends it).

- Rate: `scrub_rate = "week"` (the default) or `"day"`: one full pass per period, at the
  archive's size ÷ the period (computed again at every segment, never below 64 KB/s);
  a number: that many MB/s; `0` or `"off"`: no scrub. Passes follow each other with a
  pause of PASS_PAUSE_S.
- One at a time: the process holds <data_dir>/corrupt/scrub.lock (flock), so the scrub of
  a server killed a moment ago and the new one never both run.
- Resumable: where it is (segment, offset) and its totals are in
  <data_dir>/corrupt/scrub.json, replaced atomically every few seconds and at the end of
  each segment; after a restart it goes on from there.
- Gentle: nice 19 and the idle I/O class (ioprio_set), even pacing, and the pages it read
  dropped from the page cache, so ingest and retrieve keep the disk and the cache.
- Supervised by the acceptor (`ScrubProcess`): started once the workers are ready,
  restarted a minute after it dies, stopped on drain (SIGTERM: it saves its position).
  It exits when the acceptor dies, however it dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stowage.catalog.durable import replace_durably
from stowage.engine.runtime.config import Config, scrub_setting
from stowage.engine.runtime.logs import audit_line
from stowage.engine.runtime.supervised import SupervisedProcess, child_start, run_exclusively
from stowage.engine.storage.remote import read_from_bucket

if TYPE_CHECKING:  # the acceptor imports this module for ScrubProcess only: no DuckDB there
    from stowage.engine.lifecycle.verify import Problem, Span

log = logging.getLogger("stowage.scrub")

DIRECTORY = "corrupt"       # as engine.store.integrity's, beside the marks
STATE = "scrub.json"
LOCK = "scrub.lock"
PASS_PAUSE_S = 10.0
MIN_RATE = 64 << 10        # bytes/s: a tiny archive still gets its pass in reasonable time
SAVE_EVERY_S = 5.0
RESTART_AFTER_S = 60.0
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}
_IOPRIO_CLASS_IDLE = 3


@dataclass
class ScrubState:
    segment: str = ""          # the segment being scrubbed ("" between passes)
    offset: int = 0            # the record boundary reached in it
    passes: int = 0            # full passes completed
    bytes: int = 0             # bytes read, in all passes
    pass_started: float = 0.0  # epoch seconds
    last_pass_seconds: float = 0.0


def load_state(data_dir: Path) -> ScrubState:
    try:
        with open(data_dir / DIRECTORY / STATE, "rb") as f:
            d = json.load(f)
        return ScrubState(**{k: d[k] for k in ScrubState.__dataclass_fields__ if k in d})
    except (OSError, ValueError, TypeError):
        return ScrubState()


def save_state(data_dir: Path, state: ScrubState) -> None:
    directory = data_dir / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    replace_durably(directory / STATE, json.dumps(asdict(state)))


def next_pass_in(state: ScrubState, fixed: float, period: float, now: float) -> float:
    """Seconds until the next pass: at a fixed rate, PASS_PAUSE_S; at "week" or "day", once
    the period since the last pass began has run out. An archive small enough for MIN_RATE
    to finish its pass early (under ~40 GB a week) is then read once a period, not again
    every PASS_PAUSE_S with an audit line each time."""
    if fixed or not state.pass_started:
        return PASS_PAUSE_S
    return max(PASS_PAUSE_S, state.pass_started + period - now)


class Scrub:
    """Passes over the archive until `stop` is set."""

    def __init__(self, config: Config, stop: threading.Event) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.stop = stop
        from stowage.engine.lifecycle.verify import Pacer, Verifier
        self.fixed, self.period = scrub_setting(config.scrub_rate)
        self.state = load_state(self.data_dir)
        self.pacer = Pacer(self.fixed or None, stop)
        self.verifier = Verifier(self.data_dir, self.pacer, by="scrub", duplicates=config.duplicates,
                                 on_problem=self._on_problem, on_progress=self._on_progress, drop_cache=True)
        self._told: set[tuple[str, int, str]] = set()
        self._saved_at = time.monotonic()
        self.remote_checked = 0  # evicted segments checked by HEAD in this pass

    def run(self) -> None:
        log.info("scrub running at %s (pass %d, from %s @ %d)", self._describe(), self.state.passes + 1,
                 self.state.segment or "the start", self.state.offset)
        try:
            # a pass done before a restart: the next one when it is due, not at once
            if not self.state.segment and self.state.passes and self.stop.wait(self._until_next()):
                return
            while not self.stop.is_set():
                if self._pass() and self.stop.wait(self._until_next()):
                    break
        finally:
            self._save()
            self.verifier.close()

    def _until_next(self) -> float:
        return next_pass_in(self.state, self.fixed, self.period, time.time())

    def _describe(self) -> str:
        return f"{self.fixed / 1e6:g} MB/s" if self.fixed else f"one pass per {self.period / 86400:g} day(s)"

    def _pass(self) -> bool:
        """Scrub from where it stands to the end of the archive; False if stopped."""
        from stowage.engine.lifecycle.verify import Stopped, Tally
        spans = self.verifier.plan()
        if not self.state.segment:
            self.state.pass_started = time.time()
            self.verifier.tally = Tally()
            self.remote_checked = 0
        evicted = self._evicted()
        for span in spans:
            if span.segment < self.state.segment:
                continue
            start = self.state.offset if span.segment == self.state.segment else 0
            self.state.segment, self.state.offset = span.segment, start
            if span.segment in evicted:  # in the bucket only: its verified upload is trusted, checked by HEAD
                self._check_remote(span.segment, evicted[span.segment])
                self._save()
                continue
            self._pace(spans)
            try:
                self.verifier.verify(span, start)
            except Stopped:
                return False
            except OSError as e:  # e.g. the catalog unreadable for a moment: the next pass tries again
                log.error("scrub: %s: %s; going on with the next segment", span.segment, e.strerror or e)
            self._save()
        self._pass_done()
        return True

    def _evicted(self) -> dict[str, dict]:
        """Uploaded segments without a local copy: segment -> their manifest entry."""
        if not self.config.storage:
            return {}
        from stowage.catalog import manifest
        uploaded = manifest.load(self.data_dir / "catalog").uploaded
        return {n: e for n, e in uploaded.items()
                if not e.get("gone") and not (self.data_dir / "segments" / n).exists()}

    def _check_remote(self, segment: str, entry: dict) -> None:
        """One HEAD: the object still has the size and checksum its verified upload recorded
        (reading it again would cost a GET of every byte, every pass)."""
        from stowage.engine.storage.objects import ObjectStoreError, store_for
        try:
            problem = store_for(self.config).still_there(entry)
        except ObjectStoreError as e:  # the bucket out of reach: the next pass asks again
            log.error("scrub: %s: %s", segment, e)
            return
        self.remote_checked += 1
        if problem:
            log.error("scrub: segment %s: %s", segment, problem)
            audit_line(f"scrub: {segment}: {problem}", {"event": "integrity", "segment": segment, "offset": 0,
                                                        "sop_instance_uid": "", "problem": problem, "by": "scrub"})

    def _pace(self, spans: list[Span]) -> None:
        if self.fixed:
            return
        rate = max(sum(s.end for s in spans) / self.period, MIN_RATE)
        if self.pacer.rate is None or abs(rate - self.pacer.rate) > 0.1 * self.pacer.rate:
            self.pacer.set_rate(rate)

    def _pass_done(self) -> None:
        t = self.verifier.tally
        self.state.passes += 1
        self.state.last_pass_seconds = round(time.time() - self.state.pass_started, 3)
        self.state.segment, self.state.offset = "", 0
        self._save()
        audit_line(f"scrub pass {self.state.passes}: {t.records} record(s), {len(t.problems)} problem(s)", {
            "event": "scrub", "pass": self.state.passes, "records": t.records, "bytes": t.bytes,
            "problems": len(t.problems), "corrupt": t.corrupt, "marked": t.marked, "cleared": t.cleared,
            "seconds": self.state.last_pass_seconds})
        log.info("scrub pass %d done: %d record(s), %.1f MB in %.0f s, %d problem(s); %d segment(s) in the bucket "
                 "checked by HEAD", self.state.passes, t.records, t.bytes / 1e6, self.state.last_pass_seconds,
                 len(t.problems), self.remote_checked)

    def _on_progress(self, segment: str, offset: int, n: int) -> None:
        self.state.offset = offset
        self.state.bytes += n
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self._save()

    def _on_problem(self, p: Problem) -> None:
        """Corrupt records are marked (and audited) by the verifier; a catalog problem is
        said once per process, not once per pass."""
        key = (p.segment, p.offset, p.problem)
        if p.corrupt or key in self._told:
            return
        self._told.add(key)
        log.warning("scrub: %s @ %d (%s): %s", p.segment, p.offset, p.sop_instance_uid or "no UID", p.problem)
        audit_line(f"scrub: {p.segment} @ {p.offset}: {p.problem}", {
            "event": "integrity", "segment": p.segment, "offset": p.offset,
            "sop_instance_uid": p.sop_instance_uid, "problem": p.problem, "by": "scrub"})

    def _save(self) -> None:
        self._saved_at = time.monotonic()
        try:
            save_state(self.data_dir, self.state)
        except OSError as e:  # a full disk: the position is kept in memory, saved when it can be
            log.warning("scrub: cannot save its position (%s)", e.strerror or e)


# -- the process --------------------------------------------------------------------

def lower_priority() -> None:
    """nice 19 and the idle I/O class: the scrub reads only when nobody else wants the disk."""
    try:
        os.nice(19)
    except OSError:
        pass
    nr = _IOPRIO_SET.get(platform.machine())
    if nr is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, 1, 0, _IOPRIO_CLASS_IDLE << 13) != 0:  # IOPRIO_WHO_PROCESS, this process
        log.info("scrub: idle I/O priority not available (errno %d); nice 19 only", ctypes.get_errno())


def main() -> None:
    config, stop = child_start("STOWAGE_SCRUB_CONFIG", "scrub")
    read_from_bucket(config)  # segments evicted after their upload: read from the bucket
    lower_priority()
    directory = config.data_dir / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    run_exclusively(directory / LOCK, stop, lambda: Scrub(config, stop).run(), "scrub")


class ScrubProcess(SupervisedProcess):
    """The acceptor's handle on the scrub process."""

    name, module, config_env, restart_after = "scrub", "stowage.engine.lifecycle.scrub", "STOWAGE_SCRUB_CONFIG", \
        RESTART_AFTER_S

    @property
    def enabled(self) -> bool:
        fixed, period = scrub_setting(self.config.scrub_rate)
        return bool(fixed or period)

    def start(self) -> None:
        if self.enabled:
            self.launch(f", scrub_rate {self.config.scrub_rate}")


if __name__ == "__main__":
    main()
