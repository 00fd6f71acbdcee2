"""The `stowage send` command: select instances from the catalog, send them with the
sending core (engine/send.py) under a progress bar, print a summary, and optionally ask
the destination for storage commitment (engine/commit_scu.py)."""
from __future__ import annotations

import logging
import sys
import time

import click

from stowage.catalog.reader import Catalog
from stowage.engine.requestor import PeerError, resolve
from stowage.engine.config import Config
from stowage.engine.selection import SelectionError, parse_query, select
from stowage.engine.send import Outcome, Sender


def quiet_libraries() -> None:
    """The command prints its own outcome: no per-PDU or per-instance log lines."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("stowage").setLevel(logging.ERROR)


class SendCommandError(RuntimeError):
    """Nothing could be sent; the message says why (one line, for a person)."""


def run_send(config: Config, target: str, level: str | None, values: list[str], query_text: str | None, *,
             calling_aet: str | None = None, called_aet: str | None = None, timeout: float = 30.0,
             commit: bool = False, commit_timeout: float = 60.0, commit_port: int | None = None,
             progress: bool = True) -> bool:
    """True when everything selected arrived (and, with `commit`, was committed)."""
    if not (config.data_dir / "catalog").exists():
        raise SendCommandError(f"{config.data_dir} holds no archive (no catalog/ in it)")
    try:
        peer = resolve(target, config, called_aet)
        query = parse_query(query_text) if query_text else []
    except (PeerError, SelectionError) as e:
        raise SendCommandError(str(e)) from None
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
    sender = Sender(config.data_dir / "segments", peer, calling, dimse_timeout=timeout,
                    acse_timeout=config.acse_timeout,
                    max_pdu=config.max_pdu, on_outcome=on_outcome, duplicates=config.duplicates,
                    associations=remote.associations if (remote := config.remotes.get(target)) else 1)
    try:
        result = sender.send(instances)
    finally:
        if bar is not None:
            if failed == len(instances):
                bar.leave = False  # nothing went: the one error line below says why
            bar.close()
    seconds = time.monotonic() - started
    total = len(instances)
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
        from stowage.engine.commit_scu import CommitError, request_commitment
        sent = [o.instance for o in result.outcomes if o.state != "failed"]
        if not sent:
            raise SendCommandError("nothing arrived, so no storage commitment was requested")
        try:
            report = request_commitment(peer, calling, sent, timeout=commit_timeout, listen_port=commit_port,
                                        bind=config.bind)
        except CommitError as e:
            raise SendCommandError(f"storage commitment: {e}") from None
        click.echo(f"storage commitment {report.transaction_uid}: {len(report.committed)} committed, "
                   f"{len(report.failed)} failed (event type {report.event_type}, "
                   f"{'same' if report.same_association else 'new'} association)")
        for uid, reason in report.failed[:20]:
            click.echo(f"not committed: {uid}: failure reason 0x{reason:04X}", err=True)
        ok = ok and not report.failed
    return ok
