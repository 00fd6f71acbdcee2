"""Several nodes on one bucket (engine/storage, docs/scale-out.md): two `stowage serve`
nodes with different node names on the same bucket and prefix each upload a segment of
the same name; both objects are there, under `<prefix>/<node>/segments/`, neither upload
is refused, and each node reads its own segment and the other's from the bucket with
`remote.open_node_segment`: every record verified, the very datasets DCMTK storescu sent
to that node. The scrub of a node whose local copies are evicted checks their objects by
HEAD, reading none of them again, and says so when one is missing."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pydicom
import pytest

from conftest import catalog_sealed, received_by_dcmtk, series_instances, wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS
from stowage.engine.runtime import config as configuration
from stowage.engine.storage import remote
from stowage.engine.store import segment
from test_s3_storage import env_for, sealed_segments, storescu, uploaded

pytestmark = pytest.mark.timeout(300)


def records(f) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes (after the file meta) of every record of the
    segment file `f`, each checked against its CRC-32 by the segment reader."""
    out, offset, size = {}, 0, f.seek(0, 2)
    while offset < size:
        rec, chunks = segment.open_record(f, offset)
        payload = b"".join(segment.decoded(rec, chunks))
        out[rec.header["sop_instance_uid"]] = payload[int(rec.header["meta_length"]):]
        offset += rec.length
    return out


def node_config(env: dict[str, str], data_dir: Path) -> configuration.Config:
    """A node's configuration in this process (its credentials in the configuration, not AWS_*)."""
    return configuration.load(env={**env, "STOWAGE_DATA_DIR": str(data_dir), "STOWAGE_S3_ACCESS_KEY":
                                   env["AWS_ACCESS_KEY_ID"], "STOWAGE_S3_SECRET_KEY": env["AWS_SECRET_ACCESS_KEY"]}
                              ).validate()


def test_two_nodes_on_one_bucket_keep_apart_and_read_each_other(make_server, tmp_path, s3_server):  # noqa: F811
    bucket = s3_server.new_bucket("nodes")
    nodes, sent = {}, {}
    # node-a: room for 100 kB of cached blocks, no local copy of an uploaded segment (each
    # is bigger), and a scrub pass as fast as it goes (10 s apart).
    scrubbed = {"STOWAGE_LOCAL_CACHE_BYTES": "100000", "STOWAGE_SCRUB_RATE": "100"}
    for node in ("node-a", "node-b"):
        env = env_for(s3_server, bucket, STOWAGE_NODE_NAME=node, **(scrubbed if node == "node-a" else {}))
        nodes[node] = (make_server("--workers", "1", data_dir=tmp_path / node, **env), env)
    for node, (server, _env) in nodes.items():
        files = series_instances(tmp_path / f"ct-{node}", node, pydicom.uid.generate_uid(),
                                 pydicom.uid.generate_uid(), 12)
        storescu(server.port, files)
        sent[node] = received_by_dcmtk(files, tmp_path / f"sent-{node}")

    def both_uploaded() -> set[str]:
        ups = [set(uploaded(s.data_dir)) for s, _e in nodes.values()]
        return ups[0] & ups[1] if all(catalog_sealed(s.data_dir) and sealed_segments(s.data_dir) <= set(uploaded(
            s.data_dir)) for s, _e in nodes.values()) else set()
    wait_for(both_uploaded, 60, lambda: f"both nodes' sealed segments uploaded: "
             f"{ {n: sorted(uploaded(s.data_dir)) for n, (s, _e) in nodes.items()} }")
    shared = sorted(both_uploaded())
    assert shared, "no segment name in common: the test proves nothing"
    objects = s3_server.objects(bucket)
    for node, (server, env) in nodes.items():
        assert "already holds a different segment" not in server.log()
        for name in shared:
            entry = uploaded(server.data_dir)[name]
            assert entry["key"] == f"archive/{node}/segments/{name}"
            assert objects[entry["key"]] == entry["size"]

    # node-a's scrub trusts the verified uploads of its evicted segments: a HEAD each, no GET.
    a = nodes["node-a"][0]

    def heads() -> int:
        passes = re.findall(r"(\d+) segment\(s\) in the bucket checked by HEAD", a.log())
        return max(map(int, passes), default=0)
    wait_for(lambda: not any((a.data_dir / "segments" / n).exists() for n in uploaded(a.data_dir)) and heads(), 60,
             lambda: f"a scrub pass over node-a's evicted segments: {a.log()[-2000:]}")
    assert s3_server.traffic(bucket).get("sent", 0) < min(e["size"] for e in uploaded(a.data_dir).values())

    # Each node reads its own segments and the other's, located by node and name alone.
    for reader, (server, env) in nodes.items():
        cfg = node_config(env, server.data_dir)
        for node, (owner, _env) in nodes.items():
            got: dict[str, bytes] = {}
            for name in sorted(uploaded(owner.data_dir)):
                assert remote.segment_key(cfg, node, name) == f"archive/{node}/segments/{name}"
                with remote.open_node_segment(cfg, node, name) as f:
                    assert hashlib.sha256(f.read()).hexdigest() == uploaded(owner.data_dir)[name]["sha256"]
                    got.update(records(f))
            assert got and set(got) <= set(sent[node]), f"{reader} reading {node}"
            assert all(got[uid] == sent[node][uid] for uid in got), f"{reader} reading {node}: other bytes"
        if reader == "node-b":  # node-a's cache is evicted as fast as the budget says
            assert any((server.data_dir / "segment-cache" / "nodes").rglob("0*")), "the shared block cache unused"

    # A segment the bucket does not hold is a clear FileNotFoundError, not an empty file.
    with pytest.raises(FileNotFoundError, match="node-c"):
        remote.open_node_segment(node_config(nodes["node-a"][1], tmp_path / "node-a"), "node-c", shared[0])

    # An object gone from the bucket: the next scrub pass of its node says which.
    gone = uploaded(a.data_dir)[shared[0]]["key"]
    s3_server.client().delete_object(Bucket=bucket, Key=gone)
    wait_for(lambda: f"{gone} is missing from the bucket" in a.log(), 60,
             lambda: f"the scrub finds {gone} missing: {a.log()[-2000:]}")
