"""`stowage delete`: what would go shown, confirmed, then deleted durably."""
from __future__ import annotations

import click

from stowage.cli.checks import DATA_DIR, writable_later
from stowage.cli.options import common, load, split_values


@click.command()
@common
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable, or comma-separated).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable, or comma-separated).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable, or comma-separated).")
@click.option("--reason", default="", help="Why (e.g. 'consent withdrawn'), kept in the audit log and the tombstones.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete(config_file, data_dir, patient, study, series, instance, reason, yes) -> None:
    """Delete stored instances (also while `stowage serve` runs): hidden at once from C-FIND,
    C-MOVE, C-GET, export, send and storage commitment; space comes back with compaction."""
    import getpass

    import duckdb

    from stowage.engine.lifecycle.delete import DeleteError
    from stowage.engine.lifecycle.delete import delete as run
    from stowage.engine.lifecycle.verify import catalog_unreadable
    from stowage.engine.runtime.logs import setup_logging
    chosen = [(lvl, [v for v in split_values(vals)] if lvl != "patient" else list(vals))
              for lvl, vals in (("patient", patient), ("study", study), ("series", series),
                                ("instance", instance)) if vals]
    if len(chosen) != 1:
        raise click.UsageError("choose exactly one of --patient, --study, --series, --instance")
    config = load(config_file, data_dir=data_dir)
    if not (config.data_dir / "catalog").is_dir():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    writable_later(config.data_dir, DATA_DIR)  # before asking: a read-only archive deletes nothing
    level, values = chosen[0]
    comment = " ".join(reason.split())[:200]
    try:
        actor = f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a bare container)
        actor = "cli"
    try:
        plan = run(config, level, values, actor=actor, dry_run=True)
        if not plan.records:
            raise click.ClickException(f"nothing to delete: no stored instance has that {level} "
                                       "(or it is deleted already)")
        _tell_unmatched(level, plan.unknown, plan.already)
        click.echo(f"would delete {plan.summary()}")
        if not yes:
            click.confirm("delete them?", abort=True)
        setup_logging(config, "delete")
        result = run(config, level, values, actor=actor, comment=comment)
    except DeleteError as e:
        raise click.ClickException(str(e)) from None
    except duckdb.Error as e:  # a damaged catalog file: what the selection holds is unknown
        raise click.ClickException(f"nothing deleted: {catalog_unreadable(e)}") from None
    except OSError as e:
        raise click.ClickException(f"cannot write the tombstones ({e.strerror or e}): the deletion may be "
                                   "incomplete; run it again once that is fixed") from None
    click.echo(f"deleted {result.summary()}")
    if result.unknown:  # a mistyped value must not pass for done: the exit status says so too
        raise click.ClickException(f"{len(result.unknown)} of the {len(result.values)} {level} value(s) given "
                                   f"matched no stored instance, so nothing of them was deleted: {_some(result.unknown)}")


def _some(values: list[str], shown: int = 5) -> str:
    return ", ".join(values[:shown]) + (f" and {len(values) - shown} more" if len(values) > shown else "")


def _tell_unmatched(level: str, unknown: list[str], already: list[str]) -> None:
    """Before asking: the values that match nothing (a typo?) and those deleted already."""
    if unknown:
        click.echo(f"not found: no stored instance has {level} {_some(unknown)}", err=True)
    if already:
        click.echo(f"deleted already: {level} {_some(already)}", err=True)
