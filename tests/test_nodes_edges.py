"""Object storage and several nodes at their edges, as an operator meets them
(docs/scale-out.md): the bucket out of reach while modalities send, the bucket answering
with errors, a node restarted or restored while things are half done.

Real parts only: SeaweedFS (tests/s3_server.py, the session's one server; each test its
own bucket), `stowage serve` reaching it through a TCP relay of the test's own where the
test cuts the bucket off (tests/test_s3_wal.Relay), DCMTK storescu, findscu and getscu.
"""
from __future__ import annotations

import pydicom
import pytest

from conftest import catalog_sealed, received_by_dcmtk, series_instances, storescu, wait_for, HOST
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS
from test_s3_restore import find_and_get
from test_s3_storage import all_uploaded_and_evicted, env_for, sealed_segments, uploaded
from test_s3_wal import Relay

pytestmark = pytest.mark.timeout(300)


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
        server = make_server("--workers", "1", **env)
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
        import time
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
    finally:
        relay.cut()
