"""The `stowage send` command: select instances from the catalog, send them with the
sending core (engine/transfer/send.py) under a progress bar, print a summary, and optionally ask
the destination for storage commitment (engine/transfer/commit_scu.py)."""
from __future__ import annotations

import sys
import threading
import time

import click

from stowage.cli.checks import check_ae_title
from stowage.cli.interrupt import Interrupted, interruptible
from stowage.cli.options import common, load, quiet_libraries, split_values
from stowage.engine.runtime.config import Config


class SendCommandError(RuntimeError):
    """Nothing could be sent; the message says why (one line, for a person)."""


def run_send(config: Config, target: str, level: str | None, values: list[str], query_text: str | None, *,
             calling_aet: str | None = None, called_aet: str | None = None, timeout: float = 30.0,
             commit: bool = False, commit_timeout: float = 60.0, commit_port: int | None = None,
             progress: bool = True) -> bool:
    """True when everything selected arrived (and, with `commit`, was committed)."""
    from stowage.catalog.reader import Catalog  # here, not at the top: `stowage --help` imports every command
    from stowage.engine.transfer.requestor import PeerError, resolve
    from stowage.engine.transfer.results import Outcome
    from stowage.engine.transfer.selection import SelectionError, parse_query, select
    from stowage.engine.transfer.deleted import DeletionWatch
    from stowage.engine.transfer.send import Sender
    if not (config.data_dir / "catalog").exists():
        raise SendCommandError(f"{config.data_dir} holds no archive (no catalog/ in it)")
    try:
        peer = resolve(target, config, called_aet)
        query = parse_query(query_text) if query_text else []
    except (PeerError, SelectionError) as e:
        raise SendCommandError(str(e)) from None
    deleted = DeletionWatch(config.data_dir)  # before the selection: nothing deleted slips between
    catalog = Catalog(config.data_dir / "catalog", config.duplicates)
    try:
        instances = select(catalog, level, values, query)
    finally:
        catalog.close()
    if not instances:
        raise SendCommandError("nothing matches the selection; nothing sent")
    calling = calling_aet or config.aet
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(instances), unit="inst", desc=f"to {peer.ae_title}", file=sys.stderr,
                   dynamic_ncols=True, leave=True)

    failed = 0

    def on_outcome(o: Outcome) -> None:
        nonlocal failed
        failed += o.state == "failed"
        if bar is not None:
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed, refresh=False)

    quiet_libraries()
    started = time.monotonic()
    stop = threading.Event()
    sender = Sender(config.data_dir / "segments", peer, calling, dimse_timeout=timeout,
                    acse_timeout=config.acse_timeout,
                    max_pdu=config.max_pdu, on_outcome=on_outcome, duplicates=config.duplicates,
                    max_inflated_bytes=config.max_inflated_bytes, cancelled=stop.is_set,
                    associations=remote.associations if (remote := config.remotes.get(target)) else 1,
                    deleted=deleted)
    try:
        # Ctrl-C: no new C-STORE; the one on the wire gets its response, the association is
        # released (not aborted), and the summary says what went
        result, interrupted = interruptible(lambda: sender.send(instances), stop.set)
    finally:
        if bar is not None:
            if failed == len(instances):
                bar.leave = False  # nothing went: the one error line below says why
            bar.close()
    seconds = time.monotonic() - started
    total = len(instances)
    if interrupted:
        raise Interrupted(_what_went(result, total, peer))
    reasons = {o.reason for o in result.failures}
    if result.failed == total and len(reasons) == 1:
        raise SendCommandError(f"nothing sent to {peer}: {reasons.pop()}")
    for o in result.failures[:20]:
        click.echo(f"failed: {o.instance.sop_instance_uid}: {o.reason}", err=True)
    if len(result.failures) > 20:
        click.echo(f"... and {len(result.failures) - 20} more failure(s); see the log", err=True)
    mb = result.bytes_sent / 1e6
    click.echo(f"sent {total} instance(s) to {peer} in {seconds:.2f} s: {result.completed} completed, "
               f"{result.warning} warning, {result.failed} failed ({result.converted} converted; "
               f"{mb:.1f} MB, {total / seconds if seconds else 0:.0f} inst/s)")
    ok = result.failed == 0
    if commit:
        from stowage.engine.transfer.commit_scu import CommitError, request_commitment
        sent = [o.instance for o in result.outcomes if o.state != "failed"]
        if not sent:
            raise SendCommandError("nothing arrived, so no storage commitment was requested")
        try:
            report = request_commitment(peer, calling, sent, timeout=commit_timeout, listen_port=commit_port,
                                        bind=config.bind)
        except CommitError as e:
            raise SendCommandError(f"storage commitment: {e}") from None
        except KeyboardInterrupt:  # the sending is over (its line is above): only the report is not known
            raise Interrupted(f"storage commitment of the {len(sent)} instance(s) sent was asked for, but its "
                              "report not waited for: what the destination holds is not confirmed") from None
        click.echo(f"storage commitment {report.transaction_uid}: {len(report.committed)} committed, "
                   f"{len(report.failed)} failed (event type {report.event_type}, "
                   f"{'same' if report.same_association else 'new'} association)")
        for uid, reason in report.failed[:20]:
            click.echo(f"not committed: {uid}: failure reason 0x{reason:04X}", err=True)
        ok = ok and not report.failed
    return ok


