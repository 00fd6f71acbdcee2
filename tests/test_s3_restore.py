"""A node's data directory lost after its segments were uploaded (engine/storage/restore.py):
the node started again with the same node name on an empty data directory finds its
segments in the bucket, so every instance they hold answers C-FIND (DCMTK findscu) and
comes back by C-GET (DCMTK getscu) with the bytes DCMTK storescu sent; new segments are
numbered after the bucket's, uploaded beside them, none refused. `stowage rebuild-catalog`
on an empty data directory does the same, and the quota counts the segments in the bucket."""
from __future__ import annotations

import shutil

import pydicom
import pytest

from conftest import catalog_sealed, received_by_dcmtk, series_instances, wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS
from stowage.engine.store import segment, usage
from test_find import findscu
from test_get import getscu, received
from test_s3_storage import dataset, env_for, sealed_segments, stowage, storescu, uploaded

pytestmark = pytest.mark.timeout(300)


def in_segments(data_dir, names) -> set[str]:
    """The SOP Instance UIDs of the records of local segments `names`."""
    return {rec.header["sop_instance_uid"] for n in names for rec in segment.iter_records(data_dir / "segments" / n)}


def test_a_lost_data_directory_is_found_again_in_the_bucket(make_server, tmp_path, s3_server):  # noqa: F811
    bucket = s3_server.new_bucket("lost")
    env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-lost")
    server = make_server("--workers", "1", **env)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "LOST", study, series, 12)
    storescu(server.port, files)
    sent = received_by_dcmtk(files, tmp_path / "sent")
    data_dir = server.data_dir
    wait_for(lambda: catalog_sealed(data_dir) and sealed_segments(data_dir) and sealed_segments(data_dir) <= set(
        uploaded(data_dir)), 60, lambda: f"sealed segments uploaded: {uploaded(data_dir)}")
    names = sorted(uploaded(data_dir))
    safe = in_segments(data_dir, names)   # what the bucket holds: the active segment's records are not there
    assert len(safe) >= 6, safe
    server.kill()
    shutil.rmtree(data_dir)

    restarted = make_server("--workers", "1", data_dir=data_dir, **env)
    assert "found" in restarted.log() and "indexing them from the bucket" in restarted.log()
    r, found = findscu(restarted.port, "-S", tmp_path / "find", "QueryRetrieveLevel=IMAGE",
                       f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}", "SOPInstanceUID")
    assert r.returncode == 0, r.stderr
    assert {ds.SOPInstanceUID for ds in found} == safe
    r = getscu(restarted.port, "S", tmp_path / "get", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study,
                                                       "SeriesInstanceUID": series})
    assert r.returncode == 0, r.stderr
    assert {u: dataset(p) for u, p in received(tmp_path / "get").items()} == {u: sent[u] for u in safe}
    # The quota counts what is in the bucket, though the local disk holds none of it.
    assert usage.segment_bytes(data_dir) >= sum(e["size"] for e in uploaded(data_dir).values())

    # New segments go on after the bucket's names, and are uploaded beside them.
    more = series_instances(tmp_path / "ct2", "LOST", study, pydicom.uid.generate_uid(), 8)
    storescu(restarted.port, more)
    wait_for(lambda: catalog_sealed(data_dir) and set(uploaded(data_dir)) - set(names), 60,
             lambda: f"a new segment uploaded: {sorted(uploaded(data_dir))}; {restarted.log()[-2000:]}")
    new = sorted(set(uploaded(data_dir)) - set(names))
    assert min(new) > max(names), (new, names)
    assert "already holds a different segment" not in restarted.log()
    assert set(s3_server.objects(bucket, "archive/node-lost/segments/")) >= {
        f"archive/node-lost/segments/{n}" for n in names + new}

    # rebuild-catalog on an empty data directory: the catalog from the bucket alone.
    restarted.kill()
    shutil.rmtree(data_dir)
    r = stowage(env, "rebuild-catalog", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(names) + len(new)} segment(s) of node node-lost found in the bucket" in r.stdout, r.stdout
    r = stowage(env, "export", "--data-dir", str(data_dir), "--out", str(tmp_path / "export"), "--all")
    assert r.returncode == 0, r.stderr
    exported = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset(p)
                for p in (tmp_path / "export").iterdir()}
    assert safe < set(exported) and all(exported[u] == sent[u] for u in safe)


def test_object_store_durability_keeps_every_acknowledged_instance_through_kill_9_and_a_lost_disk(
        make_server, tmp_path, s3_server):  # noqa: F811
    """durability = "object-store" (engine/storage/wal.py): with no segment uploaded yet (the
    uploader's first look is in an hour), kill -9 right after storescu's last success, the
    data directory deleted: the restarted node has every acknowledged instance, from the
    write-ahead objects, and deletes them once their segments are uploaded."""
    bucket = s3_server.new_bucket("wal")
    env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-wal", STOWAGE_DURABILITY="object-store",
                  STOWAGE_UPLOAD_INTERVAL="3600")
    server = make_server("--workers", "2", **env)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "WAL", study, series, 10)
    storescu(server.port, files)   # every C-STORE acknowledged with success
    server.kill()
    sent = received_by_dcmtk(files, tmp_path / "sent")
    objects = s3_server.objects(bucket)
    assert objects and all(k.startswith("archive/node-wal/wal/") for k in objects), objects
    shutil.rmtree(server.data_dir)

    restarted = make_server("--workers", "2", data_dir=server.data_dir, **{**env, "STOWAGE_UPLOAD_INTERVAL": "0.2"})
    assert "write-ahead objects" in restarted.log()
    r, found = findscu(restarted.port, "-S", tmp_path / "find", "QueryRetrieveLevel=IMAGE",
                       f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}", "SOPInstanceUID")
    assert r.returncode == 0, r.stderr
    assert {ds.SOPInstanceUID for ds in found} == set(sent)
    r = getscu(restarted.port, "S", tmp_path / "get", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study,
                                                       "SeriesInstanceUID": series})
    assert r.returncode == 0, r.stderr
    assert {u: dataset(p) for u, p in received(tmp_path / "get").items()} == sent
    # The restored segments are sealed now (the node writes new ones): uploaded, and their
    # write-ahead objects deleted.
    wait_for(lambda: uploaded(restarted.data_dir) and not s3_server.objects(bucket, "archive/node-wal/wal/"), 60,
             lambda: f"write-ahead objects deleted after the upload: {s3_server.objects(bucket)}")
