"""Space reclaim against a running archive, with real peers (DCMTK storescu and findscu):
`stowage compact` drops superseded and deleted records and the disk usage of segments/
drops, while every live instance stays findable and is exported byte-identical; kill -9
of the compactor, and of the server while it compacts in the background, at random
moments, never loses a live instance, never brings back a dead one and never leaves
duplicate rows."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import (HOST, catalog_sealed, cli, dcmtk, export_all, dataset_bytes, received_by_dcmtk, series_instances,
                      wait_for)
from stowage.engine.lifecycle.compaction import COMPACT_SLOT, JOURNAL, RESERVED
from stowage.catalog import manifest

pytestmark = pytest.mark.timeout(900)
# Small segments, fast sealing, retired segments unlinked at once: many segments to compact.
ENV = {"STOWAGE_SEGMENT_SIZE": "200000", "STOWAGE_SEAL_INTERVAL": "0.2", "STOWAGE_COMPACT_GRACE": "0",
       "STOWAGE_COMPACT_INTERVAL": "0"}


def stowage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli(*args, env=env)


def new_versions(files: list[Path], out: Path, tag: str) -> list[Path]:
    """The same SOP instances with different content (Image Comments)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in files:
        ds = pydicom.dcmread(p)
        ds.ImageComments = tag
        q = out / p.name
        ds.save_as(q, enforce_file_format=True)
        paths.append(q)
    return paths


def store(port: int, files: list[Path]) -> None:
    r = subprocess.run([dcmtk("storescu"), "-aec", "STOWAGE", HOST, str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def sent(files: list[Path], out: Path) -> dict[str, bytes]:
    """What DCMTK storescu sends for `files`: uid -> dataset bytes."""
    return received_by_dcmtk(files, out)


def stored_series(port: int, work: Path, patient: str, n: int) -> tuple[str, dict[str, Path], dict[str, bytes]]:
    """A new series of n instances stored with DCMTK storescu: its UID, its files by SOP
    Instance UID, and what storescu sent (uid -> dataset bytes)."""
    series = generate_uid()
    files = series_instances(work / "in", patient, generate_uid(), series, n)
    store(port, files)
    current = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    return series, current, sent(files, work / "dcmtk0")


def store_versions(port: int, files: list[Path], out: Path, tag: str) -> list[Path]:
    """New versions of `files` (see new_versions), stored with DCMTK storescu."""
    v = new_versions(files, out, tag)
    store(port, v)
    return v


def supersede(port: int, work: Path, i: int, chosen: list[str], current: dict[str, Path],
              expected: dict[str, bytes]) -> None:
    """Round i: the `chosen` instances superseded by new versions, stored; `current` and
    `expected` follow."""
    v = store_versions(port, [current[u] for u in chosen], work / f"v{i}", f"iteration {i}")
    expected.update(sent(v, work / f"dcmtk{i + 1}"))
    current.update(zip(chosen, v))


def wait_sealed(data_dir: Path) -> None:
    """Until the sealer has catalogued every segment to its end (compaction only rewrites
    such segments)."""
    wait_for(lambda: catalog_sealed(data_dir), 60, f"the sealer to catalogue every segment of {data_dir}")


def segment_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "segments").glob("*.seg"))


