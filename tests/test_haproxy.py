"""HAProxy in front of two `stowage serve` nodes (ops/haproxy/haproxy.cfg, issue #24 part 4).

Real parts on loopback: Debian's haproxy with the shipped example configuration, two
stowage nodes, DCMTK storescu/echoscu and pynetdicom as the clients. What a user checks:
associations are spread over the nodes and every instance lands once; the health check
(a real C-ECHO) takes a dead node out of the rotation and puts it back; and the PROXY v2
header makes each node see the modality's address, not the balancer's, so that access
control by host still holds behind the balancer.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from conftest import CT, HOST, copies, dcmtk, free_port, wait_for
from test_access import audit_refusals
from stowage.protocol import proxy_header

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (Debian package)")
REPO = Path(__file__).resolve().parents[1]
BALANCER = "127.0.0.2"  # where haproxy connects to the nodes from: the tests' own 127.0.0.1 stays a plain client
NODE_CONFIG = """
proxy_protocol_from = ["127.0.0.2"]
http_processes = 1
unknown_ae_loopback_services = ["echo", "store"]
[remotes.FINDER]
host = "127.0.0.5"
port = 104
check_host = true
services = ["echo", "find"]
"""


def _health_check_bytes() -> tuple[bytes, bytes]:
    """The A-ASSOCIATE-RQ (Verification) and A-RELEASE-RQ the example's health check sends."""
    sends = [line.split()[-1] for line in (REPO / "ops/haproxy/haproxy.cfg").read_text().splitlines()
             if line.strip().startswith("tcp-check send-binary")]
    return bytes.fromhex(sends[0]), bytes.fromhex(sends[-1])


ECHO_ASSOCIATE_RQ, A_RELEASE_RQ = _health_check_bytes()


ALL_UP = {"a": "UP", "b": "UP", "http:a": "UP", "http:b": "UP"}


class Balancer:
    """haproxy -db (foreground) on the rendered example configuration, stopped by PID."""

    def __init__(self, tmp: Path, nodes: list[tuple[str, int, int]]) -> None:
        self.port, self.http_port, self.stats = free_port(), free_port(), str(tmp / "haproxy.sock")
        cfg = tmp / "haproxy.cfg"
        render = [sys.executable, str(REPO / "ops/haproxy/render.py"), "--dicom-port", str(self.port),
                  "--http-port", str(self.http_port), "--stats-socket", self.stats, "--source", BALANCER]
        for name, port, http_port in nodes:
            render += ["--node", f"{name}={HOST}:{port}:{http_port}"]
        cfg.write_text(subprocess.run(render, check=True, capture_output=True, text=True).stdout)
        self.log = open(tmp / "haproxy.log", "wb")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)

    def states(self) -> dict[str, str]:
        """Each server's status from the stats socket (UP, DOWN, ...), "http:" before those
        of the HTTP backend."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.stats)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        prefix = {"stowage_dicom": "", "stowage_http": "http:"}
        return {prefix[r["pxname"]] + r["svname"]: r["status"].split()[0] for r in rows
                if r["pxname"] in prefix and r["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_states(self, want: dict[str, str], timeout: float = 30.0) -> None:
        def reached():
            try:
                return self.states() == want
            except OSError:
                return False
        wait_for(reached, timeout, f"haproxy sees {want}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def cluster(make_server, tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(NODE_CONFIG)
    http_ports = [free_port(), free_port()]
    nodes = [make_server("--workers", "1", "--config", str(cfg), "--http-port", str(http_port), data_dir=tmp_path / name)
             for name, http_port in zip("ab", http_ports)]
    balancer = Balancer(tmp_path, [(name, node.port, http_port) for name, node, http_port in zip("ab", nodes, http_ports)])
    try:
        balancer.wait_states(ALL_UP)
        yield balancer, nodes
    finally:
        balancer.stop()


def _audit(data_dir: Path, event: str) -> list[dict]:
    path = data_dir / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [d for d in map(json.loads, lines) if d.get("event") == event]


def _stored_uids(data_dir: Path) -> set[str]:
    """SOP Instance UIDs a node's audit trail says it stored (status 0x0000)."""
    return {d["sop_instance_uid"] for d in _audit(data_dir, "store") if d["status"] == "0x0000"}


