"""`durability = "object-store"` when the bucket is out of reach (engine/storage/wal.py):
serve reaches SeaweedFS through a TCP relay of the test's own on loopback. With the relay
cut, a C-STORE from DCMTK storescu is refused with 0xA700 (Out of Resources) and an Error
Comment that names the object store, and nothing of it is kept (findscu does not find it);
with the relay back, the same instance is stored. A fresh data directory whose bucket
cannot be listed refuses to start, in one line."""
from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from conftest import HOST, dcmtk, free_port, series_instances, wait_for
from s3_server import s3_server  # noqa: F401 - the session's SeaweedFS
from test_find import findscu
from test_s3_storage import env_for, stowage, storescu

pytestmark = pytest.mark.timeout(300)


class Relay:
    """Forwards TCP connections from a loopback port to `target`; `cut()` closes the port
    and every connection through it (the peer sees refusals), `restore()` opens it again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind((HOST, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.conns: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        try:  # wakes the accepting thread; a close alone leaves it listening
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_store_the_bucket_does_not_take_is_refused_and_not_kept(make_server, tmp_path, s3_server):  # noqa: F811
    bucket = s3_server.new_bucket("wal")
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    relay = Relay((host, int(port)))
    try:
        # One retry per S3 request instead of five: a request to the cut relay fails after
        # 0.5 s of backoff on average, not 15.5 s (each of the refusals below waited that out).
        env = env_for(s3_server, bucket, STOWAGE_NODE_NAME="node-wal", STOWAGE_DURABILITY="object-store",
                      STOWAGE_S3_ENDPOINT=f"http://{HOST}:{relay.port}", STOWAGE_S3_RETRIES="1")
        server = make_server("--workers", "1", **env)
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        files = series_instances(tmp_path / "ct", "WAL", study, series, 3)
        storescu(server.port, files[:2])
        relay.cut()
        r = subprocess.run([dcmtk("storescu"), "-v", "-aec", "STOWAGE", HOST, str(server.port), str(files[2])],
                           capture_output=True, text=True, timeout=180)
        assert "Received Store Response (Refused: OutOfResources)" in r.stdout + r.stderr, r.stdout + r.stderr
        wait_for(lambda: "not in the object store (durability = object-store)" in server.log(), 30,
                 lambda: f"the refusal's reason in the log: {server.log()[-2000:]}")

        def found(out: Path) -> set[str]:
            r, got = findscu(server.port, "-S", out, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                             "SOPInstanceUID")
            assert r.returncode == 0, r.stderr
            return {ds.SOPInstanceUID for ds in got}
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
        assert found(tmp_path / "find1") == set(uids[:2])
        relay.restore()
        storescu(server.port, files[2:])
        assert found(tmp_path / "find2") == set(uids)

        # A fresh data directory whose bucket cannot be listed does not start (it cannot
        # know which segment names it used): one line, no traceback.
        relay.cut()
        r = stowage(env, "serve", "--data-dir", str(tmp_path / "fresh"), "--port", str(free_port()))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "cannot know which of its segments it holds" in r.stderr, r.stderr
    finally:
        relay.cut()
