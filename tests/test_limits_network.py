"""Resource limits a peer runs into over the network (issue #25), each checked as an
operator would over a real socket to a real `stowage serve`: a command set that never
ends is aborted and costs the worker no memory or spool; connections that trickle their
A-ASSOCIATE-RQ neither keep other peers out (max_associations_per_address) nor hold a slot
past association_request_timeout; a large data set that would overfill the spool or the
disk is refused with 0xA700 while it arrives, its spool file gone; `port = 0` serves TLS
only; Deflated proposed beside an uncompressed syntax gets the uncompressed one. Each
refusal is counted in stowage_limit_refusals{limit=...} on the metrics port.

The tricklers and the per-address checks connect from 127.0.0.2, another loopback address
(Linux routes all of 127.0.0.0/8 to lo), so that the normal peer on 127.0.0.1 is another
IP address, as it would be in the field; everything still binds and targets loopback only."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from conftest import HOST, dataset_bytes, dcmtk, echo_ok, free_port
from stowage.protocol.pdu import COMMAND, pdv_pdu
from stowage.protocol.status import OUT_OF_RESOURCES
from test_bad_input import (CT_STORAGE, STUDY_ROOT_FIND, VERIFICATION, assert_abort_or_close, associate_rq,
                            exported, part10, raw_connect, read_pdu_or_close, request_uid, scu, tmpfs,  # noqa: F401
                            assert_slots_come_back, worker_pids, workers_rss)
from test_metrics import scrape, wait_for
from test_tls import certs  # noqa: F401  (fixture)
from test_tls_scp import dcmtk_tls, tls_client

OTHER_ADDRESS = "127.0.0.2"  # loopback, but not the normal peer's address
A_ASSOCIATE_RJ = 0x03


def refusals(limit: str) -> str:
    return f'stowage_limit_refusals_total{{limit="{limit}"}}'


def wait_for_log(server, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.log()


def spool_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "spool").rglob("*") if p.is_file()]


def spool_size(data_dir: Path) -> int:
    total = 0
    for p in spool_files(data_dir):
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # removed between the listing and the stat
            pass
    return total


# -- 1. a command set that never ends ----------------------------------------------------

FRAGMENT = 16 << 10
FLOOD = 64 << 20  # 1024 times max_command_bytes' default (64 KiB)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", ["lean", "pynetdicom"])
def test_endless_command_set_is_aborted_within_max_command_bytes(make_server, path):
    """PDVs with the command bit and never the last-fragment bit: before, the lean path
    kept them all in memory and pynetdicom's spilled them to the spool (64 MiB sent, 64 MiB
    held). Now the association is aborted once the command set passes 64 KiB; the workers
    grow by less than 32 MiB (the cap, a PDU buffer of max_pdu and thread stacks are well
    under it; a tenth of what was buffered before) and the spool stays empty."""
    mport = free_port()
    server = make_server("--workers", "2", "--metrics-port", str(mport))
    pids, rss_before = worker_pids(server), workers_rss(server)
    fragment = pdv_pdu(1, COMMAND, FRAGMENT) + bytes(FRAGMENT)  # context 1: Verification, accepted
    with raw_connect(server.port) as s:
        s.sendall(associate_rq(server.port, abstract=CT_STORAGE if path == "lean" else STUDY_ROOT_FIND))
        ac = read_pdu_or_close(s, timeout=10)
        assert ac[:1] == b"\x02", f"expected A-ASSOCIATE-AC, got {ac[:16].hex()}"
        sent = 0
        try:
            while sent < FLOOD:
                s.sendall(fragment)
                sent += FRAGMENT
        except OSError:  # the server aborted and closed: our writes fail
            pass
        growth, spooled = workers_rss(server) - rss_before, spool_size(server.data_dir)
        assert growth < 32 << 20, f"workers grew by {growth >> 20} MiB"
        assert spooled < 1 << 20, f"{spooled >> 20} MiB of command set in the spool"
        assert_abort_or_close(read_pdu_or_close(s, timeout=15))
        assert echo_ok(server.port), "another peer was not served"
    assert sent < FLOOD, "the server read a 64 MiB command set"
    assert wait_for(mport, refusals("command_bytes"), 1)[refusals("command_bytes")] == 1
    assert "max_command_bytes" in wait_for_log(server, "max_command_bytes")
    assert "127.0.0.1" in [line for line in server.log().splitlines() if "max_command_bytes" in line][0]
    assert echo_ok(server.port)
    assert worker_pids(server) == pids


# -- 2. connections that trickle their A-ASSOCIATE-RQ -----------------------------------

def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (non-blocking look)."""
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


