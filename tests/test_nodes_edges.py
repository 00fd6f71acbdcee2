"""Object storage and several nodes at their edges, as an operator meets them
(docs/scale-out.md): the bucket out of reach while modalities send, the bucket answering
with errors, a node restarted or restored while things are half done.

Real parts only: SeaweedFS (tests/s3_server.py, the session's one server; each test its
own bucket), `stowage serve` reaching it through a TCP relay of the test's own where the
test cuts the bucket off (tests/test_s3_wal.Relay), DCMTK storescu, findscu and getscu.
"""
from __future__ import annotations

import http.client

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from conftest import HOST, Server, catalog_sealed, echo_ok, free_port, received_by_dcmtk, series_instances, storescu, wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS
from test_s3_restore import find_and_get
from test_s3_storage import all_uploaded_and_evicted, env_for, sealed_segments, stowage, uploaded
from test_bad_input import tmpfs  # noqa: F401 - fixture
from test_find import findscu
from test_s3_wal import Relay

pytestmark = pytest.mark.timeout(300)
BOUND = 60.0  # seconds: the staleness bound (about 1 s with these settings) with room for a busy machine


def relayed(s3) -> Relay:
    host, port = s3.endpoint.removeprefix("http://").split(":")
    return Relay((host, int(port)))


def test_an_unreachable_bucket_costs_a_log_line_and_the_uploads_wait(make_server, tmp_path, s3_server):  # noqa: F811
    """docs/scale-out.md, "The uploader": with durability = fsync a C-STORE is acknowledged
    after the local fsync, and "an unreachable bucket costs nothing but a log line": the
    stores succeed, the sealed segments wait on local disk, the uploader says so once (it
    does not die and restart with a traceback every few seconds), and uploads them when the
    bucket is back; C-FIND and C-GET answer throughout, C-GET byte for byte from the bucket."""
    bucket = s3_server.new_bucket("down")
    relay = relayed(s3_server)
    try:
        env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-down", STOWAGE_S3_ENDPOINT=f"http://{HOST}:{relay.port}",
                      STOWAGE_S3_RETRIES="1", STOWAGE_LOCAL_CACHE_BYTES="0")
        http_port = free_port()
        server = make_server("--workers", "1", "--http-port", str(http_port), "--http-processes", "1", **env)
        relay.cut()
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        files = series_instances(tmp_path / "ct", "DOWN", study, series, 16)
        storescu(server.port, files)    # every one acknowledged: durable on local disk
        sent = received_by_dcmtk(files, tmp_path / "sent")
        data_dir = server.data_dir
        wait_for(lambda: catalog_sealed(data_dir) and len(sealed_segments(data_dir)) >= 2
                 and "uploads to s3://" in server.log(), 60,
                 lambda: f"sealed segments waiting and the uploader saying why: {server.log()[-3000:]}")
        found, got = find_and_get(server.port, tmp_path / "1", study, series)
        assert found == set(sent) and got == sent
        wait_for(lambda: server.log().count("will retry") >= 1, 30, "the log line")
        time.sleep(8)  # several upload intervals (0.2 s) and more than the supervisor's restart delay (5 s)
        log = server.log()
        assert not uploaded(data_dir), "uploaded while the bucket was out of reach?"
        assert "uploader exited" not in log and "Traceback" not in log, log[-4000:]
        assert log.count("will retry") == 1, log[-4000:]

        relay.restore()
        wait_for(lambda: all_uploaded_and_evicted(data_dir), 60,
                 lambda: f"uploaded once the bucket is back: {uploaded(data_dir)}; {server.log()[-3000:]}")
        assert "go through again" in server.log()
        found, got = find_and_get(server.port, tmp_path / "2", study, series)
        assert found == set(sent) and got == sent

        # Cut off again, the commands that read the evicted segments say so in one line.
        relay.cut()
        for args in (("export", "--out", str(tmp_path / "export"), "--all"), ("verify",)):
            r = stowage(env, *args, "--data-dir", str(data_dir))
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert "Error: the object store failed: GET s3://" in r.stderr, r.stderr[-3000:]
        assert not (data_dir / "corrupt").exists() or not (data_dir / "corrupt" / "marks.jsonl").read_text(), \
            "a bucket out of reach is no corruption"
        # WADO-RS of an evicted series: its answer stops short (the status line has gone out),
        # never a 500 written into the body after the 200, and the server goes on serving
        conn = http.client.HTTPConnection(HOST, http_port, timeout=60)
        conn.request("GET", f"/dicom-web/studies/{study}/series/{series}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        resp = conn.getresponse()
        try:
            body = resp.read()
        except http.client.IncompleteRead as e:
            body = e.partial
        conn.close()
        assert b"HTTP/1.1 500" not in body and b"Internal Server Error" not in body, body[-300:]
        assert "Traceback" not in server.log(), server.log()[-3000:]
        assert echo_ok(server.port)
    finally:
        relay.cut()


# -- two nodes, one bucket, one Iceberg catalog ------------------------------------------

class Nodes:
    """Nodes a and b on one bucket (segments and the Iceberg warehouse) and one SQLite
    Iceberg catalog, publishing and refreshing every half second (tests/test_nodes.py's
    setup without the balancer). `start(name, **env)` starts one with extra settings."""

    def __init__(self, tmp: Path, s3) -> None:
        self.tmp, self.s3, self.bucket = tmp, s3, s3.new_bucket("edges")
        self.common = {**s3.env(), "STOWAGE_STORAGE": f"s3://{self.bucket}/archive",
                       "STOWAGE_S3_ENDPOINT": s3.endpoint, "STOWAGE_S3_PATH_STYLE": "true",
                       "STOWAGE_S3_READ_BLOCK": "16384", "STOWAGE_SEGMENT_MAX_AGE": "0.5",
                       "STOWAGE_SEAL_INTERVAL": "0.2", "STOWAGE_UPLOAD_INTERVAL": "0.2", "STOWAGE_SCRUB_RATE": "0",
                       "STOWAGE_COMPACT_INTERVAL": "0", "STOWAGE_COMPACT_GRACE": "1",
                       "STOWAGE_ICEBERG_CATALOG": f"sqlite:///{tmp / 'iceberg.db'}",
                       "STOWAGE_ICEBERG_WAREHOUSE": f"s3://{self.bucket}/warehouse",
                       "STOWAGE_ICEBERG_INTERVAL": "0.5", "STOWAGE_CLUSTER_REFRESH": "0.5"}
        self.nodes: dict[str, Server] = {}

    def env(self, name: str, **more: str) -> dict[str, str]:
        return {**self.common, "STOWAGE_NODE_NAME": name, **more}

    def start(self, name: str, **more: str) -> Server:
        old = self.nodes.get(name)
        node = Server(self.tmp / name, old.port if old else free_port(), ["--workers", "1"], self.env(name, **more),
                      log_dir=self.tmp)
        self.nodes[name] = node
        return node.start()

    def stowage(self, name: str, *args: str, **more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stowage.cli", *args, "--data-dir",
                               str(self.nodes[name].data_dir)], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, **self.env(name, **more)))

    def logs(self) -> str:
        return "\n".join(f"--- node {name}:\n{n.log()[-2500:]}" for name, n in self.nodes.items())

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()


