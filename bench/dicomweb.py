"""`stowage bench --dicomweb URL`: the DICOMweb load generator. STOW-RS: K sender processes,
each POSTing its share of the corpus in requests of `batch` instances (multipart/related,
one Part-10 file a part) on one kept-alive connection; WADO-RS (`--wado`): K processes
retrieving every series of the corpus as stored (`transfer-syntax=*`), then each series'
metadata. Reported as the DIMSE benchmark's RunResult and table: instances/s, MB/s,
latency percentiles (per request), failures by status, the target's CPU and peak RSS."""
from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import os
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from stowage.bench.loadgen import Item, RunResult, find_listener

RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # each instance as stored


@dataclass(frozen=True)
class WebTarget:
    base: str                  # http(s)://host:port/dicom-web
    token: str | None = None   # a bearer token, when the archive asks for one
    ca: str | None = None      # CA file to verify an https target with

    def __str__(self) -> str:
        return self.base

    def connection(self) -> http.client.HTTPConnection:
        u = urlsplit(self.base)
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.ca)
            return http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=600, context=ctx)
        return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)

    def path(self, rest: str) -> str:
        return urlsplit(self.base).path.rstrip("/") + rest

    def headers(self, **more: str) -> dict[str, str]:
        return {**({"Authorization": f"Bearer {self.token}"} if self.token else {}), **more}


def _stow_answer(status: int, body: bytes, n: int) -> Counter:
    """Outcomes of one STOW-RS request of `n` instances, by DICOM status ("0x0000"…)."""
    out: Counter = Counter()
    if status not in (200, 202, 409):
        out[f"HTTP {status}"] += n
        return out
    try:
        answer = json.loads(body)
    except ValueError:
        out["unreadable answer"] += n
        return out
    out["0x0000"] += len(answer.get("00081199", {}).get("Value", []))
    for item in answer.get("00081198", {}).get("Value", []):
        reason = (item.get("00081197", {}).get("Value") or [0x0110])[0]
        out[f"0x{int(reason):04X}"] += 1
    if sum(out.values()) < n:
        out["not in the answer"] += n - sum(out.values())
    return out


