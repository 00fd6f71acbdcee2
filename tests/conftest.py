"""Shared fixtures: a real `stowage serve` on a free loopback port, stopped by PID."""
from __future__ import annotations

import inspect
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom

from pydicom.data import get_testdata_file
import pytest
from pynetdicom import AE

from stowage.protocol import pynetdicom_patches

import file_seconds

HOST = "127.0.0.1"
# The test process's pynetdicom SCUs get the same fix for pynetdicom's lost-response race
# (issue #875: the association thread can take a C-STORE-RSP meant for send_c_store, which
# then waits out the DIMSE timeout) that stowage's own SCU uses. A server that answers as
# fast as ours makes stock pynetdicom hit it about once in a hundred stores.
pynetdicom_patches.install()
CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))


def dcmtk(name: str) -> str:
    """The DCMTK tool `name` (pynetdicom installs scripts of the same names that may come
    first on PATH)."""
    from stowage.bench.procs import find_dcmtk
    path = find_dcmtk(name)
    if path is None:
        pytest.fail(f"DCMTK's {name} is not installed: apt-get install dcmtk (ops/test.sh does)")
    return path


def storescu(port: int, files: list[Path], *options: str) -> None:
    """DCMTK storescu sends `files` to the stowage on `port` (with `options`); all must succeed."""
    r = subprocess.run([dcmtk("storescu"), *options, "-aec", "STOWAGE", HOST, str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what, interval: float = 0.1):
    """Poll `predicate` every `interval` seconds until it returns something true, and return
    that. If it has not within `timeout` seconds, fail the test saying `what` (a string, or
    a callable giving one, e.g. with the server's log) never happened. The timeout is a
    bound on a wait, never an assertion about speed: make it generous."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def catalog_sealed(data_dir: Path) -> bool:
    """Whether every record of every segment is in the sealed catalog: the manifest's
    watermark of each segment (but those a compaction retired) reaches the segment's end.
    Compaction only rewrites segments catalogued to their end."""
    from stowage.catalog import manifest
    m = manifest.load(data_dir / "catalog")
    for p in (data_dir / "segments").glob("*.seg"):
        try:
            size = p.stat().st_size
        except FileNotFoundError:  # unlinked by a compaction meanwhile
            continue
        if p.name not in m.retired_segments and m.sealed_upto(p.name) < size:
            return False
    return True


def echo_ok(port: int, aet: str = "STOWAGE", timeout: float = 2.0) -> bool:
    ae = AE("TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    assoc = ae.associate(HOST, port, ae_title=aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


# Markers (docs/testing.md): `pytest -m unit` runs without DCMTK, Orthanc, servers or
# subprocesses; `-m integration` is everything else. A test's own mark wins; otherwise a test
# is integration when it uses a server fixture, or when its code (with the module's helpers
# and fixtures it uses) names a peer, a subprocess or a listening socket. New test files are
# classified by the same reading, so nothing has to be listed by hand.
SERVER_FIXTURES = frozenset({"make_server", "server"})
PEER_WORDS = re.compile(r"subprocess|Popen|multiprocessing|os\.fork|make_server|\bServer\b|dcmtk|orthanc"
                        r"|engine\.cli|echo_ok|export_all|received_by_dcmtk|free_port|bench\.procs"
                        r"|start_server|\.associate\(|\.listen\(|create_connection", re.I)


def _sources(obj, module, seen: set) -> list[str]:
    """The source of `obj` and of every function or class of `module` it names, transitively."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    try:
        out = [inspect.getsource(obj)]
    except (OSError, TypeError):
        return []
    codes = [getattr(obj, "__code__", None)] if not inspect.isclass(obj) else \
        [getattr(f, "__code__", None) for f in vars(obj).values()]
    while codes:
        code = codes.pop()
        if code is None:
            continue
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
        for name in code.co_names:
            ref = getattr(module, name, None)
            if (inspect.isfunction(ref) or inspect.isclass(ref)) and getattr(ref, "__module__", None) == module.__name__:
                out += _sources(ref, module, seen)
    return out


def _needs_peers(item: pytest.Item) -> bool:
    if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    module = getattr(item, "module", None)
    func = getattr(item, "function", None)
    if module is None or func is None:
        return True  # not a plain Python test: assume the worst
    seen: set = set()
    texts = _sources(func, module, seen)
    if getattr(item, "cls", None) is not None:
        texts += _sources(item.cls, module, seen)
    for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
        for fixturedef in defs:
            home = inspect.getmodule(fixturedef.func)
            if home is not None and Path(getattr(home, "__file__", "/")).parent == Path(__file__).parent:
                texts += _sources(fixturedef.func, home, seen)  # ours, not pytest's own
    return any(PEER_WORDS.search(t) for t in texts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not (item.get_closest_marker("unit") or item.get_closest_marker("integration")):
            item.add_marker(pytest.mark.integration if _needs_peers(item) else pytest.mark.unit)
    # The longest files first (tests/file_seconds.py): pytest-xdist (--dist loadfile
    # --no-loadscope-reorder, ops/test.sh) hands whole files out in this order, so the last
    # handed out are short and the test processes finish together. Within a file, its order.
    seconds = file_seconds.load()
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))