def query(data_dir: Path, sql: str) -> list[dict]:
    r = stowage("query", "--data-dir", str(data_dir), "--format", "json", sql)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def findscu_images(port: int, out: Path, series: str) -> set[str]:
    for p in out.glob("rsp*.dcm") if out.exists() else ():
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([dcmtk("findscu"), "-S", "-aec", "STOWAGE", "-X", "-od", str(out), "-k",
                        "QueryRetrieveLevel=IMAGE", "-k", "StudyInstanceUID", "-k", f"SeriesInstanceUID={series}",
                        "-k", "SOPInstanceUID", HOST, str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.glob("rsp*.dcm")}


def check(data_dir: Path, out: Path, expected: dict[str, bytes], gone: set[str]) -> None:
    """The invariants: every live instance exported byte-identical, exactly those, nothing
    dead visible, no record catalogued twice."""
    for p in out.glob("*.dcm") if out.exists() else ():
        p.unlink()
    r = export_all(data_dir, out)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {p.stem: dataset_bytes(p) for p in out.glob("*.dcm")}
    odd = sorted(set(expected) ^ set(got))
    assert not odd, (f"missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}: "
                     + json.dumps(query(data_dir, "SELECT sop_instance_uid, segment, \"offset\", received_at, "
                                  "sop_instance_uid IN (SELECT sop_instance_uid FROM instances) AS served "
                                  f"FROM records WHERE sop_instance_uid IN ({', '.join(repr(u) for u in odd[:5])})"),
                                  default=str))
    wrong = [u for u in expected if got[u] != expected[u]]
    assert not wrong, f"{len(wrong)} instance(s) not byte-identical, e.g. {wrong[:3]}"
    assert not gone & set(got)
    # one `stowage query` for both (a CLI call costs half a second of the test's time)
    doubles = query(data_dir, "SELECT 'records catalogued twice' AS what, sop_instance_uid, received_at, count(*) AS n "
                              "FROM records GROUP BY 2, 3 HAVING count(*) > 1 UNION ALL "
                              "SELECT 'instances served twice', sop_instance_uid, NULL, count(*) FROM instances "
                              "GROUP BY 2 HAVING count(*) > 1")
    assert not doubles, doubles[:3]


def test_compact_reclaims_superseded_and_deleted_records(make_server, tmp_path):
    server = make_server("--workers", "2", **ENV)
    data = server.data_dir
    study = generate_uid()
    a, b = generate_uid(), generate_uid()
    files_a = series_instances(tmp_path / "in", "COMPACT1", study, a, 40)
    files_b = series_instances(tmp_path / "in", "COMPACT1", study, b, 20)
    store(server.port, files_a + files_b)
    # keep-newest: the first versions of 30 are dead now
    resent = store_versions(server.port, files_a[:30], tmp_path / "v2", "second version")
    r = stowage("delete", "--data-dir", str(data), "--series", b, "--yes")
    assert r.returncode == 0, r.stderr
    expected = sent(resent + files_a[30:], tmp_path / "dcmtk")
    gone = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files_b}
    wait_sealed(data)
    before = segment_bytes(data)

    dry = stowage("compact", "--data-dir", str(data), "--dry-run", env=ENV)
    assert dry.returncode == 0, dry.stderr
    assert "would rewrite" in dry.stdout and segment_bytes(data) == before

    r = stowage("compact", "--data-dir", str(data), env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rewrote" in r.stdout and "MB/s" in r.stdout
    after = segment_bytes(data)
    # 30 superseded + 20 deleted of 110 records were dead; most sat in sealed segments
    assert after < before * 0.75, (before, after, r.stdout)
    assert list((data / "segments").glob(f"{COMPACT_SLOT}-*.seg")), "no compaction output"
    assert not (data / "segments" / JOURNAL).exists()

    check(data, tmp_path / "out", expected, gone)
    assert findscu_images(server.port, tmp_path / "find", a) == set(expected)
    assert findscu_images(server.port, tmp_path / "find", b) == set()
    # a second pass has nothing left to do below the ratio
    again = stowage("compact", "--data-dir", str(data), env=ENV)
    assert again.returncode == 0 and "rewrote 0 segment(s)" in again.stdout, again.stdout + again.stderr

    # The segments are the truth: a catalog rebuilt from them agrees.
    server.stop()
    r = stowage("rebuild-catalog", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    check(data, tmp_path / "out", expected, gone)


def test_stores_and_deletes_while_compacting(make_server, tmp_path):
    """Stores (new instances and new versions) and a delete land during a compaction: none
    is lost, nothing deleted comes back."""
    server = make_server("--workers", "2", **ENV)
    data = server.data_dir
    study, series = generate_uid(), generate_uid()
    files = series_instances(tmp_path / "in", "COMPACT2", study, series, 60)
    store(server.port, files)
    v2 = store_versions(server.port, files[:40], tmp_path / "v2", "v2")
    wait_sealed(data)
    compactor = subprocess.Popen([sys.executable, "-m", "stowage.cli", "compact", "--data-dir", str(data),
                                  "--rate", "1", "--ratio", "0.99"], env=dict(os.environ, **ENV),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    more = series_instances(tmp_path / "more", "COMPACT2", study, series, 10)
    v3 = new_versions(v2[:10], tmp_path / "v3", "v3")
    store(server.port, more + v3)
    victim = str(pydicom.dcmread(v2[20], stop_before_pixels=True).SOPInstanceUID)
    r = stowage("delete", "--data-dir", str(data), "--instance", victim, "--yes")
    assert r.returncode == 0, r.stderr
    out, err = compactor.communicate(timeout=300)
    assert compactor.returncode == 0, out + err
    assert "rewrote" in out
    expected = sent(v3 + v2[10:] + files[40:] + more, tmp_path / "dcmtk")
    del expected[victim]
    check(data, tmp_path / "out", expected, {victim})


def _state(data: Path) -> str:
    """Where an interrupted compaction stopped, read from what it left."""
    if not (data / "segments" / JOURNAL).exists():
        return "between rounds"
    m = manifest.load(data / "catalog")
    if any(v == RESERVED for k, v in m.watermarks.items() if k.startswith(f"{COMPACT_SLOT}-")
           and (data / "segments" / k).exists()):
        return "copying or rewriting"
    return "journal written"


def test_kill_9_of_the_compactor_at_random_moments(make_server, tmp_path):
    server = make_server("--workers", "2", **ENV)
    data = server.data_dir
    rng = random.Random(12)
    series, current, expected = stored_series(server.port, tmp_path, "COMPACT3", 80)
    gone: set[str] = set()
    states = []
    for i in range(15):
        # more dead space: new versions of some live instances, a deletion
        chosen = rng.sample(sorted(current), 6)
        supersede(server.port, tmp_path, i, chosen, current, expected)
        victim = rng.choice(sorted(current))
        r = stowage("delete", "--data-dir", str(data), "--instance", victim, "--yes")
        assert r.returncode == 0, r.stderr
        del current[victim], expected[victim]
        gone.add(victim)
        wait_sealed(data)
        compactor = subprocess.Popen([sys.executable, "-m", "stowage.cli", "compact", "--data-dir", str(data),
                                      "--rate", "0.5", "--ratio", "0.99"], env=dict(os.environ, **ENV),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Not a wait for anything: the kill lands at a random moment of the compaction, which
        # is what this test is about (the states it landed in are asserted below).
        time.sleep(rng.uniform(0.5, 4.0))
        compactor.send_signal(signal.SIGKILL)
        compactor.wait(30)
        states.append(_state(data))
        check(data, tmp_path / "out", expected, gone)
    assert "copying or rewriting" in states, states  # the kills did land inside compactions
    r = stowage("compact", "--data-dir", str(data), "--ratio", "0.99", env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (data / "segments" / JOURNAL).exists()
    m = manifest.load(data / "catalog")
    assert not [k for k, v in m.watermarks.items() if v == RESERVED and (data / "segments" / k).exists()]
    assert not list((data / "catalog").glob(".compact-*")), "temporary files left behind"
    check(data, tmp_path / "out", expected, gone)
    assert findscu_images(server.port, tmp_path / "find", series) == set(expected)


def test_kill_9_of_the_server_during_background_compaction(make_server, tmp_path):
    env = dict(ENV, STOWAGE_COMPACT_INTERVAL="1", STOWAGE_COMPACT_RATE="0.1", STOWAGE_COMPACT_LIVE_RATIO="0.99")
    server = make_server("--workers", "2", **env)
    data = server.data_dir
    rng = random.Random(7)
    series, current, expected = stored_series(server.port, tmp_path, "COMPACT4", 60)
    states = []
    for i in range(6):
        chosen = rng.sample(sorted(current), 12)
        supersede(server.port, tmp_path, i, chosen, current, expected)
        # the first pass starts 5 s after start-up (about when the stores above are done),
        # then one every second: at 0.1 MB/s a round takes a second or two. Not a wait for
        # anything: the kill lands at a random moment, which is what this test is about.
        time.sleep(rng.uniform(1.0, 8.0))
        states.append(_state(data))
        server.kill()
        check(data, tmp_path / "out", expected, set())
        server.start()
    assert "copying or rewriting" in states, states
    check(data, tmp_path / "out", expected, set())
    assert findscu_images(server.port, tmp_path / "find", series) == set(expected)


# Dies by SIGKILL at a chosen step of the first round, then lets nothing else run: the
# same compaction code, killed at a known point rather than a random one.
_INJECT = """
import os, signal, sys
from stowage.catalog import relocate
from stowage.engine.lifecycle import compaction
from stowage.cli import main
point, data = sys.argv[1], sys.argv[2]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def after(fn):
    def wrapped(*a, **k):
        r = fn(*a, **k)
        die()
        return r
    return wrapped
if point == "journal":
    compaction._write_journal = after(compaction._write_journal)
elif point == "reserved":
    compaction._copy = lambda *a, **k: die()
elif point == "copying":
    real, n = compaction._copy_record, [0]
    def copy_record(*a, **k):
        n[0] += 1
        if n[0] == 3:
            die()
        return real(*a, **k)
    compaction._copy_record = copy_record
elif point == "rewritten":
    relocate.rewrite = after(relocate.rewrite)
elif point == "committed":
    relocate.commit = after(relocate.commit)
main(["compact", "--data-dir", data, "--ratio", "0.99"])
"""


@pytest.mark.parametrize("point", ["journal", "reserved", "copying", "rewritten", "committed"])
def test_kill_9_at_each_step_of_a_round(make_server, tmp_path, point):
    server = make_server("--workers", "2", **ENV)
    data = server.data_dir
    files = series_instances(tmp_path / "in", "COMPACT5", generate_uid(), generate_uid(), 30)
    store(server.port, files)
    v2 = store_versions(server.port, files[:20], tmp_path / "v2", "v2")
    victim = str(pydicom.dcmread(files[25], stop_before_pixels=True).SOPInstanceUID)
    assert stowage("delete", "--data-dir", str(data), "--instance", victim, "--yes").returncode == 0
    expected = sent(v2 + files[20:], tmp_path / "dcmtk")
    del expected[victim]
    wait_sealed(data)
    before = segment_bytes(data)
    r = subprocess.run([sys.executable, "-c", _INJECT, point, str(data)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **ENV))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert (data / "segments" / JOURNAL).exists()
    check(data, tmp_path / "out", expected, {victim})
    r = stowage("compact", "--data-dir", str(data), "--ratio", "0.99", env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (data / "segments" / JOURNAL).exists()
    assert segment_bytes(data) < before
    m = manifest.load(data / "catalog")
    assert not [k for k, v in m.watermarks.items() if v == RESERVED and (data / "segments" / k).exists()]
    named = set(m.files) | set(m.retired) | {m.duplicates}
    stray = [p.name for p in (data / "catalog").glob("*compact-*") if p.name.replace(".studies", "") not in named]
    assert not stray, stray
    check(data, tmp_path / "out", expected, {victim})
    server.stop()
    assert stowage("rebuild-catalog", "--data-dir", str(data)).returncode == 0
    check(data, tmp_path / "out", expected, {victim})


HOLD_S = 10  # longer than a background round's copy here (0.2-0.4 MB at 0.05 MB/s)


def test_sigterm_during_background_compaction_rolls_the_round_back(make_server, tmp_path):
    env = dict(ENV, STOWAGE_COMPACT_INTERVAL="1", STOWAGE_COMPACT_RATE="0.05", STOWAGE_COMPACT_LIVE_RATIO="0.99")
    server = make_server("--workers", "2", **env)
    data = server.data_dir
    files = series_instances(tmp_path / "in", "COMPACT6", generate_uid(), generate_uid(), 40)
    store(server.port, files)
    v2 = store_versions(server.port, files[::2], tmp_path / "v2", "v2")  # old segments half live: a slow copy
    expected = sent(v2 + files[1::2], tmp_path / "dcmtk")

    def copying():
        """The journal of the background round in progress, once it is copying."""
        if _state(data) != "copying or rewriting":
            return None
        try:
            return json.loads((data / "segments" / JOURNAL).read_text())
        except (FileNotFoundError, ValueError):  # that round ended meanwhile
            return None

    round_ = wait_for(copying, 60, lambda: "a background compaction round to copy\n" + server.log()[-2000:])
    assert round_["segment"] and round_["replaced"], round_
    # An association held open makes the drain last longer than the round's copy: the round
    # must be told to stop as the drain begins, not once the workers are gone (it finished,
    # 1 run in 3, while the drain went on).
    from pynetdicom import AE
    holder = AE("HOLDER")
    holder.add_requested_context("1.2.840.10008.1.1")
    held = holder.associate(HOST, server.port, ae_title="STOWAGE")
    assert held.is_established
    threading.Timer(HOLD_S, held.release).start()
    # SIGTERM mid-copy (at 0.05 MB/s a round copies for seconds): the round is rolled back,
    # not finished first. stop() fails the test if the archive does not stop within 60 s.
    assert server.stop(timeout=60) == 0, server.log()[-3000:]
    rolled = re.findall(r"an interrupted compaction was rolled back \((\S+), replacing (\d+) segment", server.log())
    assert rolled == [(round_["segment"], str(len(round_["replaced"])))], server.log()[-3000:]
    assert not (data / "segments" / JOURNAL).exists(), "the round in progress was not rolled back"
    assert not (data / "segments" / round_["segment"]).exists(), "the interrupted round's output was kept"
    m = manifest.load(data / "catalog")
    assert not [k for k, v in m.watermarks.items() if v == RESERVED and (data / "segments" / k).exists()]
    kept = [s for s in round_["replaced"] if (data / "segments" / s).exists() and s not in m.retired_segments]
    assert kept == round_["replaced"], "a segment of the rolled-back round was retired or removed"
    check(data, tmp_path / "out", expected, set())


def test_a_segment_with_a_corrupt_mark_is_not_rewritten(make_server, tmp_path):
    """A mark names (segment, offset): were its record moved, it would lose the mark and be
    served again. Such a segment stays as it is; the others are still compacted."""
    from stowage.engine.store.integrity import marks_of
    server = make_server("--workers", "1", **ENV)
    data = server.data_dir
    study = generate_uid()
    files = series_instances(tmp_path / "in", "COMPACT2", study, generate_uid(), 40)
    store(server.port, files)
    store_versions(server.port, files[:33], tmp_path / "v2", "second version")  # 33 dead records
    wait_sealed(data)
    # a live record in the sparsest segment that still holds one: a compaction candidate
    victim = query(data, """
        WITH total AS (SELECT segment, sum(record_length) AS b FROM records GROUP BY 1),
             live AS (SELECT segment, sum(record_length) AS b FROM instances GROUP BY 1)
        SELECT i.segment, i."offset", i.sop_instance_uid FROM instances i
        JOIN total USING (segment) JOIN live USING (segment)
        WHERE live.b < 0.5 * total.b ORDER BY live.b / total.b, i."offset" LIMIT 1""")[0]
    assert marks_of(data).mark(victim["segment"], victim["offset"], victim["sop_instance_uid"], "test", "test")
    r = stowage("compact", "--data-dir", str(data), env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (data / "segments" / victim["segment"]).exists()
    left = query(data, "SELECT segment, \"offset\" FROM instances WHERE sop_instance_uid = "
                       f"'{victim['sop_instance_uid']}'")
    assert left == [{"segment": victim["segment"], "offset": victim["offset"]}], r.stdout
