"""Sealed segments on S3-compatible object storage (engine/storage, docs/scale-out.md),
against a real S3 server (SeaweedFS, tests/s3_server.py) and real DICOM peers (DCMTK):
DCMTK storescu stores through `stowage serve`; every sealed segment appears in the bucket
with its size and checksum; its local copy is evicted under the local-disk budget; C-GET
(getscu), C-MOVE (movescu to storescp), `stowage export` and `stowage verify` still give
back the very bytes the modality sent, read by ranged GETs; a delete and a compaction of
evicted segments work and delete the replaced objects; `kill -9` of serve before the
upload loses nothing, and the restarted server uploads what it had sealed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from conftest import HOST, Server, catalog_sealed, free_port, received_by_dcmtk, series_instances, storescu, \
    wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS
from stowage.catalog import manifest
from test_get import getscu, received
from test_move import movescu
from test_send import StoreSCP, config_with

pytestmark = pytest.mark.timeout(300)
SEGMENT = 200_000   # small segments: a few dozen CT images make several
BLOCK = 16384       # ranged GETs of 16 KiB: a record's read fetches a few blocks, not its segment
NODE = "node-a"     # segments go to archive/<node>/segments/ (overridden by STOWAGE_NODE_NAME in `more`)


def env_for(s3, bucket: str, **more: str) -> dict[str, str]:
    """serve and the CLI on `bucket`: endpoint and path style in STOWAGE_*, credentials in AWS_*."""
    return {**s3.env(), "STOWAGE_STORAGE": f"s3://{bucket}/archive", "STOWAGE_NODE_NAME": NODE, "STOWAGE_S3_ENDPOINT": s3.endpoint,
            "STOWAGE_S3_PATH_STYLE": "true", "STOWAGE_S3_READ_BLOCK": str(BLOCK),
            "STOWAGE_SEGMENT_SIZE": str(SEGMENT), "STOWAGE_SEAL_INTERVAL": "0.2", "STOWAGE_UPLOAD_INTERVAL": "0.2",
            "STOWAGE_SCRUB_RATE": "0", "STOWAGE_COMPACT_INTERVAL": "0", "STOWAGE_COMPACT_GRACE": "0", **more}


def stowage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **env))



def dataset(path: Path) -> bytes:
    from conftest import dataset_bytes
    return dataset_bytes(path)


def uploaded(data_dir: Path) -> dict[str, dict]:
    return {n: e for n, e in manifest.load(data_dir / "catalog").uploaded.items() if not e.get("gone")}


def sealed_segments(data_dir: Path) -> set[str]:
    """The segments that are no longer the last of their slot and hold records: those to upload."""
    local = {p.name: p.stat().st_size for p in (data_dir / "segments").glob("*.seg")}
    names = sorted(local) + list(uploaded(data_dir))
    last: dict[str, str] = {}
    for n in names:
        last[n[:3]] = max(last.get(n[:3], n), n)
    return {n for n in names if n != last[n[:3]] and local.get(n) != 0}


def all_uploaded_and_evicted(data_dir: Path) -> bool:
    up = uploaded(data_dir)
    sealed = sealed_segments(data_dir)
    return bool(sealed) and sealed <= set(up) and not any((data_dir / "segments" / n).exists() for n in up)


def cached_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "segment-cache").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def archive(tmp_path_factory, s3_server):  # noqa: F811
    """One serve for the module's first two tests (in this order: the second deletes), on a
    fresh bucket, with room for 100 kB of cached blocks and no local copy of an uploaded
    segment (each is bigger); a CT series of 30 stored with DCMTK storescu."""
    tmp_path = tmp_path_factory.mktemp("s3-archive")
    bucket = s3_server.new_bucket("segments")
    dest = StoreSCP(tmp_path / "moved")
    env = env_for(s3_server, bucket, STOWAGE_LOCAL_CACHE_BYTES="100000")
    cfg = config_with(tmp_path, DEST=(HOST, dest.port))
    server = Server(tmp_path / "data", free_port(), ["--workers", "2", "--config", str(cfg)], env)
    try:
        server.start()  # in the try: a server that does not start must not leave storescp running
        files = series_instances(tmp_path / "ct", "S3-1", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(),
                                 30)
        storescu(server.port, files)
        yield server, bucket, env, files, dest
    finally:
        server.kill()
        dest.stop()


def test_sealed_segments_are_uploaded_verified_evicted_and_read_back_by_ranged_gets(archive, tmp_path, s3_server):  # noqa: F811,E501
    server, bucket, env, files, dest = archive
    sent = received_by_dcmtk(files, tmp_path / "sent")   # what storescu puts on the wire, bit for bit
    data_dir = server.data_dir
    wait_for(lambda: catalog_sealed(data_dir) and all_uploaded_and_evicted(data_dir), 60,
             lambda: f"every sealed segment uploaded and evicted; manifest: {uploaded(data_dir)}; log: "
                     f"{server.log()[-3000:]}")
    # In the bucket, as the manifest records them: the same size and SHA-256 as written.
    objects = s3_server.objects(bucket, f"archive/{NODE}/segments/")
    up = uploaded(data_dir)
    assert {e["key"]: e["size"] for e in up.values()} == {k: v for k, v in objects.items() if k in
                                                          {e["key"] for e in up.values()}}
    assert len(up) >= 3, up
    for name, entry in up.items():
        assert entry["key"] == f"archive/{NODE}/segments/{name}"
    assert "verified" in server.log()

    # One instance by C-GET reads a few blocks of its segment, not the whole object.
    one = files[0]
    uid = pydicom.dcmread(one, stop_before_pixels=True).SOPInstanceUID
    series = pydicom.dcmread(one, stop_before_pixels=True).SeriesInstanceUID
    r = getscu(server.port, "S", tmp_path / "get1", {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID":
               pydicom.dcmread(one, stop_before_pixels=True).StudyInstanceUID, "SeriesInstanceUID": series,
               "SOPInstanceUID": uid})
    assert r.returncode == 0, r.stderr
    assert dataset(received(tmp_path / "get1")[uid]) == sent[uid]
    blocks = list((data_dir / "segment-cache").rglob("0*"))
    assert blocks and cached_bytes(data_dir) < min(e["size"] for e in up.values()), blocks
    sent_by_server = s3_server.traffic(bucket).get("sent", 0)  # SeaweedFS's own count
    assert 0 < sent_by_server < min(e["size"] for e in up.values()), sent_by_server

    # The whole series by C-GET, by C-MOVE and by export: the bytes the modality sent.
    study = pydicom.dcmread(one, stop_before_pixels=True).StudyInstanceUID
    r = getscu(server.port, "S", tmp_path / "get", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study,
                                                     "SeriesInstanceUID": series})
    assert r.returncode == 0, r.stderr
    got = received(tmp_path / "get")
    assert {u: dataset(p) for u, p in got.items()} == sent
    r = movescu(server.port, "S", "DEST", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study,
                                           "SeriesInstanceUID": series})
    assert r.returncode == 0, r.stderr
    assert {u: dataset(p) for u, p in dest.received().items()} == sent
    r = stowage(env, "export", "--data-dir", str(data_dir), "--out", str(tmp_path / "export"), "--all")
    assert r.returncode == 0, r.stderr
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset(p)
            for p in (tmp_path / "export").iterdir()} == sent
    assert not any((data_dir / "segments" / n).exists() for n in up)  # all of it from the bucket

    # verify re-reads every record, those in the bucket too, and finds nothing wrong.
    r = stowage(env, "verify", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "30 record" in r.stdout + r.stderr, r.stdout + r.stderr


def test_delete_and_compaction_of_evicted_segments(archive, tmp_path, s3_server):  # noqa: F811
    server, bucket, env, files, _dest = archive
    data_dir = server.data_dir
    wait_for(lambda: catalog_sealed(data_dir) and all_uploaded_and_evicted(data_dir), 60,
             lambda: f"every sealed segment uploaded and evicted; log: {server.log()[-3000:]}")
    before = uploaded(data_dir)
    doomed = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files[:20]]
    r = stowage(env, "delete", "--data-dir", str(data_dir), "--yes", "--instance", ",".join(doomed))
    assert r.returncode == 0, r.stderr
    r = stowage(env, "compact", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    # The replaced segments' objects are deleted from the bucket once the uploader sees them
    # purged, and the compaction's output is uploaded in their place.
    def replaced() -> set[str]:
        return {e["key"] for n, e in before.items() if n not in uploaded(data_dir)}

    wait_for(lambda: replaced() and not replaced() & set(s3_server.objects(bucket))
             and any(n.startswith("999-") for n in uploaded(data_dir)), 60,
             lambda: f"the replaced objects deleted; bucket: {s3_server.objects(bucket)}; log {server.log()[-2000:]}")
    kept = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset(p) for p in files[20:]}
    r = stowage(env, "export", "--data-dir", str(data_dir), "--out", str(tmp_path / "export"), "--all")
    assert r.returncode == 0, r.stderr
    exported = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in (tmp_path / "export").iterdir()}
    assert set(exported) == set(kept)
    r = stowage(env, "verify", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stdout + r.stderr


def test_kill_9_before_the_upload_loses_nothing(make_server, tmp_path, s3_server):  # noqa: F811
    bucket = s3_server.new_bucket("killed")
    # The uploader's first look would be in an hour: the segments stay local.
    env = env_for(s3_server, bucket, STOWAGE_LOCAL_CACHE_BYTES="0", STOWAGE_UPLOAD_INTERVAL="3600")
    server = make_server("--workers", "2", **env)
    files = series_instances(tmp_path / "ct", "S3-K", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 20)
    storescu(server.port, files)
    sent = received_by_dcmtk(files, tmp_path / "sent")
    wait_for(lambda: catalog_sealed(server.data_dir) and len(sealed_segments(server.data_dir)) >= 2, 30,
             "sealed segments")
    server.kill()
    assert not s3_server.objects(bucket), "uploaded before the kill: the test proves nothing"
    assert not uploaded(server.data_dir)
    restarted = make_server("--workers", "2", data_dir=server.data_dir, **{**env, "STOWAGE_UPLOAD_INTERVAL": "0.2"})
    wait_for(lambda: all_uploaded_and_evicted(restarted.data_dir), 60,
             lambda: f"the sealed segments uploaded after the restart: sealed {sealed_segments(restarted.data_dir)}, "
                     f"uploaded {uploaded(restarted.data_dir)}, local "
                     f"{sorted(p.name for p in (restarted.data_dir / 'segments').iterdir())}")
    objects = s3_server.objects(bucket)
    assert {e["key"]: e["size"] for e in uploaded(restarted.data_dir).values()} == objects
    r = stowage(env, "export", "--data-dir", str(restarted.data_dir), "--out", str(tmp_path / "export"), "--all")
    assert r.returncode == 0, r.stderr
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset(p)
            for p in (tmp_path / "export").iterdir()} == sent


def test_an_object_already_in_the_bucket_is_never_overwritten(make_server, tmp_path, s3_server):  # noqa: F811
    """Two objects planted at the keys of segments not uploaded yet: one with the segment's
    own bytes (what an upload that landed just before a crash leaves) is taken as uploaded;
    one with other bytes (a second node on the same prefix, a data directory started
    afresh) is left as it is, the segment stays local, and the log says why."""
    import base64
    import hashlib
    bucket = s3_server.new_bucket("planted")
    env = env_for(s3_server, bucket, STOWAGE_LOCAL_CACHE_BYTES="0", STOWAGE_UPLOAD_INTERVAL="3600")
    server = make_server("--workers", "1", **env)
    files = series_instances(tmp_path / "ct", "S3-P", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 24)
    storescu(server.port, files)
    sent = received_by_dcmtk(files, tmp_path / "sent")
    wait_for(lambda: catalog_sealed(server.data_dir) and len(sealed_segments(server.data_dir)) >= 2, 30,
             lambda: f"sealed segments: {catalog_sealed(server.data_dir)}, {sealed_segments(server.data_dir)}, "
                     f"{sorted((p.name, p.stat().st_size) for p in (server.data_dir / 'segments').iterdir())}")
    server.kill()
    same, other = sorted(sealed_segments(server.data_dir))[:2]
    segments, client = server.data_dir / "segments", s3_server.client()

    def plant(name: str, body: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"archive/{NODE}/segments/{name}", Body=body,
                          ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode())
    plant(same, (segments / same).read_bytes())
    plant(other, b"another archive's segment")
    restarted = make_server("--workers", "1", data_dir=server.data_dir, **{**env, "STOWAGE_UPLOAD_INTERVAL": "0.2"})
    wait_for(lambda: same in uploaded(restarted.data_dir) and "already holds a different segment" in restarted.log(),
             60, lambda: f"the planted objects judged: uploaded {sorted(uploaded(restarted.data_dir))}")
    assert other not in uploaded(restarted.data_dir) and (segments / other).exists(), "kept local, not recorded"
    body = client.get_object(Bucket=bucket, Key=f"archive/{NODE}/segments/{other}")["Body"].read()
    assert body == b"another archive's segment", "the stranger's object was overwritten"
    r = stowage(env, "export", "--data-dir", str(restarted.data_dir), "--out", str(tmp_path / "export"), "--all")
    assert r.returncode == 0, r.stderr
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset(p)
            for p in (tmp_path / "export").iterdir()} == sent


def test_the_quota_counts_this_nodes_segments_in_the_bucket_and_the_dashboard_says_so(make_server, tmp_path,
                                                                                      s3_server):  # noqa: F811
    """max_storage_bytes is per node and counts its segments wherever they are: a node whose
    sealed segments were all uploaded and evicted (its local disk holds only the last one of
    each writer) and whose quota is what it holds refuses the next store with 0xA700; the
    dashboard shows the same figure against the quota, split into this disk and the bucket."""
    import json
    import urllib.request
    from test_quota import store_one
    bucket = s3_server.new_bucket("quota")
    env = env_for(s3_server, bucket, STOWAGE_LOCAL_CACHE_BYTES="0")
    server = make_server("--workers", "1", **env)
    files = series_instances(tmp_path / "ct", "S3-Q", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 12)
    storescu(server.port, files[:-1])
    wait_for(lambda: catalog_sealed(server.data_dir) and all_uploaded_and_evicted(server.data_dir), 60,
             lambda: f"uploaded and evicted: {uploaded(server.data_dir)}\n{server.log()[-2000:]}")
    server.kill()
    data_dir = server.data_dir
    local = sum(p.stat().st_size for p in (data_dir / "segments").glob("*.seg"))
    in_bucket = sum(e["size"] for e in uploaded(data_dir).values())
    assert in_bucket > local, "most of what the node holds is only in the bucket"
    http = free_port()
    quota = {"STOWAGE_MAX_STORAGE_BYTES": str(local + in_bucket), "STOWAGE_QUOTA_POLICY": "refuse"}
    restarted = make_server("--workers", "1", "--http-port", str(http), data_dir=data_dir, **{**env, **quota})
    status, comment = store_one(restarted.port, files[-1])
    assert status == 0xA700 and "max_storage_bytes" in comment, (hex(status), comment)
    with urllib.request.urlopen(f"http://{HOST}:{http}/dashboard/status.json", timeout=30) as r:
        st = json.load(r)["storage"]
    # the restarted uploader may have uploaded the last segments meanwhile: the split moves, the sum does not
    assert st["segments_bytes"] == st["segments_local_bytes"] + st["segments_bucket_bytes"] == local + in_bucket \
        == st["quota_bytes"], st
    assert st["segments_bucket_bytes"] >= in_bucket > st["segments_local_bytes"], st
    with urllib.request.urlopen(f"http://{HOST}:{http}/dashboard/panels", timeout=30) as r:
        panels = r.read().decode()
    assert f"only in s3://{bucket}/archive" in panels and "on this disk and in the bucket" in panels
