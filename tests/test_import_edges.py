"""`stowage import` at the edges of what a folder tree holds, as a research group's overnight
import of a million files meets them: file names that are not UTF-8, and the like. Each
run is the real command in a subprocess, into a real data directory."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from conftest import cli


def run_import(data_dir: Path, *paths: Path | bytes | str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", "import", *map(os.fsencode, paths), "--data-dir",
                           str(data_dir), "-q", *args], capture_output=True, text=True, timeout=300)


def summary(stdout: str) -> dict[str, int]:
    line = next(x for x in stdout.splitlines() if x.startswith("import:"))
    return {key: int(n) for n, key in re.findall(r"(\d+) (stored|already held|unchanged|skipped|refused)", line)}


def report_bytes(stdout: str) -> bytes:
    m = re.search(r"report: (.+)$", stdout.strip().splitlines()[0])
    assert m, stdout
    return Path(m.group(1)).read_bytes()


def test_file_names_that_are_not_utf8(tmp_path):
    """Latin-1 names from an old file server: the file is imported, a re-run skips it
    through the ledger, and the report names a skipped one by its very bytes (the report's
    UTF-8 codec raised, and the import ended in a traceback without its summary)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    latin = os.fsencode(src) + b"/r\xe9sultat-\xe9t\xe9.dcm"
    folder = os.fsencode(src) + b"/s\xe9rie"
    os.mkdir(folder)
    shutil.copy(get_testdata_file("CT_small.dcm"), latin)
    shutil.copy(get_testdata_file("MR_small.dcm"), folder + b"/MR.dcm")
    shutil.copy(get_testdata_file("waveform_ecg.dcm"), src / "sub" / "plain.dcm")
    (Path(os.fsdecode(folder)) / "notes.txt").write_bytes(b"not DICOM")
    os.rename(Path(os.fsdecode(folder)) / "notes.txt", folder + b"/notes-\xff.txt")
    data = tmp_path / "data"
    r = run_import(data, src)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert summary(r.stdout) == {"stored": 3, "already held": 0, "skipped": 1, "refused": 0}, r.stdout
    assert folder + b"/notes-\xff.txt,skipped,\"not DICOM" in report_bytes(r.stdout)
    held = cli("query", "--data-dir", str(data), "--format", "csv", "SELECT count(*) AS n FROM instances")
    assert held.stdout.split() == ["n", "3"], held.stdout + held.stderr

    again = run_import(data, src)  # every DICOM file unchanged: none is opened again
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again.stdout) == {"stored": 0, "already held": 0, "unchanged": 3, "skipped": 1, "refused": 0}, \
        again.stdout
    alone = run_import(data, latin)  # named on the command line: the ledger knows it too
    assert alone.returncode == 0 and summary(alone.stdout)["unchanged"] == 1, alone.stdout + alone.stderr
    with sqlite3.connect(data / "import" / "ledger.sqlite") as con:
        assert sorted(p for (p,) in con.execute("SELECT path FROM files") if isinstance(p, bytes)) == \
            [latin, folder + b"/MR.dcm"]


def test_symbolic_links_loops_and_broken_ones(tmp_path):
    """A tree of symbolic links, as research groups build them over mounted storage: links
    to files are imported; a link to a folder (here, to the tree's own root: a loop) is not
    followed and listed as skipped; a link to itself is refused as unreadable; and links
    whose storage is gone (not mounted) are refused with their target, so the command
    exits 1 (they were left out in silence: "0 stored, 0 refused", exit status 0)."""
    src, nas = tmp_path / "src", tmp_path / "nas"
    (src / "sub").mkdir(parents=True)
    nas.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), nas / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), nas / "mr.dcm")
    (src / "ct.dcm").symlink_to(nas / "ct.dcm")
    (src / "sub" / "mr.dcm").symlink_to(nas / "mr.dcm")
    (src / "sub" / "up").symlink_to(src)                # a loop through a folder
    (src / "self.dcm").symlink_to(src / "self.dcm")     # a loop on itself
    (src / "gone.dcm").symlink_to(tmp_path / "unmounted" / "gone.dcm")
    data = tmp_path / "data"
    r = run_import(data, src)
    assert r.returncode == 1, r.stdout + r.stderr
    assert summary(r.stdout) == {"stored": 2, "already held": 0, "skipped": 1, "refused": 2}, r.stdout
    report = report_bytes(r.stdout).decode()
    assert f"{src}/sub/up,skipped,a symbolic link to a folder: not followed" in report, report
    assert f"{src}/gone.dcm,refused,\"unreadable: a broken symbolic link (to {tmp_path}/unmounted/gone.dcm" \
        in report, report
    assert f"{src}/self.dcm,refused," in report, report

    (src / "gone.dcm").unlink()
    (src / "self.dcm").unlink()
    followed = run_import(data, src / "sub" / "up")  # the link named as a PATH: followed, it is what was asked
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert summary(followed.stdout)["already held"] == 2, followed.stdout