def _stow_share(target: WebTarget, batches: list[list[Item]], go, results) -> None:
    conn = target.connection()
    boundary = uuid.uuid4().hex
    bodies = []
    for batch in batches:  # read before the clock starts, as the DIMSE senders do
        parts = []
        for it in batch:
            with open(it.path, "rb") as f:
                parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read() + b"\r\n")
        bodies.append((b"".join(parts) + f"--{boundary}--\r\n".encode(), len(batch)))
    headers = target.headers(**{"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                "Accept": "application/dicom+json"})
    statuses: Counter = Counter()
    latencies, sent, errors = [], 0, []
    go.wait()
    cpu0, start = time.process_time(), time.monotonic()
    for body, n in bodies:
        t = time.monotonic()
        try:
            conn.request("POST", target.path("/studies"), body=body, headers=headers)
            resp = conn.getresponse()
            statuses.update(_stow_answer(resp.status, resp.read(), n))
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            statuses["not sent: connection error"] += n
            conn.close()
            conn = target.connection()
            continue
        latencies.append(time.monotonic() - t)
        sent += len(body)
    results.put({"start": start, "end": time.monotonic(), "statuses": dict(statuses), "errors": errors,
                 "latencies": latencies, "bytes": sent, "cpu": time.process_time() - cpu0})


class BadAnswer(Exception):
    """The answer is not what a retrieve of that series should give; the message says how."""


Fetch = Callable[[http.client.HTTPResponse, str, int], int]  # (answer, series UID, instances) -> bytes read


def read_whole(resp: http.client.HTTPResponse, series: str, instances: int) -> int:
    """The body gathered into one bytes object by `resp.read()`, as a plain client does."""
    return len(resp.read())


def get_share(target: WebTarget, series: list[tuple[str, str, int]], go, results, *, accept: str,
              suffix: str = "", reader: Callable[[], Fetch] | None = None) -> None:
    """One client process: GET `/studies/S/series/U{suffix}` of every series in turn on one
    kept-alive connection, the body of each 200 read by read_whole, or by the fetch that
    `reader()` makes (before the clock starts: the lean client's buffer). A status other
    than 200, a connection error or a BadAnswer counts the series' instances as failed."""
    conn = target.connection()
    fetch = reader() if reader is not None else read_whole
    statuses: Counter = Counter()
    latencies, received, errors = [], 0, []
    go.wait()
    cpu0, start = time.process_time(), time.monotonic()
    for study, uid, n in series:
        t = time.monotonic()
        try:
            conn.request("GET", target.path(f"/studies/{study}/series/{uid}{suffix}"), headers=target.headers(Accept=accept))
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                statuses[f"HTTP {resp.status}"] += n
                continue
            nbytes = fetch(resp, uid, n)
        except (OSError, http.client.HTTPException, BadAnswer) as e:
            errors.append(f"{type(e).__name__}: {e}")
            statuses["not received: " + type(e).__name__] += n
            conn.close()
            conn = target.connection()
            continue
        latencies.append(time.monotonic() - t)
        statuses["0x0000"] += n
        received += nbytes
    results.put({"start": start, "end": time.monotonic(), "statuses": dict(statuses), "errors": errors,
                 "latencies": latencies, "bytes": received, "cpu": time.process_time() - cpu0})


def _archive_root(pid: int) -> int:
    """The `stowage serve` acceptor above the HTTP process listening (its whole tree is the target)."""
    import psutil
    proc = psutil.Process(pid)
    while True:
        parent = proc.parent()
        if parent is None or "serve" not in " ".join(parent.cmdline()):
            return proc.pid
        proc = parent


def _results(results, procs: list, timeout: float = 3600.0) -> list[dict]:
    """One result from each client process; a client that died without one (a crash, a
    kill) is one clear error, not an hour's wait."""
    from stowage.bench.procs import collect
    outs = collect(results, procs, poll=1.0, timeout=timeout)
    if len(outs) < len(procs):
        from stowage.bench.command import BenchError
        codes = ", ".join(str(p.exitcode) for p in procs if not p.is_alive())
        raise BenchError(f"{len(procs) - len(outs)} of {len(procs)} client process(es) gave no result "
                         f"(exit codes {codes or 'none: still running'})")
    return outs


def _run(target: WebTarget, label: str, shares: list, work, instances: int, nbytes: int,
         pid: int | None) -> RunResult:
    from stowage.bench.procs import TreeMonitor, machine_busy_s, without_sigint
    res = RunResult(f"{target} {label}", len(shares), instances, nbytes)
    if pid is None:
        u = urlsplit(target.base)
        if u.hostname in ("127.0.0.1", "localhost", "::1"):
            found = find_listener(u.port or 80)
            pid = _archive_root(found) if found else None
    monitor = TreeMonitor(pid) if pid else None
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=without_sigint, args=(work, target, share, go, results), daemon=True)
             for share in shares]
    for p in procs:
        p.start()
    time.sleep(0.5 + 0.002 * instances)  # let every sender read its share before the clock starts
    if monitor is not None:
        cpu0 = monitor.sample()
        monitor.start()
    busy0 = machine_busy_s()
    go.set()
    outs = _results(results, procs)
    res.machine_cpu_s = round(machine_busy_s() - busy0, 3)
    for p in procs:
        p.join(10)
    if monitor is not None:
        monitor.stop()
        res.target_pid, res.target_cpu_s = pid, round(monitor.cpu - cpu0, 3)
        res.target_peak_rss_mb = round(monitor.peak_rss / 1e6, 1)
    statuses: Counter = Counter()
    for o in outs:
        statuses.update(o["statuses"])
        res.errors += o["errors"]
        res.sender_cpu_s += o["cpu"]
    res.statuses = dict(sorted(statuses.items()))
    res.completed = statuses.get("0x0000", 0)
    res.failed = sum(statuses.values()) - res.completed
    res.wall_s = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    moved = sum(o["bytes"] for o in outs)
    lat = np.array([x for o in outs for x in o["latencies"]])
    if res.wall_s > 0:
        res.inst_per_s = round(res.completed / res.wall_s, 2)
        res.mb_per_s = round(moved / 1e6 / res.wall_s, 3)
    if len(lat):
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]) * 1e3
        res.latency_ms = {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                          "mean": round(float(lat.mean()) * 1e3, 3), "max": round(float(lat.max()) * 1e3, 3)}
    res.wall_s = round(res.wall_s, 4)
    return res


