"""Orthanc (the Debian package) as a throw-away subprocess for benchmarks and tests.

One place that writes its JSON configuration (free 127.0.0.1 ports, its own storage, no
plugins, no remote access or authentication), starts it, waits for its REST API and stops
it by PID, so that no run ever touches, or depends on, the system service.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from pathlib import Path
from typing import Any

from stowage.bench.procs import free_port, tail
from stowage.engine.runtime.stop_process import stop_process

EXE = "/usr/sbin/Orthanc"
Modalities = dict[str, tuple[str, str, int]]  # name -> (AE title, host, port)


def executable() -> str | None:
    """The Debian package's binary, else an ``Orthanc`` on PATH, else None."""
    return EXE if Path(EXE).exists() else shutil.which("Orthanc")


def write_config(path: Path, dicom_port: int, http_port: int, storage: Path, index: Path | None = None,
                 aet: str = "ORTHANC", modalities: Modalities | None = None, **extra: Any) -> Path:
    """Write a configuration to ``path``; ``extra`` keys (Orthanc's names) add to or override it.

    StorageCompression is off so that stored files are as large, and as cheap to write, as
    everyone else's in a comparison.
    """
    config = {
        "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(index or storage),
        "DicomAet": aet, "DicomPort": dicom_port, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "StorageCompression": False,
        "DicomModalities": {name: {"AET": a, "Host": h, "Port": p} for name, (a, h, p) in (modalities or {}).items()},
        **extra,
    }
    path.write_text(json.dumps(config, indent=1))
    return path


class Orthanc:
    """A running Orthanc on free ports with its configuration, database and log in ``work``.

    ``nodelay`` sets TCP_NODELAY=1 in its environment only: its DICOM layer is DCMTK's,
    which otherwise leaves Nagle on and makes each small response wait out a delayed ACK.
    """

    rest_timeout = 600.0
    launcher: tuple[str, ...] = ()  # a prefix for the command line (tests: setpriv --pdeathsig)

    def __init__(self, work: Path, modalities: Modalities | None = None, aet: str = "ORTHANC", *,
                 nodelay: bool = False, new_session: bool = False, timeout: float = 30.0, **extra: Any) -> None:
        exe = executable()
        if exe is None:
            raise RuntimeError("Orthanc is not installed: apt-get install orthanc")
        work.mkdir(parents=True, exist_ok=True)
        self.aet, self.dicom_port, self.http_port = aet, free_port(), free_port()
        config = write_config(work / "orthanc.json", self.dicom_port, self.http_port, work / "db", aet=aet,
                              modalities=modalities, **extra)
        self.log_path = work / "orthanc.log"
        env = dict(os.environ, TCP_NODELAY="1") if nodelay else None
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([*self.launcher, exe, str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=new_session)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.rest("GET", "/system")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start; log tail:\n{tail(self.log_path, 50)}") from None
                time.sleep(0.1)

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        """Call its REST API: bytes and str are sent as they are, anything else as JSON;
        the parsed JSON answer, None if empty."""
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method, data=data)
        with urllib.request.urlopen(req, timeout=self.rest_timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else None

    def upload(self, paths: list[Path], threads: int = 4) -> None:
        """POST each file to /instances, `threads` at a time on kept-alive connections, as
        Orthanc's ImportDicomFiles.py and its users do; raises on any refusal."""
        local = threading.local()

        def post(path: Path) -> None:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=600)
            conn.request("POST", "/instances", body=path.read_bytes(), headers={"Content-Type": "application/dicom"})
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"Orthanc answered {resp.status} for {path}: {answer[:200]!r}")

        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(post, paths):
                pass

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate it by PID, kill it if it has not exited after ``timeout`` seconds."""
        stop_process(self.proc, timeout, kill_wait=10)
