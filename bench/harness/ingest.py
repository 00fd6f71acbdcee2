"""Ingest benchmark: C-STORE a generated corpus into each receiver, with K concurrent associations.

    python -m stowage.bench.harness.ingest --kind small --count 2000 --associations 1 4 --repeat 3 \
        [--receivers stowage,storescp,storescp-fork,orthanc,pynetdicom] \
        [--senders storescu,stowage-bench] [--json out.json]

For every receiver × sender × association count × repeat: start the receiver on a free
127.0.0.1 port in a fresh temp dir, wait for it to answer C-ECHO, split the corpus
into K equal contiguous shares and send each on its own association, then SIGTERM the
receiver. Senders: ``storescu`` (one DCMTK ``storescu`` process per share; wall time from
the first start to the last exit) and ``stowage-bench`` (bench/loadgen.py: one sender
process per share with the datasets pre-loaded; wall time from the start signal to the
last release). CPU and peak RSS cover the receiver's whole process tree. Medians over
repeats are reported. bench/harness/compare.py runs this over both corpora and prints ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import psutil

from stowage.bench.corpus import KINDS, generate, series_layout
from stowage.bench.procs import TreeMonitor, echo, find_dcmtk, free_port, machine_busy_s, stop_tree, tail
from stowage.bench.harness.receivers import RECEIVERS, REPO_ROOT, Receiver, Unavailable

SENDERS = ("storescu", "stowage-bench")

MAX_ARGV_BYTES = 1 << 20  # beyond this a share is passed as a directory of symlinks (+sd)


def tool_env(nagle: bool) -> dict[str, str]:
    """Environment for every child. Debian/Ubuntu DCMTK leaves Nagle's algorithm on unless
    ``TCP_NODELAY`` is set, which caps a DCMTK peer at ~1 C-STORE per 40 ms delayed ACK."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    if nagle:
        env.pop("TCP_NODELAY", None)
    else:
        env["TCP_NODELAY"] = "1"
    return env


class StartFailed(Exception):
    """The receiver exited or did not answer C-ECHO in time."""


@dataclass
class Run:
    """One measured transfer."""

    wall_s: float
    inst_per_s: float
    mb_per_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    senders_ok: bool  # every storescu exited 0 / every stowage-bench store answered success
    received: int | None = None
    leftover_procs: int = 0
    max_procs: int = 0
    errors: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)  # stowage-bench only
    sender_cpu_s: float | None = None                            # stowage-bench only
    # The whole machine's busy CPU over the transfer (senders, receiver, kernel flusher
    # threads writing back what a receiver left in the page cache), and the time `sync`
    # took right after it: what a receiver that does not fsync leaves to be done.
    machine_cpu_s: float = 0.0
    sync_s: float = 0.0
    # What reached the disk over the transfer and its `sync` (every block device: what a
    # receiver's compression saves), and what the page cache held dirty at the last ack.
    disk_write_bytes: int = 0
    dirty_mb_at_ack: float = 0.0


