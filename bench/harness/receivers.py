"""The table of C-STORE receivers the ingest benchmark can start.

Each entry builds the command line for a port and an (existing, empty) data dir,
or raises ``Unavailable`` when the receiver cannot run here. ``workers`` (stowage only)
None means the archive's default (one worker per core).

Orthanc (the Debian package) runs as a plain subprocess with its own JSON configuration
(written by bench/harness/orthanc.py) in the data dir: free DICOM and HTTP ports on 127.0.0.1,
storage and SQLite index in the data dir, no plugins, fsync on (``SyncStorageArea``, its
default, like stowage's). Its DICOM layer is DCMTK's, so the ``TCP_NODELAY=1`` environment
that the benchmark gives every child turns Nagle off there too; ``TcpNoDelay`` covers its
HTTP server and ``MaximumPduLength`` is raised to the largest it allows (128 KiB).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stowage.bench.harness.orthanc import executable, write_config
from stowage.bench.procs import find_dcmtk, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class Unavailable(Exception):
    """The receiver's program is not installed here."""


@dataclass(frozen=True)
class Receiver:
    """How to start one receiver; ``one_file_per_instance`` lets the bench count what arrived."""

    name: str
    aet: str
    build: Callable[[int, Path, int | None], list[str]]  # (port, data_dir, workers) -> argv
    one_file_per_instance: bool
    count: Callable[[Path], int | None] | None = None  # instances held, asked of the running receiver

    def received(self, data_dir: Path) -> int | None:
        """How many instances the receiver holds (files, or asked of it), None if unknown."""
        if self.one_file_per_instance:
            return sum(1 for p in data_dir.rglob("*") if p.is_file())
        return self.count(data_dir) if self.count else None


def _stowage(port: int, data_dir: Path, workers: int | None) -> list[str]:
    try:
        spec = importlib.util.find_spec("stowage.cli")
    except ImportError:
        spec = None
    if spec is not None:
        base = [sys.executable, "-m", "stowage.cli"]
    elif exe := shutil.which("stowage"):
        base = [exe]
    else:
        raise Unavailable("cli is not importable and no `stowage` console script on PATH")
    return [*base, "serve", "--data-dir", str(data_dir), "--port", str(port), "--aet", "STOWAGE",
            "--bind", "127.0.0.1", "--http-port", "0", *(["--workers", str(workers)] if workers else [])]


def _storescp(fork: bool) -> Callable[[int, Path, int], list[str]]:
    def build(port: int, data_dir: Path, workers: int | None) -> list[str]:
        exe = find_dcmtk("storescp")
        if exe is None:
            raise Unavailable("DCMTK storescp not found (set DCMTK_BIN)")
        return [exe, *(["--fork"] if fork else []), "-aet", "STORESCP", "-od", str(data_dir), str(port)]

    return build


ORTHANC_CONFIG = "orthanc.json"


def _orthanc(port: int, data_dir: Path, workers: int | None) -> list[str]:
    exe = executable()
    if exe is None:
        raise Unavailable("Orthanc is not installed (apt-get install orthanc)")
    path = write_config(data_dir / ORTHANC_CONFIG, port, free_port(), data_dir / "storage", data_dir / "index",
                        Name="stowage-bench", DicomCheckCalledAet=False, SyncStorageArea=True, TcpNoDelay=True,
                        MaximumPduLength=131072)
    return [exe, str(path)]


def _orthanc_count(data_dir: Path) -> int | None:
    try:
        port = json.loads((data_dir / ORTHANC_CONFIG).read_text())["HttpPort"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/statistics", timeout=30) as r:
            return int(json.loads(r.read())["CountInstances"])
    except (OSError, ValueError, KeyError):
        return None


def _pynetdicom(port: int, data_dir: Path, workers: int | None) -> list[str]:
    if importlib.util.find_spec("pynetdicom") is None:
        raise Unavailable("pynetdicom is not installed")
    return [sys.executable, "-m", "stowage.bench.harness.pynetdicom_scp", "--port", str(port), "--aet", "PYNETDICOM",
            "--out", str(data_dir)]


RECEIVERS: dict[str, Receiver] = {
    r.name: r
    for r in (
        Receiver("stowage", "STOWAGE", _stowage, False),
        Receiver("storescp", "STORESCP", _storescp(False), True),
        Receiver("storescp-fork", "STORESCP", _storescp(True), True),
        Receiver("orthanc", "ORTHANC", _orthanc, False, _orthanc_count),
        Receiver("pynetdicom", "PYNETDICOM", _pynetdicom, True),
    )
}
