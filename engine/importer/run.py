"""`stowage import`: the main process. It scans the folders, hands chunks of files to
the import processes (engine/importer/loader.py), shows progress, writes the ledger
and the refused-files report, and sums up.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from stowage.engine.importer.ledger import Ledger
from stowage.engine.importer.outcome import HELD, NOT_ATTEMPTED, REFUSED, SKIPPED, STORED, Outcome, Task
from stowage.engine.importer.scan import roots_of, scan
from stowage.engine.runtime.config import Config
from stowage.engine.store.slots import IMPORT_FIRST_SLOT, IMPORT_LAST_SLOT, slots_present, try_claim

_CHUNK_FILES = 16
_CHUNK_BYTES = 8 << 20
_RETRIES = 8  # times new import processes are given the files of one that died
_DIED = "an import process ended unexpectedly"


@dataclass
class Summary:
    stored: int = 0
    held: int = 0
    unchanged: int = 0
    skipped: int = 0
    refused: int = 0
    not_attempted: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    report: Path | None = None
    problems: list[str] = field(default_factory=list)
    died: int = 0           # import processes that died (each time, their files went to a new one)
    retried: int = 0        # files given to a new import process after one died

    @property
    def exit_code(self) -> int:
        """0 when every DICOM file is in the archive (non-DICOM files skipped is fine);
        1 when a file that is or may be DICOM was not stored."""
        return 1 if self.refused or self.not_attempted or self.problems else 0

    def line(self) -> str:
        rate = self.seconds or 1e-9
        done = self.stored + self.held
        parts = [f"{self.stored} stored", f"{self.held} already held"]
        if self.unchanged:
            parts.append(f"{self.unchanged} unchanged since the last import")
        parts += [f"{self.skipped} skipped (not DICOM)", f"{self.refused} refused"]
        if self.not_attempted:
            parts.append(f"{self.not_attempted} not attempted")
        if self.died:
            parts.append(f"{self.died} import process(es) died, {self.retried} file(s) retried")
        text = (f"import: {', '.join(parts)}; {self.bytes_read / 1e6:.1f} MB read in {self.seconds:.1f} s "
                f"({done / rate:.0f} files/s, {self.bytes_read / 1e6 / rate:.1f} MB/s)")
        if self.report is not None:
            text += f"; report: {self.report}"
        return text


class _Report:
    """The CSV of every file not stored, opened when the first one comes."""

    def __init__(self, path: Path | None, default_dir: Path) -> None:
        self.path = path
        self.default_dir = default_dir
        self._file: TextIO | None = None
        self._writer: Any = None
        if path is not None:  # a report the user named: fail now, not half-way through
            self._open(path)

    def _open(self, path: Path) -> None:
        # surrogateescape: a file name that is not UTF-8 is written as its own bytes, so
        # that the report names the very file (a strict codec failed the whole import)
        self._file = open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["path", "outcome", "reason"])

    def add(self, path: str, outcome: str, reason: str) -> None:
        if self._writer is None:
            self.default_dir.mkdir(parents=True, exist_ok=True)
            self.path = self.default_dir / time.strftime("refused-%Y%m%d-%H%M%S.csv")
            self._open(self.path)
        self._writer.writerow([path, outcome, reason])

    def close(self) -> Path | None:
        if self._file is not None:
            self._file.close()
            return self.path
        return None


def child_main(*args) -> None:
    """Entry point of an import process (engine/importer/loader.py does the work), imported
    there so that this process starts its children before it loads the store path."""
    from stowage.engine.importer.loader import process_main
    process_main(*args)


def _recover_left_behind(data_dir: Path) -> None:
    """Recover import slots that a killed import left (nobody holds them now)."""
    from stowage.engine.store.recovery import recover  # the store path's imports: after the processes started
    for number in sorted(n for n in slots_present(data_dir) if IMPORT_FIRST_SLOT <= n <= IMPORT_LAST_SLOT):
        claim = try_claim(data_dir, number)
        if claim is not None:
            try:
                recover(data_dir, number)
            finally:
                claim.release()


def _chunks(files: list[tuple[str, tuple[int, int, int]]], per_chunk: int = _CHUNK_FILES):
    chunk: list[Task] = []
    size = 0
    for i, (path, key) in enumerate(files):
        chunk.append((i, path, key[0]))
        size += key[0]
        if len(chunk) >= per_chunk or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Bar:
    def __init__(self, total_files: int, total_bytes: int, quiet: bool) -> None:
        self.total_files = total_files
        self.files = 0
        self.t0 = time.monotonic()
        self.bar = None
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                            desc="import", mininterval=0.5, smoothing=0.1,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                                       "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    def update(self, files: int, nbytes: int) -> None:
        self.files += files
        if self.bar is not None:
            rate = self.files / max(time.monotonic() - self.t0, 1e-6)
            self.bar.set_postfix_str(f"{self.files}/{self.total_files} files, {rate:.0f} files/s", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_import(config: Config, paths: list[Path], *, processes: int = 0, threads: int = 16,
               report: Path | None = None, quiet: bool = False, project: str = "") -> Summary:
    t0 = time.monotonic()
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    out = _Report(report, data_dir / "import")
    ledger = Ledger(data_dir)
    found = scan(roots_of(paths), ledger)
    summary = Summary(unchanged=found.unchanged)
    for path, why in found.errors:
        out.add(path, REFUSED, why)
        summary.refused += 1
    for path, why in found.skipped:
        out.add(path, SKIPPED, why)
        summary.skipped += 1
    try:
        if found.files:
            n = max(1, min(processes or (os.cpu_count() or 1), len(found.files)))
            todo = list(range(len(found.files)))
            for attempt in range(_RETRIES + 1):
                before = len(todo)
                todo, died = _dispatch(config, found, todo, n, threads, ledger, out, summary, quiet, project,
                                       first=attempt == 0)
                if died:
                    summary.died += 1
                if not (todo and died) or attempt == _RETRIES:
                    break
                # An import process died (a crash, the OOM killer) with files in hand: a new
                # one takes them, one file at a time, after the slot it left is recovered
                # (_dispatch). A retry that got no file through died on its first one: that
                # file is refused, the others go on.
                summary.problems.remove(_DIED)
                summary.retried += len(todo)
                if attempt and len(todo) == before:
                    out.add(found.files[todo[0]][0], REFUSED, "an import process died reading this file, twice")
                    summary.refused += 1
                    todo.pop(0)
                n, threads = 1, 1
            if not todo and _DIED in summary.problems:  # it died, but the others stored all its files
                summary.problems.remove(_DIED)
            _not_attempted(found, todo, summary, out)
    finally:
        ledger.close()
        summary.report = out.close()
    summary.seconds = time.monotonic() - t0
    return summary


def _dispatch(config: Config, found, todo: list[int], n: int, threads: int, ledger: Ledger, out: _Report,
              summary: Summary, quiet: bool, project: str = "", first: bool = True) -> tuple[list[int], bool]:
    """Import the files `todo` (indices into found.files) on n processes; returns those
    with no result, and whether an import process died. The first run forks (before this
    process has threads of its own) and hands out files in chunks; a retry spawns fresh
    interpreters and hands them out one by one."""
    # The store path is imported once, here, and the import processes are forked with it
    # (spawning N interpreters that each import pydicom, pyarrow and duckdb took seconds
    # on a busy machine). Forked before this process starts any thread of its own or
    # touches pyarrow or duckdb; they are our children, joined by us, so their CPU time
    # counts in ours (RUSAGE_CHILDREN), as a benchmark expects.
    import stowage.engine.importer.loader  # noqa: F401
    files = [found.files[i] for i in todo]
    ctx = multiprocessing.get_context("fork" if first else "spawn")
    tasks = ctx.Queue(maxsize=n * threads * 4)
    tasks.cancel_join_thread()  # tasks no process took (all stopped early) must not hold up our exit
    results = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=child_main, args=(config.to_dict(), tasks, results, stop, threads, project),
                         name=f"stowage-import-{i}", daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    # While they start (about a second of imports): recover import slots a killed import
    # left. Their processes see what this seals within 0.1 s, before the first file.
    try:
        _recover_left_behind(config.data_dir)
    except OSError as e:
        summary.problems.append(f"could not recover an earlier import's slot: {e.strerror or e}")
    feeder = threading.Thread(target=_feed, args=(files, tasks, n * threads, _CHUNK_FILES if first else 1, stop),
                              daemon=True)
    feeder.start()
    bar = _Bar(len(files), sum(key[0] for _path, key in files), quiet)
    done = [False] * len(files)
    closed = [0]
    try:
        _collect(results, procs, closed, files, done, ledger, out, summary, bar)
    except KeyboardInterrupt:
        # Each process ends the files in hand and says what it stored (they ignore SIGINT):
        # files stored but not heard of would be reported "not attempted". The feeder stops,
        # and what is already queued comes back not attempted at once (Loader sees `stop`).
        stop.set()
        summary.problems.append("interrupted")
        try:
            _collect(results, procs, closed, files, done, ledger, out, summary, bar, time.monotonic() + 30)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pass
    finally:
        bar.close()
        for p in procs:
            if "interrupted" in summary.problems and p.is_alive():
                p.terminate()
            p.join(30)
            if p.is_alive():
                p.kill()
    return [todo[i] for i, ok in enumerate(done) if not ok], _DIED in summary.problems


def _collect(results, procs, closed: list[int], files, done: list[bool], ledger: Ledger, out: _Report,
             summary: Summary, bar: _Bar, deadline: float | None = None) -> None:
    """Count what the import processes send until all have closed (closed[0] counts them),
    all died, or `deadline` passed."""
    while closed[0] < len(procs) and (deadline is None or time.monotonic() < deadline):
        try:
            kind, payload = results.get(timeout=1.0)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                summary.problems.append(_DIED)
                return
            continue
        if kind == "done":
            _count(payload, files, done, ledger, out, summary, bar)
        elif kind == "failed":
            summary.problems.append(payload)
        elif kind == "closed":
            closed[0] += 1


_INTERRUPTED = "interrupted before this file; run the import again to go on"


def _not_attempted(found, left: list[int], summary: Summary, out: _Report) -> None:
    why = (_INTERRUPTED if "interrupted" in summary.problems
           else f"no result from an import process ({_RETRIES} retries after one died)"
           if summary.retried else "no result from an import process")
    for i in left:
        summary.not_attempted += 1
        out.add(found.files[i][0], NOT_ATTEMPTED, why)


def _feed(files, tasks, consumers: int, per_chunk: int, stop) -> None:
    for chunk in _chunks(files, per_chunk or _CHUNK_FILES):
        if stop.is_set():  # the rest is reported not attempted, by _not_attempted
            break
        tasks.put(chunk)
    for _ in range(consumers):
        tasks.put(None)


def _count(outcomes: list[Outcome], files, done: list[bool], ledger: Ledger, out: _Report, summary: Summary,
           bar: _Bar) -> None:
    nbytes = 0
    for o in outcomes:
        done[o.index] = True
        path, key = files[o.index]
        nbytes += key[0]
        summary.bytes_read += o.nbytes
        if o.kind in (STORED, HELD):
            ledger.add(path, key, o.kind)
            if o.kind == STORED:
                summary.stored += 1
            else:
                summary.held += 1
            continue
        interrupted = o.kind == NOT_ATTEMPTED and "interrupted" in summary.problems  # not the disk's doing
        out.add(path, o.kind, _INTERRUPTED if interrupted else o.reason)
        for lost in o.missing:
            out.add(lost, REFUSED, f"referenced by {path}, but not there")
            summary.refused += 1
        if o.kind == SKIPPED:
            summary.skipped += 1
        elif o.kind == REFUSED:
            summary.refused += 1
        else:
            summary.not_attempted += 1
    bar.update(len(outcomes), nbytes)
