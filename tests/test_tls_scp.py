"""TLS on the archive's own port (`tls_port`): DCMTK echoscu and storescu, and pynetdicom
C-FIND, associate over TLS with a client certificate the archive verifies against
`tls_ca`; what arrives over TLS is stored byte for byte and seen on the plain port; a
client without a certificate, and plain DICOM sent to the TLS port, are turned away
without harming anything; a TLS association over the cap gets an A-ASSOCIATE-RJ; a TLS
port without its certificate is one clear line at start-up."""
from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet, Verification)

from conftest import CT, HOST, copies, dataset_bytes, dcmtk, echo_ok, export_all, free_port, received_by_dcmtk, wait_for
from test_send import store, stowage, study_of
from test_tls import certs  # noqa: F401  (fixture)


def tls_server(make_server, tmp_path: Path, certs: Path, *extra: str, **env: str):  # noqa: F811
    """stowage serving a TLS port that requires a client certificate signed by the test CA."""
    tls_port = free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'tls_port = {tls_port}\ntls_cert = "{certs / "server.pem"}"\n'
                   f'tls_key = "{certs / "server.key"}"\ntls_ca = "{certs / "ca.pem"}"\n')
    return make_server("--workers", "2", "--config", str(cfg), *extra, **env), tls_port


def dcmtk_tls(certs: Path) -> list[str]:  # noqa: F811
    """DCMTK client options: our client certificate, the CA that signed the server's."""
    return ["+tls", str(certs / "client.key"), str(certs / "client.pem"), "+cf", str(certs / "ca.pem")]


def tls_client(certs: Path, with_certificate: bool = True) -> ssl.SSLContext:  # noqa: F811
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    if with_certificate:
        ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return ctx