@pytest.mark.timeout(180)
def test_trickled_requests_keep_no_one_out_and_end_at_the_deadline(make_server):
    """10 connections from one address send their A-ASSOCIATE-RQ a byte every 0.2 s. Before,
    they took 8 of the 8 slots for as long as they trickled and every other peer got
    "Local Limit Exceeded". Now 4 (max_associations_per_address) are handed to workers and
    closed association_request_timeout (5 s) after their accept, the other 6 are refused
    by the acceptor; a normal peer meanwhile is served, and the address's slots come back."""
    mport = free_port()
    server = make_server("--workers", "2", "--max-associations", "8", "--metrics-port", str(mport),
                         STOWAGE_MAX_ASSOCIATIONS_PER_ADDRESS="4", STOWAGE_ASSOCIATION_REQUEST_TIMEOUT="5")
    # On a loaded machine the start-up probes (conftest echo_ok) can queue up and meet the
    # per-address cap themselves: count only what happens from here on.
    before = scrape(mport).get(refusals("associations_per_address"), 0)
    rq = associate_rq(server.port)
    tricklers = [socket.create_connection((HOST, server.port), timeout=5, source_address=(OTHER_ADDRESS, 0))
                 for _ in range(10)]
    for t in tricklers:
        t.setblocking(False)  # a timeout would make every look below wait it out
    try:
        still_open, served, open_while_served = set(range(10)), None, 0
        for i in range(len(rq) - 1):  # never the whole request; bounded
            for k in sorted(still_open):
                try:
                    if closed_by_server(tricklers[k]):
                        still_open.discard(k)
                    else:
                        tricklers[k].send(rq[i:i + 1])
                except OSError:
                    still_open.discard(k)
            if i == 2:  # while they trickle, a peer from another address
                open_while_served, served = len(still_open), echo_ok(server.port, timeout=10)
            if not still_open:
                break
            time.sleep(0.2)
        assert served, "a normal peer was refused while the tricklers held their slots"
        assert open_while_served >= 4, f"only {open_while_served} tricklers were still open then"
        assert not still_open, f"{len(still_open)} trickling connections outlived the deadline"
    finally:
        for t in tricklers:
            t.close()
    got = wait_for(mport, refusals("association_request_timeout"), 4)
    assert got[refusals("association_request_timeout")] == 4, got
    assert got[refusals("associations_per_address")] - before == 6, got
    log = wait_for_log(server, "association_request_timeout")
    assert any(OTHER_ADDRESS in line and "association_request_timeout" in line for line in log.splitlines())
    assert any(OTHER_ADDRESS in line and "max_associations_per_address" in line for line in log.splitlines())
    assert_address_slots_come_back(server.port, 4)


def associate_from(ae: AE, port: int, address: str = OTHER_ADDRESS):
    return ae.associate(HOST, port, ae_title="STOWAGE", bind_address=(address, 0))


def assert_address_slots_come_back(port: int, n: int, timeout: float = 30.0) -> None:
    """`n` associations at once from OTHER_ADDRESS fit: the slots of connections that ended
    were freed."""
    assert_slots_come_back(scu(timeout=10), port, n, timeout, address=OTHER_ADDRESS)


