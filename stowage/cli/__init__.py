"""The `stowage` command line: one module per command, registered on one group. It sits
above everything else (engine, workers, bench).

A command's module is imported only when that command runs (or `--help` lists them): every
command pulls in a different part of the archive, and a `stowage query` or `stowage delete`
in a script should not pay for importing `serve`'s, `migrate`'s and `bench`'s (about a
third of a second of CPU per call)."""
from __future__ import annotations

import errno
import importlib
import os
import stat
import sys

import click

# command name -> (module under stowage.cli, attribute)
COMMANDS = {
    "serve": ("serve", "serve"),
    "export": ("export", "export"),
    "delete": ("delete", "delete"),
    "compact": ("compact", "compact"),
    "import": ("importing", "import_"),
    "verify": ("verify", "verify"),
    "rebuild-catalog": ("rebuild", "rebuild_catalog"),
    "echo": ("echo", "echo"),
    "send": ("send", "send"),
    "query": ("query", "query"),
    "bench": ("bench", "bench"),
    "migrate": ("migrate", "migrate"),
    "viewer": ("viewer", "viewer"),
    "deidentify": ("deidentify", "deidentify"),
    "pseudonyms": ("pseudonyms", "pseudonyms"),
    "queue": ("queue", "queue"),
    "iceberg": ("iceberg", "iceberg"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    def main(self, *args, **kwargs):
        """click's main, then the output flushed here: a full disk or a failing device under
        `> file` is one line, not a traceback (from a write, --help or --version included,
        or at exit from the flush). click itself handles only a closed pipe."""
        try:
            try:
                return super().main(*args, **kwargs)
            finally:
                sys.stdout.flush()
        except OSError as e:
            if e.errno not in _FULL or e.filename is not None:
                raise
            where = "its output (standard output)" if _stdout_failing() else "a file it writes"
            click.echo(f"Error: cannot write {where}: {e.strerror}; make room, or send it elsewhere", err=True)
            sys.exit(1)
        except ValueError as e:  # a damaged catalog manifest, met by whichever command reads the catalog first
            if type(e).__name__ != "ManifestUnreadable":
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except RuntimeError as e:  # the bucket out of reach or refusing (export, verify... of evicted segments)
            if not _object_store_error(e):
                raise
            click.echo(f"Error: the object store failed: {' '.join(str(e).split())}; check that it is reachable "
                       "and the credentials, then run the command again", err=True)
            sys.exit(1)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        if name == "serve" and not _asks_for_help(ctx):
            # its fork server imports what the workers need on the other core meanwhile
            from stowage.engine.runtime import forkserver
            forkserver.server()
        command = getattr(importlib.import_module(f"stowage.cli.{module}"), attr)
        assert command.name == name, f"stowage.cli.{module}.{attr} is named {command.name!r}, not {name!r}"
        return command


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _object_store_error(e: BaseException) -> bool:
    """Whether `e` is a failed request to the bucket (imported only then: most commands never use one)."""
    if "stowage.engine.storage.objects" not in sys.modules:
        return False
    from stowage.engine.storage.objects import ObjectStoreError
    return isinstance(e, ObjectStoreError)


def _stdout_failing() -> bool:
    """Whether standard output is what failed: a device (/dev/full) or a file on a disk
    with no room left. (A failed flush drops what it held: it cannot simply be tried again.)
    If so, it is swapped for /dev/null: the interpreter's flush at exit has nothing to fail on."""
    try:
        fd = sys.stdout.fileno()
        vfs = os.fstatvfs(fd)
        failing = stat.S_ISCHR(os.fstat(fd).st_mode) or min(vfs.f_bavail, vfs.f_bfree) * vfs.f_frsize < 1 << 20
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return False
    if failing:
        sys.stdout = open(os.devnull, "w")
    return failing


def _asks_for_help(ctx: click.Context) -> bool:
    return ctx.resilient_parsing or any(a in ("-h", "--help") for a in sys.argv[1:])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stowage")
def main() -> None:
    """stowage: a fast, durable DICOM archive."""
