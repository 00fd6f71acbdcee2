"""The `stowage verify` command: every record of every segment re-read at a steady rate
(engine/lifecycle/verify.py), a progress bar, a CSV report of what is wrong, one summary line."""
from __future__ import annotations

import csv
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from stowage.cli.interrupt import Interrupted, interruptible
from stowage.cli.options import common, load
from stowage.engine.runtime.config import Config
from stowage.engine.runtime.logs import audit_line, setup_logging

if TYPE_CHECKING:
    from stowage.engine.lifecycle.verify import Problem, Tally

REPORT_COLUMNS = ("segment", "offset", "sop_instance_uid", "problem")
_SHOWN = 20  # problems printed on stderr; the report has them all


class VerifyCommandError(RuntimeError):
    """The archive cannot be verified; the message says why (one line, for a person)."""


def _partial(path: Path) -> Path:
    """Where the report is written until the pass ends: beside it, hidden. A pass cut short
    leaves no report that reads like a whole pass with nothing wrong (and the previous
    report, if any, stays as it was)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _open_report(path: Path | None) -> tuple[TextIO | None, Any]:
    if path is None:
        return None, None
    try:
        f = open(_partial(path), "w", newline="")
    except OSError as e:
        raise VerifyCommandError(f"cannot write the report {path}: {e.strerror or e}") from None
    writer = csv.writer(f)
    writer.writerow(REPORT_COLUMNS)
    f.flush()
    return f, writer


def _close_report(out: TextIO | None, path: Path | None, whole: bool) -> None:
    """Put a whole pass's report in place; drop a cut-short one's."""
    if out is None or path is None:
        return
    out.close()
    try:
        if whole:
            os.replace(_partial(path), path)
        else:
            os.unlink(_partial(path))
    except OSError as e:
        raise VerifyCommandError(f"cannot write the report {path}: {e.strerror or e}") from None


def run_verify(config: Config, rate_mb: float | None, report: Path | None, progress: bool = True,
               jobs: int = 1) -> Tally:
    """Verify the archive of `config`, `jobs` segments at a time (threads: decompression
    and CRCs run outside the GIL); the tally says what was found."""
    import duckdb  # not for `--help`

    from stowage.engine.lifecycle.verify import Pacer, Tally, Verifier, catalog_unreadable, verify_all
    data_dir = config.data_dir
    if not (data_dir / "segments").is_dir() and not (data_dir / "catalog").is_dir():
        raise VerifyCommandError(f"{data_dir} holds no archive (no segments/ or catalog/ in it)")
    try:
        setup_logging(config, "verify")  # audit lines of corrupt records go to <data_dir>/audit.jsonl
    except OSError as e:  # e.g. run by a user who may only read the archive: verify all the same
        click.echo(f"warning: no audit lines ({e.strerror or e}); corrupt records cannot be marked either",
                   err=True)
    logging.getLogger("stowage").setLevel(logging.CRITICAL)  # the command prints its own lines
    out, writer = _open_report(report)
    bar = None
    shown = 0
    lock = threading.Lock()

    def on_problem(p: Problem) -> None:
        nonlocal shown
        with lock:
            if writer is not None:
                writer.writerow((p.segment, p.offset, p.sop_instance_uid, p.problem))
                out.flush()
            if shown < _SHOWN:
                line = f"{'corrupt' if p.corrupt else 'catalog'}: {p.segment} @ {p.offset} " \
                       f"{p.sop_instance_uid or '(no UID)'}: {p.problem}"
                (bar.write if bar is not None else click.echo)(line, file=sys.stderr)
            shown += 1

    def on_progress(_segment: str, _offset: int, n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    pacer = Pacer(rate_mb * 1e6 if rate_mb else None)
    verifiers = [Verifier(data_dir, pacer, by="verify", duplicates=config.duplicates, on_problem=on_problem,
                          on_progress=on_progress) for _ in range(max(1, jobs))]
    started = time.monotonic()
    interrupted, whole, total = False, False, 0
    try:
        spans = verifiers[0].plan()
        for v in verifiers[1:]:  # the catalog files that cannot be read: left out by every thread
            v.leave_out(verifiers[0].damaged)
        total = sum(s.end for s in spans)
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify",
                       file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        # Ctrl-C stops the pacer: each verifier finishes the record it is on (a corrupt mark
        # is written whole) and stops
        _, interrupted = interruptible(lambda: verify_all(verifiers, spans), pacer.stop.set)
        whole = not interrupted
    except duckdb.Error as e:  # damage the read-through of the catalog files did not find
        raise VerifyCommandError(catalog_unreadable(e)) from None
    finally:
        for v in verifiers:
            v.close()
        if bar is not None:
            bar.close()
        _close_report(out, report, whole)
    tally = Tally()
    for v in verifiers:
        tally.add(v.tally)
    seconds = time.monotonic() - started
    if interrupted:
        raise Interrupted(f"verify stopped after {tally.records} record(s), {tally.bytes / 1e6:.1f} of "
                          f"{total / 1e6:.1f} MB: {len(tally.problems)} problem(s) found so far"
                          f"{f' ({tally.marked} corrupt record(s) marked)' if tally.marked else ''}"
                          f"{f'; no report written to {report}' if report else ''}. Run verify again for a whole "
                          "pass")
    if shown > _SHOWN:
        click.echo(f"... and {shown - _SHOWN} more problem(s)" + (f"; see {report}" if report else ""), err=True)
    click.echo(summary(tally, seconds))
    audit_line(f"verify: {tally.records} record(s), {len(tally.problems)} problem(s)", {
        "event": "verify", "records": tally.records, "bytes": tally.bytes, "segments": tally.segments,
        "problems": len(tally.problems), "corrupt": tally.corrupt, "marked": tally.marked,
        "cleared": tally.cleared, "seconds": round(seconds, 3)})
    return tally


def summary(tally: Tally, seconds: float) -> str:
    mb = tally.bytes / 1e6
    line = (f"verified {tally.records} record(s) in {tally.segments} segment(s), {mb:.1f} MB in {seconds:.1f} s "
            f"({mb / seconds if seconds else 0:.0f} MB/s): ")
    if not tally.problems:
        return line + "all intact" + (f" ({tally.cleared} corrupt mark(s) lifted)" if tally.cleared else "")
    return line + (f"{tally.corrupt} corrupt record(s) ({tally.marked} newly marked), "
                   f"{len(tally.problems) - tally.corrupt} catalog problem(s)")


@click.command()
@common
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Read at most this many MB/s, evenly paced [unlimited].")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False),
              help="Write every problem found as CSV: segment, offset, sop_instance_uid, problem.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Segments verified at once (threads; the rate is theirs together).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(config_file, data_dir, rate, report, jobs, quiet) -> None:
    """Re-read every stored record and check its checksums and its catalog row; safe while
    `stowage serve` runs. Corrupt records are marked (never sent, commitment fails them).
    Exit status 1 if anything is wrong (see docs/lifecycle.md)."""
    config = load(config_file, data_dir=data_dir)
    try:
        tally = run_verify(config, rate, report, progress=not quiet, jobs=jobs)
    except VerifyCommandError as e:
        raise click.ClickException(str(e)) from None
    if tally.problems:
        raise click.ClickException(f"{tally.corrupt} corrupt record(s), {len(tally.problems) - tally.corrupt} "
                                   f"catalog problem(s)" + (f"; every one is listed in {report}" if report else ""))
