"""What every command shares: --config and --data-dir, the configuration loaded with
flags over it, UID lists split, library logging quieted."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from stowage.engine.runtime import config as cfg
from stowage.engine.storage import remote

COMMON = [
    click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML configuration file."),
    click.option("--data-dir", type=click.Path(path_type=Path), help="Archive data directory [./stowage-data]."),
]


def common(f):
    for opt in reversed(COMMON):
        f = opt(f)
    return f


def load(config_file: Path | None, **overrides) -> cfg.Config:
    try:
        config = cfg.load(config_file, overrides=overrides)
    except cfg.ConfigError as e:
        raise click.ClickException(f"configuration: {e}") from None
    from stowage.engine.iceberg.node_segments import read_other_nodes
    read_other_nodes(config, remote.read_from_bucket(config))  # evicted after their upload; other nodes'
    return config


def split_values(values) -> list[str]:
    """Repeated and comma- or space-separated values as one list."""
    return [v for value in values for v in value.replace(",", " ").split()]


def quiet_libraries() -> None:
    """The command prints its own outcome: no per-PDU or per-instance log lines."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("stowage").setLevel(logging.ERROR)
