"""The command line as a new administrator misuses it: a data directory that is a file or
on a read-only disk, AE titles and hosts that cannot be used, out files that cannot be
written. Each answer is one line naming what is wrong, a non-zero exit, no traceback;
each of these used to end in a traceback (or, for bench --json, in one after the whole run)."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from conftest import CT, HOST, cli, copies, free_port


def stowage(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode not in (0, None) and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted ro): root may not write there
    either, as it may into a folder merely chmod'ed read-only."""
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as where:
        yield where


@contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `where` (made) with `options`, unmounted at the end; the test is
    skipped where mounting is not allowed."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(r.stderr or r.stdout).strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def serve(data_dir: Path) -> subprocess.CompletedProcess:
    return stowage("serve", "--data-dir", str(data_dir), "--bind", HOST, "--port", str(free_port()),
                   "--workers", "1", "--http-port", "0")


def test_serve_on_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    one_line(serve(tmp_path / "data"), "data", "is a file")
    one_line(serve(tmp_path / "data" / "below"), "cannot create", "Not a directory")


def test_serve_on_a_read_only_disk(read_only):
    one_line(serve(read_only), "cannot write into", "read-only file system")
    one_line(serve(read_only / "data"), "cannot create", "Read-only file system")


def test_migrate_into_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    one_line(cli("migrate", "--data-dir", str(tmp_path / "data"), "--from", f"PACS@{HOST}:{free_port()}",
                 "--method", "get", "-q"), "is a file")


@pytest.mark.parametrize("args,needles", [
    (["echo", "nohost.invalid:104"], ("cannot resolve", "nohost.invalid")),
    (["echo", f"{HOST}:104", "--aec", "A\\B"], ("--aec", "not an AE title")),
    (["echo", f"{HOST}:104", "--aet", "ABCDEFGHIJKLMNOPQ"], ("--aet", "not an AE title")),
    (["migrate", "--from", "PACS@nohost.invalid:104", "--method", "get", "-q"], ("cannot resolve",)),
    (["send", "--to", f"{HOST}:104", "--aet", "A\\B", "--study", "1.2.3"], ("--aet", "not an AE title")),
    (["send", "--to", f"{HOST}:104", "--aec", "ABCDEFGHIJKLMNOPQ", "--study", "1.2.3"], ("--aec",)),
    # a free port: before the check, bench ran (and must not reach anyone's 11112)
    (["bench", "--port", str(free_port()), "--aet", "A\\B", "--count", "1", "-q"], ("--aet", "not an AE title")),
    (["bench", "--port", str(free_port()), "--calling-aet", "ABCDEFGHIJKLMNOPQ", "--count", "1", "-q"],
     ("--calling-aet",)),
])
def test_peers_and_titles_that_cannot_be_used(tmp_path, args, needles):
    """Before: pynetdicom's ValueError or socket.gaierror as a traceback (echo, send,
    migrate), or a bench run whose every store failed with "sender error: ValueError"."""
    data = tmp_path / "data"
    if args[0] == "send":  # an archive to send from
        assert cli("import", "--data-dir", str(data), "-q", str(CT)).returncode == 0
    one_line(cli(*args, "--data-dir", str(data)) if args[0] != "bench" else cli(*args), *needles)


def test_bench_refuses_a_results_file_it_could_not_write_after_the_run(tmp_path, read_only):
    """--json and --chart are written after every run: a folder that is missing or read-only
    is said before the corpus is made, not with a traceback once the results are in."""
    one_line(cli("bench", "--port", str(free_port()), "--count", "1", "-q", "--json", str(read_only / "r.json")),
             "--json", "read-only")
    one_line(cli("bench", "--port", str(free_port()), "--count", "1", "-q", "--chart",
                 str(tmp_path / "missing" / "c.png")), "--chart", "no folder")


