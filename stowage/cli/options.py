"""What every command shares: --config and --data-dir, the configuration loaded with
flags over it, UID lists split, library logging quieted; and the checks that turn a bad
AE title, host, data directory or out folder into one line before any work starts (each
used to surface as a traceback from deep inside pynetdicom or pathlib)."""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from stowage.engine.runtime import config as cfg
from stowage.engine.storage import remote

T = TypeVar("T")

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


def check_ae_title(value: str | None, flag: str) -> None:
    """`value` of `flag` is a usable AE title (None: not given)."""
    if value is not None and not cfg.valid_ae_title(value):
        raise click.ClickException(f"{flag} '{value}' is not an AE title: 1-16 printable ASCII characters, "
                                   "no backslash")


def check_host(host: str, what: str) -> None:
    """`host` resolves to an address (pynetdicom would raise socket.gaierror mid-association)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise click.ClickException(f"{what}: cannot resolve the host {host!r} ({why}); check the name, "
                                   "or give an IP address") from None


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be written into the existing folder `folder`, or None."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    return "permission denied"


def writable_folder(folder: Path, what: str) -> Path:
    """Make `folder` (and its parents) if missing; one line if it is a file, cannot be made,
    or cannot be written into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise click.ClickException(f"{what} {folder} is a file, not a folder") from None
    except OSError as e:
        raise click.ClickException(f"cannot create {what} {folder}: {e.strerror or e}") from None
    why = _unwritable(folder)
    if why:
        raise click.ClickException(f"cannot write into {what} {folder}: {why}")
    return folder


def writable_later(folder: Path, what: str) -> None:
    """`folder` is, or can be made, a folder to write into; nothing is made now (a command
    that fails for another reason leaves no empty folder behind)."""
    there = folder
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise click.ClickException(f"{what} {folder}: {there} is a file, not a folder")
    why = _unwritable(there)
    if why:
        raise click.ClickException(f"cannot write into {what} {folder}: {why}")


DATA_DIR = "the data directory (--data-dir, data_dir)"


def writable_data_dir(config: cfg.Config) -> Path:
    """The data directory, made if missing, for a command that writes into it."""
    return writable_folder(config.data_dir, DATA_DIR)


def writable_file(path: Path | None, what: str) -> None:
    """A file the command writes only at its end (--json, --chart): its folder must exist
    and be writable now, not after an hour's run."""
    if path is None:
        return
    folder = path.parent
    if path.is_dir():
        raise click.ClickException(f"{what} {path} is a folder; give a file name")
    if not folder.is_dir():
        raise click.ClickException(f"{what} {path}: no folder {folder}; create it first")
    why = _unwritable(folder)
    if why:
        raise click.ClickException(f"{what} {path}: cannot write into {folder}: {why}")


class Interrupted(click.ClickException):
    """Ctrl-C: one line saying what was done and what was not, exit status 130 (128 + SIGINT)
    as shells expect, instead of click's bare "Aborted!"."""

    exit_code = 130

    def __init__(self, message: str) -> None:
        super().__init__(f"interrupted: {message}")


def interruptible(work: Callable[[], T], stop: Callable[[], None]) -> tuple[T | None, bool]:
    """Run `work` in a thread while this (the main) thread waits for Ctrl-C; on Ctrl-C call
    `stop()` (which must make `work` wind down: finish its current item, release what it
    holds) and wait for it. Returns (what `work` returned, or None if it was stopped, and
    whether it was); an exception `work` raised is raised here. A second Ctrl-C while it
    winds down is not caught: the process ends at once."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # noqa: B036 - handed to the main thread
            box["error"] = e
        finally:
            done.set()

    # waited for on an Event, not by Thread.join: a join that Ctrl-C interrupts can leave
    # the thread looking finished while it runs on (Python < 3.12)
    threading.Thread(target=run, name="interruptible", daemon=True).start()
    interrupted = False
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        interrupted = True
        stop()
        done.wait()
    if "error" in box and not interrupted:
        raise box["error"]
    return box.get("value"), interrupted
