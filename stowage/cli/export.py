"""`stowage export`: stored instances as Part-10 files, flat, as a tree, or a DICOMDIR File-set."""
from __future__ import annotations

from pathlib import Path

import click

from stowage.cli.checks import writable_later
from stowage.cli.interrupt import Interrupted
from stowage.cli.options import common, load


def _before(seen: list[int]) -> str:
    """How far an export that stopped on an error got, for its one line."""
    return f" ({seen[0]} of {seen[1]} instance(s) done before it)" if seen[1] else ""


@click.command()
@common
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write files into.")
@click.option("--all", "everything", is_flag=True, help="Every stored instance.")
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable).")
@click.option("--layout", type=click.Choice(["flat", "tree"]), default="flat", show_default=True,
              help="flat: <SOP Instance UID>.dcm; tree: patient/study/series folders with readable names.")
@click.option("--dicomdir", is_flag=True, help="Write a PS3.10 File-set: 8-character file IDs and a DICOMDIR.")
@click.option("--deidentify", "project", default="",
              help="De-identify copies under this [projects.NAME], named by their new UIDs (docs/deidentification.md).")
def export(config_file, data_dir, out, everything, patient, study, series, instance, layout, dicomdir,
           project) -> None:
    """Write stored instances as Part-10 files, dataset bytes as received (docs/export.md)."""
    from stowage.engine.transfer.export import ExportError, describe
    from stowage.engine.transfer.export import export as run
    if dicomdir and layout != "flat":
        raise click.UsageError("--dicomdir names the files itself (PS3.10 file IDs): drop --layout")
    chosen = [(lvl, list(v)) for lvl, v in (("patient", patient), ("study", study), ("series", series),
                                            ("instance", instance)) if v]
    if len(chosen) + bool(everything) != 1:
        raise click.UsageError("choose exactly one of --all, --patient, --study, --series, --instance")
    config = load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").exists():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    level, values = chosen[0] if chosen else (None, [])
    if project:
        if dicomdir or layout != "flat":
            raise click.UsageError("--deidentify writes flat files named by their new UIDs: drop --layout/--dicomdir")
        from stowage.cli.deidentified import export_deidentified
        writable_later(out, "--out")  # engine.transfer.export checks its own; this path did not
        export_deidentified(config, project, out, level, values)
        return
    seen = [0, 0]  # instances done (written, already there or failed), of how many

    def progress(done: int, total: int) -> None:
        seen[:] = done, total

    try:
        result = run(config.data_dir, out, level, values, config.duplicates, layout=layout, dicomdir=dicomdir,
                     progress=progress, cluster=config.cluster_view)
    except ExportError as e:
        raise click.ClickException(f"{e}{_before(seen)}") from None
    except KeyboardInterrupt:  # the file being written is removed (export.write_file): only whole ones remain
        raise Interrupted(f"{seen[0]} of {seen[1] or 'the'} instance(s) exported to {out}, every file whole"
                          f"{'; its DICOMDIR not written yet' if dicomdir else ''}. Run the same command again to "
                          "finish: it writes only what is missing") from None
    for failure in result.failed:
        click.echo(f"failed: {failure}", err=True)
    click.echo(describe(result, out))
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} instance(s) could not be exported")
