"""`stowage queue`: the forwarding queue per destination (docs/forwarding.md), its parked
entries with the destination's status and Error Comment, and retry or cancel."""
from __future__ import annotations

import sqlite3
import time

import click

from stowage.cli.options import common, load
from stowage.engine.forward.queue import COMMIT_STATES, STATES, Queue, path_of


@click.command("queue")
@common
@click.option("--parked", "show_parked", is_flag=True,
              help="List the parked entries (status and Error Comment), those not committed (the reason) and "
                   "those whose commitment request got no report yet.")
@click.option("--retry", "retry", metavar="DEST",
              help="Put DEST's parked entries back in the queue; ask again for its commitments that got no report.")
@click.option("--cancel", "cancel", metavar="DEST", help="Cancel DEST's pending and parked entries.")
def queue(config_file, data_dir, show_parked, retry, cancel) -> None:
    """Forwarding queue: pending, done (ever), parked and cancelled entries per destination."""
    config = load(config_file, data_dir=data_dir)
    if not path_of(config.data_dir).is_file():
        raise click.ClickException(f"no forwarding queue in {config.data_dir} ([[forward]] rules create it)")
    try:
        q = Queue(config.data_dir)
        try:
            for name in filter(None, (retry, cancel)):
                _check_destination(q, config, name)
            if retry:
                click.echo(f"{q.retry_parked(retry)} parked entr(ies) of {retry} queued again")
            if cancel:
                click.echo(f"{q.cancel(cancel)} entr(ies) of {cancel} cancelled")
            summary = q.summary()
            for destination, n in q.delivered().items():  # done ever: done entries are pruned after a week
                summary[(destination, "done")] = (n, None)
            retrying = q.retrying()
            parked = q.parked() if show_parked else []
            commitments = q.commitments()
            not_committed = q.not_committed() if show_parked else []
            unreported = q.not_committed(state="wanted") if show_parked else []
        finally:
            q.close()
    except sqlite3.Error as e:
        raise click.ClickException(f"forwarding queue {path_of(config.data_dir)}: {e}") from None
    now = time.time()
    click.echo(f"{'destination':16} " + " ".join(f"{s:>9}" for s in STATES) + "  oldest pending")
    for destination in sorted({d for d, _s in summary}):
        counts = [summary.get((destination, s), (0, None))[0] for s in STATES]
        oldest = summary.get((destination, "pending"), (0, None))[1]
        age = f"{now - oldest:.0f} s" if oldest else "-"
        click.echo(f"{destination:16} " + " ".join(f"{n:>9}" for n in counts) + f"  {age}")
    for destination, attempts, comment in retrying:  # why they wait: otherwise only in serve's log
        click.echo(f"retrying {destination}: {comment} ({attempts} attempt(s))")
    for destination, uid, status, comment in parked:
        code = f"0x{status:04X}" if status is not None else "-"
        click.echo(f"parked {destination} {uid} {code} {comment}")
    if commitments:
        click.echo(f"{'commitment':16} " + " ".join(f"{s:>9}" for s in COMMIT_STATES))
        for destination in sorted({d for d, _s in commitments}):
            click.echo(f"{destination:16} " + " ".join(f"{commitments.get((destination, s), 0):>9}"
                                                        for s in COMMIT_STATES))
    for destination, uid, comment in not_committed:
        click.echo(f"not committed {destination} {uid} {comment}")
    for destination, uid, comment in unreported:
        click.echo(f"commitment wanted {destination} {uid} {comment}")


def _check_destination(q: Queue, config, name: str) -> None:
    """A DEST that is neither in the queue nor a configured remote is a typo (AE titles are
    case-sensitive): saying "0 entries" would let the operator believe it was done."""
    known = {d for d, _s in q.summary()} | set(q.delivered()) | set(config.remotes)
    if name not in known:
        raise click.ClickException(f"{name} is not a forwarding destination (the queue's and [remotes]' are: "
                                   f"{', '.join(sorted(known)) or 'none'}); AE titles are case-sensitive")
