"""Access control (engine/receive/access.py, docs/access.md): per remote AE the services it
may use, only from its host, only with a certificate naming it; unknown AEs get everything
from loopback and no C-FIND/C-MOVE/C-GET from other hosts. Refusals are A-ASSOCIATE-RJ or
0x0124 with an audit line. Peers: pynetdicom and DCMTK over loopback, DCMTK inside a
private network namespace (veth pair) for the other-host case."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (MRImageStorage, StorageCommitmentPushModel,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from conftest import HOST, MR, copies, dcmtk, free_port, wait_for
from stowage.engine.receive.access import Caller, Policy, certificate_names, is_loopback
from stowage.engine.runtime.config import ConfigError, load
from test_tls import certs  # noqa: F401  (fixture)

NOT_AUTHORIZED = 0x0124
FIND, GET, MOVE = (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                   StudyRootQueryRetrieveInformationModelMove)


def audit_refusals(data_dir: Path) -> list[dict]:
    lines = (data_dir / "audit.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if d.get("event") == "access-refused"]


def config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "access.toml"
    p.write_text(text)
    return p


# --- the policy itself ----------------------------------------------------------------------

def test_policy_defaults_and_configured_services(tmp_path):
    cfg = load(config(tmp_path, '[remotes.ECHOONLY]\nhost = "127.0.0.1"\nport = 104\nservices = ["echo"]\n'), env={})
    policy = Policy(cfg)
    assert policy.services("ANYONE", "127.0.0.5") == {"echo", "store", "find", "move", "get", "commitment"}
    assert policy.services("ANYONE", "::ffff:127.0.0.1") == policy.services("ANYONE", "127.0.0.1")
    assert policy.services("ANYONE", "192.168.1.20") == {"echo", "store", "commitment"}
    assert policy.services("ECHOONLY", "127.0.0.1") == {"echo"}
    refusal = policy.admit(Caller("ANYONE", "192.168.1.20"), {"find", "move"})
    assert refusal is not None and "unknown_ae_services" in refusal.reason
    assert policy.admit(Caller("ANYONE", "192.168.1.20"), {"find", "store"}) is None  # answered per request
    assert "echo, store, commitment from other hosts" in policy.describe_unknown()
    assert not is_loopback("10.0.0.1") and is_loopback("::1")
    assert certificate_names({"subject": ((("commonName", "CT1"),),), "subjectAltName": (("DNS", "ct1.lan"),)}) \
        == {"CT1", "ct1.lan"}


def test_configuration_refuses_unknown_service_names(tmp_path):
    with pytest.raises(ConfigError, match="'fnd' is not a service"):
        load(config(tmp_path, '[remotes.X]\nhost = "h"\nport = 104\nservices = ["fnd"]\n'), env={})
    with pytest.raises(ConfigError, match="unknown_ae_services"):
        load(env={"STOWAGE_UNKNOWN_AE_SERVICES": "echo,retrieve"})
    assert load(env={"STOWAGE_UNKNOWN_AE_SERVICES": "none"}).unknown_ae_services == ()
    with pytest.raises(ConfigError, match="check_host: must be true or false"):
        load(config(tmp_path, '[remotes.X]\nhost = "h"\nport = 104\ncheck_host = "yes"\n'), env={})


# --- every service over loopback, pynetdicom ------------------------------------------------

def _associate(port: int, ae_title: str):
    ae = AE(ae_title)
    for uid in (Verification, MRImageStorage, FIND, GET, MOVE, StorageCommitmentPushModel):
        ae.add_requested_context(uid)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    stored: list[str] = []

    def on_store(event):  # C-GET sub-operations
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=[build_role(MRImageStorage, scu_role=True, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, f"{ae_title}: no association"
    return assoc, stored


def _every_service(port: int, ae_title: str, mr: Path) -> dict[str, int]:
    """The status of each of the six services, asked on one association."""
    assoc, got = _associate(port, ae_title)
    ds = pydicom.dcmread(mr)
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID = "IMAGE", ds.StudyInstanceUID, ds.SeriesInstanceUID
    q.SOPInstanceUID = ds.SOPInstanceUID
    commit = Dataset()
    commit.TransactionUID = pydicom.uid.generate_uid()
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    commit.ReferencedSOPSequence = [ref]
    try:
        out = {"echo": assoc.send_c_echo().Status, "store": assoc.send_c_store(ds).Status}
        find = [s.Status for s, _ in assoc.send_c_find(q, FIND)]
        out["find"], out["find_matches"] = find[-1], find.count(0xFF00)
        out["get"] = [s.Status for s, _ in assoc.send_c_get(q, GET)][-1]
        out["got"] = len(got)
        out["move"] = [s.Status for s, _ in assoc.send_c_move(q, "NOWHERE", MOVE)][-1]
        status, _ = assoc.send_n_action(commit, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        out["commitment"] = status.Status
    finally:
        assoc.release()
    return out


def test_each_service_granted_or_refused_per_remote_over_loopback(make_server, tmp_path):
    cfg = config(tmp_path, '[remotes.ECHOONLY]\nhost = "127.0.0.1"\nport = 104\nservices = ["echo"]\n'
                           '[remotes.NOGET]\nhost = "localhost"\nport = 104\ncheck_host = true\n'
                           'services = ["echo", "store", "find", "move", "commitment"]\n')
    server = make_server("--workers", "1", "--config", str(cfg))
    assert ("unknown calling AEs may use echo, store, find, move, get, commitment from this machine (loopback) "
            "and echo, store, commitment from other hosts") in server.log()
    mine, theirs = copies(MR, tmp_path / "a", 1, "a")[0], copies(MR, tmp_path / "b", 1, "b")[0]

    unknown = _every_service(server.port, "ANYONE", mine)  # not configured, from loopback: everything
    assert unknown == {"echo": 0, "store": 0, "find": 0, "find_matches": 1, "get": 0, "got": 1,
                       "move": 0xA801, "commitment": 0}  # 0xA801: past the check, NOWHERE is no destination
    limited = _every_service(server.port, "ECHOONLY", theirs)
    assert limited == {"echo": 0, "store": NOT_AUTHORIZED, "find": NOT_AUTHORIZED, "find_matches": 0,
                       "get": NOT_AUTHORIZED, "got": 0, "move": NOT_AUTHORIZED, "commitment": NOT_AUTHORIZED}
    noget = _every_service(server.port, "NOGET", mine)  # check_host: localhost is where it calls from
    assert noget["find_matches"] == 1 and noget["get"] == NOT_AUTHORIZED and noget["got"] == 0

    refused = audit_refusals(server.data_dir)
    assert sorted(r["what"] for r in refused if r["calling_ae"] == "ECHOONLY") == \
        ["commitment", "find", "get", "move", "store"]
    assert [r["what"] for r in refused if r["calling_ae"] == "NOGET"] == ["get"]
    assert all("not authorized" in r["reason"] for r in refused)
    # the refused C-STORE stored nothing
    q = Dataset()
    q.QueryRetrieveLevel, q.SOPInstanceUID = "IMAGE", pydicom.dcmread(theirs).SOPInstanceUID
    assoc, _ = _associate(server.port, "ANYONE")
    try:
        assert [s.Status for s, _ in assoc.send_c_find(q, FIND)] == [0]
    finally:
        assoc.release()


# --- DCMTK over loopback: associations that propose nothing allowed are rejected -------------

def test_dcmtk_tools_rejected_at_association_for_services_not_granted(make_server, tmp_path):
    cfg = config(tmp_path, '[remotes.ECHOONLY]\nhost = "127.0.0.1"\nport = 104\nservices = ["echo"]\n'
                           '[remotes.STOREONLY]\nhost = "127.0.0.1"\nport = 104\nservices = ["store"]\n')
    server = make_server("--workers", "1", "--config", str(cfg))
    mr = copies(MR, tmp_path / "mr", 1, "mr")[0]
    study = pydicom.dcmread(mr).StudyInstanceUID

    def run(tool: str, aet: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dcmtk(tool), "-aet", aet, "-aec", "STOWAGE", HOST, str(server.port), *args],
                              capture_output=True, text=True, timeout=60)

    assert run("echoscu", "ECHOONLY").returncode == 0
    assert run("storescu", "STOREONLY", str(mr)).returncode == 0
    keys = ("-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")
    for tool, aet, args in (("storescu", "ECHOONLY", (str(mr),)), ("echoscu", "STOREONLY", ()),
                            ("findscu", "STOREONLY", keys), ("getscu", "ECHOONLY", (*keys, "-od", str(tmp_path))),
                            ("movescu", "STOREONLY", (*keys, "-aem", "STOREONLY"))):
        r = run(tool, aet, *args)
        assert r.returncode != 0 and "Association Rejected" in r.stdout + r.stderr, (tool, aet, r.stdout + r.stderr)
    r = run("findscu", "ANYONE", *keys)  # an unknown AE on this machine finds it
    assert r.returncode == 0 and study in r.stdout + r.stderr, r.stdout + r.stderr
    assert [(r["calling_ae"], r["what"]) for r in audit_refusals(server.data_dir)] == \
        [("ECHOONLY", "association"), ("STOREONLY", "association"), ("STOREONLY", "association"),
         ("ECHOONLY", "association"), ("STOREONLY", "association")]


# --- TLS: a certificate naming the AE -------------------------------------------------------

def test_require_certificate_naming_the_remote(make_server, tmp_path, certs):  # noqa: F811
    from test_tls_scp import tls_client
    tls_port = free_port()
    cfg = config(tmp_path, f'tls_port = {tls_port}\ntls_cert = "{certs / "server.pem"}"\n'
                           f'tls_key = "{certs / "server.key"}"\ntls_ca = "{certs / "ca.pem"}"\n'
                           '[remotes.NAMED]\nhost = "127.0.0.1"\nport = 104\nrequire_certificate = true\n'
                           '[remotes.ELSEWHERE]\nhost = "ct.example.org"\nport = 104\nrequire_certificate = true\n')
    server = make_server("--workers", "1", "--config", str(cfg))

    def echo(aet: str, tls: bool) -> bool:
        ae = AE(aet)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(HOST, tls_port if tls else server.port, ae_title="STOWAGE",
                             tls_args=(tls_client(certs), HOST) if tls else None)
        ok = assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release() if assoc.is_established else None
        return ok

    # the client certificate (CN=client, subjectAltName IP:127.0.0.1) names NAMED's host
    assert echo("NAMED", tls=True)
    assert not echo("NAMED", tls=False)       # the plain port: no certificate at all
    assert not echo("ELSEWHERE", tls=True)    # a certificate, but not one naming ct.example.org
    reasons = [r["reason"] for r in audit_refusals(server.data_dir)]
    assert len(reasons) == 2 and "(it called the plain port)" in reasons[0] and "ct.example.org" in reasons[1]


# --- another host: a private network namespace -------------------------------------------------

@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: (namespace, our address, its
    address), private addresses; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (ip netns add); CI runs as root")
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"stw{tag}", f"stwh{tag}", f"stwn{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    ours, theirs = f"{subnet}.1", f"{subnet}.2"
    steps = [["ip", "netns", "add", ns], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns], ["ip", "addr", "add", f"{ours}/30", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{theirs}/30", "dev", there],
             ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=30)
        yield ns, ours, theirs
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_other_host_unknown_ae_may_store_but_not_find_or_get(make_server, tmp_path, netns):
    ns, ours, theirs = netns
    cfg = config(tmp_path, f'[remotes.WARD]\nhost = "{theirs}"\nport = 104\ncheck_host = true\n'
                           f'[remotes.WRONGHOST]\nhost = "{ours[:-1]}3"\nport = 104\ncheck_host = true\n')
    server = make_server("--workers", "1", "--config", str(cfg), "--bind", ours, start=False)
    server.start(wait=False)
    wait_for(lambda: "listening on" in server.log(), 60, lambda: f"stowage serve listening:\n{server.log()}")
    mr = copies(MR, tmp_path / "mr", 1, "mr")[0]
    study = pydicom.dcmread(mr).StudyInstanceUID
    keys = ("-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")

    def inside(tool: str, aet: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, dcmtk(tool), "-aet", aet, "-aec", "STOWAGE", ours,
                               str(server.port), *args], capture_output=True, text=True, timeout=60)

    assert inside("echoscu", "STRANGER").returncode == 0
    r = inside("storescu", "STRANGER", str(mr))
    assert r.returncode == 0, r.stdout + r.stderr
    r = inside("findscu", "STRANGER", *keys)  # proposes only C-FIND: rejected at association
    assert r.returncode != 0 and "Association Rejected" in r.stdout + r.stderr, r.stdout + r.stderr
    got = tmp_path / "got"
    got.mkdir()
    # getscu also proposes the storage classes (to take the instances back), which a stranger
    # may use: the association is accepted and the C-GET answered 0x0124 Not Authorized
    r = inside("getscu", "STRANGER", *keys, "-od", str(got))
    assert "0x124" in r.stdout + r.stderr and not list(got.iterdir()), r.stdout + r.stderr
    r = inside("findscu", "WARD", *keys)  # configured, from its host: served
    assert r.returncode == 0 and study in r.stdout + r.stderr, r.stdout + r.stderr
    r = inside("echoscu", "WRONGHOST")   # configured for another host: turned away
    assert "Calling AE Title Not Recognized" in r.stdout + r.stderr, r.stdout + r.stderr
    refused = audit_refusals(server.data_dir)
    assert [(r["calling_ae"], r["what"], r["peer"]) for r in refused] == \
        [("STRANGER", "association", theirs), ("STRANGER", "get", theirs), ("WRONGHOST", "association", theirs)]
    assert "may not use find (unknown_ae_services)" in refused[0]["reason"]
    assert f"configured for host '{ours[:-1]}3', not {theirs}" in refused[2]["reason"]
