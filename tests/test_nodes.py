"""Several nodes answering as one archive (issue #24 part 3, docs/scale-out.md).

Real parts on loopback, started once for the module: SeaweedFS (segments and the Iceberg
warehouse in one bucket), one SQLite Iceberg catalog file shared by two `stowage serve`
nodes, Debian's HAProxy in front of them, DCMTK storescu/findscu/movescu/getscu and a DCMTK
storescp as the C-MOVE destination. What a user checks: what went in through the balancer
is found on each node; a study node A stored is moved and got from node B byte for byte;
a delete on A blinds B; the same SOP Instance UID sent to both nodes is served once, as
the duplicates policy says; a node killed mid-ingest loses no acknowledged instance; after
A compacts, B still gets A's moved records, and A's compaction reclaims A's records that B
deleted; a node whose disk is lost keeps its deletions and publishes none of its rows twice.
Every wait is bounded by BOUND: the nodes' cluster_refresh and iceberg_interval are 0.5 s
here, so the view is seconds old at most, and BOUND leaves room for a loaded machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from conftest import CT, HOST, MR, Server, copies, dataset_bytes, dcmtk, free_port, storescu, wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS (fixture)
from test_haproxy import BALANCER, Balancer, _audit
from test_move import key_options
from test_send import store as store_exact
from test_commitment import Modality, refs_of
from test_delete import uid_of
from test_rejection import rejection_note, store_one

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (Debian package)")]
BOUND = 60.0  # seconds: the staleness bound (about 1 s here) with room for a busy 2-core machine
NODE_CONFIG = f"""
proxy_protocol_from = ["{BALANCER}"]
http_processes = 1
[remotes.DEST]
host = "{HOST}"
port = {{dest_port}}
"""


class Pair:
    def __init__(self, tmp: Path, s3) -> None:
        self.tmp = tmp
        self.s3, self.bucket = s3, s3.new_bucket("nodes")
        self.dest_port, self.dest_out = free_port(), tmp / "dest"
        self.dest_out.mkdir()
        self.dest = subprocess.Popen([dcmtk("storescp"), "+B", "-aet", "DEST", "-od", str(self.dest_out),
                                      str(self.dest_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cfg = tmp / "node.toml"
        cfg.write_text(NODE_CONFIG.format(dest_port=self.dest_port))
        common = {**s3.env(), "STOWAGE_STORAGE": f"s3://{self.bucket}/archive", "STOWAGE_S3_ENDPOINT": s3.endpoint,
                  "STOWAGE_S3_PATH_STYLE": "true", "STOWAGE_S3_READ_BLOCK": "16384",
                  # segments roll by age (segment_max_age), not size: what a node stored is
                  # sealed and uploaded within about a second, as a quiet node's would be
                  "STOWAGE_SEGMENT_MAX_AGE": "0.5", "STOWAGE_SEAL_INTERVAL": "0.2", "STOWAGE_UPLOAD_INTERVAL": "0.2",
                  "STOWAGE_SCRUB_RATE": "0", "STOWAGE_COMPACT_INTERVAL": "0",
                  # a compacted-away segment's object goes a second after the table's rows follow it
                  "STOWAGE_COMPACT_GRACE": "1",
                  "STOWAGE_ICEBERG_CATALOG": f"sqlite:///{tmp / 'iceberg.db'}",
                  "STOWAGE_ICEBERG_WAREHOUSE": f"s3://{self.bucket}/warehouse",
                  "STOWAGE_ICEBERG_INTERVAL": "0.5", "STOWAGE_CLUSTER_REFRESH": "0.5"}
        self.env = {name: {**common, "STOWAGE_NODE_NAME": name} for name in "ab"}
        self.http = {name: free_port() for name in "ab"}
        self.nodes = {name: Server(tmp / name, free_port(), ["--workers", "1", "--config", str(cfg),
                                                                 "--http-port", str(self.http[name])],
                                   self.env[name], log_dir=tmp) for name in "ab"}
        for node in self.nodes.values():
            node.start()
        self.balancer = Balancer(tmp, [(name, n.port, self.http[name]) for name, n in self.nodes.items()])
        self.balancer.wait_states({"a": "UP", "b": "UP", "http:a": "UP", "http:b": "UP"})

    def stowage(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stowage.cli", *args, "--data-dir", str(self.nodes[name].data_dir)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, **self.env[name]))

    def logs(self) -> str:
        return "\n".join(f"--- node {name}:\n{n.log()[-2500:]}" for name, n in self.nodes.items())

    def stop(self) -> None:
        self.balancer.stop()
        for node in self.nodes.values():
            node.kill()
        self.dest.terminate()
        self.dest.wait(10)


@pytest.fixture(scope="module")
def pair(s3_server, tmp_path_factory):  # noqa: F811 - the session's fixture
    p = Pair(tmp_path_factory.mktemp("nodes"), s3_server)
    try:
        yield p
    finally:
        p.stop()



def find(port: int, level: str, **keys: str) -> list[pydicom.Dataset]:
    """findscu (Study Root) at `level`: the responses' identifiers."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"findscu-{os.getpid()}-{threading.get_ident()}-{free_port()}"
    out.mkdir(parents=True)
    args = [dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-X", "-od", str(out), "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    r = subprocess.run([*args, HOST, str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    found = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    return found


def studies_on(port: int) -> set[str]:
    return {str(ds.StudyInstanceUID) for ds in find(port, "STUDY", StudyInstanceUID="")}


def instances_on(port: int, study: str) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in find(port, "IMAGE", StudyInstanceUID=study, SOPInstanceUID="")}


def getscu(port: int, out: Path, **keys: str) -> tuple[subprocess.CompletedProcess, dict[str, bytes]]:
    """getscu (Study Root): the dataset bytes received, by SOP Instance UID."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    r = subprocess.run([dcmtk("getscu"), "+B", "-S", "-aet", "GETSCU", "-aec", "STOWAGE", "-od", str(out),
                        *key_options(keys), HOST, str(port)], capture_output=True, text=True, timeout=120)
    return r, {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
               for p in out.iterdir()}


def own_study(files: list[Path]) -> list[Path]:
    """The files moved into a study of their own (copies() keeps the source's study)."""
    study = pydicom.uid.generate_uid()
    for p in files:
        d = pydicom.dcmread(p)
        d.StudyInstanceUID = study
        d.save_as(p)
    return files


def by_uid(files: list[Path]) -> dict[str, bytes]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p) for p in files}


def study_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_stored_through_the_balancer_and_found_on_each_node(pair, tmp_path):
    batches = [own_study(copies(src, tmp_path / f"s{i}", 3, f"lb{i}")) for i, src in enumerate((CT, MR, CT))]
    for files in batches:  # one association each: the balancer spreads them over the nodes
        storescu(pair.balancer.port, files)
    wanted = {study_of(files): 3 for files in batches}
    held = {name: len(list((n.data_dir / "segments").glob("*.seg"))) for name, n in pair.nodes.items()}
    assert all(held.values()), f"both nodes took associations: {held}"

    def counts(port: int) -> dict[str, int]:
        return {str(d.StudyInstanceUID): int(d.NumberOfStudyRelatedInstances)
                for d in find(port, "STUDY", StudyInstanceUID="\\".join(wanted), NumberOfStudyRelatedInstances="")}
    for name, node in pair.nodes.items():
        wait_for(lambda: counts(node.port) == wanted, BOUND, lambda: f"node {name} finds every study\n{pair.logs()}",
                 0.5)
    for name, port in pair.http.items():  # QIDO-RS on each node answers for the whole archive too
        with urllib.request.urlopen(f"http://{HOST}:{port}/dicom-web/studies?limit=1000", timeout=30) as r:
            qido = {s["0020000D"]["Value"][0] for s in json.load(r)}
        assert set(wanted) <= qido, name


def test_node_b_moves_and_gets_what_node_a_stored_byte_exact(pair, tmp_path):
    files = own_study(copies(CT, tmp_path / "a-only", 4, "aonly"))
    sent = by_uid(files)
    study = study_of(files)
    store_exact(pair.nodes["a"].port, files)  # as the files' data set bytes, so that `sent` is what a received
    b = pair.nodes["b"].port
    wait_for(lambda: instances_on(b, study) == set(sent), BOUND, lambda: f"node b sees a's study\n{pair.logs()}",
             0.5)
    got: dict[str, bytes] = {}

    def all_got() -> bool:  # a's last segment reaches the bucket a moment after its row reaches Iceberg
        nonlocal got
        _r, got = getscu(b, tmp_path / "get", QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        return set(got) == set(sent)
    wait_for(all_got, BOUND, lambda: f"C-GET from b of a's study\n{pair.logs()}", 0.5)
    assert got == sent, "C-GET from node b: the datasets node a received, byte for byte"
    for p in pair.dest_out.iterdir():
        p.unlink()
    r = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aec", "STOWAGE", "-aem", "DEST",
                        *key_options({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}), HOST, str(b)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert by_uid(sorted(pair.dest_out.iterdir())) == sent, "C-MOVE from node b: byte for byte"
    # WADO-RS on node b: one of a's instances as a Part-10 part holding the data set received
    uid = sorted(sent)[0]
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    request = urllib.request.Request(f"http://{HOST}:{pair.http['b']}/dicom-web/studies/{study}/series/{series}/"
                                     f"instances/{uid}", headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200 and sent[uid] in r.read()
    # storage commitment on node b of a's instances: committed (b reads each record back)
    modality = Modality()
    refs = refs_of(files)
    status, assoc = modality.request(b, refs, release=False)
    try:
        assert status.Status == 0
        report = modality.report(BOUND)
    finally:
        assoc.release()
    assert report.committed() == {i for _c, i in refs} and not report.failed()
    # export on node b writes a's instances too
    out = tmp_path / "export"
    r = pair.stowage("b", "export", "--out", str(out), "--study", study)
    assert r.returncode == 0, r.stdout + r.stderr
    assert by_uid(sorted(out.glob("*.dcm"))) == sent


def test_delete_on_a_blinds_b(pair, tmp_path):
    files = own_study(copies(MR, tmp_path / "del", 3, "del"))
    study = study_of(files)
    storescu(pair.nodes["b"].port, files)  # stored by b, deleted on a: a's view must know it first
    a, b = pair.nodes["a"].port, pair.nodes["b"].port
    wait_for(lambda: len(instances_on(a, study)) == 3, BOUND, lambda: f"node a sees b's study\n{pair.logs()}", 0.5)
    r = pair.stowage("a", "delete", "--yes", "--study", study)
    assert r.returncode == 0, r.stdout + r.stderr
    assert instances_on(a, study) == set(), "node a hides it at once"
    wait_for(lambda: instances_on(b, study) == set() and study not in studies_on(b), BOUND,
             lambda: f"node b blind to the study node a deleted\n{pair.logs()}", 0.5)
    _r, got = getscu(b, tmp_path / "get", QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    assert got == {}, "nothing retrieved of a deleted study"



def test_a_rejection_note_on_a_refuses_its_instances_on_b(pair, tmp_path):
    """rejected_reaccept off (the default): once a's note is in b's view, b refuses a copy
    of an instance it rejects (held by a, or held by no node) as a does: 0xA771, the same
    Error Comment, nothing stored."""
    a, b = pair.nodes["a"], pair.nodes["b"]
    files = own_study(copies(CT, tmp_path / "rej", 4, "rej"))
    study, uids = study_of(files), [uid_of(p) for p in files]
    store_exact(a.port, files[:3])  # files[3]: never held by any node
    storescu(a.port, [rejection_note(tmp_path / "note", [files[0], files[3]])])
    assert uids[0] not in instances_on(a.port, study)
    answers = {"a": (store_one(a.port, files[0]), store_one(a.port, files[3]))}

    def in_b_view() -> bool:  # a's study and the note's two deletions folded into b's view, read as a
        from stowage.catalog import cluster_view  # user would (a's deletions may be published before its rows)
        view_dir = cluster_view.directory(b.data_dir)
        names = cluster_view.load(view_dir).deletions
        rejected = {u for n in names for u in pq.read_table(view_dir / n, columns=["sop_instance_uid"])
                    ["sop_instance_uid"].to_pylist()}
        if not {uids[0], uids[3]} <= rejected:
            return False
        found = instances_on(b.port, study)
        return set(uids[1:3]) <= found and uids[0] not in found
    wait_for(in_b_view, BOUND, lambda: f"a's note in b's view\n{pair.logs()}", 0.5)
    answers["b"] = (store_one(b.port, files[0]), store_one(b.port, files[3]))
    for node, statuses in answers.items():
        assert [int(s.Status) for s in statuses] == [0xA771, 0xA771], node
    assert [str(s.ErrorComment) for s in answers["b"]] == [str(s.ErrorComment) for s in answers["a"]]
    assert "rejected by a rejection note (113001)" in str(answers["b"][0].ErrorComment)
    found = instances_on(b.port, study)
    assert set(uids[1:3]) <= found and not {uids[0], uids[3]} & found, "b stored neither copy"
    assert not {uids[0], uids[3]} & set(_places(b, study)), "no record of them in b's own catalog"


def _variant(src: Path, uid: str, study: str, series: str, name: str, out: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName = name
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@contextlib.contextmanager
def exact_bytes():
    """pynetdicom sends each file's data set bytes as they are (chunked mode), not re-encoded."""
    from pynetdicom import _config
    before, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def _store_one(port: int, path: Path) -> int:
    ae = AE("DUPS")
    ae.add_requested_context(CTImageStorage, pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        with exact_bytes():
            return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_same_instance_on_both_nodes_is_served_once_by_the_duplicates_policy(pair, tmp_path):
    """keep-newest (the default) across nodes as on one: the newest received copy is served."""
    a, b = pair.nodes["a"].port, pair.nodes["b"].port
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    # at once: both nodes store it (neither has seen the other's); both serve the newer
    uid = pydicom.uid.generate_uid()
    paths = [_variant(CT, uid, study, series, f"AT^ONCE{n}", tmp_path / f"once-{n}.dcm") for n in "ab"]
    statuses: dict[str, int] = {}
    threads = [threading.Thread(target=lambda n=n, p=p, port=port: statuses.__setitem__(n, _store_one(port, p)))
               for n, p, port in zip("ab", paths, (a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == {"a": 0, "b": 0}

    def served(port: int) -> bytes | None:
        _r, got = getscu(port, tmp_path / f"get-{port}", QueryRetrieveLevel="IMAGE", StudyInstanceUID=study,
                         SeriesInstanceUID=series, SOPInstanceUID=uid)
        return got.get(uid) if len(got) == 1 else None
    copies_ = {dataset_bytes(p) for p in paths}
    wait_for(lambda: served(a) is not None and served(a) == served(b), BOUND,
             lambda: f"both nodes serve one copy\n{pair.logs()}", 0.5)
    assert served(a) in copies_
    assert [str(d.SOPInstanceUID) for d in find(a, "IMAGE", StudyInstanceUID=study, SOPInstanceUID="")] == [uid]
    assert [str(d.SOPInstanceUID) for d in find(b, "IMAGE", StudyInstanceUID=study, SOPInstanceUID="")] == [uid]

    # one after the other: a stores it, b (once its view has it) gets the same copy, then a
    # newer, different one. A study b has not looked at lately: its store path keeps what it
    # found of a study for up to 30 s (engine/store/served_versions.py), on one node as here.
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    uid2 = pydicom.uid.generate_uid()
    first = _variant(CT, uid2, study, series, "FIRST", tmp_path / "first.dcm")
    second = _variant(CT, uid2, study, series, "SECOND", tmp_path / "second.dcm")
    assert _store_one(a, first) == 0
    wait_for(lambda: uid2 in instances_on(b, study), BOUND, lambda: f"b sees a's copy\n{pair.logs()}", 0.5)
    assert _store_one(b, first) == 0, "identical copy: success, already held"
    assert _store_one(b, second) == 0, "different copy under keep-newest: stored"

    def newest_everywhere() -> bool:
        return all(getscu(port, tmp_path / f"g2-{port}", QueryRetrieveLevel="IMAGE", StudyInstanceUID=study,
                          SeriesInstanceUID=series, SOPInstanceUID=uid2)[1].get(uid2) == dataset_bytes(second)
                   for port in (a, b))
    wait_for(newest_everywhere, BOUND, lambda: f"both nodes serve the newest copy\n{pair.logs()}", 0.5)
    held = [d for d in _audit(pair.nodes["b"].data_dir, "duplicate") if d.get("sop_instance_uid") == uid2]
    assert any(d.get("identical") for d in held), "b's audit log says the identical copy was already held"


def test_a_node_killed_mid_ingest_loses_no_acknowledged_instance(pair, tmp_path):
    a, b = pair.nodes["a"], pair.nodes["b"]
    files = own_study(copies(CT, tmp_path / "kill", 12, "kill"))
    study = study_of(files)
    sent = by_uid(files)
    acked: list[str] = []
    ae = AE("KILLER")
    ae.add_requested_context(CTImageStorage, pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    ae.dimse_timeout = ae.network_timeout = 10  # the request in flight when a dies: given up on after this
    assoc = ae.associate(HOST, a.port, ae_title="STOWAGE")
    assert assoc.is_established
    killer = threading.Thread(target=lambda: (wait_for(lambda: len(acked) >= 4, BOUND, "four acknowledged", 0.01),
                                              a.kill()))
    killer.start()  # kill -9 of every process of node a while the stores go on
    with exact_bytes():
        for p in files:
            try:
                status = assoc.send_c_store(p)
            except Exception:
                break
            if not assoc.is_established or getattr(status, "Status", None) != 0:
                break
            acked.append(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    killer.join(BOUND)
    if assoc.is_established:
        assoc.abort()
    assert 4 <= len(acked) < len(files), len(acked)
    a.start()
    for node in (a, b):
        def everything_back(node=node) -> bool:
            _r, got = getscu(node.port, tmp_path / f"k-{node.port}", QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
            return set(acked) <= set(got) and all(got[u] == sent[u] for u in acked)
        wait_for(everything_back, BOUND, lambda: f"every acknowledged instance from {node.port}\n{pair.logs()}", 1.0)


def _places(node: Server, study: str) -> dict[str, str]:
    """SOP Instance UID -> segment of the node's own records of `study` (deleted ones too), as its catalog says."""
    from stowage.catalog.reader import Catalog
    catalog = Catalog(node.data_dir / "catalog")
    try:
        return dict(catalog.execute("SELECT sop_instance_uid, segment FROM records WHERE study_instance_uid = ?",
                                    [study])[1])
    finally:
        catalog.close()


def test_after_a_compacts_b_gets_the_moved_records_byte_exact(pair, tmp_path):
    """Store on a; delete some instances on a and some on b (b's deletion of a's records
    reaches a through the deletions table), in every segment that holds two or more, so
    that each keeps live records and loses dead ones; compact on a: its compaction drops
    them all, copies the rest into a new segment, the instances table is rewritten to
    match, and the old segments' objects are deleted. b then gets the rest from the new
    segment, byte for byte, and finds none of the deleted."""
    from stowage.catalog import manifest
    a, b = pair.nodes["a"], pair.nodes["b"]
    files = own_study(copies(CT, tmp_path / "compact", 10, "cmp"))
    sent = by_uid(files)
    study = study_of(files)
    store_exact(a.port, files)
    wait_for(lambda: instances_on(b.port, study) == set(sent), BOUND, lambda: f"b sees a's study\n{pair.logs()}", 0.5)
    before = _places(a, study)
    groups: dict[str, list[str]] = {}
    for uid, seg in sorted(before.items()):
        groups.setdefault(seg, []).append(uid)
    dead = [u for g in groups.values() if len(g) > 1 for u in g[:len(g) // 2]]
    on_a, on_b = dead[0::2], dead[1::2]
    assert on_a and on_b, f"a's segments hold the study's records one by one: {groups}"
    wait_for(lambda: set(groups) <= set(manifest.load(a.data_dir / "catalog").uploaded), BOUND,
             lambda: f"a's segments {sorted(groups)} uploaded\n{pair.logs()}", 0.5)
    for node, gone in (("a", on_a), ("b", on_b)):
        r = pair.stowage(node, "delete", "--yes", "--instance", ",".join(gone))
        assert r.returncode == 0, r.stdout + r.stderr
    kept = set(sent) - set(dead)
    wait_for(lambda: instances_on(a.port, study) == kept, BOUND, lambda: f"a hides b's deletions\n{pair.logs()}", 0.5)
    r = pair.stowage("a", "compact", "--ratio", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    after = _places(a, study)
    assert set(after) == kept, "the deleted records dropped, b's deletions too"
    replaced = {before[u] for u in dead}
    assert not replaced & set(after.values()) and all(after[u].startswith("999-") for u in kept
                                                      if before[u] in replaced), (before, after)
    objects = {n: e["key"] for n, e in manifest.load(a.data_dir / "catalog").uploaded.items() if n in replaced}
    assert set(objects) == replaced

    def deleted_from_bucket() -> bool:  # relocated in the table, purged by a compaction pass, deleted
        if not set(objects.values()) & set(pair.s3.objects(pair.bucket)):
            return True
        m = manifest.load(a.data_dir / "catalog")
        if not any(not m.relocations.get(s) for s in replaced if s in m.relocations) \
                and replaced & set(m.retired_segments):
            r = pair.stowage("a", "compact", "--ratio", "1")
            assert r.returncode == 0, r.stdout + r.stderr
        return False
    wait_for(deleted_from_bucket, BOUND, lambda: f"a's old segments' objects deleted\n{pair.logs()}", 1.0)
    got: dict[str, bytes] = {}

    def all_got() -> bool:
        nonlocal got
        _r, got = getscu(b.port, tmp_path / "get", QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        return set(got) == kept
    wait_for(all_got, BOUND, lambda: f"C-GET from b of a's compacted study: {sorted(got)}\n{pair.logs()}", 0.5)
    assert got == {u: sent[u] for u in kept}, "the datasets a received, byte for byte, from the new segment"
    assert instances_on(b.port, study) == kept


def test_a_node_that_lost_its_disk_keeps_its_deletions_and_publishes_nothing_twice(pair, tmp_path):
    """Node a's data directory deleted after its segments were uploaded and its rows and
    deletions published: started again on an empty one, it finds its deletions in the
    Iceberg deletions table (the deleted instance stays deleted) and adds none of the rows
    the instances table already holds for it again."""
    from stowage.catalog import iceberg_outbox, manifest
    from stowage.engine.iceberg.tables import open_catalog
    from stowage.engine.runtime import config as configuration
    a, b = pair.nodes["a"], pair.nodes["b"]
    files = own_study(copies(MR, tmp_path / "lost", 4, "lost"))
    sent = by_uid(files)
    study = study_of(files)
    store_exact(a.port, files)
    uids = sorted(sent)
    r = pair.stowage("a", "delete", "--yes", "--instance", uids[0])
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: instances_on(b.port, study) == set(uids[1:])
             and set(_places(a, study).values()) <= set(manifest.load(a.data_dir / "catalog").uploaded), BOUND,
             lambda: f"a's rows and deletion published, its segments uploaded\n{pair.logs()}", 0.5)
    a.kill()
    shutil.rmtree(a.data_dir)
    a.start()
    assert "deletion(s) of node a in stowage.deletions" in a.log(), a.log()[-3000:]
    assert instances_on(a.port, study) == set(uids[1:]), "deleted before the loss, deleted after it"
    catalog_dir = a.data_dir / "catalog"
    wait_for(lambda: iceberg_outbox.enabled(catalog_dir) and not iceberg_outbox.pending(catalog_dir), BOUND,
             lambda: f"a's re-indexed files through its publisher\n{pair.logs()}", 0.5)
    env = pair.env["a"]  # the bucket's credentials in the configuration (this process has no AWS_*)
    cfg = configuration.load(env={**env, "STOWAGE_DATA_DIR": str(a.data_dir), "STOWAGE_S3_ACCESS_KEY":
                                  env["AWS_ACCESS_KEY_ID"], "STOWAGE_S3_SECRET_KEY": env["AWS_SECRET_ACCESS_KEY"]}
                             ).validate()
    table = open_catalog(cfg).load_table(f"{cfg.iceberg_namespace}.instances")
    places: list[tuple[str, int]] = []
    study_rows: list[str] = []
    for path in table.inspect.data_files()["file_path"].to_pylist():
        if "/data/a/" not in path:
            continue
        with table.io.new_input(path).open() as f:
            rows = pq.read_table(pa.BufferReader(f.read()), columns=["segment", "offset", "study_instance_uid",
                                                                     "sop_instance_uid"])
        places += zip(rows["segment"].to_pylist(), rows["offset"].to_pylist())
        study_rows += [u for u, s in zip(rows["sop_instance_uid"].to_pylist(), rows["study_instance_uid"].to_pylist())
                       if s == study]
    assert places and len(places) == len(set(places)), "a record of a's in the instances table twice"
    assert sorted(study_rows) == uids, "each record once, the deleted one's row too (its deletion hides it)"
    deletions = open_catalog(cfg).load_table(f"{cfg.iceberg_namespace}.deletions").scan().to_arrow()
    assert deletions["sop_instance_uid"].to_pylist().count(uids[0]) == 1, "the deletion published once"


def _record_counts(node: Server, study: str) -> dict[str, int]:
    """SOP Instance UID -> how many records of it the node's own catalog holds (deleted ones too)."""
    from stowage.catalog.reader import Catalog
    catalog = Catalog(node.data_dir / "catalog")
    try:
        return dict(catalog.execute("SELECT sop_instance_uid, count(*) FROM records WHERE study_instance_uid = ? "
                                    "GROUP BY 1", [study])[1])
    finally:
        catalog.close()


def test_a_disk_lost_inside_compact_grace_catalogues_each_record_once(pair, tmp_path):
    """a compacts (its replaced segments' objects kept: a long compact_grace), uploads the
    output, and loses its disk before the old objects are deleted: restored, it leaves the
    replaced segments out by the compaction's journal in the bucket, so its catalog holds
    each record once; findscu finds each live instance once, getscu gets them byte-exact;
    the instances table ends with one row per live record; the old objects and the journal go."""
    from stowage.catalog import manifest
    from stowage.engine.storage.objects import segment_key
    a, b = pair.nodes["a"], pair.nodes["b"]
    files = own_study(copies(CT, tmp_path / "grace", 6, "grace"))
    sent = by_uid(files)
    study = study_of(files)
    uids = sorted(sent)
    store_exact(a.port, files)
    catalog_dir = a.data_dir / "catalog"
    wait_for(lambda: len(_places(a, study)) == 6 and set(_places(a, study).values())
             <= set(manifest.load(catalog_dir).uploaded), BOUND, lambda: f"a's segments uploaded\n{pair.logs()}", 0.5)
    r = pair.stowage("a", "delete", "--yes", "--instance", uids[0])  # its segment now holds a dead record
    assert r.returncode == 0, r.stdout + r.stderr
    before = _places(a, study)
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "compact", "--ratio", "1", "--data-dir", str(a.data_dir)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, **pair.env["a"], "STOWAGE_COMPACT_GRACE": "3600"})
    assert r.returncode == 0, r.stdout + r.stderr
    after = _places(a, study)
    replaced = set(before.values()) - set(after.values())
    outputs = {s for s in after.values() if s.startswith("999-")}
    assert replaced and outputs and set(after) == set(uids[1:]), (before, after)
    wait_for(lambda: outputs <= set(manifest.load(catalog_dir).uploaded), BOUND,
             lambda: f"a's compaction output uploaded\n{pair.logs()}", 0.5)
    prefix = "archive"
    old = {segment_key(prefix, "a", s) for s in replaced}
    journals = {f"{prefix}/a/compactions/{o}.json" for o in outputs}
    held = set(pair.s3.objects(pair.bucket))
    assert old <= held and journals <= held, "inside the grace: the replaced objects, and the journal, in the bucket"
    a.kill()
    shutil.rmtree(a.data_dir)
    a.start()
    kept = set(uids[1:])
    assert _record_counts(a, study) == {u: 1 for u in kept}, "each record catalogued once, from the output"
    assert "that compactions had replaced" in a.log(), a.log()[-3000:]
    assert sorted(str(d.SOPInstanceUID) for d in find(a.port, "IMAGE", StudyInstanceUID=study, SOPInstanceUID="")) \
        == sorted(kept)
    _r, got = getscu(a.port, tmp_path / "get", QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    assert got == {u: sent[u] for u in kept}, "byte for byte"
    from stowage.engine.iceberg.tables import open_catalog
    from stowage.engine.runtime import config as configuration
    env = pair.env["a"]
    cfg = configuration.load(env={**env, "STOWAGE_DATA_DIR": str(a.data_dir), "STOWAGE_S3_ACCESS_KEY":
                                  env["AWS_ACCESS_KEY_ID"], "STOWAGE_S3_SECRET_KEY": env["AWS_SECRET_ACCESS_KEY"]}
                             ).validate()

    def table_rows() -> list[tuple[str, str]]:
        table = open_catalog(cfg).load_table(f"{cfg.iceberg_namespace}.instances")
        rows = table.scan(row_filter=f"study_instance_uid == '{study}'",
                          selected_fields=("sop_instance_uid", "segment")).to_arrow()
        return sorted(zip(rows["sop_instance_uid"].to_pylist(), rows["segment"].to_pylist()))
    # Where each record is now: the compaction's output, or a segment of the study it left alone
    # (the study's instances may span two workers' segments; only the one with the deleted
    # record is below the ratio).
    now = {u: after[u] for u in sorted(kept)}

    def settled() -> bool:  # the relocation's rows are published after the restore's: waited for too
        rows = table_rows()
        return ([u for u, _s in rows] == sorted(kept) and dict(rows) == now
                and not old & set(pair.s3.objects(pair.bucket)))
    wait_for(settled, BOUND, lambda: f"the table's rows of a once each, where the records are now ({now}): "
             f"{table_rows()}, and the old objects deleted\n{pair.logs()}", 1.0)
    wait_for(lambda: not journals & set(pair.s3.objects(pair.bucket)), BOUND,
             lambda: f"the journal deleted with the objects it named\n{pair.logs()}", 0.5)
