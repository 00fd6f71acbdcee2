"""`export --deidentify` and `send --deidentify`: the command-line side of
engine/transfer/deidentified.py (one clear line per problem, never a traceback)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from stowage.cli.checks import check_host
from stowage.cli.interrupt import Interrupted
from stowage.engine.runtime.config import Config


def _project(config: Config, name: str):
    from stowage.engine.deidentify.project import ProjectError, open_project
    try:
        return open_project(config.projects, name, config.data_dir)
    except ProjectError as e:
        raise click.ClickException(str(e)) from None


def _write(config: Config, name: str, out: Path, level: str | None, values: list[str]):
    from stowage.engine.transfer.deidentified import made_by, selected, write_deidentified
    if not (config.data_dir / "catalog").exists():
        raise click.ClickException(f"{config.data_dir} holds no archive (no catalog/ in it)")
    project = _project(config, name)
    try:
        instances = selected(config.data_dir, config.duplicates, level, values)
        if not instances:
            raise click.ClickException("nothing matches the selection")
        result = write_deidentified(project, config.data_dir, instances, out,
                                    as_stored=made_by(project, config.data_dir, config.duplicates, instances))
    finally:
        project.close()
    for line in result.quarantined:
        click.echo(f"quarantined: {line}", err=True)
    for line in result.failed:
        click.echo(f"failed: {line}", err=True)
    return result


def export_deidentified(config: Config, name: str, out: Path, level: str | None, values: list[str]) -> None:
    try:
        result = _write(config, name, out, level, values)
    except KeyboardInterrupt:  # each file is written under a temporary name, then renamed
        raise Interrupted(f"export --deidentify stopped: the files in {out} are whole, the others not written; "
                          "run the same command again for the rest") from None
    click.echo(f"{len(result.written)} de-identified under project {name} into {out}, "
               f"{len(result.quarantined)} quarantined, {len(result.failed)} failed")
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} instance(s) could not be exported")


def send_deidentified(config: Config, name: str, target: str, called_aet: str | None, level: str | None,
                      values: list[str], calling_aet: str | None) -> None:
    """De-identify into a private temporary folder under the data directory, send, remove it."""
    from stowage.engine.transfer.deidentified import send_files
    from stowage.engine.transfer.requestor import PeerError, resolve
    try:
        peer = resolve(target, config, called_aet)
    except PeerError as e:
        raise click.ClickException(str(e)) from None
    check_host(peer.host, str(peer))  # before the de-identification, not as a traceback after it
    spool = config.data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deidentified-", dir=spool) as tmp:
        result = _write(config, name, Path(tmp), level, values)
        try:
            sent, failures = send_files(peer, calling_aet or config.aet, result.written)
        except KeyboardInterrupt:  # the association is released (send_files), the copies removed
            raise Interrupted(f"send --deidentify stopped while sending to {peer}: part of the "
                              f"{len(result.written)} de-identified instance(s) arrived; run the same command again "
                              "(what arrived is sent again)") from None
    reasons = {line.split(": ", 1)[-1] for line in failures}
    if not sent and failures and len(reasons) == 1:  # one reason for all (no association): one line, not one per file
        raise click.ClickException(f"nothing sent to {peer}: {reasons.pop()}")
    for line in failures:
        click.echo(f"failed: {line}", err=True)
    click.echo(f"{sent} de-identified under project {name} sent to {peer}, {len(result.quarantined)} quarantined, "
               f"{len(result.failed) + len(failures)} failed")
    if result.failed or failures:
        raise click.ClickException(f"{len(result.failed) + len(failures)} instance(s) not sent")
