"""`stowage serve` lifecycle: SIGTERM drains in-flight associations and exits 0; the
acceptor spreads associations over workers."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess

import psutil
import pytest

from pynetdicom import AE, _config

from conftest import CT, HOST, copies, dcmtk, echo_ok, export_all, wait_for
from page_cache import file_system, resident_pages


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` has a socket listening on `port`."""
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def accept_queue(port: int) -> int | None:
    """Connections waiting in the accept queue of the socket listening on 127.0.0.1:`port`
    (for a listening socket, /proc/net/tcp's rx_queue is that count), or None if none listens."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # local address, state LISTEN
                return int(fields[4].split(":")[1], 16)
    return None


def test_sigterm_drains_in_flight_associations(make_server, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    server = make_server("--workers", "2")
    files = copies(CT, tmp_path / "in", 3, "a")
    ae = AE("DRAINSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    assert assoc.send_c_store(files[0]).Status == 0
    assert listening(server.proc.pid, server.port)
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not listening(server.proc.pid, server.port), 30,
             lambda: "the acceptor to close its listening socket\n" + server.log()[-3000:])
    with socket.socket() as s:  # no longer accepting
        s.settimeout(2)
        assert s.connect_ex((HOST, server.port)) != 0
    for f in files[1:]:  # the open association still finishes its work
        assert assoc.send_c_store(f).Status == 0
    assoc.release()
    assert server.proc.wait(60) == 0
    r = export_all(server.data_dir, tmp_path / "out")
    assert r.returncode == 0 and len(list((tmp_path / "out").glob("*.dcm"))) == 3
    tails = list((server.data_dir / "catalog" / "tails").glob("*"))
    assert not tails, "a clean stop seals every tail"


def test_associations_spread_over_workers(make_server):
    server = make_server("--workers", "2")
    ae = AE("SPREAD")
    ae.add_requested_context("1.2.840.10008.1.1")
    assocs = [ae.associate(HOST, server.port, ae_title="STOWAGE") for _ in range(4)]
    assert all(a.is_established for a in assocs)
    busy = {w.pid: len(w.net_connections(kind="tcp")) for w in server.workers()}
    for a in assocs:
        a.release()
    assert sorted(busy.values()) == [2, 2], busy


def test_peers_that_reset_before_being_rejected_do_not_stop_the_acceptor(make_server):
    """Over the association cap, connections that were reset while they waited to be
    accepted (accept() still returns them; getpeername() then fails) are dropped, and the
    archive goes on serving."""
    server = make_server("--workers", "2", "--max-associations", "1")
    ae = AE("HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert held.is_established
    os.kill(server.proc.pid, signal.SIGSTOP)  # the acceptor: the connections wait in its backlog
    try:
        for _ in range(3):
            c = socket.create_connection((HOST, server.port), timeout=5)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()  # RST
        assert accept_queue(server.port) == 3, "the reset connections are not waiting to be accepted"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    # The acceptor takes them (and drops them, over the cap and gone) while the held one is open.
    wait_for(lambda: accept_queue(server.port) == 0, 30,
             lambda: f"the acceptor to take the reset connections (queue {accept_queue(server.port)})\n"
                     + server.log()[-3000:])
    held.release()
    assert server.proc.poll() is None, server.log()[-3000:]
    # the held association's slot comes back once its worker reports the release
    wait_for(lambda: echo_ok(server.port), 10, lambda: "an echo to be admitted\n" + server.log()[-3000:])
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.parametrize("cache_writes", ["true", "false"])
def test_cache_writes_keeps_or_drops_what_serve_wrote(make_server, tmp_path, cache_writes):
    """By default serve keeps the segments it wrote in the page cache (a study just received
    is often retrieved next); `cache_writes = false` drops them once durable, as import and
    migrate always do. Either way every instance is stored."""
    if file_system(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the page cache is the storage on tmpfs")
    # the scrub off: its first pass over a new archive can read what is being stored (under
    # load, while storescu still sends), and a reader's pages are not the writer's doing
    # (test_verify's slow scrub checks that it drops what it read)
    server = make_server("--workers", "1", STOWAGE_CACHE_WRITES=cache_writes, STOWAGE_SCRUB_RATE="0")
    files = copies(CT, tmp_path / "in", 40, "cache")
    r = subprocess.run([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(server.port), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    counts = [resident_pages(p) for p in (server.data_dir / "segments").glob("*.seg")]
    resident, pages = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert pages >= 40 * 2  # each CT_small record is several pages
    if cache_writes == "true":
        assert resident == pages
    else:
        assert resident <= len(counts), f"{resident} of {pages} segment pages still cached"
    assert export_all(server.data_dir, tmp_path / "out").returncode == 0
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 40



def test_a_busy_http_port_stops_serve_before_any_worker_starts(tmp_path):
    """The HTTP port is bound before the workers start (its processes start later, once the
    DICOM port is served): a port in use is one line and a non-zero exit, with no worker
    started and nothing left running."""
    with socket.create_server((HOST, 0)) as taken:
        http_port = taken.getsockname()[1]
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(["python3", "-m", "stowage.cli", "serve", "--data-dir", str(tmp_path / "data"),
                                 "--bind", HOST, "--port", str(port), "--http-port", str(http_port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"cannot listen for HTTP on {HOST}:{http_port}" in out
    assert "worker 0 started" not in out and "Traceback" not in out

    def its_fork_server() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "stowage.engine.runtime.forkserver" in cmd and str(proc.pid) in cmd:
                found.append(p)
        return found
    wait_for(lambda: not its_fork_server(), 10, "the fork server of the serve that stopped to end")
