"""`stowage deidentify`: a folder of DICOM files de-identified into another, under a
research project's profile, options and key (docs/deidentification.md)."""
from __future__ import annotations

from pathlib import Path

import click

from stowage.cli.checks import writable_later
from stowage.cli.interrupt import Interrupted
from stowage.cli.options import common, load


@click.command()
@common
@click.option("--project", required=True, help="A [projects.NAME] of the configuration.")
@click.option("--jobs", type=int, default=0, show_default=True, help="Processes (0: one per core).")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def deidentify(config_file, data_dir, project, jobs, src, out) -> None:
    """De-identify every DICOM file under SRC into OUT (named by their new SOP Instance UID)."""
    from stowage.engine.deidentify.folder import ProjectError, deidentify_folder
    config = load(config_file, data_dir=data_dir)
    if out.resolve() == src.resolve():
        raise click.UsageError("OUT must not be SRC: the originals are never overwritten")
    writable_later(out, "OUT")  # made by the de-identification, once the project is known good
    try:
        result = deidentify_folder(config.projects, project, config.data_dir, src, out, jobs)
    except ProjectError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:  # each file is written under a temporary name, then renamed
        raise Interrupted(f"deidentify stopped: the files in {out} are whole, the others not written; run the "
                          "same command again for the rest") from None
    for line in result.quarantined:
        click.echo(f"quarantined: {line}", err=True)
    for line in result.failed:
        click.echo(f"failed: {line}", err=True)
    for line in result.dicomdirs:
        click.echo(f"skipped: {line}: a DICOMDIR (a media directory, not an instance; the files it names "
                   "are de-identified on their own)", err=True)
    dicomdirs = f", {len(result.dicomdirs)} DICOMDIR skipped" if result.dicomdirs else ""
    click.echo(f"{result.written} de-identified into {out}, {len(result.quarantined)} quarantined, "
               f"{len(result.failed)} failed, {result.skipped} not DICOM{dicomdirs}")
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} file(s) could not be de-identified")
