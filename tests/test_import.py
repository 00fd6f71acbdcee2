"""`stowage import` as users run it, against a `stowage serve` on the same data directory:
DCMTK findscu sees every imported instance, export gives back the source's data set
bytes, bad files are reported, a re-run reads nothing it already imported, the source is
never touched, and kill -9 loses nothing acknowledged.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.data import get_testdata_file

from stowage.bench import corpus
from conftest import HOST, cli, dcmtk, export_all
from page_cache import file_system, resident_pages

# Real files in several transfer syntaxes, each a distinct instance.
TESTDATA = ["CT_small.dcm",            # Explicit VR Little Endian
            "MR_small_bigendian.dcm",  # Explicit VR Big Endian
            "JPEG2000.dcm",            # JPEG 2000
            "SC_rgb_rle.dcm",          # RLE Lossless
            "image_dfl.dcm",           # Deflated Explicit VR Little Endian
            "waveform_ecg.dcm"]
DICOMDIR_DIRS = ["77654033", "98892001", "98892003"]  # what pydicom's test DICOMDIR references


def run_import(data_dir: Path, *paths: Path | str, args: tuple[str, ...] = (), timeout: float = 300,
               preexec_fn: Callable[[], None] | None = None):
    return subprocess.run([sys.executable, "-m", "stowage.cli", "import", *map(str, paths), "--data-dir",
                           str(data_dir), "-q", *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def permissions_hold() -> Callable[[], None] | None:
    """For a subprocess that must meet file permissions as any user does, also when the
    suite runs as root (CI): before exec, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    from the capability bounding set. Root's capabilities after exec are that set (its
    inheritable and ambient sets are empty), so the program is still uid 0, still runs the
    Python installed under /root, and still owns what it creates, but a mode 000 file or
    folder is closed to it. None when not root: permissions already hold."""
    if os.geteuid() != 0:
        return None
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>

    def drop() -> None:
        for cap in (cap_dac_override, cap_dac_read_search):
            if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")
    return drop


def assert_unreadable(*paths: Path) -> None:
    """Each of `paths` really is closed to a process started with permissions_hold()."""
    probe = ("import os, sys\nfor p in sys.argv[1:]:\n    try:\n        os.listdir(p) if os.path.isdir(p) else open(p).close()\n"
             "    except PermissionError:\n        continue\n    sys.exit(f'{p} could be read')")
    r = subprocess.run([sys.executable, "-c", probe, *map(str, paths)], capture_output=True, text=True, timeout=60,
                       preexec_fn=permissions_hold())
    assert r.returncode == 0, r.stderr


def counts(stdout: str) -> dict[str, int]:
    """The summary line's figures: stored, held, unchanged, skipped, refused."""
    line = next(x for x in stdout.splitlines() if x.startswith("import:"))
    got = {"unchanged": 0}
    for key, pattern in (("stored", r"(\d+) stored"), ("held", r"(\d+) already held"),
                         ("unchanged", r"(\d+) unchanged"), ("skipped", r"(\d+) skipped"),
                         ("refused", r"(\d+) refused")):
        m = re.search(pattern, line)
        if m:
            got[key] = int(m.group(1))
    return got


def report_of(stdout: str) -> dict[str, tuple[str, str]]:
    m = re.search(r"report: (.+)$", stdout.strip().splitlines()[0])
    assert m, stdout
    with open(m.group(1), newline="") as f:
        return {row["path"]: (row["outcome"], row["reason"]) for row in csv.DictReader(f)}


