"""Tests for the load generator (protocol/store_scu.py, bench/loadgen.py, `stowage bench`):
what arrives, on how many associations, in which syntax, and how refusals are counted.
No timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from stowage.bench.corpus import generate
from stowage.bench.loadgen import Target, load_corpus, run
from stowage.protocol.store_scu import parse_response, store_command
from conftest import HOST, dataset_bytes, export_all, free_port

EXPLICIT, IMPLICIT, RLE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5"
CT_CLASS, MR_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.88.11"
US_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"


class Scp:
    """An in-process pynetdicom Storage SCP that records what it receives and answers
    every C-STORE with ``status`` (and an Error Comment when it is not success)."""

    def __init__(self, status: int = 0x0000, syntaxes: tuple[str, ...] = (EXPLICIT, IMPLICIT, RLE),
                 classes: tuple[str, ...] = (CT_CLASS, MR_CLASS, SR_CLASS, US_CLASS)) -> None:
        self.status = status
        self.received: dict[str, tuple[str, str, bytes]] = {}  # uid -> (sop class, syntax, dataset bytes)
        self.associations: set[int] = set()
        self.lock = threading.Lock()
        self.port = free_port()
        ae = AE("TESTSCP")
        ae.maximum_associations = 16
        for cls in classes:
            ae.add_supported_context(cls, list(syntaxes))
        ae.add_supported_context(Verification)
        self.server = ae.start_server((HOST, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event):
        with self.lock:
            self.associations.add(id(event.assoc))
            self.received[event.request.AffectedSOPInstanceUID] = (
                event.request.AffectedSOPClassUID, event.context.transfer_syntax,
                bytes(event.request.DataSet.getvalue()))
        if self.status == 0:
            return 0x0000
        rsp = Dataset()
        rsp.Status = self.status
        rsp.ErrorComment = "refused by the test SCP"
        return rsp

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory():
    made: list[Scp] = []

    def make(**kw) -> Scp:
        s = Scp(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def test_command_set_round_trip() -> None:
    cmd = store_command(7, CT_CLASS, "1.2.3.4")
    assert cmd[:4] == b"\x00\x00\x00\x00"  # (0000,0000) group length first
    field, status, comment = parse_response(cmd)
    assert field == 0x0001 and status == -1 and comment == ""


def test_corpus_arrives_byte_exact_over_k_associations(tmp_path: Path, scp_factory) -> None:
    files = (generate(tmp_path / "ct", "ct", 4) + generate(tmp_path / "mr", "small", 9, transfer_syntax="implicit")
             + generate(tmp_path / "rle", "small", 5, transfer_syntax="rle") + generate(tmp_path / "sr", "sr", 3))
    items = load_corpus(files)
    scp = scp_factory()
    res = run(Target(HOST, scp.port, "TESTSCP"), items, 3, progress=False)
    assert res.statuses == {"0x0000": 21} and res.completed == 21 and res.failed == 0
    assert res.errors == []
    assert len(scp.associations) == 3
    assert set(res.latency_ms) >= {"p50", "p95", "p99"}
    assert res.latency_ms["p50"] <= res.latency_ms["p95"] <= res.latency_ms["p99"]
    assert res.bytes == sum(it.length for it in items)
    # what it reports is what the peer received: every instance, every byte, exactly once
    assert len(scp.received) == res.completed == len(items)
    assert sum(len(data) for _c, _s, data in scp.received.values()) == res.bytes
    # and its rates are those counts over its wall time (not a speed: whatever that time was)
    assert res.wall_s > 0
    assert res.inst_per_s == pytest.approx(res.completed / res.wall_s, rel=5e-3, abs=0.01)
    assert res.mb_per_s == pytest.approx(res.bytes / 1e6 / res.wall_s, rel=5e-3, abs=0.002)
    for path, item in zip(files, items):
        sop_class, syntax, data = scp.received[item.sop_instance_uid]
        assert sop_class == item.sop_class_uid and syntax == item.transfer_syntax_uid
        assert data == dataset_bytes(path)
    assert Counter(s for _, s, _ in scp.received.values()) == {EXPLICIT: 7, IMPLICIT: 9, RLE: 5}
    assert res.target_pid == os.getpid()  # found by its listening port: this process
    assert res.target_cpu_s is not None and res.target_peak_rss_mb > 0


def test_large_dataset_is_streamed_in_pdu_fragments(tmp_path: Path, scp_factory) -> None:
    files = generate(tmp_path, "us", 1, frames=3)  # 2.7 MB, over the preload limit below
    items = load_corpus(files)
    scp = scp_factory()
    res = run(Target(HOST, scp.port, "TESTSCP"), items, 1, progress=False, preload_limit=1 << 20)
    assert res.completed == 1 and res.failed == 0
    assert scp.received[items[0].sop_instance_uid][2] == dataset_bytes(files[0])


def test_failure_status_counted_with_its_comment(tmp_path: Path, scp_factory) -> None:
    items = load_corpus(generate(tmp_path, "small", 12))
    scp = scp_factory(status=0xA700)
    res = run(Target(HOST, scp.port, "TESTSCP"), items, 2, progress=False)
    assert res.statuses == {"0xA700": 12}
    assert res.failed == 12 and res.completed == 0 and res.warning == 0
    assert len(scp.received) == 12  # every one was sent, and answered with the failure
    assert res.comments["0xA700"] == "refused by the test SCP"


def test_warning_status_is_not_a_failure(tmp_path: Path, scp_factory) -> None:
    items = load_corpus(generate(tmp_path, "small", 4))
    scp = scp_factory(status=0xB000)
    res = run(Target(HOST, scp.port, "TESTSCP"), items, 1, progress=False)
    assert res.statuses == {"0xB000": 4} and res.warning == 4 and res.failed == 0


def test_refused_context_is_reported_and_the_rest_sent(tmp_path: Path, scp_factory) -> None:
    files = generate(tmp_path / "a", "small", 3) + generate(tmp_path / "b", "small", 2, transfer_syntax="rle")
    scp = scp_factory(syntaxes=(EXPLICIT,))
    res = run(Target(HOST, scp.port, "TESTSCP"), load_corpus(files), 1, progress=False)
    assert res.statuses == {"0x0000": 3, "not sent: presentation context refused": 2}
    assert res.failed == 2 and len(scp.received) == 3


def test_nobody_listening(tmp_path: Path) -> None:
    items = load_corpus(generate(tmp_path, "small", 6))
    res = run(Target(HOST, free_port(), "NOBODY"), items, 2, progress=False)
    assert res.statuses == {"not sent: association failed": 6} and res.failed == 6
    assert res.errors and all("is unreachable" in e for e in res.errors)
    assert res.target_pid is None and res.latency_ms == {}


def test_rejected_association(tmp_path: Path, scp_factory) -> None:
    """An SCP that accepts none of the proposed contexts: every instance is unsent, with the reason."""
    items = load_corpus(generate(tmp_path, "sr", 2))
    scp = scp_factory(classes=(CT_CLASS,))
    res = run(Target(HOST, scp.port, "TESTSCP"), items, 1, progress=False)
    assert res.statuses == {"not sent: association failed": 2}
    assert "accepted none" in res.errors[0]


def test_cli_against_full_stowage(tmp_path: Path, make_server) -> None:
    """stowage refusing for lack of disk space: exit 1, every store counted under 0xA700 in
    the table and the JSON, with the archive's Error Comment; a chart is written."""
    srv = make_server("--workers", "1", STOWAGE_MIN_FREE_BYTES=str(10 ** 15))
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--port", str(srv.port), "--aet", "STOWAGE",
                        "-k", "1,2", "--kind", "small", "--syntax", "explicit,implicit", "--count", "5", "-q",
                        "--json", str(out), "--chart", str(chart)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0xA700: 20" in r.stdout
    data = json.loads(out.read_text())
    assert [run["associations"] for run in data["runs"]] == [1, 2]
    for run_ in data["runs"]:
        assert run_["statuses"] == {"0xA700": 10} and run_["failed"] == 10
        assert run_["comments"]["0xA700"]
        assert run_["target_pid"] == srv.proc.pid
    assert data["summary"][0]["failed"] == 10
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what it counted as failed, the archive did not store
    exported = export_all(srv.data_dir, tmp_path / "out")
    assert exported.returncode == 0, exported.stderr
    assert list((tmp_path / "out").glob("*.dcm")) == []


