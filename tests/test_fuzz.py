"""A fixed-seed, bounded share of the fuzzer (bench/harness/fuzz.py, issue #20) run as users
run it: mutated A-ASSOCIATE-RQs, PDUs in orders the state machine does not expect, P-DATA on accepted associations (C-ECHO commands, C-STORE
data sets with lying and undefined lengths, deep sequences, bad VRs and character sets,
C-FIND identifiers), damaged files for `stowage import` while serving, and DICOMweb requests
made wrong on the HTTP port (bench/harness/fuzz_http.py). The invariants
(server answering, no traceback, no worker lost, descriptors and threads back, the good
file of every import stored, `stowage verify` clean) are the tool's; the test checks its
report and reads the server's log itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bounded_fuzz_run_breaks_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stowage.bench.harness.fuzz", "--cases", "360", "--seed", "20",
                        "--check-every", "120", "--import-every", "12", "--work", str(tmp_path / "fuzz"), "--json"],
                       capture_output=True, text=True, timeout=600)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["violations"] == [], report["violations"] or r.stderr[-3000:]
    assert report["total"] == 360 and set(report["cases"]) == {"assoc", "sequence", "echo", "store", "find", "import",
                                                         "http"}
    outcomes = report["outcomes"]
    # the mix reached the parsers: some associations aborted, some stores refused, queries answered
    assert any(k.startswith("assoc: aborted") for k in outcomes), outcomes
    assert any(k.startswith("store: answered 0xC") or k.startswith("store: answered 0xA9") for k in outcomes), outcomes
    assert any(k.startswith("find: answered") for k in outcomes), outcomes
    # PDUs out of order reached an accepted association and were ended by an A-ABORT
    assert any(k.startswith("sequence: accepted") and "aborted" in k for k in outcomes), outcomes
    # and the HTTP surface: requests refused with a 4xx, and some answered
    assert any(k.startswith("http: status 4") for k in outcomes), outcomes
    assert any(k.startswith("http: status 2") for k in outcomes), outcomes
    # a Host header that is not a host name: refused, not a 500 with a traceback
    assert outcomes.get("regression http: status 400") == 1, outcomes
    # a Specific Character Set with NULs in it: stored (its text read as Latin-1), not a 500
    assert outcomes.get("regression http: status 200") == 1, outcomes
    assert report["checks"] == 3 and report["import_files"] > 0
    log = Path(report["log"]).read_text(errors="replace")
    assert "listening on" in log and "Traceback" not in log