def test_bench_dicomweb_without_a_url():
    r = cli("bench", "--dicomweb", "notaurl", "--count", "1", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--dicomweb 'notaurl'" in r.stderr, r.stderr


def test_deidentify_into_a_read_only_folder(tmp_path, read_only):
    config = tmp_path / "s.toml"
    config.write_text("[projects.p1]\n")
    src = tmp_path / "src"
    copies(CT, src, 2, "d")
    one_line(cli("deidentify", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--project", "p1",
                 str(src), str(read_only / "out")), "cannot write into OUT", "read-only file system")
    # a project that is not configured leaves no empty OUT behind either
    one_line(cli("deidentify", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--project", "nope",
                 str(src), str(tmp_path / "out")), "nope")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def read_only_archive(tmp_path):
    """An archive (two instances) on a tmpfs then remounted read-only: a backup mounted ro."""
    with _tmpfs(tmp_path / "disk", "size=20m") as disk:
        src = copies(CT, tmp_path / "in", 2, "ro")
        r = cli("import", "--data-dir", str(disk / "data"), "-q", *map(str, src), env={"STOWAGE_MIN_FREE_BYTES": "0"})
        assert r.returncode == 0, r.stdout + r.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
        yield disk / "data", src


def test_commands_that_write_on_a_read_only_archive(read_only_archive):
    """compact, import, rebuild-catalog and iceberg publish ended in tracebacks (audit.jsonl,
    the import ledger, serve.lock); delete asked first, then said the deletion "may be
    incomplete"."""
    data, src = read_only_archive
    study = pydicom.dcmread(src[0], stop_before_pixels=True).StudyInstanceUID
    for args in (["compact"], ["import", "-q", str(src[0])], ["rebuild-catalog"], ["delete", "--study", study]):
        one_line(cli(*args, "--data-dir", str(data)), "cannot write into the data directory", "read-only")
    config = read_only_archive[0].parent.parent / "iceberg.toml"
    config.write_text(f'iceberg_catalog = "sqlite:///{config.parent}/iceberg.db"\n')
    one_line(cli("iceberg", "publish", "--config", str(config), "--data-dir", str(data)), "read-only")
    # reading it still works
    r = cli("query", "--data-dir", str(data), "--format", "csv", "SELECT count(*) AS n FROM instances")
    assert r.returncode == 0 and r.stdout.split() == ["n", "2"], r.stdout + r.stderr


def test_output_to_a_full_device(tmp_path):
    """`> /dev/full` (or a file on a full disk): a traceback from the write, from --help and
    --version too (click handles only a closed pipe)."""
    data = tmp_path / "data"
    assert cli("import", "--data-dir", str(data), "-q", str(CT)).returncode == 0
    for args in (["--version"], ["export", "--help"],
                 ["query", "--data-dir", str(data), "--format", "csv", "SELECT * FROM instances"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "stowage.cli", *args], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        one_line(r, "cannot write its output (standard output): No space left on device")


def test_send_deidentified_to_a_peer_that_cannot_be_reached(tmp_path):
    """An unresolvable host was a traceback after the whole selection was de-identified; a
    peer that does not answer was one "association not established" line per instance."""
    config = tmp_path / "s.toml"
    config.write_text("[projects.p1]\n")
    data = tmp_path / "data"
    src = copies(CT, tmp_path / "in", 3, "deid")
    assert cli("import", "--data-dir", str(data), "-q", *map(str, src)).returncode == 0
    study = pydicom.dcmread(src[0], stop_before_pixels=True).StudyInstanceUID
    base = ("send", "--config", str(config), "--data-dir", str(data), "--study", study, "--deidentify", "p1")
    one_line(cli(*base, "--to", "nohost.invalid:104"), "cannot resolve", "nohost.invalid")
    one_line(cli(*base, "--to", f"{HOST}:{free_port()}"), "nothing sent to", "not established")


def test_export_deidentified_into_a_folder_that_cannot_be_made(tmp_path, read_only):
    config = tmp_path / "s.toml"
    config.write_text("[projects.p1]\n")
    data = tmp_path / "data"
    assert cli("import", "--data-dir", str(data), "-q", str(CT)).returncode == 0
    (tmp_path / "afile").write_text("")
    for out, needle in ((read_only / "out", "read-only file system"), (tmp_path / "afile", "is a file")):
        one_line(cli("export", "--config", str(config), "--data-dir", str(data), "--out", str(out), "--all",
                     "--deidentify", "p1"), "--out", needle)
