"""`stowage import`: DICOM files from folders through the store path."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from stowage.cli.checks import DATA_DIR, writable_later
from stowage.cli.interrupt import Interrupted
from stowage.cli.options import common, load


@click.command("import")
# readable=False: the command says "PATH: permission denied" in one line itself (click would
# print a three-line usage error and exit 2)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False))
@common
@click.option("--processes", type=int, default=0, help="Import processes [one per core].")
@click.option("--threads", type=int, default=16, show_default=True, help="Concurrent stores per process.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False),
              help="CSV of every file not stored, and why [DATA_DIR/import/refused-<time>.csv].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--project", default="", help="De-identify into this [projects.NAME] (docs/deidentification.md).")
def import_(paths, config_file, data_dir, processes, threads, report, quiet, project) -> None:
    """Import DICOM files (Part-10, without preamble, DICOMDIR trees) from folders, recursively,
    through the same durable store path as C-STORE; safe while `stowage serve` runs. Exit status 1
    if a DICOM file could not be stored (see docs/import.md)."""
    import os

    from stowage.engine.importer.run import run_import
    config = load(config_file, data_dir=data_dir)
    for p in paths:
        if not p.exists():
            raise click.ClickException(f"{p}: no such file or folder")
        if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
            raise click.ClickException(f"{p}: permission denied")
    writable_later(config.data_dir, DATA_DIR)  # its ledger (SQLite) would fail first, with a traceback
    if project:
        from stowage.engine.deidentify.project import ProjectError, open_project
        try:
            open_project(config.projects, project, config.data_dir).close()  # its key too, before any file
        except ProjectError as e:
            raise click.ClickException(str(e)) from None
    if processes < 0 or threads < 1:
        raise click.UsageError("--processes must be >= 0 and --threads >= 1")
    try:
        summary = run_import(config, list(paths), processes=processes, threads=threads, report=report,
                             quiet=quiet, project=project)
    except OSError as e:
        raise click.ClickException(f"import into {config.data_dir}: {e.strerror or e}"
                                   f"{f' ({e.filename})' if e.filename else ''}") from None
    click.echo(summary.line())
    for problem in summary.problems:
        if problem != "interrupted":
            click.echo(f"import: {problem}", err=True)
    if "interrupted" in summary.problems:
        raise Interrupted(f"import stopped: the {summary.stored} file(s) stored are in the archive, "
                          f"{summary.not_attempted} not attempted; run the same command again for the rest")
    sys.exit(summary.exit_code)