@pytest.fixture(scope="module")
def nodes(s3_server, tmp_path_factory):  # noqa: F811 - the session's fixture
    n = Nodes(tmp_path_factory.mktemp("edges"), s3_server)
    try:
        n.start("b")
        yield n
    finally:
        n.stop()


def found_on(port: int, study: str, out: Path) -> set[str]:
    r, got = findscu(port, "-S", out, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID")
    assert r.returncode == 0, r.stderr
    for p in out.iterdir():
        p.unlink()
    return {str(ds.SOPInstanceUID) for ds in got}


def test_a_disk_lost_before_its_last_segment_was_uploaded_leaves_no_phantoms(nodes, tmp_path):
    """Node a stores a series; its rows are sealed and published (node b finds them all),
    but its last segment is still the active one, on local disk only (durability = fsync,
    segments rolled by size). The disk is lost and a is started again on an empty data
    directory: what was only in that segment is gone (docs/scale-out.md, "A lost disk":
    "What it cannot bring back"), but the archive must say so the same way on every node:
    b stops listing the lost instances (a's published rows of a segment that no longer
    exists anywhere are taken out of the instances table), a and b find the same set,
    and what a stores next is found and got from b byte for byte (a never reuses the lost
    segment's name, which rows of the table named)."""
    b = nodes.nodes["b"]
    a = nodes.start("a", STOWAGE_SEGMENT_MAX_AGE="0", STOWAGE_SEGMENT_SIZE="200000")
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "LOSTTAIL", study, series, 12)
    storescu(a.port, files)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    wait_for(lambda: found_on(b.port, study, tmp_path / "f") == uids and sealed_segments(a.data_dir)
             and sealed_segments(a.data_dir) <= set(uploaded(a.data_dir)), BOUND,
             lambda: f"a's rows published, its sealed segments uploaded\n{nodes.logs()}", 0.5)
    a.kill()
    shutil.rmtree(a.data_dir)
    a = nodes.start("a", STOWAGE_SEGMENT_MAX_AGE="0.5")
    kept = found_on(a.port, study, tmp_path / "f")
    assert 0 < len(kept) < len(uids), "some records were in the last segment only: the test proves nothing"
    wait_for(lambda: found_on(b.port, study, tmp_path / "f") == kept, BOUND,
             lambda: f"b lists what a holds, not what was lost: {len(found_on(b.port, study, tmp_path / 'f'))} "
                     f"against {len(kept)}\n{nodes.logs()}", 0.5)

    more = series_instances(tmp_path / "ct2", "LOSTTAIL", study, pydicom.uid.generate_uid(), 3)
    storescu(a.port, more)
    sent = received_by_dcmtk(more, tmp_path / "sent")
    wanted = kept | set(sent)
    assert found_on(a.port, study, tmp_path / "f") == wanted
    wait_for(lambda: found_on(b.port, study, tmp_path / "f") == wanted, BOUND,
             lambda: f"b finds what a stored after the restore\n{nodes.logs()}", 0.5)
    got: dict[str, bytes] = {}

    def all_got() -> bool:  # a's new segment reaches the bucket a moment after its rows reach b
        nonlocal got
        got = find_and_get(b.port, tmp_path / "g", study, str(pydicom.dcmread(more[0]).SeriesInstanceUID))[1]
        return set(got) == set(sent)
    wait_for(all_got, BOUND, lambda: f"C-GET from b of what a stored after the restore\n{nodes.logs()}", 1.0)
    assert got == sent


