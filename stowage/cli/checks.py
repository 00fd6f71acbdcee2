"""Checks that turn a bad AE title, host, data directory or out folder into one line
before any work starts; each used to surface as a traceback from deep inside pynetdicom
or pathlib, or only after the work (bench --json)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from stowage.engine.runtime import config as cfg


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
