"""Ctrl-C (SIGINT to the command's process group, as a terminal sends it) in the middle of
export, send, verify and bench: exit status 130 and one line saying what was done and
what was not, never click's bare "Aborted!"; nothing half-done left visible (a partial
file, a report that reads like a whole pass, an association aborted mid-store).
Import and migrate have their own (tests/test_import.py, tests/test_migrate.py)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE, evt

from conftest import CT, HOST, cli, copies, free_port, wait_for

N = 1500  # enough that none of them is over before the signal


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """N instances of one study (CT_small copies), imported once for the module."""
    base = tmp_path_factory.mktemp("archive")
    copies(CT, base / "in", N, "ct")
    r = cli("import", "--data-dir", str(base / "data"), "-q", str(base / "in"))
    assert r.returncode == 0, r.stderr
    return base / "data"


def _ctrl_c_as_from_a_terminal() -> None:
    """In the child before exec: SIGINT to its default. pytest-xdist's worker processes
    ignore SIGINT, and a child inherits that (Python then never raises KeyboardInterrupt):
    under `ops/test.sh` every Ctrl-C here was ignored and each command ran to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """`stowage ARGS` in its own process group, stderr to a file one can poll."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.err_path = tmp_path / f"stderr-{time.monotonic_ns()}"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "stowage.cli", *args], stdout=subprocess.PIPE,
                                     stderr=self._err, start_new_session=True, env={**os.environ, **(env or {})},
                                     preexec_fn=_ctrl_c_as_from_a_terminal)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def interrupt(self) -> tuple[int, str, str]:
        """SIGINT to the whole group, as Ctrl-C in a terminal; (exit status, stdout, stderr)."""
        assert self.proc.poll() is None, f"it ended before the signal:\n{self.stderr()}"
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            pytest.fail(f"still running 60 s after Ctrl-C:\n{self.stderr()}")
        self._err.close()
        return self.proc.returncode, out.decode(errors="replace"), self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def run(tmp_path):
    started: list[Run] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Run:
        started.append(Run(tmp_path, *args, env=env))
        return started[-1]

    yield start
    for r in started:
        r.kill()


def the_line(err: str) -> str:
    assert "Traceback" not in err and "Aborted!" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted: "), err
    return lines[0]


def test_ctrl_c_in_export(archive, tmp_path, run):
    out = tmp_path / "out"
    r = run("export", "--data-dir", str(archive), "--out", str(out), "--all")
    wait_for(lambda: len(list(out.glob("*.dcm"))) >= 10, 60, lambda: "the first files\n" + r.stderr())
    code, _, err = r.interrupt()
    line = the_line(err)
    files = sorted(out.iterdir())
    assert code == 130 and f"{len(files)} of {N} instance(s) exported" in line and "same command again" in line
    assert all(p.suffix == ".dcm" for p in files), files  # no .tmp left behind
    again = cli("export", "--data-dir", str(archive), "--out", str(out), "--all")
    assert again.returncode == 0 and f"({len(files)} already there)" in again.stdout, again.stdout


class SlowSCP:
    """A Storage SCP answering each C-STORE after `delay` s, that records whether its
    associations were released or aborted."""

    def __init__(self, delay: float) -> None:
        self.port, self.delay = free_port(), delay
        self.received: list[str] = []
        self.ends: list[str] = []
        self.lock = threading.Lock()
        ae = AE("DEST")
        ae.add_supported_context(str(CT_CLASS), ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_supported_context(COMMITMENT, scp_role=True, scu_role=True)
        self.commitment_asked = threading.Event()  # and never reported
        self.server = ae.start_server((HOST, self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, lambda e: self.ends.append("released")),
            (evt.EVT_ABORTED, lambda e: self.ends.append("aborted")), (evt.EVT_N_ACTION, self._on_action)])

    def _on_action(self, event):
        self.commitment_asked.set()
        return 0x0000, None

    def _on_store(self, event) -> int:
        time.sleep(self.delay)
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model


@pytest.fixture
def slow_scp():
    scp = SlowSCP(0.02)
    yield scp
    scp.stop()


def test_ctrl_c_in_send(archive, run, slow_scp):
    """No new C-STORE after Ctrl-C: the one on the wire is answered, the association
    released (not aborted), and the line counts what arrived."""
    r = run("send", "--data-dir", str(archive), "--to", f"{HOST}:{slow_scp.port}", "--aec", "DEST",
            "--patient", "1CT1", "-q")
    wait_for(lambda: len(slow_scp.received) >= 10, 60, lambda: "the first stores\n" + r.stderr())
    code, _, err = r.interrupt()
    line = the_line(err)
    wait_for(lambda: slow_scp.ends, 10, "the association to end")
    got = len(slow_scp.received)
    assert code == 130 and f"{got} of {N} instance(s) sent" in line and f"{N - got} not sent" in line, line
    assert slow_scp.ends == ["released"]


def test_ctrl_c_in_verify_leaves_no_report_that_looks_whole(archive, tmp_path, run):
    """Before, the report held its header alone: "no problem found" to anyone reading it."""
    report = tmp_path / "problems.csv"
    r = run("verify", "--data-dir", str(archive), "--rate", "2", "--report", str(report))
    wait_for(lambda: "verify:" in r.stderr(), 60, lambda: "the progress bar\n" + r.stderr())
    time.sleep(0.5)
    code, _, err = r.interrupt()
    line = the_line(err)
    assert code == 130 and "verify stopped after" in line and "no report written" in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if "problems" in p.name) == []
    # the report of a whole pass is still written
    whole = cli("verify", "--data-dir", str(archive), "-q", "--report", str(report))
    assert whole.returncode == 0 and report.read_text().splitlines() == ["segment,offset,sop_instance_uid,problem"]


def test_ctrl_c_in_bench(tmp_path, run, slow_scp):
    """The generated corpus is removed, and the line says no results were written."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = run("bench", "--host", HOST, "--port", str(slow_scp.port), "--aet", "DEST", "--kind", "ct", "--count", "300",
            "--json", str(tmp_path / "r.json"), "-q", env={"TMPDIR": str(tmp)})
    wait_for(lambda: len(slow_scp.received) >= 5, 120, lambda: "the first stores\n" + r.stderr())
    code, _, err = r.interrupt()
    # The sender processes get the SIGINT too (the whole group, as from a terminal): they
    # ignore it (bench/procs.py, without_sigint) and the command stops them; each printed
    # a KeyboardInterrupt traceback before.
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 130 and "Aborted!" not in err and len(lines) == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert lines[0].startswith("Error: interrupted: bench stopped: no results table, nothing written to"), lines
    assert not (tmp_path / "r.json").exists() and list(tmp.iterdir()) == []