def test_an_instance_of_another_node_not_in_the_bucket_yet_is_a_failed_sub_operation(nodes, tmp_path):
    """docs/scale-out.md, "Several nodes on one bucket": C-FIND on b may list what c stored
    before c's segment reaches the bucket; a C-GET of it from b then fails its
    sub-operation, answered with a failure status naming it, not silently (and b keeps
    serving). Once c's segment is uploaded, the same C-GET from b gets the bytes."""
    from pynetdicom.sop_class import CTImageStorage
    from test_get import _pyn_get
    b = nodes.nodes["b"]
    c = nodes.start("c", STOWAGE_SEGMENT_MAX_AGE="0")    # its segment rolls at 1 GiB only: not uploaded
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "NOTYET", study, series, 2)
    storescu(c.port, files)
    sent = received_by_dcmtk(files, tmp_path / "sent")
    wait_for(lambda: found_on(b.port, study, tmp_path / "f") == set(sent), BOUND,
             lambda: f"b lists c's instances\n{nodes.logs()}", 0.5)
    assert not uploaded(c.data_dir)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    rsps, got = _pyn_get(b.port, keys, classes=(CTImageStorage,))
    final, ident = rsps[-1]
    assert got == {} and final.Status == 0xA702, (hex(final.Status), final)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 2), final
    # the reason is the bucket's, not "deleted": b looks the record up again among every node's
    # (before: "no longer in the archive: deleted, rejected or replaced", as if it had been deleted)
    assert "its segme" in final.ErrorComment and "no longer" not in final.ErrorComment, final.ErrorComment
    failed = ident.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == set(sent)
    assert echo_ok(b.port), "b goes on serving"

    c.stop()
    c = nodes.start("c", STOWAGE_SEGMENT_MAX_AGE="0.5")   # its last segment rolls and is uploaded now
    got = {}

    def all_got() -> bool:
        nonlocal got
        rsps, got = _pyn_get(b.port, keys, classes=(CTImageStorage,))
        return rsps[-1][0].Status == 0
    wait_for(all_got, BOUND, lambda: f"C-GET from b once c's segment is uploaded\n{nodes.logs()}", 1.0)
    assert {u: ts_bytes[1] for u, ts_bytes in got.items()} == sent