def _find_via(port: int, source: str) -> tuple[bool, list[int]]:
    """FINDER's C-FIND from `source` (a loopback address): (associated, statuses)."""
    ae = AE("FINDER")
    ae.add_requested_context(FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", bind_address=(source, 0))
    if not assoc.is_established:
        return False, []
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", ""
    try:
        return True, [s.Status for s, _ in assoc.send_c_find(q, FIND)]
    finally:
        assoc.release()


def test_associations_spread_over_the_nodes_and_every_instance_lands_once(cluster, tmp_path):
    balancer, nodes = cluster
    files = copies(CT, tmp_path / "ct", 12, "lb")
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    pushes = [subprocess.Popen([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(balancer.port), *map(str, part)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for part in (files[0:3], files[3:6], files[6:9], files[9:12])]
    for p in pushes:
        assert p.wait(60) == 0, p.stderr.read().decode()
    wait_for(lambda: sum(len(_stored_uids(n.data_dir)) for n in nodes) == len(sent), 30, "every store audited")
    a, b = (_stored_uids(n.data_dir) for n in nodes)
    assert a | b == sent and not a & b, "every instance stored once, on one node"
    assert a and b, "leastconn spread four concurrent associations over both nodes"


def test_a_dead_node_leaves_the_rotation_and_comes_back(cluster, tmp_path):
    balancer, (a, b) = cluster
    a.kill()
    balancer.wait_states({"a": "DOWN", "b": "UP", "http:a": "DOWN", "http:b": "UP"})
    for _ in range(4):  # every association now goes to b, and succeeds
        done = subprocess.run([dcmtk("echoscu"), "-aec", "STOWAGE", HOST, str(balancer.port)],
                              capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr.decode()
    with urllib.request.urlopen(f"http://{HOST}:{balancer.http_port}/dicom-web/studies", timeout=30) as r:
        assert r.status in (200, 204), "QIDO-RS through the balancer, answered by b"
    a.start()
    balancer.wait_states(ALL_UP)


def test_nodes_see_the_client_address_from_the_proxy_header(cluster):
    balancer, (a, b) = cluster
    # FINDER may C-FIND only from 127.0.0.5 (check_host): through the balancer, whose own
    # address is 127.0.0.1, the node must judge by the address the PROXY header names.
    associated, statuses = _find_via(balancer.port, "127.0.0.5")
    assert associated and statuses and statuses[-1] == 0x0000
    associated, _ = _find_via(balancer.port, "127.0.0.6")
    assert not associated, "FINDER from 127.0.0.6 must be rejected: it is not FINDER's host"
    refused = [r for n in (a, b) for r in audit_refusals(n.data_dir)]
    assert [(r["calling_ae"], r["peer"]) for r in refused] == [("FINDER", "127.0.0.6")]


def test_a_trusted_address_without_a_proxy_header_is_closed_with_a_reason(make_server, tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'proxy_protocol_from = ["{BALANCER}"]\n')
    node = make_server("--workers", "1", "--config", str(cfg))
    with socket.create_connection((HOST, node.port), timeout=10, source_address=(BALANCER, 0)) as s:
        s.sendall(ECHO_ASSOCIATE_RQ)  # no header from an address that must send one
        try:
            answer = s.recv(1)
        except ConnectionResetError:  # closed with our request unread: a reset, not a FIN
            answer = b""
        assert answer == b"", "closed, without an answer"
    wait_for(lambda: "no PROXY protocol v2 header" in node.log(), 10, "the reason in the log")
    # With the header, the association is served and the audit trail names the client.
    with socket.create_connection((HOST, node.port), timeout=10, source_address=(BALANCER, 0)) as s:
        s.sendall(proxy_header.encode(("127.0.0.9", 4242), (HOST, node.port)) + ECHO_ASSOCIATE_RQ)
        assert s.recv(1)[0] == 0x02, "an A-ASSOCIATE-AC"
        s.sendall(A_RELEASE_RQ)
    wait_for(lambda: any(d["peer"].startswith(f"127.0.0.9:4242 via {BALANCER}:") for d in _audit(node.data_dir, "association")),
             10, "the association audited under the client's address")
    assert f"{BALANCER} begin with a PROXY v2 header" in node.log()


def test_the_header_round_trips():
    for source in (("127.0.0.5", 1234), ("2001:db8::7", 65535)):
        header = proxy_header.encode(source, ("127.0.0.1", 11112))
        assert header.startswith(proxy_header.SIGNATURE)
        assert proxy_header.source_from(header[12], header[13], header[16:]) == source
    assert proxy_header.source_from(0x20, 0x00, b"") is None  # LOCAL: the balancer's health check
    with pytest.raises(proxy_header.ProxyHeaderError):
        proxy_header.source_from(0x21, 0x31, b"\x00" * 216)  # a UNIX socket family: not a TCP client
    assert "127.0.0.9" in proxy_header.Trusted(["127.0.0.0/8"]) and "10.0.0.1" not in proxy_header.Trusted(["127.0.0.0/8"])