@dataclass
class Server:
    data_dir: Path
    port: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    log_dir: Path | None = None  # not under data_dir's disk: tests fill that disk up

    def start(self, wait: bool = True) -> "Server":
        self.log_path = (self.log_dir or self.data_dir.parent) / f"serve-{self.port}-{time.monotonic_ns()}.log"
        # setpriv --pdeathsig: the server gets SIGTERM if this test process dies (kill -9, a CI
        # timeout), so no server outlives its run; started from the main thread (the signal
        # follows the thread that forked), and exec keeps the PID the tests signal
        cmd = ["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(self.data_dir),
               "--port", str(self.port), "--bind", HOST, *self.args]
        self._log = open(self.log_path, "wb")
        # No HTTP port unless a test asks for one (--http-port): not every test pays for its processes.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, STOWAGE_HTTP_PORT="0", **self.env), start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stowage serve exited {self.proc.returncode}:\n{self.log()}")
            if echo_ok(self.port, timeout=1.0):
                return
            time.sleep(0.2)
        raise RuntimeError(f"stowage serve not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def workers(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "stowage.workers.worker" in " ".join(p.cmdline())]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL to the whole process group if it hangs; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """kill -9 the acceptor and every worker at once."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def make_server(tmp_path):
    servers: list[Server] = []

    def make(*args: str, data_dir: Path | None = None, port: int | None = None, start: bool = True,
             **env: str) -> Server:
        s = Server(data_dir or tmp_path / "data", port or free_port(), list(args), env, log_dir=tmp_path)
        servers.append(s)
        return s.start() if start else s

    yield make
    for s in servers:
        s.kill()


@pytest.fixture
def server(make_server):
    return make_server("--workers", "2")


@pytest.fixture
def orthancs():
    """Starts Orthancs on demand (tests/orthanc.py: their own configuration on free ports)
    and stops them after the test."""
    from orthanc import Orthanc
    started: list[Orthanc] = []

    def make(*args, **kwargs) -> Orthanc:
        o = Orthanc(*args, **kwargs)
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


def cli(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`stowage *args` run inside this process by click's CliRunner: the same command code, its
    output and exit code, without a new interpreter's ~1 s of imports (tests that read the
    archive back in a loop call it dozens of times). An uncaught exception is a non-zero exit
    with its traceback in stderr, as a subprocess would show it. `input` is its standard
    input (e.g. the answer to a confirmation)."""
    import logging
    import multiprocessing
    import traceback
    import warnings
    from click.testing import CliRunner
    from stowage.cli import main
    # a command sets up logging for its process (root and audit handlers, warnings, the
    # process name): give this one back what it had
    loggers = [logging.getLogger(n) for n in ("", "stowage.audit", "pynetdicom", "pydicom")]
    saved = [(g, g.handlers[:], g.level, g.propagate) for g in loggers]
    shown, name = warnings.showwarning, multiprocessing.current_process().name
    try:
        r = CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=True)
    finally:
        for g, handlers, level, propagate in saved:
            for h in set(g.handlers) - set(handlers):
                h.close()
            g.handlers[:], g.level, g.propagate = handlers, level, propagate
        warnings.showwarning, multiprocessing.current_process().name = shown, name
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["stowage", *args], r.exit_code, r.stdout, err)


def export_all(data_dir: Path, out: Path, *selector: str) -> subprocess.CompletedProcess:
    return cli("export", "--data-dir", str(data_dir), "--out", str(out), *(selector or ("--all",)))


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part-10 file after its file meta group."""
    from pydicom.filereader import read_preamble, _read_file_meta_info
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


# Numbered copies of one instance (copies, series_instances): pydicom writes one file in
# 10-60 ms on the 2-core machine (the 1,500 copies of a module fixture took half a minute);
# these write it once per width of the Instance Number and set each copy's SOP Instance UID
# and number in those bytes, at the same lengths (no length field changes).
_UID_HOLDER = "2.25." + "1" * 39


def fresh_uid() -> str:
    """A new UUID-derived UID (2.25.<the UUID's integer>, as pydicom.uid.generate_uid makes),
    always 44 characters: the integer taken from 10**38 up to 2**128, 39 digits."""
    return f"2.25.{10**38 + uuid.uuid4().int % (2**128 - 10**38)}"


def _instance_number(number: int) -> bytes:
    """Instance Number (0020,0013) as pydicom writes it in Explicit VR Little Endian."""
    value = str(number).encode()
    value += b" " * (len(value) % 2)
    return b"\x20\x00\x13\x00IS" + struct.pack("<H", len(value)) + value


def _numbered(ds: pydicom.Dataset, files: list[tuple[Path, int]]) -> None:
    """Write `ds` to each path with a fresh SOP Instance UID and the path's Instance Number;
    pydicom writes each one where the bytes would not take the UID and number in place
    (another transfer syntax)."""
    syntax = ds.file_meta.TransferSyntaxUID
    explicit_le = not syntax.is_implicit_VR and syntax.is_little_endian and not syntax.is_deflated
    templates: dict[int, bytes | None] = {}
    for path, number in files:
        element = _instance_number(number)
        if len(element) not in templates:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _UID_HOLDER
            ds.InstanceNumber = number
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            raw = buf.getvalue()
            fits = (explicit_le and raw.count(_UID_HOLDER.encode()) == 2 and raw.count(element) == 1
                    and b"\0NUMBER\0" not in raw)
            templates[len(element)] = raw.replace(element, b"\0NUMBER\0") if fits else None
        template = templates[len(element)]
        if template is None:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = fresh_uid()
            ds.InstanceNumber = number
            ds.save_as(path, enforce_file_format=True)
        else:
            path.write_bytes(template.replace(_UID_HOLDER.encode(), fresh_uid().encode())
                             .replace(b"\0NUMBER\0", element))


def copies(src: Path, out: Path, n: int, tag: str) -> list[Path]:
    """n copies of `src` with fresh SOP Instance UIDs (one series), as Part-10 files."""
    out.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    paths = [out / f"{tag}-{i:04d}.dcm" for i in range(n)]
    _numbered(ds, [(p, i + 1) for i, p in enumerate(paths)])
    return paths


def series_instances(out: Path, patient: str, study: str, series: str, n: int, src: Path = CT,
                     **attributes: str) -> list[Path]:
    """n instances of one series (fresh SOP Instance UIDs, numbered from 1) of the given
    patient and study, copies of `src` with `attributes` set, as Part-10 files."""
    out.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    paths = [out / f"{series[-12:]}-{i:03d}.dcm" for i in range(n)]
    _numbered(ds, [(p, i + 1) for i, p in enumerate(paths)])
    return paths


# DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment: between two
# DCMTK tools every PDU written in two pieces then waits for a delayed ACK, about 90 ms per
# instance on loopback (50 CTs: 5 s instead of 0.2). bench/harness/ingest.py sets it too.
DCMTK_NODELAY = {"TCP_NODELAY": "1"}


def received_by_dcmtk(files: list[Path], out: Path) -> dict[str, bytes]:
    """What DCMTK storescu really sends for `files` (it re-encodes: e.g. it drops Data Set
    Trailing Padding), as received bit-preserving by DCMTK storescp: uid -> dataset bytes.
    Both run with TCP_NODELAY=1 (DCMTK_NODELAY): the same bytes, without Nagle's delays."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, **DCMTK_NODELAY)
    scp = subprocess.Popen([dcmtk("storescp"), "+B", "-od", str(out), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 20
        while not echo_ok(port, aet="ANY-SCP", timeout=1.0) and time.monotonic() < deadline:
            time.sleep(0.1)
        r = subprocess.run([dcmtk("storescu"), HOST, str(port), *map(str, files)], capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    got = {}
    for p in out.iterdir():
        uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        got[uid] = dataset_bytes(p)
    return got


# The browser, the OHIF viewer and an archive with its HTTP port, each started once per
# session for tests/test_dashboard.py and tests/test_viewer.py (defined in tests/browser.py;
# fixtures named here are registered once, not once per test module that imports them).
from browser import chromium, installed_viewer, web_archive, web_archive_with_token  # noqa: E402,F401
