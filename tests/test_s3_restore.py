"""A node's data directory lost (engine/storage/restore.py, wal.py), with
`durability = "object-store"`: storescu's last success, then `kill -9` and the data
directory deleted. Started again with the same node name on an empty data directory, the
node finds its uploaded segments in the bucket and writes back its active segment from
the write-ahead objects: every acknowledged instance answers C-FIND (DCMTK findscu) and
comes back by C-GET (DCMTK getscu) with the bytes DCMTK storescu sent, except one deleted
before the loss (the tombstone log's copy in the bucket hides it again); the quota counts
what is in the bucket; new segments are numbered after the bucket's and uploaded beside
them, none refused, and their write-ahead objects deleted. `stowage rebuild-catalog` on an
empty data directory rebuilds the same from the bucket alone."""
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
WAL = "archive/node-lost/wal/"
TOMBSTONES = "archive/node-lost/tombstones/tombstones.log"


def in_segments(data_dir, names) -> set[str]:
    """The SOP Instance UIDs of the records of local segments `names`."""
    return {rec.header["sop_instance_uid"] for n in names for rec in segment.iter_records(data_dir / "segments" / n)}


def find_and_get(port: int, out, study: str, series: str) -> tuple[set[str], dict[str, bytes]]:
    """What findscu finds of the series, and what getscu brings back of it (uid -> dataset)."""
    r, found = findscu(port, "-S", out / "find", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                       f"SeriesInstanceUID={series}", "SOPInstanceUID")
    assert r.returncode == 0, r.stderr
    r = getscu(port, "S", out / "get", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study,
                                        "SeriesInstanceUID": series})
    assert r.returncode == 0, r.stderr
    return {ds.SOPInstanceUID for ds in found}, {u: dataset(p) for u, p in received(out / "get").items()}


def test_a_lost_data_directory_is_found_again_in_the_bucket(make_server, tmp_path, s3_server):  # noqa: F811
    bucket = s3_server.new_bucket("lost")
    env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-lost", STOWAGE_DURABILITY="object-store")
    server = make_server("--workers", "1", **env)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "ct", "LOST", study, series, 12)
    storescu(server.port, files)   # every C-STORE acknowledged with success
    data_dir = server.data_dir
    wait_for(lambda: catalog_sealed(data_dir) and sealed_segments(data_dir) and sealed_segments(data_dir) <= set(
        uploaded(data_dir)), 60, lambda: f"sealed segments uploaded: {uploaded(data_dir)}")
    names = sorted(uploaded(data_dir))
    in_bucket = in_segments(data_dir, names)   # in uploaded segments; the others only in write-ahead objects
    sent = received_by_dcmtk(files, tmp_path / "sent")
    assert 6 <= len(in_bucket) < len(sent), in_bucket
    # one instance deleted before the loss: the uploader copies the tombstone log to the bucket
    deleted = sorted(in_bucket)[0]
    r = stowage(env, "delete", "--data-dir", str(data_dir), "--instance", deleted, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    log_size = (data_dir / "tombstones" / "tombstones.log").stat().st_size
    wait_for(lambda: s3_server.objects(bucket, TOMBSTONES).get(TOMBSTONES) == log_size, 60,
             lambda: f"the tombstone log in the bucket: {s3_server.objects(bucket, 'archive/node-lost/')}")
    server.kill()
    sent.pop(deleted)
    assert s3_server.objects(bucket, WAL), "no write-ahead object for the active segment"
    shutil.rmtree(data_dir)

    restarted = make_server("--workers", "1", data_dir=data_dir, **env)
    log = restarted.log()
    assert "indexing them from the bucket" in log and "write-ahead objects" in log, log[-3000:]
    assert "found the tombstone log of node node-lost" in log, log[-3000:]
    found, got = find_and_get(restarted.port, tmp_path / "1", study, series)
    assert found == set(sent), "every acknowledged instance but the one deleted before the loss"
    assert got == sent
    # The quota counts what is in the bucket, though the local disk holds none of it.
    assert usage.segment_bytes(data_dir) >= sum(e["size"] for e in uploaded(data_dir).values())

    # New segments go on after the bucket's names and are uploaded beside them; the
    # segment written back from write-ahead objects is uploaded too, and they are deleted.
    more = series_instances(tmp_path / "ct2", "LOST", study, pydicom.uid.generate_uid(), 8)
    storescu(restarted.port, more)
    wait_for(lambda: catalog_sealed(data_dir) and sealed_segments(data_dir) <= set(uploaded(data_dir))
             and len(set(uploaded(data_dir)) - set(names)) >= 2, 60,
             lambda: f"new segments uploaded: {sorted(uploaded(data_dir))}; {restarted.log()[-2000:]}")
    new = sorted(set(uploaded(data_dir)) - set(names))
    assert min(new) > max(names), (new, names)
    assert "already holds a different segment" not in restarted.log()
    assert set(s3_server.objects(bucket, "archive/node-lost/segments/")) >= {
        f"archive/node-lost/segments/{n}" for n in names + new}
    restored = {k for k in s3_server.objects(bucket, WAL) if k.split("/")[-2] in names + new}
    assert not restored, f"write-ahead objects of uploaded segments left: {restored}"

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
    assert {u: exported.get(u) for u in sent} == sent
    assert deleted not in exported, "rebuild-catalog finds the deletion in the bucket too"
