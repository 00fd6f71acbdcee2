"""Forwarding (docs/forwarding.md) as an administrator sees it: `[[forward]]` rules send
what DCMTK storescu stores on to DCMTK storescp and a pynetdicom SCP over loopback, through
the durable queue: a destination down then up, `kill -9` of serve right after the acks,
a second destination unaffected, refusals parked with the destination's status and comment."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from conftest import HOST, MR, copies, dataset_bytes, export_all, free_port, series_instances, \
    storescu, wait_for
from stowage.engine.runtime import config as cfg
from test_send import StoreSCP, scps  # noqa: F401  (scps: fixture)


def stowage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stowage.cli", *args], capture_output=True, text=True, timeout=120)



def send_as_is(port: int, path: Path) -> None:
    """C-STORE a file in its own (compressed) transfer syntax with pynetdicom (storescu would
    propose it only beside the uncompressed context of the same SOP class)."""
    ds = pydicom.dcmread(path)
    ae = AE("MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="STOWAGE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000


def write_config(path: Path, remotes: dict[str, int], rules: str) -> Path:
    text = "forward_retry_initial = 0.2\nforward_retry_max = 1.0\n"
    for name, port in remotes.items():
        text += f'[remotes.{name}]\nhost = "{HOST}"\nport = {port}\n'
    path.write_text(text + rules)
    return path


def queue_counts(data_dir: Path) -> dict[str, list[int]]:
    """`stowage queue`: destination -> [pending, done, parked, cancelled]."""
    r = stowage("queue", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    return {m[1]: [int(n) for n in m.groups()[1:5]] for m in re.finditer(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", r.stdout,
                                                                   re.M) if m[1] != "destination"}


def uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def test_a_bad_rule_is_one_clear_line(tmp_path):
    bad = {"unknown remote": ('to = "NOWHERE"', "NOWHERE is not a configured [remotes.NAME]"),
           "bad keyword": ('to = "DEST"\nmatch = "Modalty=CT"', "'Modalty=CT' is not Keyword=value"),
           "level": ('to = "DEST"\nlevel = "patient"', "level 'patient' is not one of instance, series, study"),
           "unknown key": ('to = "DEST"\npriority = 1', "unknown key(s) priority")}
    for what, (rule, message) in bad.items():
        path = write_config(tmp_path / "bad.toml", {"DEST": 104}, f"[[forward]]\n{rule}\n")
        with pytest.raises(cfg.ConfigError, match=re.escape(message)):
            cfg.load(path, env={})
    r = stowage("serve", "--config", str(path), "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("unknown key(s) priority"), r.stderr
    good = write_config(tmp_path / "good.toml", {"DEST": 104, "OTHER": 105},
                        '[[forward]]\nto = ["DEST", "OTHER"]\nmatch = "Modality=CT\\\\MR PatientName=DOE*"\n'
                        'calling_ae = "CT1"\n')
    rule, = cfg.load(good, env={}).forward
    assert rule.to == ("DEST", "OTHER") and rule.calling_ae == ("CT1",)


def test_down_destination_kill_9_and_restart_lose_nothing(make_server, scps, tmp_path):
    """CT goes to DEST (down at first), MR to OTHER (up). serve is killed -9 right after
    storescu got its acks; after the restart OTHER gets its MR while DEST is still down,
    and once DEST is up it gets every CT, byte for byte as stored, but the one deleted meanwhile. OTHER (storescp accepts
    uncompressed syntaxes only) gets the RLE MR converted, its pixels the same."""
    dest_port, other_port, metrics_port = free_port(), free_port(), free_port()
    other = scps(tmp_path / "other", aet="OTHER", port=other_port)
    conf = write_config(tmp_path / "forward.toml", {"DEST": dest_port, "OTHER": other_port},
                        '[[forward]]\nname = "ct"\nto = "DEST"\nmatch = "Modality=CT"\n'
                        '[[forward]]\nname = "mr"\nto = "OTHER"\nmodality = "MR"\ncalled_ae = "STOWAGE"\n')
    cts = series_instances(tmp_path / "ct", "P1", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 5)
    mrs = series_instances(tmp_path / "mr", "P2", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 3, src=MR)
    rle, = copies(Path(get_testdata_file("MR_small_RLE.dcm")), tmp_path / "rle", 1, "rle")
    server = make_server("--workers", "1", "--config", str(conf))
    storescu(server.port, cts + mrs)
    send_as_is(server.port, rle)
    mrs.append(rle)
    server.kill()  # acknowledged, perhaps not yet scanned: nothing may be lost

    server = make_server("--workers", "1", "--config", str(conf), "--metrics-port", str(metrics_port),
                         data_dir=server.data_dir, port=server.port)
    wait_for(lambda: other.received().keys() == uids(mrs), 60, lambda: f"OTHER did not get the MR:\n{server.log()}")
    counts = wait_for(lambda: (c := queue_counts(server.data_dir)).get("DEST", [0])[0] == 5 and c, 30,
                      "DEST's entries are not pending")
    assert counts["OTHER"] == [0, 4, 0, 0], counts
    assert "DEST unreachable" in server.log()
    deleted = cts.pop()  # deleted while queued: never forwarded
    r = stowage("delete", "--data-dir", str(server.data_dir), "--instance", *uids([deleted]), "--yes")
    assert r.returncode == 0, r.stderr

    dest = scps(tmp_path / "dest", aet="DEST", port=dest_port)
    wait_for(lambda: dest.received().keys() == uids(cts), 60, lambda: f"DEST did not get every CT:\n{server.log()}")
    assert other.received().keys() == uids(mrs)  # no CT went to OTHER
    r = export_all(server.data_dir, tmp_path / "export")
    assert r.returncode == 0, r.stderr
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
              for p in (tmp_path / "export").iterdir()}
    for path in (tmp_path / "dest").iterdir():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(path) == stored[uid], f"{uid} not forwarded as stored"
    converted = next(pydicom.dcmread(p) for p in (tmp_path / "other").iterdir()
                     if p.name.endswith(str(pydicom.dcmread(rle).SOPInstanceUID)))
    assert converted.file_meta.TransferSyntaxUID != RLELossless
    assert (converted.pixel_array == pydicom.dcmread(rle).pixel_array).all()
    wait_for(lambda: queue_counts(server.data_dir).get("DEST") == [0, 4, 0, 1], 30, "DEST's entries not done")
    body = urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'stowage_forward_delivered_total{destination="DEST"} 4.0' in body, body
    assert 'stowage_forward_entries{destination="DEST",state="pending"} 0.0' in body


@pytest.fixture
def refusing_scp():
    """A pynetdicom Storage SCP that refuses odd-numbered instances with 0xA700 and an Error
    Comment; `calls` counts the C-STOREs it got per SOP Instance UID."""
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            calls[uid] = calls.get(uid, 0) + 1
        status = Dataset()
        odd = int(event.dataset.InstanceNumber) % 2 == 1
        status.Status = 0xA700 if odd else 0x0000
        if odd:
            status.ErrorComment = "no room for odd instances"
        return status
    ae = AE("REFUSER")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    scp = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, calls
    scp.shutdown()


def test_refusals_are_parked_with_status_and_comment(make_server, refusing_scp, tmp_path):
    port, calls = refusing_scp
    conf = write_config(tmp_path / "forward.toml", {"REFUSER": port}, '[[forward]]\nto = "REFUSER"\n')
    files = series_instances(tmp_path / "ct", "P3", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 4)
    server = make_server("--workers", "1", "--config", str(conf))
    storescu(server.port, files)
    wait_for(lambda: queue_counts(server.data_dir).get("REFUSER") == [0, 2, 2, 0], 60,
             lambda: f"not 2 done and 2 parked:\n{server.log()}")
    r = stowage("queue", "--data-dir", str(server.data_dir), "--parked")
    parked = [line for line in r.stdout.splitlines() if line.startswith("parked ")]
    assert len(parked) == 2 and all("0xA700 refused with status 0xA700: no room for odd instances" in line
                                    for line in parked), r.stdout
    assert sorted(calls.values()) == [1, 1, 1, 1]  # each sent once: a refusal is not retried blindly
    r = stowage("queue", "--data-dir", str(server.data_dir), "--retry", "REFUSER")
    assert "2 parked entr(ies) of REFUSER queued again" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: sorted(calls.values()) == [1, 1, 2, 2], 60, "the retried entries were not sent again")
    wait_for(lambda: queue_counts(server.data_dir).get("REFUSER") == [0, 2, 2, 0], 60, "not parked again")


def test_rules_match_as_c_find_does():
    """Conditions on catalog columns and on any header attribute, with C-FIND matching."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from stowage.engine.forward.scan import Rules
    header = Dataset()
    header.BodyPartExamined, header.StationName = "CHEST", "CT-ROOM-2"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, header)
    row = {"modality": "CT", "patient_name": "DOE^JOHN", "calling_ae": "CT1", "called_ae": "STOWAGE",
           "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "study_date": "20240315", "header": buf.getvalue(),
           "transfer_syntax_uid": ExplicitVRLittleEndian}
    specs = [{"name": "names", "to": "A", "match": "PatientName=DOE* Modality=CT\\MR"},
             {"name": "station", "to": "B", "match": "StationName=CT-ROOM-?", "calling_ae": ["CT1", "CT2"]},
             {"name": "dates", "to": "C", "match": "StudyDate=20240101-20240131"},
             {"name": "other caller", "to": "D", "calling_ae": "MR1"}]
    rules = Rules(cfg.parse_rules(specs, {"A": 1, "B": 1, "C": 1, "D": 1}))
    assert rules.destinations(row) == [("A", "names"), ("B", "station")]


