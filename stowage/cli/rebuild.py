"""`stowage rebuild-catalog`: the catalog rebuilt from the segments, archive stopped."""
from __future__ import annotations

import click

from stowage.cli.checks import DATA_DIR, writable_later
from stowage.cli.interrupt import Interrupted
from stowage.cli.options import common, load


@click.command("rebuild-catalog")
@common
def rebuild_catalog(config_file, data_dir) -> None:
    """Rebuild the whole catalog from the segment files alone (archive must be stopped)."""
    import fcntl

    from stowage.engine.lifecycle.rebuild import discard_unreadable_manifest, rebuild
    from stowage.engine.store.slots import SlotError
    config = load(config_file, data_dir=data_dir)
    if not (config.data_dir / "segments").is_dir() and not config.storage:
        raise click.ClickException(f"{config.data_dir} holds no segments/ directory")
    writable_later(config.data_dir, DATA_DIR)
    if config.storage:  # a lost data directory: rebuilt from the bucket alone
        config.data_dir.mkdir(parents=True, exist_ok=True)
    with open(config.data_dir / "serve.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException("the archive is running on this data directory; stop it first") from None
        try:
            if note := discard_unreadable_manifest(config.data_dir / "catalog"):
                click.echo(f"warning: {note}", err=True)
            if config.storage:  # this node's segments in the bucket that the data directory lost
                from stowage.engine.storage.objects import ObjectStoreError
                from stowage.engine.storage import wal
                from stowage.engine.storage.objects import store_for
                from stowage.engine.storage.restore import adopt, restore_tombstones
                try:
                    found = adopt(config)
                    wal.replay(config)  # durability = object-store: acknowledged records not uploaded yet
                    if found and not config.iceberg_catalog:  # its deletions: the bucket's copy of its log
                        restore_tombstones(config, store_for(config))
                except ObjectStoreError as e:
                    raise click.ClickException(f"cannot list this node's segments in the bucket: {e}") from None
                if found:
                    click.echo(f"{len(found)} segment(s) of node {config.node} found in the bucket")
            count = rebuild(config.data_dir)
            if config.storage and config.iceberg_catalog:
                # its deletions, from the Iceberg deletions table, and the names of segments lost before
                # their upload (kept in the manifest: after the rebuild, which starts it afresh)
                from stowage.engine.iceberg.restore import DeletionsUnknown, restore_if_lost
                try:
                    if restored := restore_if_lost(config):
                        click.echo(f"{restored} deletion(s) of node {config.node} found in the Iceberg catalog")
                except DeletionsUnknown as e:
                    raise click.ClickException(f"{e}; try again once the catalog is reachable") from None
        except KeyboardInterrupt:  # the old catalog is gone and the new one holds only part of the records
            raise Interrupted(f"the catalog of {config.data_dir} is only partly rebuilt: until `stowage "
                              "rebuild-catalog` runs again to its end, queries, export and send see part of the "
                              "archive (stowage serve's start-up recovery indexes the rest too)") from None
        except SlotError as e:  # e.g. a `stowage import` is writing: one line, no traceback
            raise click.ClickException(f"{config.data_dir}: {e.strerror}") from None
    click.echo(f"catalog rebuilt: {count} record(s) indexed")
