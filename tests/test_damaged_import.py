"""The bad files a migration meets (issue #20): a folder of good files beside damaged ones
(bench/harness/damage.py: flipped bytes, truncations, lying lengths, a non-ASCII Transfer
Syntax UID, a file meta cut short) and pydicom's own damaged test files, imported with
`stowage import` over several processes: every good file is stored byte for byte (files
with "DICM" and no preamble too), every damaged one is stored or reported with its own
reason, and nothing prints a traceback."""
from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import psutil

import pydicom
from pydicom.data import get_testdata_file

from conftest import CT, MR, copies, dataset_bytes, wait_for
from stowage.bench.harness import damage
from test_import import exported, run_import

PYDICOM_DAMAGED = ["MR_truncated.dcm", "rtplan_truncated.dcm", "badVR.dcm", "meta_missing_tsyntax.dcm",
                   "no_meta_group_length.dcm", "no_meta.dcm", "empty_charset_LEI.dcm"]
GENERIC_FAILURES = ("no result from an import process", "could not be imported (", "Traceback")


def _identity(src: Path) -> tuple[str, bytes]:
    return str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID), dataset_bytes(src)


def corpus(root: Path, seed: int = 20) -> tuple[dict[Path, tuple[str, bytes]], dict[Path, str], dict[Path, str]]:
    """(good files -> their SOP Instance UID and data set bytes, damaged files -> kind, files that may be either -> kind)."""
    rng = random.Random(seed)
    sources = copies(CT, root / "src-ct", 40, "ct") + copies(MR, root / "src-mr", 40, "mr")
    rng.shuffle(sources)
    folder = root / "migration"
    folder.mkdir()
    good: dict[Path, tuple[str, bytes]] = {}
    bad: dict[Path, str] = {}
    maybe: dict[Path, str] = {}
    kinds = [(k, f, bad) for k, f in damage.BAD.items()] * 5 + [(k, f, maybe) for k, f in damage.MAYBE.items()] * 8
    kinds += [(k, f, good) for k, f in damage.GOOD.items()] * 6
    for i, src in enumerate(sources):
        raw = src.read_bytes()
        if i < len(kinds):
            kind, mutate, into = kinds[i]
            dest = folder / f"{i:03d}-{kind}.dcm"
            dest.write_bytes(mutate(raw, rng))
            into[dest] = _identity(src) if into is good else kind  # type: ignore[index]
        else:
            dest = folder / f"{i:03d}-good.dcm"
            dest.write_bytes(raw)
            good[dest] = _identity(src)
    for name in PYDICOM_DAMAGED:
        dest = folder / f"pydicom-{name}"
        dest.write_bytes(Path(get_testdata_file(name)).read_bytes())
        maybe[dest] = name
    return good, bad, maybe


def test_damaged_files_cost_no_neighbour(tmp_path):
    good, bad, maybe = corpus(tmp_path)
    report = tmp_path / "refused.csv"
    r = run_import(tmp_path / "data", tmp_path / "migration", args=("--processes", "2", "--report", str(report)))
    output = r.stdout + r.stderr
    assert r.returncode == 1, output  # some DICOM files were not stored
    assert not any(s in output for s in GENERIC_FAILURES), output
    rows = {Path(row["path"]): row for row in csv.DictReader(report.open())}
    for path, kind in bad.items():
        assert path in rows, f"{path.name} ({kind}) neither refused nor reported"
        assert rows[path]["outcome"] in ("refused", "skipped") and rows[path]["reason"], rows[path]
        assert not any(s in rows[path]["reason"] for s in GENERIC_FAILURES), rows[path]
    assert "is not a UID" in " ".join(rows[p]["reason"] for p, k in bad.items() if k == "non-ascii-ts")
    for path in maybe:
        if path in rows:
            assert rows[path]["reason"] and not any(s in rows[path]["reason"] for s in GENERIC_FAILURES), rows[path]
    assert not set(good) & set(rows), [rows[p] for p in set(good) & set(rows)]
    stored = exported(tmp_path / "data", tmp_path / "out")
    for path, (uid, dataset) in good.items():
        assert stored.get(uid) == dataset, f"{path.name} not stored byte for byte"
    stored_maybe = len(maybe) - len(set(maybe) & set(rows))
    assert len(stored) == len(good) + stored_maybe, "a damaged file was stored but reported, or the other way round"


def test_a_dead_import_process_costs_no_file(tmp_path):
    """An import process killed mid-run (as a crash or the OOM killer would): a new process
    takes the files it had in hand, every file is stored, the import exits 0 and says so."""
    files = copies(MR, tmp_path / "src", 400, "mr")
    cmd = [sys.executable, "-m", "stowage.cli", "import", str(tmp_path / "src"), "--data-dir", str(tmp_path / "data"),
           "--processes", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def storing_child() -> psutil.Process | None:
            children = psutil.Process(proc.pid).children()
            started = list((tmp_path / "data" / "segments").glob("1*.seg")) if len(children) >= 2 else []
            return children[0] if started else None
        victim = wait_for(storing_child, 120, "two import processes storing")
        victim.suspend()  # stopped mid-chunk (almost always): the files in its hand go with it
        victim.kill()
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "1 import process(es) died" in output, output
    assert "Traceback" not in output
    stored = exported(tmp_path / "data", tmp_path / "out")
    assert sorted(stored) == sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)
