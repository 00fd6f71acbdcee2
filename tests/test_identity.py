"""One identity (issue #18): stowage's own Implementation Class UID and a Version Name
taken from the package version, on every association it accepts (the lean storage path
and the pynetdicom path) or requests (echo, send), and in every file it writes."""
from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from conftest import CT, HOST, export_all, free_port
from test_send import store, stowage

import stowage as package
from stowage.protocol.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

IDENTITY = (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)


def test_the_identity_is_ours_and_follows_the_package_version():
    assert IMPLEMENTATION_CLASS_UID.startswith("2.25.") and pydicom.uid.UID(IMPLEMENTATION_CLASS_UID).is_valid
    assert IMPLEMENTATION_VERSION_NAME == f"STOWAGE_{package.__version__}" and len(IMPLEMENTATION_VERSION_NAME) <= 16


@pytest.mark.parametrize("context", [CTImageStorage, Verification], ids=["lean storage path", "pynetdicom path"])
def test_associations_we_accept_carry_our_identity(server, context):
    ae = AE("IDCHECK")
    ae.add_requested_context(context)
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        got = (str(assoc.acceptor.implementation_class_uid), assoc.acceptor.implementation_version_name)
    finally:
        assoc.release()
    assert got == IDENTITY


class Peer:
    """A pynetdicom SCP that records the identity of every association it is asked for."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.port = free_port()
        ae = AE("PEER")
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._lock = threading.Lock()
        handlers = [(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_STORE, lambda e: 0x0000)]
        self.server = ae.start_server((HOST, self.port), block=False, evt_handlers=handlers)

    def _accepted(self, event) -> None:
        with self._lock:
            self.seen.append((str(event.assoc.requestor.implementation_class_uid),
                              event.assoc.requestor.implementation_version_name))


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.server.shutdown()


def test_associations_we_request_carry_our_identity(make_server, tmp_path, peer):
    srv = make_server()
    store(srv.port, [CT])
    r = stowage("echo", f"{HOST}:{peer.port}", "--aec", "PEER", "--data-dir", str(srv.data_dir))
    assert r.returncode == 0, r.stderr
    r = stowage("send", "--to", f"{HOST}:{peer.port}", "--aec", "PEER", "--data-dir", str(srv.data_dir),
                "--instance", pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(peer.seen) == 2 and set(peer.seen) == {IDENTITY}


def test_files_we_write_carry_our_identity(server, tmp_path: Path):
    store(server.port, [CT])
    out = tmp_path / "out"
    r = export_all(server.data_dir, out)
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("*.dcm")
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    assert (meta.ImplementationClassUID, meta.ImplementationVersionName) == IDENTITY