def tls_find(port: int, certs: Path, study: str) -> list[str]:  # noqa: F811
    """SOP Instance UIDs of a study, by C-FIND at IMAGE level over TLS (pynetdicom)."""
    ae = AE("TLSFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", tls_args=(tls_client(certs), HOST))
    assert assoc.is_established, "no association over TLS"
    q = pydicom.Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = "IMAGE", study, "", ""
    try:
        return [str(ident.SOPInstanceUID) for status, ident in
                assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()


def test_echo_store_and_find_over_the_tls_port(make_server, tmp_path, certs):  # noqa: F811
    server, tls_port = tls_server(make_server, tmp_path, certs)
    r = subprocess.run([dcmtk("echoscu"), *dcmtk_tls(certs), "-aec", "STOWAGE", HOST, str(tls_port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    r = subprocess.run([dcmtk("storescu"), *dcmtk_tls(certs), "-aec", "STOWAGE", HOST, str(tls_port),
                        *map(str, ct)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ct}
    assert sorted(tls_find(tls_port, certs, study_of(ct[0]))) == sorted(uids)
    out = tmp_path / "exported"  # read from the segments: what storescu sent over TLS, byte for byte
    assert export_all(server.data_dir, out).returncode == 0
    assert {u: dataset_bytes(out / f"{u}.dcm") for u in uids} == received_by_dcmtk(ct, tmp_path / "dcmtk")
    r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-k", "QueryRetrieveLevel=IMAGE",
                        "-k", f"StudyInstanceUID={study_of(ct[0])}", "-k", "SOPInstanceUID", HOST, str(server.port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (r.stdout + r.stderr).count("(0008,0018)") == 3, r.stdout + r.stderr


def test_get_over_the_tls_port_byte_exact(make_server, tmp_path, certs):  # noqa: F811
    """C-GET over TLS: sub-operations go out through pynetdicom (an SSL connection is not
    written from a second thread), byte for byte as stored."""
    server, tls_port = tls_server(make_server, tmp_path, certs)
    ct = copies(CT, tmp_path / "ct", 3, "ct")
    store(server.port, ct)
    got: dict[str, bytes] = {}

    def on_store(event) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0

    ae = AE("TLSGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, tls_port, ae_title="STOWAGE", tls_args=(tls_client(certs), HOST),
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = pydicom.Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", study_of(ct[0])
    try:
        statuses = [s.Status for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert {u: dataset_bytes(p) for u, p in ((pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID, p)
                                            for p in ct)} == got


def test_tls_port_turns_away_clients_without_certificate_and_plain_dicom(make_server, tmp_path, certs):  # noqa: F811
    server, tls_port = tls_server(make_server, tmp_path, certs)
    ae = AE("NOCERT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(HOST, tls_port, ae_title="STOWAGE", tls_args=(tls_client(certs, False), HOST))
    assert not assoc.is_established, "a client without a certificate associated"
    # Plain DICOM: the archive closes the connection on the failed handshake. echoscu's own
    # timeouts are beyond the subprocess's, so it cannot end on them.
    r = subprocess.run([dcmtk("echoscu"), "-to", "120", "-ta", "120", "-aec", "STOWAGE", HOST, str(tls_port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, "plain DICOM was answered on the TLS port"
    assert "Peer aborted Association" in r.stderr and "timeout" not in r.stderr.lower(), r.stdout + r.stderr
    wait_for(lambda: server.log().count("TLS handshake") >= 2, 10,
             lambda: "both failed handshakes in the log\n" + server.log()[-3000:])
    assert "Traceback" not in server.log()
    assert echo_ok(server.port)  # the workers are fine
    r = subprocess.run([dcmtk("echoscu"), *dcmtk_tls(certs), "-aec", "STOWAGE", HOST, str(tls_port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_tls_association_over_the_cap_is_rejected(make_server, tmp_path, certs):  # noqa: F811
    server, tls_port = tls_server(make_server, tmp_path, certs, "--max-associations", "1")
    ae = AE("HOLDER")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 10  # the start-up check's association may not be counted out yet
    while True:
        held = ae.associate(HOST, tls_port, ae_title="STOWAGE", tls_args=(tls_client(certs), HOST))
        if held.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert held.is_established
    try:
        r = subprocess.run([dcmtk("echoscu"), "-v", *dcmtk_tls(certs), "-aec", "STOWAGE", HOST, str(tls_port)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "Association Rejected" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        held.release()


def test_tls_port_without_its_certificate_is_one_clear_line(tmp_path, certs):  # noqa: F811
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f"tls_port = {free_port()}\n")
    r = stowage("serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()), "--bind", HOST,
                "--config", str(cfg), timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "tls_cert" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg.write_text(f'tls_port = {free_port()}\ntls_cert = "{certs / "server.pem"}"\n'
                   f'tls_key = "{certs / "client.key"}"\n')  # a key that is not the certificate's
    r = stowage("serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()), "--bind", HOST,
                "--config", str(cfg), timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "tls_cert" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_failed_handshakes_do_not_hold_up_a_stop(make_server, tmp_path, certs):  # noqa: F811
    """A connection whose TLS handshake failed is over: SIGTERM then stops the archive at
    once, without waiting out drain_timeout for associations that are not there."""
    # A drain timeout far beyond stop()'s 60 s: a stop that waited for an association would
    # not end within it (stop() then fails the test).
    server, tls_port = tls_server(make_server, tmp_path, certs, STOWAGE_DRAIN_TIMEOUT="900")
    r = subprocess.run([dcmtk("echoscu"), "-to", "10", "-ta", "10", "-aec", "STOWAGE", HOST, str(tls_port)],
                       capture_output=True, text=True, timeout=60)  # plain DICOM: the handshake fails
    assert r.returncode != 0
    wait_for(lambda: "TLS handshake" in server.log(), 10, lambda: "the failed handshake in the log\n" + server.log()[-3000:])
    assert server.stop(timeout=60) == 0, server.log()[-3000:]
    assert "still open" not in server.log() and "did not finish draining" not in server.log(), server.log()[-2000:]