def test_a_full_local_disk_still_serves_evicted_segments_and_leaves_no_litter(make_server, tmpfs, tmp_path,
                                                                              s3_server):  # noqa: F811
    """The local disk (the data directory and its read cache) fills up, say with segments
    the uploader cannot send: a C-GET of a series whose segments were evicted is still
    answered from the bucket, byte for byte, the read going on uncached
    (engine/storage/remote.ReadCache: "a full disk: the read goes on uncached"), and no
    half-written cache block is left to take the room the disk lacks."""
    bucket = s3_server.new_bucket("fullcache")
    disk = tmpfs(tmp_path / "disk", "24m")
    env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-full", STOWAGE_LOCAL_CACHE_BYTES="0",
                  STOWAGE_MIN_FREE_BYTES="-1")
    server = make_server("--workers", "1", data_dir=disk / "data", **env)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "FULL", study, series, 16)
    storescu(server.port, files)
    sent = received_by_dcmtk(files, tmp_path / "sent")
    data_dir = server.data_dir
    wait_for(lambda: catalog_sealed(data_dir) and all_uploaded_and_evicted(data_dir), 60,
             lambda: f"uploaded and evicted: {uploaded(data_dir)}\n{server.log()[-2000:]}")
    filler = disk / "filler"
    with open(filler, "wb") as f:   # the disk full to the last block
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    try:
        with open(filler, "ab") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    _found, got = find_and_get(server.port, tmp_path / "1", study, series)
    assert got == sent
    litter = [p.name for p in (data_dir / "segment-cache").rglob(".*")]
    assert not litter, f"half-written cache blocks left on the full disk: {litter}"


def test_a_strangers_object_at_one_key_holds_up_no_other_upload(make_server, tmp_path, s3_server):  # noqa: F811
    """docs/scale-out.md: an object already at a segment's key with other bytes is never
    overwritten, and that segment stays local. The others must not wait on it: a stranger's
    object (a second node started with the same node_name, a data directory started afresh)
    at the key of the first sealed segment leaves every later one uploaded, verified and
    evicted, the tombstone log copied, and the log names the refused one."""
    bucket = s3_server.new_bucket("stranger")
    env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-s", STOWAGE_LOCAL_CACHE_BYTES="0",
                  STOWAGE_UPLOAD_INTERVAL="3600")
    server = make_server("--workers", "1", **env)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "STRANGER", study, series, 24)
    storescu(server.port, files)
    sent = received_by_dcmtk(files, tmp_path / "sent")
    data_dir = server.data_dir
    wait_for(lambda: catalog_sealed(data_dir) and len(sealed_segments(data_dir)) >= 3, 30, "sealed segments")
    server.kill()
    first, *rest = sorted(sealed_segments(data_dir))
    s3_server.client().put_object(Bucket=bucket, Key=f"archive/node-s/segments/{first}", Body=b"a stranger's segment")
    deleted = str(pydicom.dcmread(files[-1], stop_before_pixels=True).SOPInstanceUID)
    r = stowage(env, "delete", "--data-dir", str(data_dir), "--yes", "--instance", deleted)
    assert r.returncode == 0, r.stdout + r.stderr
    server = make_server("--workers", "1", data_dir=data_dir, **{**env, "STOWAGE_UPLOAD_INTERVAL": "0.2"})
    tombstones = "archive/node-s/tombstones/tombstones.log"
    wait_for(lambda: set(rest) <= set(uploaded(data_dir)) and tombstones in s3_server.objects(bucket), 60,
             lambda: f"the other segments uploaded: {sorted(uploaded(data_dir))} of {rest}; "
                     f"{server.log()[-3000:]}")
    wait_for(lambda: not any((data_dir / "segments" / n).exists() for n in rest), 30, "the others evicted")
    assert first not in uploaded(data_dir) and (data_dir / "segments" / first).exists(), "kept local"
    assert "already holds a different segment named " + first in server.log()
    sent.pop(deleted)
    found, got = find_and_get(server.port, tmp_path / "1", study, series)
    assert found == set(sent) and got == sent


