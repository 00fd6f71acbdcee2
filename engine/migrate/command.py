"""Arguments of `stowage migrate` as the CLI hands them over, checked and turned into
Options; and --status, which needs no source connection."""
from __future__ import annotations

import datetime as dt

from stowage.engine.config import Config
from stowage.engine.migrate import report
from stowage.engine.migrate.pacing import PacingError, Rate, TimeWindow
from stowage.engine.migrate.run import MigrateError, Options, checkpoint_path
from stowage.engine.migrate.source import SourceError, parse_source


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


def source(text: str, config: Config):
    try:
        return parse_source(text, config)
    except SourceError as e:
        raise MigrateError(str(e)) from None


def status_lines(config: Config, source_text: str | None) -> list[str]:
    """--status for one source, or for every migration this data directory has seen."""
    if source_text:
        paths = [checkpoint_path(config.data_dir, source(source_text, config))]
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

