"""The load generator behind ``stowage bench``: K sender processes, one association each,
C-STORE a pre-encoded corpus into any Storage SCP and measure it.

The corpus is read once in the parent (file meta parsed for the SOP class, instance and
transfer syntax, and the offset of the dataset); each sender process gets a contiguous
share (whole series stay on one association, as a modality or a migration sends them),
loads its datasets into memory (those over ``preload_limit`` are streamed from their
file instead), signals it is ready and waits for the start, then associates and sends with the
lean sender (protocol/store_scu.py). The clock runs from the start signal to the last
sender's end, association set-up and release included, as for DCMTK storescu.

Each store's latency is the time from its first byte written to its response read.
When the target is a local process (``pid``, or found by its listening port), its
process tree's CPU seconds and peak RSS are sampled (bench/procs.TreeMonitor).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from stowage.bench.corpus import series_layout
from stowage.protocol.status import STORE_WARNINGS, SUCCESS
from stowage.protocol.store_scu import Association, AssociationError, Dataset, StoreFailed, contexts_for

__all__ = ["Target", "Item", "RunResult", "load_corpus", "run", "find_listener", "status_name"]

PRELOAD_LIMIT = 64 << 20
_REOPEN_TRIES = 3


@dataclass(frozen=True)
class Target:
    """The Storage SCP under test."""

    host: str
    port: int
    called_aet: str = "ANY-SCP"
    calling_aet: str = "STOWAGE-BENCH"

    def __str__(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Item:
    """One corpus file: where its dataset bytes are and what they are."""

    path: str
    offset: int
    length: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    def dataset(self, preload_limit: int) -> Dataset:
        data = None
        if self.length <= preload_limit:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.length)
        return Dataset(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid, self.length,
                       data=data, path=self.path, offset=self.offset)


def load_corpus(paths: Sequence[str | Path]) -> list[Item]:
    """Parse the file meta of each Part-10 file (not its dataset)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    items = []
    for p in paths:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            try:
                read_preamble(f, False)
                meta = _read_file_meta_info(f)
            except Exception as e:
                raise ValueError(f"{p}: not a DICOM Part-10 file ({e})") from None
            offset = f.tell()
        try:
            items.append(Item(str(p), offset, size - offset, str(meta.MediaStorageSOPClassUID),
                              str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)))
        except AttributeError as e:
            raise ValueError(f"{p}: file meta lacks {e}") from None
    return items


def status_name(status: int | str) -> str:
    return f"0x{status:04X}" if isinstance(status, int) else status


@dataclass
class RunResult:
    """One measured run: every share sent over ``associations`` concurrent associations."""

    target: str
    associations: int
    instances: int                 # in the corpus
    bytes: int                     # dataset bytes in the corpus
    wall_s: float = 0.0
    completed: int = 0             # answered 0x0000
    warning: int = 0               # answered with a warning status
    failed: int = 0                # answered with a failure status, or never answered
    statuses: dict[str, int] = field(default_factory=dict)   # "0x0000" / "not sent: ..." -> count
    errors: list[str] = field(default_factory=list)          # association-level, one line each
    latency_ms: dict[str, float] = field(default_factory=dict)
    inst_per_s: float = 0.0
    mb_per_s: float = 0.0
    sender_cpu_s: float = 0.0      # CPU of our sender processes
    target_pid: int | None = None
    target_cpu_s: float | None = None
    target_peak_rss_mb: float | None = None
    machine_cpu_s: float | None = None  # every core's busy time over the run (clients, receiver, kernel)
    comments: dict[str, str] = field(default_factory=dict)   # status -> one Error Comment seen with it

    def to_dict(self) -> dict:
        return asdict(self)


def _send_share(index: int, target: Target, items: list[Item], *args) -> None:
    """One sender process: load the share, wait for the start, send it on one association.
    A bug or an unreadable file is reported as this share's error, not as a traceback."""
    results = args[-1]
    try:
        _send(index, target, items, *args)
    except Exception as e:
        now = time.monotonic()
        results.put({"index": index, "start": now, "end": now, "statuses": {"not sent: sender error": len(items)},
                     "comments": {}, "errors": [f"sender {index}: {type(e).__name__}: {e}"],
                     "latencies": b"", "bytes": 0, "cpu": 0.0})