def _what_went(result, total: int, peer) -> str:
    if result is None:
        return f"nothing is known to have arrived at {peer}"
    done = result.completed + result.warning + result.failed
    return (f"{done} of {total} instance(s) sent to {peer} ({result.completed} completed, {result.warning} warning, "
            f"{result.failed} failed); {total - done} not sent. Run the same command again to send them "
            "(what arrived is sent again)")


@click.command()
@common
@click.option("--to", "target", required=True, help="Destination: a configured AE title, or host:port.")
@click.option("--aet", help="Our (calling) AE title [the configured aet].")
@click.option("--aec", help="Called AE title, for a host:port destination [ANY-SCP].")
@click.option("--patient", multiple=True, help="Patient ID (repeatable).")
@click.option("--study", multiple=True, help="Study Instance UID (repeatable, or comma-separated).")
@click.option("--series", multiple=True, help="Series Instance UID (repeatable, or comma-separated).")
@click.option("--instance", multiple=True, help="SOP Instance UID (repeatable, or comma-separated).")
@click.option("--query", "query_text", help="Catalog matches, e.g. 'Modality=CT PatientName=DOE*'.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds to wait for each C-STORE response (one retry on a new association).")
@click.option("--commit", is_flag=True, help="Then ask the destination for storage commitment of what arrived.")
@click.option("--commit-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the commitment report.")
@click.option("--commit-port", type=click.IntRange(1, 65535), help="Also listen on this port for a report sent on a new association.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--deidentify", "project", default="",
              help="Send de-identified copies under this [projects.NAME] (docs/deidentification.md).")
def send(config_file, data_dir, target, aet, aec, patient, study, series, instance, query_text, timeout,
         commit, commit_timeout, commit_port, quiet, project) -> None:
    """Send stored instances to another AE (C-STORE), byte-exact where the peer allows."""
    chosen = [(lvl, split_values(v)) for lvl, v in (("patient", patient), ("study", study), ("series", series),
                                              ("instance", instance)) if v]
    if len(chosen) + bool(query_text) != 1:
        raise click.UsageError("choose exactly one of --patient, --study, --series, --instance, --query")
    check_ae_title(aet, "--aet")
    check_ae_title(aec, "--aec")
    config = load(config_file, data_dir=data_dir)
    level, values = chosen[0] if chosen else (None, [])
    if project:
        if query_text or commit:
            raise click.UsageError("--deidentify takes --patient, --study, --series or --instance, without --commit")
        from stowage.cli.deidentified import send_deidentified
        send_deidentified(config, project, target, aec, level, values, aet)
        return
    try:
        ok = run_send(config, target, level, values, query_text, calling_aet=aet, called_aet=aec,
                      timeout=timeout, commit=commit, commit_timeout=commit_timeout, commit_port=commit_port,
                      progress=not quiet)
    except SendCommandError as e:
        raise click.ClickException(str(e)) from None
    if not ok:
        sys.exit(1)
