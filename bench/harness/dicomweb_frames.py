"""WADO-RS frames as a viewer loads a series: OHIF (wadors image loader) asks for
`/studies/S/series/U/instances/I/frames/1` of every slice, `Accept: multipart/related;
type="application/octet-stream"; transfer-syntax=*`, six requests at a time (a browser's
connections per host), each connection kept alive. Stowage (one or more source trees,
alternating) and Orthanc with its DICOMweb plugin serve the same CT series in one run;
per row: frames/s, MB/s, latency per request (p50, p95, p99), the server's CPU per
request (its whole process tree) and the clients'. Warm page cache unless `--cold`.

    python -m stowage.bench.harness.dicomweb_frames --dir D --tree now=. --orthanc --rounds 2

The archives are kept in DIR (made on the first run: the bench's 500-slice CT corpus, STOW-RS
into stowage, Orthanc's REST upload), so later runs only serve.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

from stowage.bench.dicomweb import BadAnswer, WebTarget, _run
from stowage.bench.harness.dicomweb import evict
from stowage.bench.harness.dicomweb_lean import read_parts
from stowage.bench.harness.dicomweb_wado import _serve, kept_archives, orthanc_serving
from stowage.bench.procs import stop_tree

ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_BUFFER = 1 << 20


def frames_of(paths: list[Path]) -> list[tuple[str, str, str]]:
    """(study, series, instance) of every file, in Instance Number order as a viewer stacks them."""
    import pydicom
    rows = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"])
        rows.append((int(ds.get("InstanceNumber", 0) or 0), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                     str(ds.SOPInstanceUID)))
    return [r[1:] for r in sorted(rows)]


def frame_share(target: WebTarget, share: list[tuple[str, str, str]], go, results) -> None:
    """One connection: frame 1 of each instance of `share` in turn, each body read into one
    reused buffer and checked to be one part (two delimiters, the closing one last)."""
    conn, buf = target.connection(), bytearray(_BUFFER)
    statuses: dict[str, int] = {}
    latencies, received, errors = [], 0, []
    go.wait()
    cpu0, start = time.process_time(), time.monotonic()
    for study, series, instance in share:
        t = time.monotonic()
        try:
            conn.request("GET", target.path(f"/studies/{study}/series/{series}/instances/{instance}/frames/1"),
                         headers=target.headers(Accept=ACCEPT))
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                statuses[f"HTTP {resp.status}"] = statuses.get(f"HTTP {resp.status}", 0) + 1
                continue
            nbytes, delimiters = read_parts(resp, buf)
            if delimiters != 2:
                raise BadAnswer(f"{delimiters - 1} parts for frame 1 of {instance}")
        except (OSError, http.client.HTTPException, BadAnswer) as e:
            errors.append(f"{type(e).__name__}: {e}")
            statuses["not received"] = statuses.get("not received", 0) + 1
            conn.close()
            conn = target.connection()
            continue
        latencies.append(time.monotonic() - t)
        statuses["0x0000"] = statuses.get("0x0000", 0) + 1
        received += nbytes
    results.put({"start": start, "end": time.monotonic(), "statuses": statuses, "errors": errors,
                 "latencies": latencies, "bytes": received, "cpu": time.process_time() - cpu0})


def run_frames(target: WebTarget, frames: list[tuple[str, str, str]], clients: int, nbytes: int, pid: int):
    shares = [frames[k::clients] for k in range(clients)]
    return _run(target, f"frames x{clients}", shares, partial(frame_share), len(frames), nbytes, pid)


def _row(name: str, r, load: float) -> dict:
    n = r.completed or 1
    return {"what": name, "frames_per_s": r.inst_per_s, "mb_per_s": r.mb_per_s,
            "p50_ms": r.latency_ms.get("p50"), "p95_ms": r.latency_ms.get("p95"), "p99_ms": r.latency_ms.get("p99"),
            "server_cpu_ms_per_frame": round(r.target_cpu_s / n * 1e3, 3),
            "client_cpu_ms_per_frame": round(r.sender_cpu_s / n * 1e3, 3),
            "machine_cpu_ms_per_frame": round(r.machine_cpu_s / n * 1e3, 3),
            "failed": r.failed, "errors": r.errors[:3], "load": round(load, 1)}


def _measure(name: str, target: WebTarget, frames, nbytes: int, pid: int, clients: int, repeat: int,
             cold: Path | None) -> list[dict]:
    rows = []
    run_frames(target, frames[:50], clients, nbytes // max(1, len(frames)) * 50, pid)  # warm-up: connections, imports
    for _ in range(repeat):
        if cold is not None:
            evict(cold)
        r = run_frames(target, frames, clients, nbytes, pid)
        rows.append(_row(name, r, os.getloadavg()[0]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="kept: the corpus and both archives")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a stowage source tree")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--clients", type=int, default=6, help="connections at once (a browser's per host)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="loads of the series per receiver per round")
    ap.add_argument("--orthanc", action="store_true")
    ap.add_argument("--cold", action="store_true", help="each load from a cold page cache")
    args = ap.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.tree)]
    paths, items = kept_archives(args.dir, args.count, trees[0][1])
    frames, nbytes = frames_of(paths), sum(it.length for it in items)
    rows: list[dict] = []
    for rnd in range(args.rounds):
        for name, tree in trees:
            proc, target = _serve(tree, args.dir / "stowage")
            try:
                rows += _measure(f"round {rnd + 1} {name}", target, frames, nbytes, proc.pid, args.clients,
                                 args.repeat, args.dir / "stowage" if args.cold else None)
            finally:
                stop_tree(proc, None)
        if args.orthanc:
            with orthanc_serving(args.dir, paths) as (orthanc, target):
                rows += _measure(f"round {rnd + 1} orthanc", target, frames, nbytes, orthanc.proc.pid,
                                 args.clients, args.repeat, args.dir / "orthanc" if args.cold else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
