"""Orthanc (the Debian package) as a test peer: a subprocess with its own temporary
configuration on free loopback ports, stopped by PID; never the system service."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import HOST, free_port

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]], aet: str = "ORTHANC") -> None:
        if not Path(ORTHANC).exists() and not shutil.which("Orthanc"):
            pytest.fail("Orthanc is not installed: apt-get install orthanc (ops/test.sh does)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.aet, self.dicom_port, self.http_port = aet, free_port(), free_port()
        config = {
            "Name": "stowage-test", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {name: {"AET": a, "Host": h, "Port": p} for name, (a, h, p) in modalities.items()},
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log_path = workdir / "orthanc.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([ORTHANC if Path(ORTHANC).exists() else "Orthanc", str(workdir / "orthanc.json")],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rest("GET", "/system")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start:\n{self.log_path.read_text(errors='replace')}")
                time.sleep(0.1)

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", method=method, data=data)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