def test_ctrl_c_in_rebuild_catalog(archive, tmp_path, run):
    """The old catalog is thrown away first: stopped midway, queries see part of the archive.
    Before, "Aborted!" alone; now the line says so and what makes it whole again."""
    data = tmp_path / "data"
    shutil.copytree(archive, data)
    old = {p.name for p in (data / "catalog").glob("*.parquet")}
    assert old
    r = run("rebuild-catalog", "--data-dir", str(data))
    wait_for(lambda: not old & {p.name for p in (data / "catalog").glob("*.parquet")}, 60,
             lambda: "the old catalog to be thrown away\n" + r.stderr(), interval=0.01)
    code, _, err = r.interrupt()
    line = the_line(err)
    assert code == 130 and "only partly rebuilt" in line and "rebuild-catalog` runs again" in line, line
    again = cli("rebuild-catalog", "--data-dir", str(data))
    assert again.returncode == 0 and f"{N} record(s) indexed" in again.stdout, again.stdout + again.stderr


def test_ctrl_c_in_deidentify(archive, tmp_path, run):
    config = tmp_path / "s.toml"
    config.write_text("[projects.p1]\n")
    out = tmp_path / "out"
    r = run("deidentify", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--project", "p1",
            str(archive.parent / "in"), str(out))
    wait_for(lambda: len(list(out.glob("*.dcm"))) >= 10, 120, lambda: "the first files\n" + r.stderr())
    code, _, err = r.interrupt()
    line = the_line(err)
    assert code == 130 and "deidentify stopped" in line and "same command again" in line, line
    assert not [p.name for p in out.iterdir() if p.suffix != ".dcm"]  # no temporary file left


def test_ctrl_c_while_waiting_for_a_commitment_report(archive, run, slow_scp):
    """Everything was sent; Ctrl-C while the report is awaited said "Aborted!" alone."""
    slow_scp.delay = 0
    r = run("send", "--data-dir", str(archive), "--to", f"{HOST}:{slow_scp.port}", "--aec", "DEST",
            "--instance", slow_uid(archive), "-q", "--commit", "--commit-timeout", "120")
    wait_for(slow_scp.commitment_asked.is_set, 60, lambda: "the N-ACTION\n" + r.stderr())
    code, out, err = r.interrupt()
    line = the_line(err)
    assert code == 130 and "sent 1 instance(s)" in out and "report not waited for" in line, out + err


def slow_uid(archive: Path) -> str:
    r = cli("query", "--data-dir", str(archive), "--format", "csv", "SELECT sop_instance_uid FROM instances LIMIT 1")
    return r.stdout.split()[1]


def test_ctrl_c_in_export_deidentify(archive, tmp_path, run):
    config = tmp_path / "s.toml"
    config.write_text("[projects.p1]\n")
    out = tmp_path / "out"
    work = tmp_path / "data"
    shutil.copytree(archive, work)  # the project's key and pseudonyms go into the data directory
    r = run("export", "--config", str(config), "--data-dir", str(work), "--out", str(out), "--all",
            "--deidentify", "p1")
    wait_for(lambda: len(list(out.glob("*.dcm"))) >= 10, 120, lambda: "the first files\n" + r.stderr())
    code, _, err = r.interrupt()
    line = the_line(err)
    assert code == 130 and "export --deidentify stopped" in line, line
    assert not [p.name for p in out.iterdir() if p.suffix != ".dcm"]  # no temporary file left


def test_ctrl_c_in_import(archive, tmp_path, run):
    """The import processes end the files in hand and say what they stored: before, they
    were terminated at once, and files they had stored were reported "not attempted"."""
    data = tmp_path / "data"
    r = run("import", "--data-dir", str(data), "--report", str(tmp_path / "report.csv"), str(archive.parent / "in"))
    wait_for(lambda: sum(p.stat().st_size for p in (data / "segments").glob("*.seg")) > 4_000_000, 120,
             lambda: "the first hundred files\n" + r.stderr(), interval=0.01)
    code, out, err = r.interrupt()
    line = the_line(err)
    assert code == 130 and "import stopped" in line and "same command again" in line, line
    stored = int(out.split(" stored")[0].rsplit(None, 1)[-1])
    q = cli("query", "--data-dir", str(data), "--format", "csv", "SELECT count(*) AS n FROM instances")
    assert q.returncode == 0, q.stderr
    assert 0 < stored < N and int(q.stdout.split()[-1]) == stored, (out, q.stdout)
    assert f"{N - stored} not attempted" in out, out
    again = cli("import", "--data-dir", str(data), "-q", str(archive.parent / "in"))
    assert again.returncode == 0 and f"{N - stored} stored" in again.stdout, again.stdout + again.stderr
