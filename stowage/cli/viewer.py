"""`stowage viewer install`: the OHIF viewer fetched from the npm registry, checked, unpacked."""
from __future__ import annotations

from pathlib import Path

import click

from stowage.cli.options import common, load


@click.group()
def viewer() -> None:
    """The OHIF web viewer served by the HTTP port (/viewer)."""


@viewer.command()
@common
@click.option("--dir", "directory", type=click.Path(path_type=Path),
              help="Install here [viewer_dir, else <data-dir>/viewer].")
@click.option("--registry", default=None, help="npm registry to fetch from [https://registry.npmjs.org].")
def install(config_file, data_dir, directory, registry) -> None:
    """Fetch the pinned @ohif/app from the npm registry over HTTPS, check its integrity hash,
    and unpack its prebuilt dist/ (replacing an earlier install only once complete)."""
    from stowage.engine.web import viewer as ohif
    config = load(config_file, data_dir=data_dir)
    target = directory or ohif.viewer_dir(config)
    try:
        done = ohif.install(target, registry=registry or ohif.REGISTRY)
    except ohif.ViewerInstallError as e:
        raise click.ClickException(f"viewer not installed: {e}") from None
    click.echo(f"installed OHIF {done.version} ({done.files} files, {done.bytes / 1e6:.0f} MB) in {done.directory}; "
               "stowage serve shows it at /viewer")