def test_cli_success_with_a_given_corpus(tmp_path: Path, make_server) -> None:
    srv = make_server("--workers", "1")
    sources = generate(tmp_path / "corpus" / "ct", "ct", 3) + \
        generate(tmp_path / "corpus" / "sr", "sr", 4, transfer_syntax="deflate")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--port", str(srv.port), "-q",
                        "--corpus", str(tmp_path / "corpus"), "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    (run_,) = json.loads(out.read_text())["runs"]
    assert run_["statuses"] == {"0x0000": 7} and run_["instances"] == 7
    assert run_["completed"] == 7 and run_["failed"] == 0 and run_["warning"] == 0
    # what it counted as completed is what the archive holds: those 7, as they were sent
    assert run_["bytes"] == sum(len(dataset_bytes(p)) for p in sources)
    exported = export_all(srv.data_dir, tmp_path / "out")
    assert exported.returncode == 0, exported.stderr
    from pydicom import dcmread
    assert {p.stem: dataset_bytes(p) for p in (tmp_path / "out").glob("*.dcm")} == \
        {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p) for p in sources}


def test_cli_usage_errors() -> None:
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "-k", "0", "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and ">= 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--kind", "pet", "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "unknown kind" in r.stderr


def test_compare_runs_end_to_end(tmp_path: Path) -> None:
    """bench/compare with a tiny corpus, one receiver and both senders: a table with a row
    per configuration and nothing left running (receivers are stopped by PID)."""
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "stowage.bench.harness.compare", "--small-count", "8", "--kinds", "small",
                        "--receivers", "stowage,storescp", "--associations", "1", "2", "--repeat", "1",
                        "--json", str(out), "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "machine:" in r.stdout and "ratio vs stowage" in r.stdout
    data = json.loads(out.read_text())
    rows = {(x["sender"], x["receiver"], x["associations"]): x for x in data["results"]}
    assert set(rows) == {(s, n, k) for s in ("storescu", "stowage-bench") for n in ("stowage", "storescp")
                         for k in (1, 2)}
    for key, x in rows.items():
        assert x["status"] == "ok", x["note"]
        assert len(x["runs"]) == 1 and x["runs"][0]["leftover_procs"] == 0
        assert x["runs"][0]["errors"] == [] and x["runs"][0]["senders_ok"], (key, x["runs"][0])
        if key[1] == "storescp":  # it writes a file per instance, which the bench counts
            assert x["runs"][0]["received"] == 8, (key, x["runs"][0])
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # temp dirs cleaned up


@pytest.mark.parametrize("fresh", [False, True])
def test_cli_fresh_sends_new_instances_each_run(tmp_path: Path, scp_factory, fresh: bool) -> None:
    scp = scp_factory()
    r = subprocess.run([sys.executable, "-m", "stowage.cli", "bench", "--port", str(scp.port), "--aet", "TESTSCP",
                        "--count", "4", "--repeat", "2", "-q", *(["--fresh"] if fresh else [])],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(scp.received) == (8 if fresh else 4)
    said = r.stdout + r.stderr
    assert said.count(" 4 ok, 0 warning, 0 failed") == 2, said  # both runs counted all they sent