def test_backoff_doubles_up_to_the_maximum():
    from stowage.engine.forward.deliver import backoff
    assert [backoff(n, 5.0, 60.0) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_done_entries_are_pruned_and_still_counted(tmp_path):
    from stowage.engine.forward.queue import Queue
    q = Queue(tmp_path)
    q.start_cursor(0)
    rows = [("DEST", "r", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3", "000-1.seg",
             i * 100, 100, 1000 + i, "1.2.3.9", 0.0) for i in range(4)]
    assert q.add(rows, 1003) == 4 and q.add(rows, 1003) == 0  # a record is queued once per destination
    ids = [e.id for e in q.due("DEST", 10)]
    q.settle([(ids[0], 0), (ids[1], 0)], [(ids[2], 0xA700, "refused with status 0xA700: full")], [])
    assert q.prune(older_than=0) == 2
    assert q.delivered() == {"DEST": 2}
    assert {key: n for key, (n, _oldest) in q.summary().items()} == {("DEST", "pending"): 1, ("DEST", "parked"): 1}
    assert q.parked() == [("DEST", "1.2.3.2", 0xA700, "refused with status 0xA700: full")]
    q.close()


def test_a_schedule_holds_entries_outside_its_window(tmp_path):
    import datetime
    from stowage.engine.forward.queue import Queue
    night, = cfg.parse_rules([{"name": "night", "to": "DEST", "schedule": "19:00-07:00"}], {"DEST": 1})
    at = lambda hh, mm: datetime.datetime(2026, 1, 1, hh, mm)  # noqa: E731
    assert [night.sends_at(at(h, m)) for h, m in ((18, 59), (19, 0), (23, 59), (0, 0), (6, 59), (7, 0))] == \
        [False, True, True, True, True, False]
    with pytest.raises(cfg.RuleError, match="not a window"):
        cfg.parse_rules([{"to": "DEST", "schedule": "7pm-7am"}], {"DEST": 1})
    q = Queue(tmp_path)
    q.start_cursor(0)
    q.add([("DEST", rule, f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3", "000-1.seg",
            i, 100, 1000 + i, "1.2.3.9", 0.0) for i, rule in enumerate(("night", "always"))], 1001)
    assert [e.sop_instance_uid for e in q.due("DEST", 10, ["night"])] == ["1.2.3.1"]
    assert [e.sop_instance_uid for e in q.due("DEST", 10)] == ["1.2.3.0", "1.2.3.1"]
    q.close()


def test_series_level_waits_until_the_series_is_quiet(tmp_path):
    """Instances stored (stowage import) in two goes, scanned after each for a series-level
    rule: every entry of the series waits until `quiet` seconds after its newest instance,
    then all are due together."""
    from stowage.engine.forward.queue import Queue
    from stowage.engine.forward.scan import Scanner
    data = tmp_path / "data"
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = series_instances(tmp_path / "s", "P4", study, series, 3)
    conf = write_config(tmp_path / "f.toml", {"DEST": 104},
                        '[[forward]]\nname = "s"\nto = "DEST"\nlevel = "series"\nquiet = 600\n')
    config = cfg.load(conf, env={}, overrides={"data_dir": data})
    scanned = 0
    for part in (files[:2], files[2:]):
        r = stowage("import", "--data-dir", str(data), *map(str, part))
        assert r.returncode == 0, r.stderr
        q = Queue(data)
        q.start_cursor(0)  # forward what is already there
        scanner = Scanner(config, q)
        scanned += scanner.scan()
        scanner.close()
    assert scanned == 3
    arrivals = sorted(at / 1e6 for _uid, at in q.queued_since(0))
    oldest, newest = arrivals[0], arrivals[-1]
    assert newest > oldest
    # Without the hold the first two would be due half-way between their quiet time and the third's.
    assert q.due("DEST", 10, now=(oldest + newest) / 2 + 600) == []
    assert {e.sop_instance_uid for e in q.due("DEST", 10, now=newest + 601)} == uids(files)
    q.close()


def test_series_and_study_go_out_after_their_quiet_time(make_server, scps, tmp_path):
    """End to end, with storescu sending one instance at a time half a second apart: a
    series-level rule sends each series, a study-level rule the whole study, only once
    `quiet` seconds passed since the last instance of it was sent to us (every file the
    destinations wrote is younger than that), each instance once; an instance arriving
    after its series went out is sent after a quiet time of its own."""
    import time
    quiet = 3.0
    series_port, study_port = free_port(), free_port()
    series_dest = scps(tmp_path / "series", aet="SERIES", port=series_port)
    study_dest = scps(tmp_path / "study", aet="STUDY", port=study_port)
    conf = write_config(tmp_path / "f.toml", {"SERIES": series_port, "STUDY": study_port},
                        f'[[forward]]\nname = "s"\nto = "SERIES"\nlevel = "series"\nquiet = {quiet}\n'
                        f'[[forward]]\nname = "t"\nto = "STUDY"\nlevel = "study"\nquiet = {quiet}\n')
    study = pydicom.uid.generate_uid()
    one = series_instances(tmp_path / "one", "P6", study, pydicom.uid.generate_uid(), 2)
    two = series_instances(tmp_path / "two", "P6", study, pydicom.uid.generate_uid(), 3)
    late = two.pop()
    server = make_server("--workers", "1", "--config", str(conf))
    sent_at: dict[str, float] = {}  # SOP Instance UID -> when storescu started sending it (before its stamp)
    for f in one + two:
        sent_at[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = time.time()
        storescu(server.port, [f])
        time.sleep(0.5)

    def written(scp: StoreSCP) -> dict[str, float]:
        """SOP Instance UID -> when the destination wrote it."""
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.stat().st_mtime
                for p in scp.out.iterdir()}

    def quiet_since(files: list[Path]) -> float:
        return max(sent_at[u] for u in uids(files)) + quiet
    wait_for(lambda: series_dest.received().keys() == uids(one + two) and study_dest.received().keys() == uids(one + two), 60,
             lambda: f"the series and the study were not forwarded:\n{server.log()}")
    for uid, at in written(series_dest).items():
        assert at >= quiet_since(one if uid in uids(one) else two), "a series went out before it was quiet"
    assert min(written(study_dest).values()) >= quiet_since(one + two), "the study went out before it was quiet"

    sent_at[str(pydicom.dcmread(late, stop_before_pixels=True).SOPInstanceUID)] = time.time()
    storescu(server.port, [late])
    wait_for(lambda: series_dest.received().keys() == uids(one + two + [late]) and
             study_dest.received().keys() == uids(one + two + [late]), 60, lambda: f"the late instance:\n{server.log()}")
    (late_uid,) = uids([late])
    assert written(series_dest)[late_uid] >= quiet_since([late])
    assert written(study_dest)[late_uid] >= quiet_since([late])
    # Each instance went out once: the series and the study were not sent again with it.
    from stowage.engine.forward.queue import Queue
    q = Queue(server.data_dir, readonly=True)

    def done() -> dict[str, int]:
        return {d: n for (d, state), (n, _o) in q.summary().items() if state == "done"}
    # a destination holds its file a moment before the queue records the send (outcomes are
    # settled every 0.2 s): wait for the record, then count
    wait_for(lambda: sum(done().values()) >= 10, 30, lambda: f"sends not recorded: {q.summary()}")
    assert done() == {"SERIES": 5, "STUDY": 5}
    q.close()

    # an audit line per forwarded instance and destination, written after the queue's commit
    def forwarded() -> list[dict]:
        lines = (server.data_dir / "audit.jsonl").read_text().splitlines()
        return [d for d in map(json.loads, lines) if d.get("event") == "forward"]
    wait_for(lambda: len(forwarded()) >= 10, 10, lambda: f"audit lines: {forwarded()}")
    assert sorted((d["destination"], d["sop_instance_uid"], d["status"]) for d in forwarded()) == \
        sorted((dest, u, 0) for dest in ("SERIES", "STUDY") for u in uids(one + two + [late]))


def test_a_clock_stepped_back_loses_nothing(tmp_path):
    """The queue's cursor ahead of the clock (as after the clock was stepped back): what is
    stored now, stamped behind the cursor, is still queued."""
    import time
    from stowage.engine.forward.queue import Queue
    from stowage.engine.forward.scan import Scanner
    data = tmp_path / "data"
    files = series_instances(tmp_path / "s", "P5", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 2)
    r = stowage("import", "--data-dir", str(data), str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    config = cfg.load(write_config(tmp_path / "f.toml", {"DEST": 104}, '[[forward]]\nto = "DEST"\n'), env={},
                      overrides={"data_dir": data})
    q = Queue(data)
    q.start_cursor(time.time_ns() // 1000 + 3600_000_000)  # an hour ahead
    scanner = Scanner(config, q)
    assert scanner.scan() == 2 and scanner.scan() == 0
    scanner.close()
    assert {e.sop_instance_uid for e in q.due("DEST", 10)} == uids(files)
    q.close()


def test_a_queue_made_by_the_first_release_is_upgraded_in_place(tmp_path):
    """A queue database without the columns added since (series, project, commitment) keeps
    its entries and takes new ones after an upgrade."""
    import sqlite3
    from stowage.engine.forward.queue import Queue, path_of
    path_of(tmp_path).parent.mkdir()
    db = sqlite3.connect(path_of(tmp_path))
    db.executescript("""
        CREATE TABLE entries (id INTEGER PRIMARY KEY, destination TEXT NOT NULL, rule TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, transfer_syntax_uid TEXT NOT NULL,
            study_instance_uid TEXT NOT NULL, segment TEXT NOT NULL, "offset" INTEGER NOT NULL,
            dataset_length INTEGER NOT NULL, received_at INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0, status INTEGER,
            comment TEXT NOT NULL DEFAULT '', queued_at REAL NOT NULL, done_at REAL,
            UNIQUE (destination, sop_instance_uid, received_at));
        CREATE TABLE cursor (id INTEGER PRIMARY KEY CHECK (id = 0), received_at INTEGER NOT NULL);
        INSERT INTO cursor VALUES (0, 1000);
        INSERT INTO entries (destination, rule, sop_instance_uid, sop_class_uid, transfer_syntax_uid,
            study_instance_uid, segment, "offset", dataset_length, received_at, queued_at)
            VALUES ('DEST', 'r', '1.2.3.0', '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', '1.2.3', '000-1.seg',
                    0, 100, 1000, 0);
    """)
    db.close()
    q = Queue(tmp_path)
    assert q.add([("DEST", "r", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.3", "000-1.seg",
                   100, 100, 1001, "1.2.3.9", 0.0, "TRIAL", "1.2.3")], 1001) == 1
    assert [(e.sop_instance_uid, e.project) for e in q.due("DEST", 10)] == [("1.2.3.0", ""), ("1.2.3.1", "TRIAL")]
    assert q.commitments() == {("DEST", "wanted"): 1}
    q.close()


def sending_processes(server) -> list:
    """The forwarding process's sending processes (engine/forward/sending.py)."""
    import psutil
    out = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "stowage.engine.forward.sending" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_a_sending_process_killed_mid_drain_loses_nothing(make_server, tmp_path):
    """A full queue drains into a pynetdicom SCP (slower than us) when the destination's
    sending process is killed -9: a new one is started, every instance arrives (those it
    had in flight perhaps twice), every entry ends done, and serve's stop leaves no sending
    process behind."""
    import psutil
    import sqlite3
    import time as _time
    from pydicom.uid import generate_uid
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def on_store(event):
        _time.sleep(0.005)
        with lock:
            uid = str(event.request.AffectedSOPInstanceUID)
            calls[uid] = calls.get(uid, 0) + 1
        return 0x0000

    def count(state: str) -> int:
        db = sqlite3.connect(server.data_dir / "forward" / "queue.sqlite", timeout=10)
        try:
            return db.execute("SELECT count(*) FROM entries WHERE state = ?", (state,)).fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            return 0
        finally:
            db.close()
    n, port = 80, free_port()
    conf = write_config(tmp_path / "f.toml", {"SLOW": port}, '[[forward]]\nto = "SLOW"\n')
    files = series_instances(tmp_path / "mr", "PS", generate_uid(), generate_uid(), n, src=MR)
    server = make_server("--workers", "1", "--config", str(conf))
    storescu(server.port, files)
    wait_for(lambda: count("pending") == n, 60, "entries not queued")
    ae = AE("SLOW")
    ae.supported_contexts = AllStoragePresentationContexts
    scp = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        wait_for(lambda: len(calls) >= 20, 60, lambda: f"the drain did not start:\n{server.log()}", interval=0.01)
        killed, = sending_processes(server)
        killed.kill()
        assert len(calls) < n, "the drain ended before the kill: nothing tested"
        wait_for(lambda: count("done") == n, 60, lambda: f"not every entry delivered:\n{server.log()}")
    finally:
        scp.shutdown()
    assert set(calls) == uids(files)
    assert (count("pending"), count("parked")) == (0, 0)
    assert "sending process for SLOW ended (killed by signal 9" in server.log()
    restarted, = sending_processes(server)
    assert restarted.pid != killed.pid
    server.stop()
    wait_for(lambda: not psutil.pid_exists(restarted.pid) or restarted.status() == psutil.STATUS_ZOMBIE, 20,
             "the sending process outlived serve")
