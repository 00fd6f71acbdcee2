"""Forwarding benchmark (docs/forwarding.md, issue #23), two measurements in one run:

1. Ingest with 0, 1 and 3 `[[forward]]` rules active: `stowage serve` with each
   configuration in turn (a fresh data directory each), the same corpus C-STOREd by the
   load generator (-k associations); each rule sends everything to its own DCMTK
   storescp --ignore, which keeps up. Also how long after the last acknowledgement the
   queue was drained (the destinations keep up, or not).
2. Draining: the same corpus stored while the destination is down, then a storescp (+B,
   writing files, --fork) comes up and the queue drains into it; against `stowage send` of
   the same study to the same kind of storescp. Both are timed the same way: from the
   first file the receiver wrote to the last (mtimes), so neither process start-up nor the
   forwarder's back-off counts.

    python -m stowage.bench.harness.forward_bench --count 2000 --kind small -k 4 --repeat 3 \\
        --associations 2    # of the draining destination, for forwarding and for send alike

Prints medians and the ratios against no forwarding / against send.
"""
from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stowage.bench.corpus import generate
from stowage.bench.harness.transfer import one_study, start_storescp, store_files
from stowage.bench.loadgen import Target, load_corpus, run
from stowage.engine.forward.process import NICE
from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, stop_tree, tear_down


def _config(path: Path, destinations: dict[str, int], rules: int, associations: int) -> Path:
    text = "forward_retry_initial = 0.2\nforward_retry_max = 0.5\n"
    for name, port in destinations.items():
        text += f'[remotes.{name}]\nhost = "127.0.0.1"\nport = {port}\nassociations = {associations}\n'
    for n, name in enumerate(list(destinations)[:rules]):
        text += f'[[forward]]\nname = "r{n}"\nto = "{name}"\n'
    path.write_text(text)
    return path


def _done(data: Path, destination: str | None = None) -> int:
    """Entries delivered (all destinations, or one), read from the queue database."""
    path = data / "forward" / "queue.sqlite"
    if not path.is_file():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        sql = "SELECT count(*) FROM entries WHERE state = 'done'" + (" AND destination = ?" if destination else "")
        return db.execute(sql, (destination,) if destination else ()).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()


def _pending(data: Path) -> int:
    path = data / "forward" / "queue.sqlite"
    if not path.is_file():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM entries WHERE state = 'pending'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.02)


def _span(out: Path, count: int) -> float:
    """Seconds from the first file storescp wrote to the last, scaled to `count` intervals."""
    times = sorted(p.stat().st_mtime_ns for p in out.iterdir() if p.name != "storescp.log")
    if len(times) != count:
        raise RuntimeError(f"{len(times)} of {count} arrived in {out}")
    return (times[-1] - times[0]) / 1e9 * count / max(1, count - 1)


def _cpu(server: subprocess.Popen) -> dict[str, float]:
    """CPU seconds so far of serve's workers and of its forwarding process (its sending
    processes included)."""
    import psutil
    out = {"workers": 0.0, "forwarding": 0.0}
    for p in psutil.Process(server.pid).children(recursive=True):
        try:
            cmd, t = " ".join(p.cmdline()), p.cpu_times()
        except psutil.Error:
            continue
        key = "workers" if "workers.worker" in cmd else "forwarding" if "engine.forward." in cmd else None
        if key:
            out[key] += t.user + t.system
    return out


def ingest(work: Path, files: list[Path], warmup: list[Path], k: int, rules: int, run_no: int,
           tools: tuple[str, str, str]) -> tuple[float, float, dict[str, float]]:
    """(instances/s acknowledged, seconds from the last ack until the queue was drained,
    CPU ms per stored instance of the workers and of the forwarding process).
    A warm-up corpus goes first, and is forwarded, so that every process has started and
    imported what it needs: the steady state is measured, not a start."""
    storescp, _storescu, echoscu = tools
    rxs, ports = [], {}
    server = None
    try:
        for n in range(rules):
            ports[f"DEST{n}"] = free_port()
            rxs.append(start_storescp(storescp, echoscu, work / f"rx-{rules}-{run_no}-{n}", ports[f"DEST{n}"],
                                      fork=True, ignore=True))
        conf = _config(work / f"ingest-{rules}.toml", ports, rules, 1)
        data, port = work / f"data-{rules}-{run_no}", free_port()
        server = serve_stowage(data, port, echoscu, "--config", str(conf))
        run(Target("127.0.0.1", port, "STOWAGE"), load_corpus(warmup), k, progress=False)
        _wait(lambda: _done(data) >= rules * len(warmup), 120, f"{rules} rule(s): the warm-up was not forwarded")
        before = _cpu(server)
        result = run(Target("127.0.0.1", port, "STOWAGE"), load_corpus(files), k, progress=False)
        if result.completed != len(files):
            raise RuntimeError(f"{rules} rule(s): {result.completed} of {len(files)} stored")
        acked = time.monotonic()
        _wait(lambda: _done(data) >= rules * (len(files) + len(warmup)), 600, f"{rules} rule(s): the queue was not drained")
        lag = (time.monotonic() - acked) if rules else 0.0
        after = _cpu(server)
        return result.inst_per_s, lag, {k: (after[k] - before[k]) * 1000 / len(files) for k in after}
    finally:
        if server is not None:
            stop_tree(server, None)
        for rx in rxs:
            stop_tree(rx, None)


