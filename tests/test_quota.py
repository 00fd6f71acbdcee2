"""The storage quota (`max_storage_bytes`) against a running archive, with real peers:
`refuse` answers 0xA700 with an Error Comment once the quota is reached and stores resume
once space is freed (delete, compact); `delete-oldest` deletes the studies received
first, never those of protected patients, and refuses when only those are left."""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from conftest import HOST, catalog_sealed, dcmtk, series_instances, wait_for
from stowage.engine.lifecycle.quota import EXHAUSTED
from stowage.engine.store.usage import segment_bytes
from test_compaction import query, stowage, store

pytestmark = pytest.mark.timeout(600)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENV = {"STOWAGE_SEGMENT_SIZE": "200000", "STOWAGE_SEAL_INTERVAL": "0.2", "STOWAGE_COMPACT_GRACE": "0"}


def store_one(port: int, path: Path) -> tuple[int, str]:
    """(status, Error Comment) of one C-STORE by pynetdicom."""
    ae = AE("QUOTATEST")
    ae.add_requested_context(CT_IMAGE, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(pydicom.dcmread(path))
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def served(data_dir: Path) -> dict[str, int]:
    """Instances served per study."""
    return {r["s"]: r["n"] for r in query(data_dir, "SELECT study_instance_uid AS s, count(*) AS n "
                                                    "FROM instances GROUP BY 1")}


def studies_found(port: int, out: Path) -> set[str]:
    """Study Instance UIDs DCMTK findscu finds."""
    import subprocess
    for p in out.glob("rsp*.dcm") if out.exists() else ():
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-X", "-od", str(out), "-k",
                        "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", HOST, str(port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {str(pydicom.dcmread(p).StudyInstanceUID) for p in out.glob("rsp*.dcm")}


def test_refuse_answers_out_of_resources_then_resumes_once_space_is_freed(make_server, tmp_path):
    limit = 600_000
    server = make_server("--workers", "2", STOWAGE_MAX_STORAGE_BYTES=str(limit), STOWAGE_COMPACT_INTERVAL="0", **ENV)
    data = server.data_dir
    study, series = generate_uid(), generate_uid()
    files = series_instances(tmp_path / "in", "QUOTA1", study, series, 40)  # about 1.2 MB stored: twice the quota
    statuses = [store_one(server.port, p) for p in files]
    stored = [p for p, (status, _c) in zip(files, statuses) if status == 0]
    refused = [(status, comment) for status, comment in statuses if status != 0]
    assert stored and refused, statuses
    assert {s for s, _c in refused} == {0xA700}
    assert all("quota" in c and "max_storage_bytes" in c for _s, c in refused), refused
    assert served(data) == {study: len(stored)}
    assert sum(p.stat().st_size for p in (data / "segments").glob("*.seg")) <= limit
    # DCMTK storescu gets the same answer
    more = series_instances(tmp_path / "more", "QUOTA1", study, generate_uid(), 1)
    import subprocess
    r = subprocess.run([dcmtk("storescu"), "-d", "-aec", "STOWAGE", HOST, str(server.port), str(more[0])],
                       capture_output=True, text=True, timeout=60)
    said = r.stdout + r.stderr
    assert "0xa700: Refused: Out of resources" in said and "storage quota (max_storage_bytes) reached" in said, said

    r = stowage("delete", "--data-dir", str(data), "--study", study, "--yes")
    assert r.returncode == 0, r.stderr
    # compaction rewrites only segments catalogued to their end
    wait_for(lambda: catalog_sealed(data), 60, "the sealer to catalogue every segment")
    r = stowage("compact", "--data-dir", str(data), env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    # What the store path weighs against the quota (engine/store/usage.py: this close to the
    # quota it asks again before every store) has room for the instance now.
    incoming = more[0].stat().st_size
    wait_for(lambda: segment_bytes(data) + incoming <= limit, 60,
             lambda: f"the segments ({segment_bytes(data)} bytes) to leave room under the quota: {r.stdout}")
    status, comment = store_one(server.port, more[0])
    assert status == 0, comment
    assert served(data) == {study: 1}


def test_delete_oldest_keeps_protected_patients_and_refuses_when_only_they_are_left(make_server, tmp_path):
    limit = 700_000
    server = make_server("--workers", "2", STOWAGE_MAX_STORAGE_BYTES=str(limit), STOWAGE_QUOTA_POLICY="delete-oldest",
                         STOWAGE_PROTECTED_PATIENTS="PROT", STOWAGE_COMPACT_INTERVAL="1", **ENV)
    data = server.data_dir
    uids = {k: generate_uid() for k in ("P", "S1", "S2", "S3")}
    patients = {"P": "PROT", "S1": "OLD1", "S2": "OLD2", "S3": "NEW"}
    for key in ("P", "S1", "S2", "S3"):  # received in this order (store() returns once all are acknowledged)
        store(server.port, series_instances(tmp_path / key, patients[key], uids[key], generate_uid(), 8))
    # 32 instances, about 0.93 MB: over the quota. Down to 90 % of it, oldest first, P spared.
    def oldest_gone() -> dict[str, int] | None:
        s = served(data)
        return s if uids["S1"] not in s and uids["S2"] not in s else None

    left = wait_for(oldest_gone, 90, lambda: f"the two oldest studies to be deleted: {served(data)}\n{server.log()[-3000:]}")
    assert left == {uids["P"]: 8, uids["S3"]: 8}, left
    assert studies_found(server.port, tmp_path / "find") == {uids["P"], uids["S3"]}
    # Who deleted what: the audit (the tombstones are pruned once compaction has dropped
    # the records they hid, issue #20, so they cannot say it any more)
    audit = [json.loads(line) for line in (data / "audit.jsonl").read_text().splitlines()]
    deletions = [a for a in audit if a.get("event") == "delete"]
    assert {(a["reason"], a["actor"]) for a in deletions} == {("quota", "quota")}, deletions
    assert {uids["S1"], uids["S2"]} <= {v for a in deletions for v in a["values"]}, deletions

    # Protected data alone over the quota: S3 goes, then stores are refused, P is kept whole.
    store(server.port, series_instances(tmp_path / "P2", "PROT", uids["P"], generate_uid(), 24))
    wait_for(lambda: (data / EXHAUSTED).exists(), 90, lambda: f"{EXHAUSTED}\n{server.log()[-3000:]}")
    assert served(data) == {uids["P"]: 32}
    extra = series_instances(tmp_path / "extra", "NEW", generate_uid(), generate_uid(), 1)
    status, comment = store_one(server.port, extra[0])
    assert status == 0xA700 and "quota" in comment, (hex(status), comment)

    # The administrator frees space: stores resume.
    r = stowage("delete", "--data-dir", str(data), "--patient", "PROT", "--yes")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not (data / EXHAUSTED).exists(), 90, lambda: f"{EXHAUSTED} to go\n{server.log()[-3000:]}")
    # Without the flag the store path does not refuse: it reads the flag again before every
    # store while it last saw it (engine/store/usage.py), so the very next store is taken.
    status, comment = store_one(server.port, extra[0])
    assert status == 0, comment
