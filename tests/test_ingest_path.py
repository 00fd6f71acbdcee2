"""The two receive paths: storage-only associations on the lean path (engine/receive/ingest.py),
everything else on pynetdicom; both store the same bytes."""
from __future__ import annotations

import json
import subprocess
import time

import pydicom
from pynetdicom import AE, _config
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from conftest import CT, HOST, copies, dataset_bytes, dcmtk, export_all
from test_store import assert_exported_identical


def paths_taken(data_dir, *calling: str) -> dict[str, set[str]]:
    """calling AE -> the receive paths its associations took, from the audit log (which
    gets the line as the worker finishes the association, a moment after the release)."""
    taken: dict[str, set[str]] = {}
    for _ in range(50):
        taken = {}
        for line in (data_dir / "audit.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "association":
                taken.setdefault(entry["calling_ae"], set()).add(entry["path"])
        if all(ae in taken for ae in calling):
            break
        time.sleep(0.1)
    return taken

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def test_small_pdus_fragment_commands_and_datasets(server, tmp_path):
    """A 4 KB maximum PDU splits every dataset (and the command) over many PDVs and PDUs."""
    files = copies(CT, tmp_path / "in", 5, "frag")
    r = subprocess.run([dcmtk("storescu"), "--max-pdu", "4096", "-aec", "STOWAGE", HOST, str(server.port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_exported_identical(server.data_dir, tmp_path / "out", files)


def _store_with(ae: AE, port: int, paths, ext_neg=None) -> list[int]:
    assoc = ae.associate(HOST, port, ae_title="STOWAGE", ext_neg=ext_neg)
    assert assoc.is_established
    statuses = [assoc.send_c_store(p).Status for p in paths]
    assoc.release()
    return statuses


def test_mixed_association_is_served_by_pynetdicom(server, tmp_path, monkeypatch):
    """Storage proposed beside a query class, or with role selection, takes the pynetdicom
    path; the stored bytes are the same."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    a, b = copies(CT, tmp_path / "a", 2, "a"), copies(CT, tmp_path / "b", 2, "b")
    mixed = AE("MIXED")
    mixed.add_requested_context(CT_STORAGE, ["1.2.840.10008.1.2.1"])
    mixed.add_requested_context(STUDY_ROOT_FIND)
    assert _store_with(mixed, server.port, a) == [0, 0]
    roles = AE("ROLES")
    roles.add_requested_context(CT_STORAGE, ["1.2.840.10008.1.2.1"])
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CT_STORAGE, True, False
    assert _store_with(roles, server.port, b, ext_neg=[role]) == [0, 0]
    taken = paths_taken(server.data_dir, "MIXED", "ROLES")
    assert taken["MIXED"] == {"pynetdicom"} and taken["ROLES"] == {"pynetdicom"}
    out = tmp_path / "out"
    assert export_all(server.data_dir, out).returncode == 0
    for f in a + b:
        uid = pydicom.dcmread(f).SOPInstanceUID
        assert dataset_bytes(out / f"{uid}.dcm") == dataset_bytes(f)


def test_echo_and_store_on_one_lean_association(server, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    (f,) = copies(CT, tmp_path / "in", 1, "e")
    ae = AE("LEAN")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(CT_STORAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(f).Status == 0
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert assoc.is_released
    assert paths_taken(server.data_dir, "LEAN")["LEAN"] == {"lean"}
