"""The `stowage` command line: one module per command, registered on one group. It sits
above everything else (engine, workers, bench)."""
from __future__ import annotations

import click

from stowage.cli import bench, compact, delete, echo, export, importing, migrate, query, rebuild, send, serve, verify, viewer
from stowage.cli import deidentify, pseudonyms
from stowage.cli import queue
from stowage.cli import iceberg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stowage")
def main() -> None:
    """stowage: a fast, durable DICOM archive."""


main.add_command(serve.serve)
main.add_command(export.export)
main.add_command(delete.delete)
main.add_command(compact.compact)
main.add_command(importing.import_)
main.add_command(verify.verify)
main.add_command(rebuild.rebuild_catalog)
main.add_command(echo.echo)
main.add_command(send.send)
main.add_command(query.query)
main.add_command(bench.bench)
main.add_command(migrate.migrate)
main.add_command(viewer.viewer)
main.add_command(deidentify.deidentify)
main.add_command(pseudonyms.pseudonyms)
main.add_command(queue.queue)
main.add_command(iceberg.iceberg)
