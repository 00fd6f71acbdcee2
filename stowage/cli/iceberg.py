"""`stowage iceberg`: publish the catalog to its Iceberg tables now (also with `serve`
stopped), and show how far publication has come."""
from __future__ import annotations

import fcntl

import click

from stowage.cli.checks import DATA_DIR, writable_later
from stowage.cli.options import common, load


@click.group()
def iceberg() -> None:
    """The catalog as Apache Iceberg tables (iceberg_catalog; docs/scale-out.md)."""


def _configured(config_file, data_dir):
    config = load(config_file, data_dir=data_dir)
    if not config.iceberg_catalog:
        raise click.ClickException("iceberg_catalog is not set: name a SQL (sqlite:///path, postgresql://...) "
                                   "or REST (http://...) catalog in the configuration")
    if not (config.data_dir / "catalog").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    return config


@iceberg.command()
@common
def publish(config_file, data_dir) -> None:
    """Commit every sealed catalog file and tombstone not yet in the Iceberg tables, then exit."""
    from stowage.engine.iceberg.process import LOCK
    from stowage.engine.iceberg.publisher import Publisher, PublishError
    from stowage.engine.runtime.logs import setup_logging
    config = _configured(config_file, data_dir)
    writable_later(config.data_dir, DATA_DIR)  # its ledger and audit lines go there
    setup_logging(config, "iceberg")
    home = config.data_dir / "iceberg"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException("the publisher of a running `stowage serve` is at work on this data "
                                       "directory; it publishes every iceberg_interval seconds") from None
        try:
            publisher = Publisher(config)
            publisher.start()
            done = publisher.run_once()
        except PublishError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:  # the catalog or the warehouse unreachable, refused credentials
            # one line: a web server that is no REST catalog answers with a whole HTML page
            text = " ".join(str(e).split())
            raise click.ClickException(f"{config.iceberg_catalog}: {type(e).__name__}: "
                                       f"{text[:300] + ' ...' if len(text) > 300 else text}") from None
    click.echo(f"published {done.instance_files} catalog file(s) ({done.instance_rows} instance row(s)) and "
               f"{done.deletion_rows} deletion(s) to {config.iceberg_namespace} in {len(done.commit_seconds)} "
               f"commit(s)" + (f"; {done.relocated_rows} row(s) relocated after a compaction" if done.relocated_rows
                               else ""))


@iceberg.command()
@common
def status(config_file, data_dir) -> None:
    """How much is published, and how much waits."""
    from stowage.catalog import iceberg_outbox, manifest
    from stowage.engine.iceberg import ledger, relocations
    config = _configured(config_file, data_dir)
    led = ledger.load(config.data_dir / "iceberg")
    waiting = iceberg_outbox.pending(config.data_dir / "catalog")
    moved = relocations.pending(manifest.load(config.data_dir / "catalog"))
    click.echo(f"node {config.node}: {led.instance_files} catalog file(s), {led.instance_rows} instance row(s) and "
               f"{led.deletion_rows} deletion(s) published in {led.commits} commit(s) ({led.conflicts} conflict(s) "
               f"retried); {len(waiting)} sealed file(s) waiting"
               + (f"; the rows of {len(moved)} compacted segment(s) to relocate" if moved else "")
               + (f"; batch {led.batch.id} of {led.batch.table} in flight" if led.batch else ""))
