"""Ingest through HAProxy into two nodes against one node direct (a benchmark: it reports,
it asserts nothing).

``python -m stowage.bench.harness.balancer_bench [--count 4000] [--kind small]
[--associations 4] [--repeat 2] [--tmp DIR]``

In one run, alternating, `--repeat` times each: (a) one `stowage serve` with two workers
and DCMTK storescu xK straight to it; (b) two nodes with one worker each (the same two
workers, on the same two cores) behind HAProxy with ops/haproxy/haproxy.cfg (PROXY v2,
the C-ECHO health check), storescu xK to the balancer. Reported: instances/s, each
node's CPU per instance (its process tree), HAProxy's CPU per instance, the whole
machine's CPU per instance, and how the associations were spread. On one 2-core machine
the nodes share the cores, so (b) shows what the balancer costs, not what a second
machine would add; docs/scale-out.md works out the rest on paper.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stowage.bench.corpus import generate
from stowage.bench.harness.ingest import page_cache_state, tool_env
from stowage.bench.procs import machine_busy_s
from stowage.bench.procs import TreeMonitor, find_dcmtk, free_port, serve_stowage, stop_tree, wait_echo

REPO = Path(__file__).resolve().parents[2]
BALANCER = "127.0.0.2"  # haproxy connects to the nodes from here (their proxy_protocol_from)


@dataclass
class Sample:
    setup: str
    rate: float
    node_cpu_ms: list[float] = field(default_factory=list)  # per node, per instance of the whole run
    balancer_cpu_ms: float = 0.0
    machine_cpu_ms: float = 0.0
    spread: list[int] = field(default_factory=list)  # instances stored per node


def _push(storescu: str, port: int, files: list[Path], k: int, nagle: bool = False) -> float:
    shares = [files[i::k] for i in range(k)]
    t0 = time.perf_counter()
    env = tool_env(nagle=nagle)
    procs = [subprocess.Popen([storescu, "-aec", "STOWAGE", "127.0.0.1", str(port), *map(str, s)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for s in shares if s]
    for p in procs:
        if p.wait(3600) != 0:
            raise RuntimeError(f"storescu exited {p.returncode}")
    return time.perf_counter() - t0


def _stored(data: Path) -> int:
    audit = data / "audit.jsonl"
    return audit.read_text().count('"event": "store", ') if audit.exists() else 0


def _node(work: Path, name: str, workers: int, echoscu: str, config: str = "") -> tuple[subprocess.Popen, int, Path]:
    data, port = work / name, free_port()
    data.mkdir(parents=True)
    cfg = data / "node.toml"
    cfg.write_text(config)
    proc = serve_stowage(data, port, echoscu, "--workers", str(workers), "--config", str(cfg))
    return proc, port, data


def _measure(setup: str, nodes: list[tuple[subprocess.Popen, int, Path]], port: int, files: list[Path], k: int,
             storescu: str, balancer: subprocess.Popen | None, nagle: bool) -> Sample:
    monitors = [TreeMonitor(p.pid).start() for p, _, _ in nodes]
    for m in monitors:
        m.settle()
    hmon = TreeMonitor(balancer.pid).start() if balancer else None
    cpu0 = [m.sample() for m in monitors]
    h0 = hmon.sample() if hmon else 0.0
    machine0 = machine_busy_s()
    wall = _push(storescu, port, files, k, nagle)
    n = len(files)
    sample = Sample(setup, n / wall, [(m.sample() - c) / n * 1e3 for m, c in zip(monitors, cpu0)],
                    ((hmon.sample() - h0) / n * 1e3) if hmon else 0.0, (machine_busy_s() - machine0) / n * 1e3,
                    [_stored(d) for _, _, d in nodes])
    for m in monitors + ([hmon] if hmon else []):
        m.stop()
    return sample


def one_node(work: Path, files: list[Path], k: int, tools: dict[str, str], nagle: bool) -> Sample:
    node = _node(work, "single", 2, tools["echoscu"])
    try:
        return _measure("one node, direct", [node], node[1], files, k, tools["storescu"], None, nagle)
    finally:
        stop_tree(node[0], None)


def two_nodes(work: Path, files: list[Path], k: int, tools: dict[str, str], nagle: bool) -> Sample:
    nodes = [_node(work, name, 1, tools["echoscu"], f'proxy_protocol_from = ["{BALANCER}"]\n') for name in "ab"]
    port = free_port()
    render = [sys.executable, str(REPO / "ops/haproxy/render.py"), "--dicom-port", str(port), "--http-port",
              str(free_port()), "--stats-socket", str(work / "haproxy.sock"), "--source", BALANCER]
    for name, (_, node_port, _) in zip("ab", nodes):
        render += ["--node", f"{name}={'127.0.0.1'}:{node_port}"]
    cfg = work / "haproxy.cfg"
    cfg.write_text(subprocess.run(render, check=True, capture_output=True, text=True).stdout)
    balancer = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_echo(tools["echoscu"], port, "STOWAGE")
        time.sleep(5)  # both nodes seen up by the health check (rise 2, every 2 s)
        return _measure("two nodes behind HAProxy", nodes, port, files, k, tools["storescu"], balancer, nagle)
    finally:
        balancer.terminate()
        balancer.wait(10)
        for proc, _, _ in nodes:
            stop_tree(proc, None)


def report(samples: list[Sample]) -> str:
    rows = ["| setup | inst/s | node CPU ms/inst | HAProxy CPU ms/inst | machine CPU ms/inst | stored per node |",
            "| :-- | --: | --: | --: | --: | :-- |"]
    for setup in dict.fromkeys(s.setup for s in samples):
        mine = [s for s in samples if s.setup == setup]
        med = statistics.median
        node_cpu = " + ".join(f"{med(s.node_cpu_ms[i] for s in mine):.3f}" for i in range(len(mine[0].node_cpu_ms)))
        rows.append(f"| {setup} | {med(s.rate for s in mine):.0f} | {node_cpu} | "
                    f"{med(s.balancer_cpu_ms for s in mine):.3f} | {med(s.machine_cpu_ms for s in mine):.3f} | "
                    f"{' / '.join(str(n) for n in mine[-1].spread)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--kind", default="small")
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--nagle", action="store_true",
                    help="leave Nagle's algorithm on in storescu (Debian's DCMTK default without TCP_NODELAY)")
    args = ap.parse_args(argv)
    tools = {name: find_dcmtk(name) for name in ("storescu", "echoscu")}
    if not all(tools.values()) or not shutil.which("haproxy"):
        print("needs DCMTK (storescu, echoscu) and haproxy (Debian packages dcmtk, haproxy)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="stowage-balancer-", dir=args.tmp))
    try:
        files = generate(root / "corpus", args.kind, args.count)
        print(page_cache_state())
        print(f"corpus: {args.count} {args.kind}, storescu x{args.associations} (Nagle "
              f"{'on' if args.nagle else 'off: TCP_NODELAY=1'}), {args.repeat} run(s) each, alternating", flush=True)
        samples = []
        for i in range(args.repeat):
            for setup in (one_node, two_nodes):
                work = root / f"{setup.__name__}-{i}"
                work.mkdir()
                samples.append(setup(work, files, args.associations, tools, args.nagle))
                print(f"  {samples[-1]}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
        print(report(samples))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