def _forwarder(server: subprocess.Popen):
    """psutil.Process of serve's forwarding process."""
    import psutil
    for p in psutil.Process(server.pid).children(recursive=True):
        try:
            if "forward.process" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    raise RuntimeError("no forwarding process")


def _cpu_s(p, children: bool = True) -> float:
    """CPU seconds of `p` and (`children`) its children (the forwarding process's sending processes)."""
    import psutil
    total = 0.0
    for q in [p, *(p.children(recursive=True) if children else [])]:
        try:
            t = q.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _children_cpu_s() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# Stages of a profile (py-spy's collapsed stacks), the first whose marker a stack holds.
STAGES = (("audit", ("audit_line",)), ("settle", ("settle (engine/forward/queue.py",)),
          ("due", ("due (engine/forward/queue.py", "_served (engine/forward/deliver.py")),
          ("scan", ("_scan_loop",)), ("commitment", ("engine/forward/commitment.py",)),
          ("read", ("_prepare (engine/transfer/send.py",)), ("wait", ("_recv_exact",)),
          ("send", ("protocol/store_scu.py",)), ("select", ("catalog/",)),
          ("start-up", ("<module>", "_find_and_load", "importlib")),
          ("idle", ("_worker (concurrent/futures/thread.py:81)",)))  # a pool thread waiting for work
PROFILE_RATE = 200  # py-spy samples per second


def stage_table(path: Path, count: int) -> dict[str, float]:
    """µs of sampled thread time per instance in each stage of a py-spy raw profile
    ("wait": blocked for a C-STORE response; "other": the rest: feeds, thread hand-offs)."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        name = next((name for name, marks in STAGES if any(m in stack for m in marks)), "other")
        out[name] = out.get(name, 0.0) + int(n) / PROFILE_RATE / count * 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _py_spy(profile: Path | None, name: str, gil: bool) -> list[str]:
    """py-spy record's arguments writing collapsed stacks to profile/name (none: [])."""
    if profile is None:
        return []
    return ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(profile / name), "--nonblocking", "--subprocesses",
            *(["--gil"] if gil else []), "--"]