def run_stow(target: WebTarget, items: list[Item], senders: int, batch: int, pid: int | None = None) -> RunResult:
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    shares = [batches[k::senders] for k in range(senders)]
    return _run(target, "STOW-RS", [s for s in shares if s], _stow_share, len(items),
                sum(os.path.getsize(it.path) for it in items), pid)


def series_of(items: list[Item]) -> list[tuple[str, str, int]]:
    """(study, series, instances) of every series in the corpus."""
    import pydicom
    count: Counter = Counter()
    for it in items:
        ds = pydicom.dcmread(it.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        count[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))] += 1
    return [(study, series, n) for (study, series), n in sorted(count.items())]


def run_wado(target: WebTarget, items: list[Item], senders: int, what: str, pid: int | None = None) -> RunResult:
    """`what`: "retrieve" (each series as stored) or "metadata" (each series' metadata)."""
    series = series_of(items)
    shares = [series[k::senders] for k in range(senders)]
    work = partial(get_share, accept=RETRIEVE_ACCEPT) if what == "retrieve" else \
        partial(get_share, accept="application/dicom+json", suffix="/metadata")
    return _run(target, what, [s for s in shares if s], work, len(items), sum(it.length for it in items), pid)


def run_web_bench(target: WebTarget, senders: list[int], repeat: int, *, corpus_dir, spec, pid: int | None,
                  json_path, batch: int, wado: bool) -> list[RunResult]:
    """STOW-RS at each sender count, `repeat` runs each (a generated corpus is made anew
    for every run, so each stores new instances; a given corpus is stored again, and the
    duplicates policy answers), then with `wado` WADO-RS retrieval and series metadata of
    the first run's instances; print the tables, write JSON."""
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from stowage.bench import report
    from stowage.bench.command import BenchError
    from stowage.bench.loadgen import load_corpus
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    made = None
    try:
        if corpus_dir is not None:
            paths = sorted(p for p in Path(corpus_dir).rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))
        else:
            made = Path(tempfile.mkdtemp(prefix="stowage-bench-corpus-"))
            paths = spec.generate(made, say)
        items = load_corpus(paths)
        if not items:
            raise BenchError("the corpus is empty")
        say(f"corpus: {len(items)} instances, {sum(it.length for it in items) / 1e6:.1f} MB; target {target}")
        stow, first = [], items
        for n, (k, rep) in enumerate((k, rep) for k in senders for rep in range(repeat)):
            if n and made is not None:  # new instances each run, not duplicates of the first run's
                from stowage.bench.command import CorpusSpec
                shutil.rmtree(made / f"run{n - 1}", ignore_errors=True)
                items = load_corpus(CorpusSpec(**{**vars(spec), "seed": spec.seed + n}).generate(
                    made / f"run{n}", lambda msg: None))
            r = run_stow(target, items, k, batch, pid)
            say(f"  STOW-RS {k} sender(s) run {rep + 1}: {r.inst_per_s:.1f} inst/s, {r.mb_per_s:.1f} MB/s, "
                f"{r.completed} ok, {r.failed} failed")
            stow.append(r)
        items = first
        results = {"STOW-RS": stow}
        if wado:
            for what in ("retrieve", "metadata"):
                results[f"WADO-RS {what}"] = [run_wado(target, items, k, what, pid) for k in senders
                                              for _rep in range(repeat)]
    except (OSError, ValueError) as e:
        raise BenchError(str(e)) from None
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    for name, rs in results.items():
        unit = f"{batch} instance(s) per request" if name == "STOW-RS" else "one series per request"
        print(f"{target} {name}: {len(items)} instances per run, {unit}, medians of {repeat} run(s) "
              "(the assoc column is concurrent HTTP clients)")
        print(report.table(rs))
        for r in rs:
            if r.target_cpu_s is not None and r.completed:
                print(f"  {r.associations} client(s): target CPU {r.target_cpu_s / r.completed * 1e3:.2f} ms per "
                      f"instance, {r.target_cpu_s / max(r.mb_per_s * r.wall_s, 1e-9):.3f} s per MB")
    if json_path is not None:
        report.write_json(json_path, [r for rs in results.values() for r in rs],
                          {"target": str(target), "batch": batch, "senders": senders, "repeat": repeat})
    return [r for rs in results.values() for r in rs]