def dataset_of(raw: bytes) -> bytes:
    """The bytes after the file meta group, found independently of the importer."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info
    f = DicomBytesIO(raw[132:] if raw[128:132] == b"DICM" else raw)
    _read_file_meta_info(f)
    return raw[(132 if raw[128:132] == b"DICM" else 0) + f.tell():]


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's SHA-256 and mtime_ns, to prove the import changed nothing."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Tree:
    root: Path
    dicomdir: Path
    expected: dict[str, bytes] = field(default_factory=dict)   # uid -> data set bytes
    series: set[tuple[str, str]] = field(default_factory=set)  # (study, series) of every instance
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (outcome, reason fragment)
    duplicates: int = 0

    def add(self, path: Path, raw: bytes | None = None) -> None:
        raw = path.read_bytes() if raw is None else raw
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        self.expected[ds.SOPInstanceUID] = dataset_of(raw) if raw[128:132] == b"DICM" or raw[:2] == b"\x02\x00" \
            else raw
        self.series.add((ds.StudyInstanceUID, ds.SeriesInstanceUID))


def _fresh(ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _add_cut_down(t: Tree, ds: pydicom.Dataset, path: Path, cut: Callable[[bytes], bytes]) -> None:
    """A copy of `ds` (a fresh SOP Instance UID) at `path`: its Part-10 bytes as `cut` leaves them."""
    _fresh(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    raw = cut(path.read_bytes())
    path.write_bytes(raw)
    t.add(path, raw)


def build_tree(base: Path) -> Tree:
    root = base / "src"
    t = Tree(root, root / "cd" / "DICOMDIR")
    for i, name in enumerate(TESTDATA):  # nested folders, Part-10 with preamble
        target = root / "pacs" / f"d{i % 3}" / f"e{i % 2}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), target)
        t.add(target)
    shutil.copy(root / "pacs" / "d0" / "e0" / "CT_small.dcm", root / "copy-of-ct.dcm")  # a duplicate
    t.duplicates += 1
    gen = root / "generated" / "mr"
    for p in corpus.generate(gen, "small", 12, patients=2, studies_per_patient=1, series_per_study=2):
        t.add(p)
    for p in corpus.generate(root / "generated" / "implicit", "sr", 4, transfer_syntax="implicit", seed=5):
        t.add(p)
    # No preamble: the file starts with the file meta group.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(3):
        _add_cut_down(t, ds, root / "nopreamble" / f"full-{i}.dcm", lambda raw: raw[132:])
    # A bare data set, Implicit VR Little Endian, no meta at all (old exports).
    ds = pydicom.dcmread(get_testdata_file("MR_small_implicit.dcm"))
    for i in range(2):
        _add_cut_down(t, ds, root / "bare" / f"IMG{i:04d}", dataset_of)
    # A DICOMDIR tree: the DICOMDIR is no instance; the files it references are.
    src = Path(get_testdata_file("DICOMDIR")).parent
    t.dicomdir.parent.mkdir(parents=True)
    shutil.copy(src / "DICOMDIR", t.dicomdir)
    for d in DICOMDIR_DIRS:
        shutil.copytree(src / d, root / "cd" / d)
    lost = root / "cd" / "77654033" / "CR1" / "6154"  # referenced by the DICOMDIR, lost from the media
    lost.unlink()
    t.bad[str(lost)] = ("refused", "referenced by")
    for d in DICOMDIR_DIRS:
        for p in (root / "cd" / d).rglob("*"):
            if p.is_file():
                t.add(p)
    t.bad[str(t.dicomdir)] = ("skipped", "DICOMDIR")
    # Not DICOM, and a DICOM file cut short.
    (root / "notes.txt").write_text("scanned at 300 dpi\n")
    t.bad[str(root / "notes.txt")] = ("skipped", "not DICOM")
    (root / "pacs" / "empty.dcm").write_bytes(b"")
    t.bad[str(root / "pacs" / "empty.dcm")] = ("skipped", "empty")
    (root / "pacs" / "d1" / "random.bin").write_bytes(os.urandom(5000))
    t.bad[str(root / "pacs" / "d1" / "random.bin")] = ("skipped", "not DICOM")
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = root / "pacs" / "d2" / "truncated.dcm"
    cut.parent.mkdir(parents=True, exist_ok=True)
    cut.write_bytes(ct[:len(ct) // 2])
    t.bad[str(cut)] = ("refused", "truncated")
    return t


def clones(out: Path, templates: int, each: int, seed: int) -> dict[Path, tuple[str, bytes]]:
    """`templates` generated instances (corpus.generate: 40 series of 20 studies at most), each
    written `each` times with a SOP Instance UID of its own, set in its bytes: pydicom writes
    a file in ~10 ms (5,000 took a minute of a test on the loaded 2-core machine), a copy
    with new UID bytes costs next to nothing. The new UID has the length of the template's
    (2.25.<decimal>, its last six digits the copy's number), so no element length changes.
    Returns each file's SOP Instance UID and data set bytes (dataset_of), in the order written."""
    out.mkdir(parents=True)
    made: dict[Path, tuple[str, bytes]] = {}
    uids: set[str] = set()
    folder = out.parent / f"{out.name}-templates"
    for t, template in enumerate(corpus.generate(folder, "small", templates, seed=seed)):
        raw = template.read_bytes()
        uid = str(pydicom.dcmread(template, stop_before_pixels=True).SOPInstanceUID)
        assert uid.startswith("2.25.") and len(uid) >= 5 + 12 and raw.count(uid.encode()) == 2, uid  # meta and data set
        meta = len(raw) - len(dataset_of(raw))  # the same in every copy: the UID keeps its length
        for k in range(each):
            new = f"{uid[:-6]}{k:06d}"
            assert int(new[5:]) < 2**128 and new not in uids, new
            uids.add(new)
            path = out / f"{t * each + k:06d}.dcm"
            copy = raw.replace(uid.encode(), new.encode())
            path.write_bytes(copy)
            made[path] = new, copy[meta:]
        template.unlink()
    folder.rmdir()
    return made


def findscu_uids(port: int, out: Path, series: set[tuple[str, str]]) -> set[str]:
    """SOP Instance UIDs that DCMTK findscu gets at IMAGE level, series by series."""
    found: set[str] = set()
    for n, (study, ser) in enumerate(sorted(series)):
        d = out / f"q{n}"
        d.mkdir(parents=True)
        r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-X", "-od", str(d),
                            "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                            "-k", f"SeriesInstanceUID={ser}", "-k", "SOPInstanceUID", HOST, str(port)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        found |= {pydicom.dcmread(p).SOPInstanceUID for p in d.glob("rsp*.dcm")}
    return found


def exported(data_dir: Path, out: Path) -> dict[str, bytes]:
    r = export_all(data_dir, out)
    assert r.returncode == 0, r.stderr
    return {p.stem: dataset_of(p.read_bytes()) for p in out.glob("*.dcm")}


def record_count(data_dir: Path) -> int:
    """Records in the catalog (`stowage query`, run in this process: conftest.cli)."""
    r = cli("query", "--data-dir", str(data_dir), "--format", "csv", "SELECT count(*) AS n FROM records")
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def import_slots_held(data_dir: Path) -> set[int]:
    """The import slots (100..899) that a live process holds a claim on."""
    from stowage.engine.store.slots import IMPORT_FIRST_SLOT, IMPORT_LAST_SLOT, try_claim
    held = set()
    for lock in (data_dir / "segments").glob("[1-8][0-9][0-9].lock"):
        number = int(lock.stem)
        if IMPORT_FIRST_SLOT <= number <= IMPORT_LAST_SLOT:
            claim = try_claim(data_dir, number)
            if claim is None:
                held.add(number)
            else:
                claim.release()
    return held


def freeze_holding_slots(proc: subprocess.Popen, data_dir: Path) -> set[int]:
    """SIGSTOP `proc`'s process group at a moment it holds import slots and not the catalog's
    manifest lock (which a serve start-up waits for), so that what follows happens under a
    live import however fast the machine is; returns the slots it holds."""
    from stowage.catalog import manifest
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the import ended before it could be frozen: make the corpus bigger"
        if import_slots_held(data_dir):
            os.killpg(proc.pid, signal.SIGSTOP)
            held = import_slots_held(data_dir)
            with manifest.lock(data_dir / "catalog", blocking=False) as free:
                pass
            if held and free:
                return held
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    pytest.fail("the import never held a slot")


def test_import_while_serving(make_server, tmp_path):
    tree = build_tree(tmp_path)
    before = tree_state(tree.root)
    server = make_server("--workers", "2")
    r = run_import(server.data_dir, tree.root, tree.dicomdir)
    assert r.returncode == 1, r.stdout + r.stderr  # a truncated file, and one the DICOMDIR lacks
    assert "Traceback" not in r.stderr
    got = counts(r.stdout)
    files = len(tree.expected) + tree.duplicates
    assert got["stored"] + got["held"] == files, r.stdout
    refused = sum(outcome == "refused" for outcome, _ in tree.bad.values())
    assert refused == 2
    assert got["refused"] == refused and got["skipped"] == len(tree.bad) - refused, r.stdout
    report = report_of(r.stdout)
    for path, (outcome, why) in tree.bad.items():
        assert report[path][0] == outcome and why in report[path][1], (path, report.get(path))
    assert len(report) == len(tree.bad), report

    # Read your writes: the running server's workers find every instance at once.
    assert findscu_uids(server.port, tmp_path / "find", tree.series) == set(tree.expected)
    # Byte-exact and exactly once.
    assert exported(server.data_dir, tmp_path / "out") == tree.expected
    assert tree_state(tree.root) == before

    # A restart of serve (its start-up recovery over every slot) keeps all of it.
    assert server.stop() == 0
    server.start()
    assert findscu_uids(server.port, tmp_path / "find2", tree.series) == set(tree.expected)

    # Re-run: the ledger skips every imported file unopened; nothing is stored.
    again = run_import(server.data_dir, tree.root, tree.dicomdir)
    assert counts(again.stdout) == dict(stored=0, held=0, unchanged=files, skipped=len(tree.bad) - refused,
                                        refused=refused), again.stdout
    # A file whose mtime changed is read again, and found already held.
    touched = tree.root / "pacs" / "d0" / "e0" / "CT_small.dcm"
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    before = tree_state(tree.root)
    third = run_import(server.data_dir, tree.root)
    assert counts(third.stdout)["held"] == 1 and counts(third.stdout)["stored"] == 0, third.stdout
    assert tree_state(tree.root) == before
    assert exported(server.data_dir, tmp_path / "out2") == tree.expected


def test_duplicates_in_one_process_stored_once(tmp_path):
    src = tmp_path / "src"
    paths = corpus.generate(src / "a", "small", 20, seed=11)
    for p in paths[:5]:
        (src / "b").mkdir(exist_ok=True)
        shutil.copy(p, src / "b" / p.name)
    data = tmp_path / "data"
    r = run_import(data, src, args=("--processes", "1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert counts(r.stdout) | {"unchanged": 0} == dict(stored=20, held=5, unchanged=0, skipped=0, refused=0)
    assert record_count(data) == 20


def test_kill_9_then_rerun(make_server, tmp_path):
    """kill -9 of an import mid-way: what it acknowledged (the ledger) is there after a
    serve start-up recovery, and a re-run completes it with every instance exactly once,
    while serve restarts in the middle of that re-run."""
    src = tmp_path / "src"
    made = clones(src, 100, 50, seed=21)
    paths = list(made)
    expected = dict(made.values())
    data = tmp_path / "data"
    # one import process: the ledger is written once a second, so the import must outlast that
    proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q",
                             "--processes", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ledger = data / "import" / "ledger.sqlite"
    deadline = time.monotonic() + 120
    acknowledged: set[str] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists():
            try:
                with sqlite3.connect(ledger, timeout=5) as db:
                    acknowledged = {row[0] for row in db.execute("SELECT path FROM files")}
            except sqlite3.Error:
                pass
            if acknowledged:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the import ended before it could be killed: make the corpus bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert 0 < len(acknowledged) < len(paths)
    acked_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in map(Path, acknowledged)}

    server = make_server("--workers", "2", data_dir=data)  # its start-up recovers the killed import's slots
    held = exported(data, tmp_path / "after-kill")
    assert acked_uids <= set(held)
    assert all(held[u] == expected[u] for u in held)

    rerun = subprocess.Popen([sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    held_slots = freeze_holding_slots(rerun, data)
    try:
        server.stop()  # serve restarts while the import holds its slots: recovery leaves them alone
        server.start()
        assert import_slots_held(data) == held_slots
    finally:
        os.killpg(rerun.pid, signal.SIGCONT)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out + err
    got = counts(out)
    assert got["stored"] + got["held"] + got["unchanged"] == len(paths), out
    assert got["unchanged"] >= len(acknowledged), out
    assert exported(data, tmp_path / "final") == expected
    assert record_count(data) == len(paths)  # nothing stored twice
    series = {(ds.StudyInstanceUID, ds.SeriesInstanceUID)
              for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths[::50])}
    uids = findscu_uids(server.port, tmp_path / "find", series)
    assert uids and uids <= set(expected)


def test_recovery_leaves_a_held_slot_alone(tmp_path):
    """The acceptor's recovery over all slots skips a slot that a live process claims,
    and recovers it (torn tail cut, stale tail dropped) once the claim is gone."""
    from stowage.engine.store.slots import claim_slot
    data = tmp_path / "data"
    seg_dir, tails = data / "segments", data / "catalog" / "tails"
    seg_dir.mkdir(parents=True)
    tails.mkdir(parents=True)
    claim = claim_slot(data, 100)
    assert claim.number == 100 and claim_slot(data, 100).number == 101  # the next free one
    seg = seg_dir / "100-00000001.seg"
    seg.write_bytes(b"torn bytes, no record")
    tail = tails / f"100-{os.getpid()}-00000001.tail"
    tail.write_bytes(b"")
    recover = [sys.executable, "-c", "import sys; from pathlib import Path; from stowage.engine.store.recovery import recover; "
                                     "recover(Path(sys.argv[1]))", str(data)]
    r = subprocess.run(recover, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert seg.read_bytes() == b"torn bytes, no record" and tail.exists()
    claim.release()
    r = subprocess.run(recover, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert seg.stat().st_size == 0 and not tail.exists()


def test_cli_errors_are_one_line(tmp_path):
    r = run_import(tmp_path / "data", tmp_path / "no-such-folder")
    assert r.returncode != 0 and "no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "src").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src")
    r = run_import(blocker / "data", tmp_path / "src")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_import(tmp_path / "data", tmp_path / "src", args=("--report", str(tmp_path / "no-such-dir" / "r.csv")))
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "data" / "segments").exists() or not list((tmp_path / "data" / "segments").glob("*.seg"))


def test_unreadable_folder_is_one_line(tmp_path):
    """A PATH that cannot be read is a command-line error: one line on stderr that names it,
    exit status 1, nothing imported (docs/import.md). Run with permissions_hold(), so that
    the folder's mode 000 holds for the import also when the suite runs as root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), locked)
    locked.chmod(0)
    try:
        assert_unreadable(locked)
        r = run_import(tmp_path / "data", locked, preexec_fn=permissions_hold())
    finally:
        locked.chmod(0o755)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr}"
    assert len(r.stderr.strip().splitlines()) == 1 and "permission denied" in r.stderr and str(locked) in r.stderr, \
        r.stderr
    assert not list((tmp_path / "data").glob("segments/*.seg"))


def test_unreadable_files_and_folders_in_a_tree_are_refused_and_the_rest_imported(tmp_path):
    """Inside a tree, a file that cannot be opened and a folder that cannot be listed are
    refused with their reason in the report; every readable file is imported; exit status 1
    (docs/import.md: an unreadable file may be DICOM). Run with permissions_hold(), so that
    mode 000 holds also when the suite runs as root."""
    src = tmp_path / "src"
    paths = corpus.generate(src / "ok", "small", 3, seed=61)
    expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_of(p.read_bytes()) for p in paths}
    locked_file = corpus.generate(src / "one", "small", 1, seed=62)[0]
    locked_dir = src / "locked"
    corpus.generate(locked_dir, "small", 2, seed=63)
    kept_out = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in [locked_file, *locked_dir.rglob("*.dcm")]}
    assert kept_out and not kept_out & set(expected)
    locked_file.chmod(0)
    locked_dir.chmod(0)
    try:
        assert_unreadable(locked_file, locked_dir)
        r = run_import(tmp_path / "data", src, preexec_fn=permissions_hold())
    finally:
        locked_file.chmod(0o644)
        locked_dir.chmod(0o755)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    got = counts(r.stdout)
    assert got["stored"] == len(expected) and got["refused"] == 2, r.stdout
    assert report_of(r.stdout) == {str(locked_file): ("refused", "unreadable: Permission denied"),
                                   str(locked_dir): ("refused", "cannot list the folder: Permission denied")}
    assert exported(tmp_path / "data", tmp_path / "out") == expected


def test_large_files_stream_from_the_source(tmp_path):
    """Files over spill_threshold are not read into memory: the kernel copies them into the
    spool, encapsulated ones are stored from there as they are, native ones compressed.
    Both come back byte-exact, and the source and the spool are left clean."""
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
        raw = (src / name).read_bytes()
        expected[pydicom.dcmread(src / name, stop_before_pixels=True).SOPInstanceUID] = dataset_of(raw)
    before = tree_state(src)
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, STOWAGE_SPILL_THRESHOLD="1024"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert counts(r.stdout)["stored"] == 4
    assert exported(data, tmp_path / "out") == expected
    assert tree_state(src) == before
    assert not [p for p in (data / "spool").rglob("*") if p.is_file()]


def test_import_leaves_the_page_cache_as_it_found_it(tmp_path):
    """A migration reads terabytes once: neither the source files nor the segments written
    stay in the page cache after an import (serve's working set is not pushed out), and
    what was imported reads back whole."""
    if file_system(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the page cache is the storage on tmpfs")
    src = tmp_path / "src"
    paths = corpus.generate(src, "ct", 12, seed=41)
    os.sync()  # written back, as old files are (the kernel does not drop dirty pages)
    for path in paths:
        path.read_bytes()  # and cached
    assert all(resident_pages(p)[0] for p in paths)
    data = tmp_path / "data"
    r = run_import(data, src)
    assert r.returncode == 0, r.stdout + r.stderr
    assert counts(r.stdout)["stored"] == 12
    cached = {p.name: resident_pages(p) for p in paths if resident_pages(p)[0]}
    assert not cached, f"source pages still cached (resident, total): {cached}"
    segments = sorted((data / "segments").glob("*.seg"))
    cached = sum(resident_pages(s)[0] for s in segments)
    assert segments and cached <= len(segments), f"{cached} segment pages still cached"
    assert len(exported(data, tmp_path / "out")) == 12


def test_no_space_stops_the_import(tmp_path):
    """Below min_free_bytes the archive answers Out of Resources, as it would a C-STORE:
    the import stops starting files, lists what it did not store, and exits 1; a later
    run with room imports everything."""
    src = tmp_path / "src"
    clones(src, 20, 10, seed=31)  # 200 files
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, STOWAGE_MIN_FREE_BYTES=str(1 << 60)))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert counts(r.stdout)["stored"] == 0
    report = report_of(r.stdout)
    assert len(report) == 200
    assert any("0xA700" in why for _, why in report.values())
    assert all(outcome in ("refused", "not-attempted") for outcome, _ in report.values())
    again = run_import(data, src)
    assert again.returncode == 0 and counts(again.stdout)["stored"] == 200, again.stdout + again.stderr


def test_large_files_from_another_file_system(tmp_path):
    """copy_file_range cannot cross file systems (EXDEV): a source on another one (here
    /dev/shm, a tmpfs) is copied into the spool by reading it instead."""
    import tempfile
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to import from")
    src = Path(tempfile.mkdtemp(dir=shm, prefix="stowage-import-test-"))
    try:
        shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
        expected = {pydicom.dcmread(src / "ct.dcm", stop_before_pixels=True).SOPInstanceUID:
                    dataset_of((src / "ct.dcm").read_bytes())}
        data = tmp_path / "data"
        r = subprocess.run([sys.executable, "-m", "stowage.cli", "import", str(src), "--data-dir", str(data), "-q"],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, STOWAGE_SPILL_THRESHOLD="1024"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert exported(data, tmp_path / "out") == expected
    finally:
        shutil.rmtree(src, ignore_errors=True)
