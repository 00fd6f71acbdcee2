"""`stowage echo`: C-ECHO a configured remote or host:port."""
from __future__ import annotations

import click

from stowage.cli.checks import check_ae_title, check_host
from stowage.cli.options import common, load, quiet_libraries


@click.command()
@click.argument("target")
@common
@click.option("--aet", help="Our (calling) AE title [the configured aet].")
@click.option("--aec", help="Called AE title, for a host:port target [ANY-SCP].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="Seconds to wait for the peer.")
def echo(target, config_file, data_dir, aet, aec, timeout) -> None:
    """C-ECHO a remote AE: a configured AE title, or host:port."""
    from stowage.engine.transfer.requestor import PeerError, resolve
    from stowage.engine.transfer.requestor import echo as run
    quiet_libraries()
    check_ae_title(aet, "--aet")
    check_ae_title(aec, "--aec")
    config = load(config_file, data_dir=data_dir)
    try:
        peer = resolve(target, config, aec)
        check_host(peer.host, str(peer))
        status = run(peer, aet or config.aet, timeout)
    except PeerError as e:
        raise click.ClickException(str(e)) from None
    if status != 0:
        raise click.ClickException(f"{peer} answered C-ECHO with status 0x{status:04X}")
    click.echo(f"{peer}: C-ECHO ok")
