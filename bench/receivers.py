"""The table of C-STORE receivers the ingest benchmark can start.

Each entry builds the command line for a port and an (existing, empty) data dir,
or raises ``Unavailable`` when the receiver cannot run here.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.procs import find_dcmtk

REPO_ROOT = Path(__file__).resolve().parent.parent


class Unavailable(Exception):
    """The receiver's program is not installed here."""


@dataclass(frozen=True)
class Receiver:
    """How to start one receiver; ``one_file_per_instance`` lets the bench count what arrived."""

    name: str
    aet: str
    build: Callable[[int, Path, int], list[str]]  # (port, data_dir, workers) -> argv
    one_file_per_instance: bool


def _stowage(port: int, data_dir: Path, workers: int) -> list[str]:
    try:
        spec = importlib.util.find_spec("engine.cli")
    except ImportError:
        spec = None
    if spec is not None:
        base = [sys.executable, "-m", "engine.cli"]
    elif exe := shutil.which("stowage"):
        base = [exe]
    else:
        raise Unavailable("engine.cli is not importable and no `stowage` console script on PATH")
    return [*base, "serve", "--data-dir", str(data_dir), "--port", str(port), "--aet", "STOWAGE",
            "--bind", "127.0.0.1", "--workers", str(workers)]


def _storescp(fork: bool) -> Callable[[int, Path, int], list[str]]:
    def build(port: int, data_dir: Path, workers: int) -> list[str]:
        exe = find_dcmtk("storescp")
        if exe is None:
            raise Unavailable("DCMTK storescp not found (set DCMTK_BIN)")
        return [exe, *(["--fork"] if fork else []), "-aet", "STORESCP", "-od", str(data_dir), str(port)]

    return build


def _pynetdicom(port: int, data_dir: Path, workers: int) -> list[str]:
    if importlib.util.find_spec("pynetdicom") is None:
        raise Unavailable("pynetdicom is not installed")
    return [sys.executable, "-m", "bench.pynetdicom_scp", "--port", str(port), "--aet", "PYNETDICOM",
            "--out", str(data_dir)]


RECEIVERS: dict[str, Receiver] = {
    r.name: r
    for r in (
        Receiver("stowage", "STOWAGE", _stowage, False),
        Receiver("storescp", "STORESCP", _storescp(False), True),
        Receiver("storescp-fork", "STORESCP", _storescp(True), True),
        Receiver("pynetdicom", "PYNETDICOM", _pynetdicom, True),
    )
}