def table_places(nodes: Nodes, node: str) -> list[tuple[str, int]]:
    """(segment, offset) of every row of `node`'s in the instances table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from stowage.engine.iceberg.tables import open_catalog
    from stowage.engine.runtime import config as configuration
    env = nodes.env(node)
    cfg = configuration.load(env={**env, "STOWAGE_DATA_DIR": str(nodes.nodes[node].data_dir),
                                  "STOWAGE_S3_ACCESS_KEY": env["AWS_ACCESS_KEY_ID"],
                                  "STOWAGE_S3_SECRET_KEY": env["AWS_SECRET_ACCESS_KEY"]}).validate()
    table = open_catalog(cfg).load_table(f"{cfg.iceberg_namespace}.instances")
    places: list[tuple[str, int]] = []
    for path in table.inspect.data_files()["file_path"].to_pylist():
        if f"/data/{node}/" in path:
            with table.io.new_input(path).open() as f:
                rows = pq.read_table(pa.BufferReader(f.read()), columns=["segment", "offset"])
            places += zip(rows["segment"].to_pylist(), rows["offset"].to_pylist())
    return places


def test_a_lost_disk_written_back_from_write_ahead_objects_publishes_no_row_twice(nodes, tmp_path):
    """durability = "object-store": node d's last segment is only in write-ahead objects
    when its disk is lost, its rows already published. Restored, d writes the segment back
    and indexes it again; the instances table must still hold each record once ("Rows
    published once"), and b must list each instance once."""
    from stowage.catalog import iceberg_outbox
    b = nodes.nodes["b"]
    wal = {"STOWAGE_DURABILITY": "object-store", "STOWAGE_SEGMENT_MAX_AGE": "0", "STOWAGE_SEGMENT_SIZE": "200000"}
    d = nodes.start("d", **wal)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "WALTWICE", study, series, 12)
    storescu(d.port, files)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    wait_for(lambda: found_on(b.port, study, tmp_path / "f") == uids and sealed_segments(d.data_dir)
             and sealed_segments(d.data_dir) <= set(uploaded(d.data_dir)), BOUND,
             lambda: f"d's rows published, its sealed segments uploaded\n{nodes.logs()}", 0.5)
    before = table_places(nodes, "d")
    assert len(before) == 12 == len(set(before)), before
    d.kill()
    shutil.rmtree(d.data_dir)
    d = nodes.start("d", **wal)
    assert "write-ahead objects" in d.log(), d.log()[-3000:]
    assert found_on(d.port, study, tmp_path / "f") == uids
    catalog_dir = d.data_dir / "catalog"
    wait_for(lambda: iceberg_outbox.enabled(catalog_dir) and not iceberg_outbox.pending(catalog_dir), BOUND,
             lambda: f"d's re-indexed files through its publisher\n{nodes.logs()}", 0.5)
    time.sleep(2)  # b's view a few refreshes on
    after = table_places(nodes, "d")
    assert sorted(after) == sorted(before), "each record of d's once in the instances table"
    r, got = findscu(b.port, "-S", tmp_path / "f", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                     "SOPInstanceUID")
    assert r.returncode == 0 and len(got) == 12, [str(ds.SOPInstanceUID) for ds in got]