def drain(work: Path, files: list[Path], study: str, associations: int, run_no: int,
          tools: tuple[str, str, str], same_priority: bool = True, profile: Path | None = None,
          gil: bool = False) -> tuple[float, float, float, float, float]:
    """(forwarding instances/s, `stowage send` instances/s, CPU ms per instance of the
    forwarding process with its sending process, of `stowage send`, and of the sending
    process alone) into storescp +B --fork. Send's CPU is net of
    its start-up (a `send` of a study that does not exist, measured just before); with
    `profile`, py-spy records both into that folder (the CPU figures then include its cost)."""
    storescp, storescu, echoscu = tools
    count = len(files)
    rx_port = free_port()
    conf = _config(work / f"drain-{run_no}.toml", {"DEST": rx_port}, 1, associations)
    data, port = work / f"drain-data-{run_no}", free_port()
    server = serve_stowage(data, port, echoscu, "--config", str(conf))
    rx = spy = None
    try:
        store_files(storescu, "STOWAGE", port, files)
        _wait(lambda: _pending(data) == count, 120, "entries not queued")
        forwarder = _forwarder(server)
        if profile is not None:
            spy = subprocess.Popen(_py_spy(profile, f"forward-{run_no}.txt", gil)[:-1] + ["-p", str(forwarder.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = work / f"drain-rx-{run_no}"
        rx = start_storescp(storescp, echoscu, out, rx_port, fork=True)
        cpu, own = _cpu_s(forwarder), _cpu_s(forwarder, children=False)
        _wait(lambda: _done(data, "DEST") == count, 600, "the queue was not drained")
        forward_cpu = _cpu_s(forwarder) - cpu
        sending_cpu = forward_cpu - (_cpu_s(forwarder, children=False) - own)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        stop_tree(rx, None)
        rx = None
        forwarded = count / _span(out, count)
        out = work / f"send-rx-{run_no}"
        rx = start_storescp(storescp, echoscu, out, rx_port, fork=True)
        # At the forwarding process's priority (it lowers its own by NICE): the same code
        # path compared, not the scheduler's favour.
        nice = (lambda: os.nice(NICE)) if same_priority else None
        send = [sys.executable, "-m", "stowage.cli", "send", "--config", str(conf), "--data-dir", str(data),
                "-q", "--to", "DEST", "--study"]
        cpu = _children_cpu_s()
        subprocess.run(send + ["1.2.3.4.5.6.7.8.9"], capture_output=True, preexec_fn=nice)  # nothing to send
        start_up = _children_cpu_s() - cpu
        cpu = _children_cpu_s()
        subprocess.run(_py_spy(profile, f"send-{run_no}.txt", gil) + send + [study], check=True,
                       capture_output=True, preexec_fn=nice)
        send_cpu = _children_cpu_s() - cpu - start_up
        stop_tree(rx, None)
        rx = None
        sent = count / _span(out, count)
        return forwarded, sent, forward_cpu * 1000 / count, send_cpu * 1000 / count, sending_cpu * 1000 / count
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if rx is not None:
            stop_tree(rx, None)
        stop_tree(server, None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--kind", default="small")
    ap.add_argument("-k", type=int, default=4, help="ingest: concurrent storing associations")
    ap.add_argument("--associations", type=int, default=1, help="the destination's [remotes] associations")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-drain", action="store_true")
    ap.add_argument("--profile", type=Path, help="draining: py-spy record the forwarder and send into this folder")
    ap.add_argument("--gil", action="store_true", help="with --profile: only samples holding the GIL")
    ap.add_argument("--send-at-own-priority", action="store_true",
                    help="run stowage send at the bench's priority, not lowered as the forwarding process's is")
    args = ap.parse_args(argv)
    tools = tuple(find_dcmtk(n) for n in ("storescp", "storescu", "echoscu"))
    if not all(tools):
        sys.exit("DCMTK is needed: apt-get install dcmtk")
    work = Path(tempfile.mkdtemp(prefix="stowage-bench-forward-"))
    try:
        files, mb, study = one_study(work, args.kind, args.count)
        warmup = generate(work / "warmup", args.kind, 200, patients=1, studies_per_patient=1, series_per_study=1,
                          seed=1)
        print(f"{args.count} {args.kind} instances, {mb:.0f} MB; ingest -k {args.k}; "
              f"destination associations {args.associations}", flush=True)
        if not args.skip_ingest:
            rates: dict[int, list[float]] = {0: [], 1: [], 3: []}
            lags: dict[int, list[float]] = {1: [], 3: []}
            cpus: dict[int, list[dict[str, float]]] = {0: [], 1: [], 3: []}
            for r in range(args.repeat):
                for rules in rates:  # interleaved, so a busier moment of the machine hits all alike
                    rate, lag, cpu = ingest(work, files, warmup, args.k, rules, r, tools)
                    rates[rules].append(rate)
                    cpus[rules].append(cpu)
                    if rules:
                        lags[rules].append(lag)
                    print(f"  run {r}: {rules} rule(s): {rate:.0f}/s" + (f", drained {lag:.1f} s after the last ack"
                                                                         if rules else "")
                          + f"; CPU ms/instance: workers {cpu['workers']:.2f}, forwarding {cpu['forwarding']:.2f}",
                          flush=True)
            none = statistics.median(rates[0])
            for rules, values in rates.items():
                m = statistics.median(values)
                lag = f", queue drained {statistics.median(lags[rules]):.1f} s after the last ack" if rules else ""
                w = statistics.median(c["workers"] for c in cpus[rules])
                f = statistics.median(c["forwarding"] for c in cpus[rules])
                print(f"ingest, {rules} rule(s): {m:.0f} instances/s ({m / none:.2f}x of none){lag}; "
                      f"CPU per instance: workers {w:.2f} ms, forwarding {f:.2f} ms")
        if not args.skip_drain:
            fwd, snd, fcpu, scpu, sgcpu = [], [], [], [], []
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            for r in range(args.repeat):
                f, s, fc, sc, sg = drain(work, files, study, args.associations, r, tools, not args.send_at_own_priority,
                                     args.profile, args.gil)
                fwd.append(f)
                snd.append(s)
                fcpu.append(fc)
                scpu.append(sc)
                sgcpu.append(sg)
                print(f"  run {r}: forwarding {f:.0f}/s, stowage send {s:.0f}/s ({f / s:.2f}x); "
                      f"CPU ms/instance: forwarding {fc:.3f} (its sending process {sg:.3f}), send {sc:.3f}; load {os.getloadavg()[0]:.1f}",
                      flush=True)
                for name in ("forward", "send") if args.profile else ():
                    table = stage_table(args.profile / f"{name}-{r}.txt", args.count)
                    print(f"    {name} µs/instance: " + ", ".join(f"{k} {v:.0f}" for k, v in table.items()))
            f, s = statistics.median(fwd), statistics.median(snd)
            print(f"forwarding a full queue: {f:.0f} instances/s; stowage send: {s:.0f} instances/s; "
                  f"ratio {f / s:.2f}x (median of ratios {statistics.median(a / b for a, b in zip(fwd, snd)):.2f}x); "
                  f"CPU per instance: forwarding {statistics.median(fcpu):.3f} ms (its sending process "
                  f"{statistics.median(sgcpu):.3f} ms), send {statistics.median(scpu):.3f} ms; "
                  f"load {os.getloadavg()[0]:.1f}")
    finally:
        tear_down(work, None)


if __name__ == "__main__":
    main()
