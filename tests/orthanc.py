"""Orthanc (the Debian package) as a test peer: bench/harness/orthanc.py's subprocess with its own
temporary configuration on free loopback ports, stopped by PID; never the system service.
Missing Orthanc fails the test rather than skipping it, so a run without it is not green."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stowage.bench.harness import orthanc


class Orthanc(orthanc.Orthanc):
    rest_timeout = 60.0  # a test waits no longer than that for one REST answer
    launcher = ("setpriv", "--pdeathsig", "TERM")  # no Orthanc outlives a killed test run

    def __init__(self, workdir: Path, modalities: orthanc.Modalities, aet: str = "ORTHANC", **extra: Any) -> None:
        """`extra`: more keys of Orthanc's configuration (e.g. LimitFindResults)."""
        if orthanc.executable() is None:
            pytest.fail("Orthanc is not installed: apt-get install orthanc (ops/test.sh does)")
        super().__init__(workdir, modalities, aet, **{"Name": "stowage-test", **extra})