def meminfo_mb(*keys: str) -> dict[str, float]:
    """Fields of /proc/meminfo in MB (Dirty, Cached, MemTotal, ...): the page cache's state."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0]) / 1024
    return out


def disk_written() -> int:
    """Bytes written to every block device since boot."""
    io = psutil.disk_io_counters()
    return io.write_bytes if io else 0


def page_cache_state() -> str:
    """One line on the page cache and writeback settings, for the report's header."""
    m = meminfo_mb("MemTotal", "Cached", "Dirty")
    vm = {k: Path(f"/proc/sys/vm/{k}").read_text().strip() for k in
          ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_expire_centisecs")}
    return (f"page cache: {m.get('Cached', 0):.0f} MB cached, {m.get('Dirty', 0):.0f} MB dirty of "
            f"{m.get('MemTotal', 0):.0f} MB; vm " + ", ".join(f"{k}={v}" for k, v in vm.items()))


@dataclass
class Result:
    """All repeats of one receiver × association count."""

    receiver: str
    associations: int
    status: str  # ok | errors | skipped | failed
    sender: str = "storescu"
    kind: str = ""
    note: str = ""
    command: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    median: dict[str, float] = field(default_factory=dict)


def _sender_argv(storescu: str, port: int, aet: str, corpus: Path, names: list[str], share_dir: Path) -> list[str]:
    """storescu argv for one share: file names relative to ``corpus`` (its cwd), or a symlink dir."""
    base = [storescu, "-aet", "BENCH", "-aec", aet, "-ta", "600", "127.0.0.1", str(port)]
    if sum(len(n) + 1 for n in names) < MAX_ARGV_BYTES:
        return [*base, *names]
    share_dir.mkdir(parents=True)
    for n in names:
        (share_dir / n).symlink_to(corpus.resolve() / n)
    return [*base, "+sd", str(share_dir)]


def _start(rcv: Receiver, cmd: list[str], port: int, logs: Path, echoscu: str, timeout: float,
           env: dict[str, str]) -> tuple[subprocess.Popen, TreeMonitor]:
    """Start the receiver and wait until it answers C-ECHO."""
    with open(logs / "receiver.out", "wb") as out, open(logs / "receiver.err", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, env=env)
    mon = TreeMonitor(proc.pid).start()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            why = f"exited with {proc.returncode} before answering C-ECHO"
        elif echo(echoscu, port, rcv.aet, env):
            return proc, mon
        elif time.monotonic() > deadline:
            why = f"no C-ECHO answer within {timeout:.0f} s"
        else:
            time.sleep(0.1)
            continue
        mon.stop()
        stop_tree(proc, mon, timeout=5)
        err = tail(logs / "receiver.err") or tail(logs / "receiver.out")
        raise StartFailed(f"{why}; output tail:\n{err}")


def _send_storescu(port: int, aet: str, files: list[Path], k: int, tools: dict[str, str], work: Path,
                   logs: Path, env: dict[str, str], args: argparse.Namespace) -> tuple[float, list[str], dict]:
    """K DCMTK storescu processes, one share each; (wall seconds, errors, extra fields of Run)."""
    corpus = files[0].parent
    names = [f.name for f in files]
    shares = [names[r.start:r.stop] for r in series_layout(len(names), k)]
    argvs = [_sender_argv(tools["storescu"], port, aet, corpus, s, work / f"share{i}") for i, s in enumerate(shares) if s]
    senders: list[subprocess.Popen] = []
    try:
        t0 = time.perf_counter()
        for i, argv in enumerate(argvs):
            with open(logs / f"sender{i}.out", "wb") as out:
                senders.append(subprocess.Popen(argv, cwd=corpus, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + args.send_timeout
        errors: list[str] = []
        for s in senders:
            try:
                s.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait()
                errors.append(f"sender pid {s.pid} killed after --send-timeout {args.send_timeout:.0f} s")
        wall = time.perf_counter() - t0
        errors += [f"sender {i} exit {s.returncode}: {tail(logs / f'sender{i}.out', 5)}"
                   for i, s in enumerate(senders) if s.returncode != 0]
        return wall, errors, {"senders_ok": all(s.returncode == 0 for s in senders)}
    finally:
        for s in senders:
            if s.poll() is None:
                s.kill()
                s.wait()


def _send_loadgen(port: int, aet: str, items: list, k: int, args: argparse.Namespace) -> tuple[float, list[str], dict]:
    """stowage bench's load generator, K sender processes; (wall seconds, errors, extra fields of Run)."""
    from stowage.bench.loadgen import Target, run
    r = run(Target("127.0.0.1", port, aet, "BENCH"), items, k, monitor_target=False, progress=False,
            timeout=min(600.0, args.send_timeout))
    errors = list(dict.fromkeys(r.errors))[:5]
    if r.completed + r.warning != r.instances:
        errors.append("not all stored: " + ", ".join(f"{s} x{n}" for s, n in r.statuses.items() if s != "0x0000"))
    return r.wall_s, errors, {"senders_ok": not errors, "latency_ms": r.latency_ms, "sender_cpu_s": r.sender_cpu_s}


def run_once(rcv: Receiver, files: list[Path], total_bytes: int, k: int,
             tools: dict[str, str], args: argparse.Namespace, sender: str = "storescu",
             items: list | None = None) -> tuple[Run, list[str]]:
    """Start ``rcv`` fresh, send ``files`` over ``k`` associations with ``sender``, stop it;
    return the measurement. ``items`` (bench.loadgen.load_corpus of ``files``) is needed for
    the stowage-bench sender."""
    work = Path(tempfile.mkdtemp(prefix=f"stowage-bench-{rcv.name}-", dir=args.tmp))
    data, logs = work / "data", work / "logs"
    data.mkdir()
    logs.mkdir()
    proc = mon = None
    try:
        port = free_port()
        cmd = rcv.build(port, data, args.stowage_workers)
        env = tool_env(args.nagle)
        proc, mon = _start(rcv, cmd, port, logs, tools["echoscu"], args.start_timeout, env)
        mon.settle()  # done starting (every process imported, the scrub's first plan made)
        os.sync()  # what an earlier run left dirty is not this run's to write back
        cpu0, busy0, disk0 = mon.sample(), machine_busy_s(), disk_written()
        if sender == "storescu":
            wall, errors, extra = _send_storescu(port, rcv.aet, files, k, tools, work, logs, env, args)
        elif sender == "stowage-bench":
            if items is None:
                from stowage.bench.loadgen import load_corpus
                items = load_corpus(files)
            wall, errors, extra = _send_loadgen(port, rcv.aet, items, k, args)
        else:
            raise ValueError(f"unknown sender {sender!r}; known: {', '.join(SENDERS)}")
        dirty = meminfo_mb("Dirty").get("Dirty", 0.0)
        synced = time.monotonic()
        os.sync()
        sync_s, busy = time.monotonic() - synced, machine_busy_s() - busy0
        written = disk_written() - disk0
        if proc.poll() is not None:
            errors.append(f"receiver died (exit {proc.returncode}): {tail(logs / 'receiver.err', 5)}")
        mon.stop()
        received = rcv.received(data) if rcv.count is not None and proc.poll() is None else None
        leftovers = stop_tree(proc, mon)
        if rcv.one_file_per_instance:
            received = rcv.received(data)
        if received is not None and received != len(files):
            errors.append(f"receiver stored {received} of {len(files)} instances")
        run = Run(wall_s=wall, inst_per_s=len(files) / wall, mb_per_s=total_bytes / 1e6 / wall,
                  cpu_s=mon.cpu - cpu0, peak_rss_mb=mon.peak_rss / 1e6, peak_pss_mb=mon.peak_pss / 1e6,
                  received=received, leftover_procs=leftovers, max_procs=mon.max_procs, errors=errors,
                  machine_cpu_s=busy, sync_s=sync_s, disk_write_bytes=written, dirty_mb_at_ack=dirty, **extra)
        return run, cmd
    finally:
        if proc is not None and proc.poll() is None:
            if mon is not None:
                mon.stop()
            stop_tree(proc, mon)
        if args.keep:
            print(f"    kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(res: Result, files: list[Path], total: int, tools: dict[str, str], args: argparse.Namespace,
            items: list | None = None, label: str = "") -> bool:
    """One more repeat of ``res``'s configuration, appended to it; False if the receiver
    cannot run (``res`` then says why and further repeats are pointless)."""
    try:
        run, res.command = run_once(RECEIVERS[res.receiver], files, total, res.associations, tools, args,
                                    res.sender, items)
    except Unavailable as e:
        res.status, res.note = "skipped", str(e)
        return False
    except StartFailed as e:
        res.status, res.note = "failed", str(e)
        return False
    res.runs.append(run)
    flag = "  ERRORS: " + " | ".join(run.errors) if run.errors else ""
    print(f"  {label}{res.receiver:<14} {res.sender:<13} assoc={res.associations} rep={len(res.runs)}: "
          f"{run.inst_per_s:8.1f} inst/s  {run.mb_per_s:7.1f} MB/s  cpu {run.cpu_s:6.2f} s  "
          f"rss {run.peak_rss_mb:6.1f} MB  procs<={run.max_procs}{flag}", file=sys.stderr, flush=True)
    return True


def finish(res: Result) -> Result:
    """Medians over the repeats; status "errors" if any run had one."""
    if not res.runs:
        return res
    for key in ("wall_s", "inst_per_s", "mb_per_s", "cpu_s", "peak_rss_mb", "peak_pss_mb", "machine_cpu_s",
                "sync_s", "disk_write_bytes", "dirty_mb_at_ack"):
        res.median[key] = statistics.median(getattr(r, key) for r in res.runs)
    lat = [r.latency_ms for r in res.runs if r.latency_ms]
    for p in ("p50", "p99"):
        if lat:
            res.median[f"{p}_ms"] = statistics.median(x[p] for x in lat)
    if any(r.errors for r in res.runs):
        res.status = "errors"
        res.note = "; ".join(e for r in res.runs for e in r.errors)[:2000]
    return res


def bench_config(name: str, k: int, files: list[Path], total: int, tools: dict[str, str],
                 args: argparse.Namespace, sender: str = "storescu", items: list | None = None) -> Result:
    """All repeats of one receiver × sender × association count."""
    res = Result(name, k, "ok", sender)
    for _ in range(args.repeat):
        if not measure(res, files, total, tools, args, items):
            break
    return finish(res)


def format_table(results: list[Result], markdown: bool = False) -> str:
    """The human-readable summary table (plus notes for skipped/failed rows); Markdown if asked.
    Latency percentiles are those the stowage-bench sender measured (storescu reports none);
    spread is half the range of the runs' inst/s, relative to their median."""
    base = {(r.kind, r.sender, r.associations): r.median["inst_per_s"]
            for r in results if r.receiver == "stowage" and r.runs}
    head = ("corpus", "sender", "assoc", "receiver", "inst/s", "spread", "durable inst/s", "MB/s", "p50 ms", "p99 ms",
            "cpu ms/inst", "machine cpu ms/inst", "disk KB/inst", "dirty MB at ack", "peak RSS MB",
            "ratio vs stowage", "ok")
    rows, notes = [], []
    for r in results:
        where = (r.kind, r.sender, str(r.associations), r.receiver)
        if not r.runs:
            rows.append((*where, r.status, "", "", "", "", "", "", "", "", "", "", "", "-"))
            notes.append(f"{r.receiver} ({r.kind} {r.sender} assoc {r.associations}) {r.status}: {r.note}")
            continue
        m = r.median
        key = (r.kind, r.sender, r.associations)
        ratio = f"{m['inst_per_s'] / base[key]:.2f}" if key in base else "-"
        ok = "yes" if r.status == "ok" else "NO"
        # instances per run: not the median rate times the median wall time, which come from
        # different runs when they spread (a ±60% spread counted 31,000 of 20,000 instances)
        n = statistics.median(x.inst_per_s * x.wall_s for x in r.runs)
        lat = [f"{m[p]:.2f}" if p in m else "-" for p in ("p50_ms", "p99_ms")]
        speeds = [x.inst_per_s for x in r.runs]
        spread = f"±{50 * (max(speeds) - min(speeds)) / m['inst_per_s']:.0f}%" if len(speeds) > 1 else "-"
        durable = n / (m["wall_s"] + m.get("sync_s", 0.0))
        rows.append((*where, f"{m['inst_per_s']:.1f}", spread, f"{durable:.1f}", f"{m['mb_per_s']:.1f}", *lat,
                     f"{m['cpu_s'] * 1e3 / n:.2f}", f"{m.get('machine_cpu_s', 0.0) * 1e3 / n:.2f}",
                     f"{m.get('disk_write_bytes', 0) / 1e3 / n:.1f}", f"{m.get('dirty_mb_at_ack', 0.0):.0f}",
                     f"{m['peak_rss_mb']:.1f}", ratio, ok))
        if r.status != "ok":
            notes.append(f"{r.receiver} ({r.kind} {r.sender} assoc {r.associations}) errors: {r.note}")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    left = (0, 1, 3)
    line = lambda cells: " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    if markdown:
        rule = " | ".join(":" + "-" * (w - 1) if i in left else "-" * (w - 1) + ":" for i, w in enumerate(widths))
        out = [f"| {line(head)} |", f"| {rule} |", *(f"| {line(r)} |" for r in rows)]
        return "\n".join(out + ([""] + [f"- {n}" for n in notes] if notes else []))
    out = [line(head), "-+-".join("-" * w for w in widths), *map(line, rows)]
    return "\n".join(out + ([""] + notes if notes else []))


def names_of(ap: argparse.ArgumentParser, what: str, value: str, known: Iterable[str]) -> list[str]:
    """The comma-separated names in an option's `value`; ap.error if one is not `known`."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if bad := [n for n in names if n not in known]:
        ap.error(f"unknown {what} {bad}; known: {', '.join(known)}")
    return names


def sender_tools() -> dict[str, str] | None:
    """DCMTK storescu and echoscu (name -> path), or None, having said which is missing."""
    tools = {t: find_dcmtk(t) for t in ("storescu", "echoscu")}
    if missing := [t for t, p in tools.items() if p is None]:
        print(f"DCMTK {', '.join(missing)} not found (apt-get install dcmtk, or set DCMTK_BIN); cannot send",
              file=sys.stderr)
        return None
    return tools


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.ingest", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=sorted(KINDS), default="small")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--receivers", default=",".join(RECEIVERS))
    ap.add_argument("--senders", default="storescu", help=f"comma-separated, of {', '.join(SENDERS)}")
    ap.add_argument("--json", type=Path, help="also write results here")
    ap.add_argument("--corpus", type=Path, help="send the *.dcm files of this dir instead of generating")
    ap.add_argument("--stowage-workers", type=int, help="stowage serve --workers [its default: one per core]")
    ap.add_argument("--start-timeout", type=float, default=15.0)
    ap.add_argument("--send-timeout", type=float, default=1800.0)
    ap.add_argument("--tmp", help="parent dir for temp dirs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep receiver temp dirs (for debugging)")
    ap.add_argument("--nagle", action="store_true",
                    help="do not set TCP_NODELAY=1 for the children (DCMTK then waits on delayed ACKs)")
    args = ap.parse_args(argv)
    names = names_of(ap, "receivers", args.receivers, RECEIVERS)
    senders = names_of(ap, "senders", args.senders, SENDERS)
    if (tools := sender_tools()) is None:
        return 2
    corpus_tmp = None if args.corpus else Path(tempfile.mkdtemp(prefix="stowage-bench-corpus-", dir=args.tmp))
    try:
        if args.corpus:
            files = sorted(args.corpus.glob("*.dcm"))
        else:
            t = time.perf_counter()
            files = generate(corpus_tmp, args.kind, args.count, seed=args.seed)
            print(f"generated {len(files)} {args.kind} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if not files:
            print("empty corpus", file=sys.stderr)
            return 2
        total = sum(f.stat().st_size for f in files)
        env = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "storescu": tools["storescu"], "files": len(files), "bytes": total}
        print(f"corpus: {len(files)} files, {total / 1e6:.1f} MB; {env['cpus']} CPUs", file=sys.stderr)
        items = None
        if "stowage-bench" in senders:
            from stowage.bench.loadgen import load_corpus
            items = load_corpus(files)
        results = [bench_config(n, k, files, total, tools, args, snd, items)
                   for snd in senders for n in names for k in args.associations]
        for r in results:
            r.kind = args.kind if not args.corpus else str(args.corpus)
    finally:
        if corpus_tmp is not None:
            shutil.rmtree(corpus_tmp, ignore_errors=True)
    print(format_table(results))
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "env": env, "results": [asdict(r) for r in results]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