def _send(index: int, target: Target, items: list[Item], contexts: list[tuple[str, str]],
          preload_limit: int, max_pdu: int, timeout: float, ready, go, progress, results) -> None:
    datasets = [it.dataset(preload_limit) for it in items]
    statuses: Counter = Counter()
    comments: dict[str, str] = {}
    errors: list[str] = []
    latencies = array("d")
    sent_bytes = 0
    with ready.get_lock():
        ready.value += 1
    go.wait()
    cpu0 = time.process_time()
    start = time.monotonic()
    assoc: Association | None = None
    i, failures_in_row = 0, 0
    while i < len(datasets):
        if assoc is None:
            try:
                assoc = Association(target.host, target.port, target.called_aet, target.calling_aet, contexts,
                                    max_pdu=max_pdu, timeout=timeout).open()
                failures_in_row = 0
            except AssociationError as e:
                errors.append(str(e))
                failures_in_row += 1
                if failures_in_row >= _REOPEN_TRIES or i == 0:
                    statuses["not sent: association failed"] += len(datasets) - i
                    break
                continue
        ds = datasets[i]
        if assoc.context_for(ds) is None:
            statuses["not sent: presentation context refused"] += 1
            i += 1
            progress[index] += 1
            progress[len(progress) // 2 + index] += 1
            continue
        t = time.perf_counter()
        try:
            status, comment = assoc.store(ds)
        except StoreFailed as e:
            errors.append(str(e))
            statuses["no response: association lost"] += 1
            assoc = None
            failures_in_row += 1
            i += 1
            progress[index] += 1
            progress[len(progress) // 2 + index] += 1
            if failures_in_row >= _REOPEN_TRIES:
                statuses["not sent: association lost"] += len(datasets) - i
                break
            continue
        latencies.append(time.perf_counter() - t)
        sent_bytes += ds.length
        key = status_name(status)
        statuses[key] += 1
        if comment and key not in comments:
            comments[key] = comment
        if status != SUCCESS:
            progress[len(progress) // 2 + index] += 1
        failures_in_row = 0
        i += 1
        progress[index] += 1
    if assoc is not None:
        assoc.release()
    end = time.monotonic()
    results.put({"index": index, "start": start, "end": end, "statuses": dict(statuses), "comments": comments,
                 "errors": errors, "latencies": latencies.tobytes(), "bytes": sent_bytes,
                 "cpu": time.process_time() - cpu0})


def find_listener(port: int) -> int | None:
    """PID of the local process listening on TCP ``port``, if any (and visible to us)."""
    import psutil
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return c.pid
    return None


def _is_local(host: str) -> bool:
    import socket
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    if any(a.startswith("127.") or a == "::1" for a in addrs):
        return True
    import psutil
    mine = {a.address for nics in psutil.net_if_addrs().values() for a in nics}
    return bool(addrs & mine)


def run(target: Target, items: list[Item], associations: int, *, pid: int | None = None,
        monitor_target: bool = True, progress: bool = True, label: str = "", timeout: float = 60.0,
        max_pdu: int = 1 << 20, preload_limit: int = PRELOAD_LIMIT) -> RunResult:
    """Send ``items`` over ``associations`` sender processes; measure."""
    if not items:
        raise ValueError("empty corpus")
    if associations < 1:
        raise ValueError("associations must be >= 1")
    contexts = contexts_for(items)
    if len(contexts) > 128:
        raise ValueError(f"the corpus needs {len(contexts)} presentation contexts (SOP class × transfer "
                         "syntax); one association can propose at most 128")
    shares = [items[r.start:r.stop] for r in series_layout(len(items), associations)]
    shares = [s for s in shares if s]
    res = RunResult(str(target), associations, len(items), sum(it.length for it in items))

    monitor = None
    if monitor_target:
        if pid is None and _is_local(target.host):
            pid = find_listener(target.port)
        if pid is not None:
            from stowage.bench.procs import TreeMonitor
            try:
                monitor = TreeMonitor(pid)
                res.target_pid = pid
            except Exception:
                monitor = None

    from stowage.bench.procs import without_sigint
    ctx = mp.get_context("spawn")
    ready, go = ctx.Value("i", 0), ctx.Event()
    counts = ctx.Array("q", 2 * len(shares), lock=False)  # per sender: done, then not successful
    results = ctx.Queue()
    procs = [ctx.Process(target=without_sigint, name=f"bench-sender-{i}", daemon=True,
                         args=(_send_share, i, target, share, contexts, preload_limit, max_pdu, timeout, ready, go,
                               counts, results))
             for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    bar = None
    outs: list[dict] = []
    try:
        _wait_ready(ready, procs)
        if monitor is not None:
            cpu0 = monitor.sample()
            monitor.start()
        from stowage.bench.procs import collect, machine_busy_s
        busy0 = machine_busy_s()
        go.set()
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(items), unit="inst", desc=label or f"{associations} assoc", file=sys.stderr,
                       dynamic_ncols=True, leave=True, disable=None, smoothing=0.1)
        shown = 0

        def tick() -> None:
            nonlocal shown
            if bar is not None:
                done, bad = sum(counts[:len(procs)]), sum(counts[len(procs):])
                if bad:
                    bar.set_postfix(not_ok=bad, refresh=False)
                bar.update(done - shown)
                shown = done
        outs = collect(results, procs, tick=tick)
        if len(outs) < len(procs):  # a sender died without its result
            res.errors += [f"sender {p.name} exited with {p.exitcode}" for p in procs if p.exitcode not in (0, None)]
        res.machine_cpu_s = round(machine_busy_s() - busy0, 3)
        if bar is not None:
            bar.update(sum(counts[:len(procs)]) - shown)
    finally:
        if bar is not None:
            bar.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if monitor is not None:
            monitor.stop()
    if monitor is not None:
        res.target_cpu_s = round(monitor.cpu - cpu0, 3)
        res.target_peak_rss_mb = round(monitor.peak_rss / 1e6, 1)

    statuses: Counter = Counter()
    lat = np.concatenate([np.frombuffer(o["latencies"], dtype=np.float64) for o in outs]) if outs else np.array([])
    for o in sorted(outs, key=lambda o: o["index"]):
        statuses.update(o["statuses"])
        res.errors += o["errors"]
        for k, v in o["comments"].items():
            res.comments.setdefault(k, v)
        res.sender_cpu_s += o["cpu"]
    unaccounted = len(items) - sum(statuses.values())
    if unaccounted > 0:
        statuses["not sent: sender died"] += unaccounted
    res.statuses = dict(sorted(statuses.items()))
    for key, n in statuses.items():
        if key == status_name(SUCCESS):
            res.completed += n
        elif key.startswith("0x") and int(key, 16) in STORE_WARNINGS:
            res.warning += n
        else:
            res.failed += n
    if outs:
        res.wall_s = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    sent = sum(o["bytes"] for o in outs)
    if res.wall_s > 0:
        res.inst_per_s = round(len(lat) / res.wall_s, 2)
        res.mb_per_s = round(sent / 1e6 / res.wall_s, 3)
    res.wall_s = round(res.wall_s, 4)
    res.sender_cpu_s = round(res.sender_cpu_s, 3)
    if len(lat):
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]) * 1e3
        res.latency_ms = {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                          "mean": round(float(lat.mean()) * 1e3, 3), "max": round(float(lat.max()) * 1e3, 3)}
    return res


def _wait_ready(ready, procs: list, timeout: float = 600.0) -> None:
    """Wait until every sender has loaded its share; fail clearly if one died doing so."""
    deadline = time.monotonic() + timeout
    while ready.value < len(procs):
        dead = [p for p in procs if p.exitcode is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited with {dead[0].exitcode}" if dead else f"not ready after {timeout:.0f} s"
            raise RuntimeError(f"sender {dead[0].name if dead else ''} {why} while loading its share")
        time.sleep(0.005)