@pytest.mark.timeout(180)
def test_per_address_cap_rejects_and_frees_the_slots_of_a_dead_worker(make_server):
    """Past max_associations_per_address (2) a plain connection from that address gets the
    A-ASSOCIATE-RJ of a full house (transient, local limit exceeded) from the acceptor;
    other addresses are served; when the workers holding the address's associations are
    killed, its slots come back."""
    server = make_server("--workers", "2", STOWAGE_MAX_ASSOCIATIONS_PER_ADDRESS="2")
    ae = scu(timeout=10)
    held = [associate_from(ae, server.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        with socket.create_connection((HOST, server.port), timeout=5, source_address=(OTHER_ADDRESS, 0)) as s:
            s.sendall(associate_rq(server.port))
            rj = read_pdu_or_close(s, timeout=10)
        assert rj[:6] == bytes([A_ASSOCIATE_RJ, 0, 0, 0, 0, 4]), rj.hex()
        assert (rj[7], rj[8], rj[9]) == (2, 3, 2), "want rejected-transient, provider (presentation), local limit"
        assert echo_ok(server.port)  # 127.0.0.1 is another address
        for w in server.workers():
            os.kill(w.pid, signal.SIGKILL)
    finally:
        for a in held:
            a.abort()
    assert_address_slots_come_back(server.port, 2)


# -- 3. a large data set spilled to the spool -------------------------------------------

def large_ct(path: Path, nbytes: int) -> Path:
    """A CT of about `nbytes` of random (incompressible) pixels, as a Part-10 file."""
    side = int((nbytes // 2) ** 0.5)
    return part10(path, pixels=os.urandom(side * side * 2))


class SpoolWatch:
    """The largest the spool was seen, polled every 10 ms from a thread while in use."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.peak = data_dir, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, spool_size(self.data_dir))

    def __enter__(self) -> "SpoolWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("limit,path", [("spool_bytes", "lean"), ("spool_bytes", "pynetdicom"),
                                        ("free_space", "lean")])
def test_spool_limits_refuse_a_large_dataset_while_it_arrives(make_server, tmpfs, tmp_path, monkeypatch,  # noqa: F811
                                                              limit, path):
    """Before, a spilled data set was checked for room only once whole: the spool grew to
    its full size (24 MB with max_spool_bytes 4 MiB) or to what would then be refused for
    free space. Now it is refused as it passes the limit: 0xA700, an Error Comment naming
    the limit, the spool never larger than the limit allows and empty after, nothing
    stored, and the association still stores the next instance."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # sent from the file, not held
    env = {"STOWAGE_SPILL_THRESHOLD": str(1 << 20)}
    if limit == "spool_bytes":
        env["STOWAGE_MAX_SPOOL_BYTES"] = str(4 << 20)
        big, words, ceiling = large_ct(tmp_path / "in" / "big.dcm", 24 << 20), "max_spool_bytes", 4 << 20
        data_dir = tmp_path / "data"
    else:  # a 128 MiB disk keeping 64 MiB free: a 48 MiB data set cannot be stored, and is refused by ~36 MiB
        data_dir = tmpfs(tmp_path / "disk", "128m") / "data"
        env["STOWAGE_MIN_FREE_BYTES"] = str(64 << 20)
        big, words, ceiling = large_ct(tmp_path / "in" / "big.dcm", 48 << 20), "min_free_bytes", 40 << 20
    mport = free_port()
    server = make_server("--workers", "2", "--metrics-port", str(mport), data_dir=data_dir, **env)
    small = part10(tmp_path / "in" / "small.dcm")
    ae = scu(timeout=120)
    if path == "pynetdicom":
        ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        with SpoolWatch(server.data_dir) as watch:
            status = assoc.send_c_store(big)
        assert "Status" in status, "no C-STORE response"
        comment = str(status.get("ErrorComment") or "")
        assert status.Status == OUT_OF_RESOURCES, f"0x{status.Status:04X} {comment}"
        assert words in comment, comment
        assert watch.peak <= ceiling, f"the spool reached {watch.peak >> 20} MiB"
        assert spool_files(server.data_dir) == []
        assert assoc.send_c_store(small).Status == 0  # the association goes on
    finally:
        assoc.release()
    assert wait_for(mport, refusals(limit), 1)[refusals(limit)] == 1
    assert set(exported(server.data_dir, tmp_path / "out")) == {request_uid(small)}


# -- 4. TLS only ----------------------------------------------------------------------------

def tls_echo_ok(port: int, certs: Path) -> bool:  # noqa: F811
    ae = AE("TLSECHO")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", tls_args=(tls_client(certs), HOST))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.mark.timeout(180)
def test_port_zero_serves_tls_only(make_server, tmp_path, certs):  # noqa: F811
    """`port = 0` with a TLS port: the acceptor listens on the TLS port alone (before, port
    0 bound an ephemeral plain port, through which the client-certificate check could be
    bypassed), says so at start-up, and TLS peers are served. A connection to the TLS port
    that never completes its handshake is closed at association_request_timeout too."""
    tls_port, mport = free_port(), free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'tls_port = {tls_port}\ntls_cert = "{certs / "server.pem"}"\n'
                   f'tls_key = "{certs / "server.key"}"\ntls_ca = "{certs / "ca.pem"}"\n'
                   f'association_request_timeout = 3\nmetrics_port = {mport}\n')
    server = make_server("--workers", "2", "--config", str(cfg), "--port", "0", start=False)  # the last --port wins
    server.start(wait=False)
    deadline = time.monotonic() + 60
    while not tls_echo_ok(tls_port, certs):
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() < deadline, f"no TLS echo within 60 s:\n{server.log()}"
        time.sleep(0.2)
    listening = {c.laddr.port for c in psutil.Process(server.proc.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {tls_port, mport}, f"the acceptor listens on {sorted(listening)} (metrics: {mport})"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, server.port), timeout=5).close()
    assert f"{HOST}:{tls_port} (TLS) only; no plain port" in server.log(), server.log()[-2000:]
    r = subprocess.run([dcmtk("echoscu"), *dcmtk_tls(certs), "-aec", "STOWAGE", HOST, str(tls_port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with socket.create_connection((HOST, tls_port), timeout=30) as silent:  # no ClientHello, ever
        assert silent.recv(4096) == b"", "the server answered a connection that sent nothing"
    got = wait_for(mport, refusals("association_request_timeout"), 1)
    assert got[refusals("association_request_timeout")] == 1, got
    assert "TLS handshake within association_request_timeout" in server.log()


# -- 5. Deflated beside an uncompressed syntax ----------------------------------------------

def deflated_copy(src: Path, out: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    return out


@pytest.mark.timeout(180)
def test_deflated_proposed_beside_explicit_gets_explicit(server, tmp_path, monkeypatch):
    """A context proposing Deflated first and Explicit VR Little Endian after it: Explicit
    is accepted (before, the lean path took the sender's first, Deflated), on the lean path
    and pynetdicom's; Deflated proposed alone is still accepted. What is stored is the
    data set as sent, byte for byte, either way."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes, as they are
    sent: dict[str, Path] = {}
    for extra in ((), (STUDY_ROOT_FIND,)):  # storage only (lean), or with C-FIND (pynetdicom)
        ae = AE("DEFLATER")
        ae.add_requested_context(CT_STORAGE, [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
        for uid in extra:
            ae.add_requested_context(uid)
        assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
        assert assoc.is_established
        try:
            accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == CT_STORAGE]
            assert accepted == [ExplicitVRLittleEndian], f"{'pynetdicom' if extra else 'lean'} path: {accepted}"
            f = part10(tmp_path / "in" / f"explicit-{len(extra)}.dcm")
            assert assoc.send_c_store(f).Status == 0
            sent[request_uid(f)] = f
        finally:
            assoc.release()
    ae = AE("DEFLATER")
    ae.add_requested_context(CT_STORAGE, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == CT_STORAGE]
        assert accepted == [DeflatedExplicitVRLittleEndian]
        f = deflated_copy(part10(tmp_path / "in" / "to-deflate.dcm"), tmp_path / "in" / "deflated.dcm")
        assert assoc.send_c_store(f).Status == 0
        sent[request_uid(f)] = f
    finally:
        assoc.release()
    got = exported(server.data_dir, tmp_path / "out")
    assert set(got) == set(sent)
    assert {u: dataset_bytes(p) for u, p in got.items()} == {u: dataset_bytes(p) for u, p in sent.items()}


def test_query_identifiers_are_not_accepted_deflated(server):
    """pynetdicom inflates a Deflated C-FIND, C-MOVE or C-GET identifier whole, past any
    max_inflated_bytes: a Query/Retrieve context proposing only Deflated is refused, one
    proposing Deflated beside Explicit VR Little Endian gets Explicit, and a query on it
    is answered."""
    ae = AE("DEFLATER")
    ae.add_requested_context(STUDY_ROOT_FIND, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        assert not [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_ROOT_FIND]
        assert [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == STUDY_ROOT_FIND]
    finally:
        assoc.release()
    ae = AE("DEFLATER")
    ae.add_requested_context(STUDY_ROOT_FIND, [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        (cx,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_ROOT_FIND]
        assert cx.transfer_syntax == [ExplicitVRLittleEndian]
        query = pydicom.Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
        statuses = [status.Status for status, _ in assoc.send_c_find(query, STUDY_ROOT_FIND) if status]
        assert statuses and statuses[-1] == 0x0000
    finally:
        assoc.release()
