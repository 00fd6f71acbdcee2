"""One study sent to DCMTK storescp: the corpus, the loading and the receiving side that
the send and C-MOVE benchmarks share, so that they measure the same thing."""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stowage.bench.corpus import generate
from stowage.bench.procs import stop_tree, wait_echo


def one_study(work: Path, kind: str, count: int) -> tuple[list[Path], float, str]:
    """A generated corpus of one patient, one study, one series: its files, their MB (file
    bytes) and its Study Instance UID."""
    import pydicom
    files = generate(work / "corpus", kind, count, patients=1, studies_per_patient=1, series_per_study=1)
    mb = sum(p.stat().st_size for p in files) / 1e6
    return files, mb, pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID


def store_files(storescu: str, aec: str, port: int, files: list[Path]) -> None:
    """C-STORE `files` to `aec` on 127.0.0.1:port with DCMTK storescu (raises if it fails)."""
    subprocess.run([storescu, "-aec", aec, "127.0.0.1", str(port), *map(str, files)], check=True,
                   capture_output=True)


def start_storescp(storescp: str, echoscu: str, out: Path, port: int, *, nodelay: bool = False,
                   fork: bool = False, ignore: bool = False) -> subprocess.Popen:
    """storescp DEST on `port` writing what it receives into `out` (a new folder), or
    (`ignore`) receiving without storing, each C-STORE logged in out/storescp.log; once it
    answers C-ECHO."""
    out.mkdir(parents=True)
    env = dict(os.environ, TCP_NODELAY="1") if nodelay else None
    mode = ["--ignore", "-v"] if ignore else ["+B"]
    log = open(out / "storescp.log", "wb") if ignore else subprocess.DEVNULL
    proc = subprocess.Popen([storescp, *mode, *(["--fork"] if fork else []), "-aet", "DEST", "-od", str(out),
                             str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_echo(echoscu, port, "DEST")
    return proc


@contextmanager
def receiving(storescp: str, echoscu: str, out: Path, port: int, **options: bool) -> Iterator[subprocess.Popen]:
    """A storescp (start_storescp, with its `options`) for one transfer: stopped after it,
    and `out` removed once the transfer has succeeded."""
    rx = start_storescp(storescp, echoscu, out, port, **options)
    try:
        yield rx
    finally:
        stop_tree(rx, None)
    shutil.rmtree(out)


def arrived(out: Path, ignore: bool = False) -> int:
    """How many instances the storescp of `out` received (stop it first)."""
    if ignore:
        return (out / "storescp.log").read_text(errors="replace").count("Received Store Request")
    return sum(1 for p in out.iterdir() if p.name != "storescp.log")
