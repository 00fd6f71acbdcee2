"""`stowage compact`: the space of deleted and superseded records reclaimed."""
from __future__ import annotations

import click

from stowage.cli.checks import DATA_DIR, writable_later
from stowage.cli.options import common, load


@click.command()
@common
@click.option("--dry-run", is_flag=True, help="Only list the segments that would be rewritten.")
@click.option("--rate", type=float, default=0.0, show_default=True, help="MB/s to copy at most (0: unlimited).")
@click.option("--ratio", type=float, help="Rewrite segments whose live fraction is below this [compact_live_ratio].")
@click.option("--grace", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Remove replaced segments this long after their round [compact_grace]; 0 frees their space "
                   "at once (a reader that still needs one looks its record up again).")
def compact(config_file, data_dir, dry_run, rate, ratio, grace) -> None:
    """Reclaim the space of deleted and superseded instances (also while `stowage serve`
    runs): rewrite sparse segments into new ones, then drop the old ones."""
    import duckdb

    from stowage.engine.lifecycle.compaction import CompactionBusy
    from stowage.engine.lifecycle.verify import catalog_unreadable
    from stowage.engine.lifecycle.compaction import compact as run
    from stowage.engine.runtime.logs import setup_logging
    config = load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    writable_later(config.data_dir, DATA_DIR)  # e.g. a backup mounted read-only: one line, not a traceback
    if ratio is not None and not 0 < ratio <= 1:
        raise click.UsageError("--ratio must be in (0, 1]")
    setup_logging(config, "compact")
    try:
        r = run(config, rate=rate, dry_run=dry_run, ratio=ratio, grace=grace)
    except CompactionBusy as e:
        raise click.ClickException(f"{e}; try again when it is done") from None
    except OSError as e:
        raise click.ClickException(f"compaction stopped: {e.strerror or e}; nothing was lost, "
                                   "run it again once that is fixed") from None
    except duckdb.Error as e:  # a damaged catalog file: what is live is unknown, so nothing is rewritten
        raise click.ClickException(f"compaction stopped: {catalog_unreadable(e)}; nothing was lost") from None
    if dry_run:
        for c in r.candidates:
            click.echo(f"{c.segment}: {c.size / 1e6:.1f} MB, {c.ratio:.0%} live ({c.live_records} record(s))")
        dead = sum(c.size - c.live_bytes for c in r.candidates)
        click.echo(f"would rewrite {len(r.candidates)} segment(s), reclaiming about {dead / 1e6:.1f} MB")
        for e in r.errors:  # segments it would leave as they are, and why
            click.echo(f"skipped: {e}", err=True)
        return
    click.echo(f"rewrote {len(r.rewritten)} segment(s) into {len(r.written)}: {r.records_copied} live record(s) "
               f"copied, {r.reclaimed / 1e6:.1f} MB reclaimed, {r.mb_per_s:.1f} MB/s; "
               f"{r.purged} retired segment(s) removed")
    if r.errors:
        for e in r.errors:
            click.echo(f"skipped: {e}", err=True)
        raise click.ClickException(f"{len(r.errors)} round(s) or segment(s) skipped (see above); run stowage verify")
    if r.short_of_space:
        raise click.ClickException(f"compaction stopped short of disk space: {r.short_of_space}")
