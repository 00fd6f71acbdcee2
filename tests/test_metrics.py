"""Prometheus metrics (`metrics_port`): what a monitoring system scrapes from /metrics
counts the stores the workers answered, keeps a dead worker's counts, counts the restart,
the associations admitted and rejected, and the free space."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request

from conftest import CT, HOST, copies, dcmtk, echo_ok, free_port
from test_move import movescu
from test_send import config_with, scps, store, study_of  # noqa: F401  (scps: fixture)


def scrape(port: int) -> dict[str, float]:
    """The samples of /metrics, by name with labels, e.g. 'stowage_stores_total{outcome="success"}'."""
    body = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        m = re.match(r"^(stowage_\S+) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_for(port: int, name: str, want: float, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(port)
        if got.get(name) == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_metrics_count_stores_restarts_and_rejections(make_server, tmp_path):
    mport = free_port()
    server = make_server("--workers", "2", "--metrics-port", str(mport), "--max-associations", "1")
    ct = copies(CT, tmp_path / "ct", 4, "ct")
    store(server.port, ct)
    success = 'stowage_stores_total{outcome="success"}'
    got = wait_for(mport, success, 4)
    assert got[success] == 4, got
    assert got['stowage_stores_total{outcome="failure"}'] == 0
    assert got["stowage_stored_bytes_total"] >= 4 * (os.path.getsize(ct[0]) - 1024)
    assert got["stowage_workers_ready"] == 2
    assert got["stowage_free_bytes"] > 0
    assert got['stowage_associations_total{outcome="admitted"}'] >= 2  # readiness echo and the store
    # a worker killed: its stores stay counted, and the restart is
    victim = next(w for w in server.workers())
    os.kill(victim.pid, signal.SIGKILL)
    got = wait_for(mport, "stowage_worker_restarts_total", 1)
    assert got["stowage_worker_restarts_total"] == 1, got
    assert got[success] == 4, got
    deadline = time.monotonic() + 30
    while not echo_ok(server.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    store(server.port, copies(CT, tmp_path / "more", 2, "more"))
    assert wait_for(mport, success, 6)[success] == 6
    # over the cap (1): the next association is rejected, and counted
    from pynetdicom import AE
    ae = AE("HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert held.is_established
    try:
        assert not echo_ok(server.port)
        got = scrape(mport)
        assert got['stowage_associations_total{outcome="rejected"}'] >= 1, got
        assert got["stowage_associations_active"] == 1, got
    finally:
        held.release()


def test_metrics_count_retrieves_and_finds(make_server, tmp_path, scps):  # noqa: F811
    dest = scps(tmp_path / "rx")
    mport = free_port()
    server = make_server("--workers", "2", "--metrics-port", str(mport), "--config",
                         str(config_with(tmp_path, DEST=(HOST, dest.port))))
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    store(server.port, ct)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_of(ct[0])}
    assert movescu(server.port, "S", "DEST", keys).returncode == 0
    r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study_of(ct[0])}", HOST, str(server.port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    moved = 'stowage_retrieve_suboperations_total{kind="C-MOVE",outcome="completed"}'
    got = wait_for(mport, moved, 3)
    assert got[moved] == 3, got
    assert got['stowage_retrieve_suboperations_total{kind="C-MOVE",outcome="failed"}'] == 0
    assert got['stowage_retrieved_bytes_total{kind="C-MOVE"}'] > 0
    assert wait_for(mport, "stowage_find_requests_total", 1)["stowage_find_requests_total"] == 1


def test_metrics_port_taken_is_one_clear_line(tmp_path):
    import socket
    import sys
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        r = subprocess.run([sys.executable, "-m", "stowage.cli", "serve", "--data-dir", str(tmp_path / "d"),
                            "--port", str(free_port()), "--bind", HOST, "--metrics-port",
                            str(busy.getsockname()[1])], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "cannot serve metrics" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
