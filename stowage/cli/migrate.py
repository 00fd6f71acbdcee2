"""Arguments of `stowage migrate` as the CLI hands them over, checked and turned into
Options; and --status, which needs no source connection."""
from __future__ import annotations

import datetime as dt
import sys

import click

from stowage.cli.checks import DATA_DIR, check_host, writable_later
from stowage.cli.options import common, load
from stowage.engine.migrate.pacing import PacingError, Rate, TimeWindow
from stowage.engine.migrate.options import MigrateError, Options, checkpoint_path
from stowage.engine.runtime.config import Config


def parse_date(text: str | None, flag: str) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text if "-" in text else f"{text[:4]}-{text[4:6]}-{text[6:]}")
    except ValueError:
        raise MigrateError(f"{flag} {text!r}: expected a date as YYYY-MM-DD or YYYYMMDD") from None


def options(*, method: str, since: str | None, until: str | None, parallel: int, find_limit: int,
            verify_content: bool, dry_run: bool, window: str | None, max_rate: str | None, stall_timeout: float,
            retries: int, retry_delay: float, rescan: bool, progress: bool) -> Options:
    if not 1 <= parallel <= 32:
        raise MigrateError("--parallel must be from 1 to 32 associations")
    if retries < 1 or retry_delay < 0 or stall_timeout <= 0 or find_limit < 0:
        raise MigrateError("--retries must be >= 1, --retry-delay >= 0, --stall-timeout > 0, --find-limit >= 0")
    try:
        tw = TimeWindow.parse(window) if window else None
        rate = Rate.parse(max_rate) if max_rate else None
    except PacingError as e:
        raise MigrateError(str(e)) from None
    lo, hi = parse_date(since, "--since"), parse_date(until, "--until")
    if lo and hi and lo > hi:
        raise MigrateError(f"--since {lo} is after --until {hi}")
    return Options(method, lo, hi, parallel, find_limit, verify_content, dry_run, tw, rate, stall_timeout,
                   retries, retry_delay, rescan, progress)


def source_of(text: str, config: Config):
    from stowage.engine.migrate.source import SourceError, parse_source
    try:
        return parse_source(text, config)
    except SourceError as e:
        raise MigrateError(str(e)) from None


def status_lines(config: Config, source_text: str | None) -> list[str]:
    """--status for one source, or for every migration this data directory has seen."""
    from stowage.engine.migrate import report
    if source_text:
        paths = [checkpoint_path(config.data_dir, source_of(source_text, config))]
    else:
        paths = sorted((config.data_dir / "migrate").glob("*.sqlite"))
    existing = [p for p in paths if p.exists()]
    if not existing:
        where = paths[0] if paths else config.data_dir / "migrate"
        raise MigrateError(f"no migration checkpoint at {where}: nothing has been migrated from there yet")
    out: list[str] = []
    for p in existing:
        out += report.status(p) + [f"checkpoint: {p}"]
    return out


@click.command()
@common
@click.option("--from", "source", help="The legacy archive: AE@host:port, or a configured remote's name.")
@click.option("--method", type=click.Choice(["move", "get"]), default="move", show_default=True,
              help="C-MOVE to the running archive (stowage serve on this data dir), or C-GET stored here.")
@click.option("--aet", help="Our AE title, calling and C-MOVE destination [the configured aet].")
@click.option("--since", help="First StudyDate to migrate (YYYY-MM-DD) [everything].")
@click.option("--until", help="Last StudyDate to migrate (YYYY-MM-DD) [everything].")
@click.option("--parallel", type=int, default=3, show_default=True, help="Studies pulled at once (associations).")
@click.option("--find-limit", type=int, default=0, show_default=True,
              help="The source's cap on C-FIND matches (e.g. Orthanc's LimitFindResults); windows answering "
                   "that many are split. 0: unknown (only a failure status reveals a cap).")
@click.option("--verify-content", is_flag=True, help="Also re-read every migrated record and check its checksums.")
@click.option("--dry-run", is_flag=True, help="Enumerate only; print what would be pulled.")
@click.option("--status", "show_status", is_flag=True, help="Print the checkpoint's state (also while a migration runs).")
@click.option("--window", help="Start new work only in this local time window, e.g. 19:00-07:00.")
@click.option("--max-rate", help="Cap: instances/s (e.g. 50) or MB/s (e.g. 20MB/s).")
@click.option("--stall-timeout", type=float, default=300.0, show_default=True,
              help="Seconds a retrieve may go without progress before it is aborted and retried later.")
@click.option("--retries", type=int, default=5, show_default=True, help="Attempts per study before it is failed.")
@click.option("--retry-delay", type=float, default=30.0, show_default=True,
              help="First back-off in seconds (doubles per attempt; x4 when the source is out of resources).")
@click.option("--rescan", is_flag=True, help="Enumerate the source again (finds studies added since).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def migrate(config_file, data_dir, source, method, aet, since, until, parallel, find_limit, verify_content, dry_run,
            show_status, window, max_rate, stall_timeout, retries, retry_delay, rescan, quiet) -> None:
    """Move a whole legacy archive into stowage over DICOM: enumerate it by C-FIND, pull every
    study by C-MOVE or C-GET, verify each instance against the catalog; checkpointed, so a re-run
    resumes. Exit status 1 if any study failed."""
    from stowage.engine.migrate.run import run
    config = load(config_file, data_dir=data_dir, aet=aet)
    try:
        if show_status:
            for line in status_lines(config, source):
                click.echo(line)
            return
        if not source:
            raise click.UsageError("give the source: --from AE@host:port (or a configured remote)")
        opts = options(method=method, since=since, until=until, parallel=parallel, find_limit=find_limit,
                       verify_content=verify_content, dry_run=dry_run, window=window, max_rate=max_rate,
                       stall_timeout=stall_timeout, retries=retries, retry_delay=retry_delay, rescan=rescan,
                       progress=not quiet)
        peer = source_of(source, config)
        check_host(peer.host, f"--from {source}")
        writable_later(config.data_dir, DATA_DIR)  # its checkpoint goes there before anything is pulled
        code = run(config, peer, opts, click.echo)
    except MigrateError as e:
        raise click.ClickException(str(e)) from None
    if code:
        sys.exit(code)
