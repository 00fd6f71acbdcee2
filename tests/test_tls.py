"""TLS on the associations the archive opens ([remotes.AE] tls = true): `stowage echo`,
`stowage send` and C-MOVE sub-operations to DCMTK storescp running TLS with mutual
authentication (it verifies our certificate against its CA, we verify its certificate
and host name against ours); a TLS remote that does not speak TLS is one clear error."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from conftest import CT, HOST, copies, dataset_bytes, dcmtk, free_port
from test_move import movescu
from test_send import StoreSCP, stowage, store, study_of


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A throw-away CA, and a server and a client certificate it signed for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=stowage-test-ca", cwd=d)
    for name in ("server", "client"):
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


class TlsStoreSCP(StoreSCP):
    """DCMTK storescp over TLS, requiring our certificate, writing what it receives."""

    def __init__(self, out: Path, certs: Path) -> None:  # not super().__init__: that starts a plain one
        self.out, self.port, self.aet = out, free_port(), "DEST"
        out.mkdir(parents=True)
        self.proc = subprocess.Popen([dcmtk("storescp"), "+tls", str(certs / "server.key"), str(certs / "server.pem"),
                                      "+cf", str(certs / "ca.pem"), "+B", "-aet", "DEST", "-od", str(out),
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:  # a plain C-ECHO cannot tell when a TLS storescp is up: its port can
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "storescp +tls did not start"
                time.sleep(0.1)


def tls_config(tmp_path: Path, certs: Path, port: int) -> Path:
    cfg = tmp_path / "stowage.toml"
    cfg.write_text(f'[remotes.DEST]\nhost = "{HOST}"\nport = {port}\ntls = true\n'
                   f'tls_ca = "{certs / "ca.pem"}"\ntls_cert = "{certs / "client.pem"}"\n'
                   f'tls_key = "{certs / "client.key"}"\n')
    return cfg


def test_echo_send_and_move_over_tls(make_server, tmp_path, certs):
    dest = TlsStoreSCP(tmp_path / "rx", certs)
    try:
        cfg = tls_config(tmp_path, certs, dest.port)
        r = stowage("echo", "--config", str(cfg), "DEST")
        assert r.returncode == 0, r.stdout + r.stderr
        server = make_server("--workers", "2", "--config", str(cfg))
        ct = copies(CT, tmp_path / "ct", 6, "ct")
        store(server.port, ct[:3])
        r = stowage("send", "--data-dir", str(server.data_dir), "--config", str(cfg), "-q", "--to", "DEST",
                    "--study", study_of(ct[0]))
        assert r.returncode == 0, r.stdout + r.stderr
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ct[:3]}
        assert {u: dataset_bytes(p) for u, p in dest.received().items()} == \
            {u: dataset_bytes(p) for u, p in sent.items()}
        for p in dest.out.iterdir():
            p.unlink()
        store(server.port, ct[3:])
        keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_of(ct[0]),
                "SeriesInstanceUID": pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID}
        r = movescu(server.port, "S", "DEST", keys)
        assert r.returncode == 0, r.stdout + r.stderr
        assert set(dest.received()) == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct}
    finally:
        dest.stop()


def test_a_tls_remote_that_does_not_speak_tls_is_one_clear_error(make_server, tmp_path, certs):
    plain = StoreSCP(tmp_path / "rx")
    try:
        cfg = tls_config(tmp_path, certs, plain.port)
        server = make_server("--workers", "1", "--config", str(cfg))
        (f,) = copies(CT, tmp_path / "ct", 1, "ct")
        store(server.port, [f])
        r = stowage("send", "--data-dir", str(server.data_dir), "--config", str(cfg), "-q", "--to", "DEST",
                    "--study", study_of(f))
        assert r.returncode == 1
        assert "TLS" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert list(plain.out.iterdir()) == []
        e = stowage("echo", "--config", str(cfg), "DEST")  # the path every other requester takes
        assert e.returncode != 0 and "Traceback" not in e.stderr, e.stderr
        assert "the TLS handshake failed (is it a TLS port" in e.stderr, e.stderr
    finally:
        plain.stop()


def test_tls_settings_are_checked_when_the_configuration_is_read(tmp_path, certs):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[remotes.DEST]\nhost = "{HOST}"\nport = 104\ntls = true\ntls_cert = "{certs / "client.pem"}"\n')
    r = stowage("echo", "--config", str(cfg), "DEST")
    assert r.returncode != 0 and "tls_cert and tls_key go together" in r.stderr and "Traceback" not in r.stderr
