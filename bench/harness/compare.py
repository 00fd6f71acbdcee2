"""Side-by-side ingest comparison: every available receiver, both senders, both corpora,
1 and 4 associations, repeated, on this machine in one run.

    python -m stowage.bench.harness.compare [--repeat 3] [--small-count 2000] [--ct-count 300] \\
        [--receivers stowage,storescp,storescp-fork,orthanc,pynetdicom] \\
        [--senders storescu,stowage-bench] [--json compare.json] [--markdown]

Receivers (bench/harness/receivers.py), each started fresh on a free 127.0.0.1 port in a new temp
dir for every single run and stopped by PID afterwards: stowage (`serve`, default
workers, fsync durability), DCMTK storescp (files) and storescp --fork, Orthanc (its own
temporary config, fsync on), pynetdicom's storescp (bench/harness/pynetdicom_scp.py). Senders:
DCMTK storescu and `stowage bench`'s load generator. Every child runs with
TCP_NODELAY=1 (DCMTK leaves Nagle on otherwise; see bench/harness/ingest.py).

Repeats are interleaved (repeat 1 of every configuration, then repeat 2, ...) so that
a burst of load from something else on the machine spreads over all receivers instead
of sinking one. The table shows medians and each receiver's ratio to stowage with the
same corpus, sender and association count (>1: faster than stowage).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from stowage.bench.corpus import generate
from stowage.bench.harness.ingest import (SENDERS, Result, finish, format_table, measure, names_of, page_cache_state,
                                          sender_tools)
from stowage.bench.harness.orthanc import executable as orthanc_executable
from stowage.bench.procs import find_dcmtk
from stowage.bench.harness.receivers import RECEIVERS
from stowage.bench.report import disk, machine

KINDS = ("small", "ct")


def tool_versions() -> dict[str, str]:
    """Versions of the peers, for the record."""
    out: dict[str, str] = {}
    storescp = find_dcmtk("storescp")
    if storescp:
        r = subprocess.run([storescp, "--version"], capture_output=True, text=True, timeout=10)
        first = next((ln for ln in r.stdout.splitlines() if "dcmtk" in ln.lower()), "")
        out["dcmtk"] = first.split("v", 1)[-1].split()[0] if "v" in first else first
    if orthanc := orthanc_executable():
        r = subprocess.run([orthanc, "--version"], capture_output=True, text=True, timeout=10)
        out["orthanc"] = (r.stdout.splitlines() or [""])[0].split()[-1]
    for pkg in ("pynetdicom", "pydicom", "stowage"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "engine", "workers", "catalog"],
                               cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10).stdout.strip()
        if head:
            out["stowage"] = f"{out.get('stowage', '?')} (commit {head}{', modified' if dirty else ''})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def header(env: dict, corpora: dict[str, tuple[int, int]], args: argparse.Namespace) -> str:
    m = env["machine"]
    load = " → ".join(f"{a:.2f}" for a in env["load"])
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
             f"Python {m['python']}; temp dirs on {env['disk']}",
             f"load average (1 min) at start → end: {load}",
             "peers: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             "corpora: " + "; ".join(f"{k}: {n} instances, {b / 1e6:.1f} MB" for k, (n, b) in corpora.items()),
             page_cache_state() + " (disk KB/inst: written over the transfer and its sync; dirty MB at ack: "
             "what the page cache still held to write when the last C-STORE was answered)",
             f"medians of {args.repeat} interleaved runs; every receiver started fresh for every run"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--small-count", type=int, default=2000)
    ap.add_argument("--ct-count", type=int, default=300)
    ap.add_argument("--kinds", default=",".join(KINDS), help="corpora to run, of small,ct")
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--receivers", default=",".join(RECEIVERS))
    ap.add_argument("--senders", default=",".join(SENDERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write every run here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--stowage-workers", type=int, help="stowage serve --workers [its default]")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--send-timeout", type=float, default=1800.0)
    ap.add_argument("--tmp", help="parent dir for temp dirs (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep receiver temp dirs (for debugging)")
    args = ap.parse_args(argv)
    args.nagle = False
    kinds = names_of(ap, "kinds", args.kinds, KINDS)
    receivers = names_of(ap, "receivers", args.receivers, RECEIVERS)
    senders = names_of(ap, "senders", args.senders, SENDERS)
    if (tools := sender_tools()) is None:
        return 2
    env = {"machine": machine(), "disk": disk(args.tmp or tempfile.gettempdir()), "versions": tool_versions(),
           "load": [os.getloadavg()[0]]}
    work = Path(tempfile.mkdtemp(prefix="stowage-compare-", dir=args.tmp))
    results: dict[tuple[str, str, str, int], Result] = {}
    corpora: dict[str, tuple[int, int]] = {}
    started = time.monotonic()
    try:
        files, items = {}, {}
        from stowage.bench.loadgen import load_corpus
        for kind in kinds:
            count = args.small_count if kind == "small" else args.ct_count
            files[kind] = generate(work / kind, kind, count, seed=args.seed)
            # in memory only for the stowage-bench sender: a 10 GB corpus for storescu stays on disk
            items[kind] = load_corpus(files[kind]) if "stowage-bench" in senders else None
            corpora[kind] = (len(files[kind]), sum(f.stat().st_size for f in files[kind]))
        print(header(env, corpora, args), file=sys.stderr, flush=True)
        for kind in kinds:
            for snd in senders:
                for name in receivers:
                    for k in args.associations:
                        results[(kind, snd, name, k)] = Result(name, k, "ok", snd, kind)
        for rep in range(args.repeat):
            print(f"--- repeat {rep + 1} of {args.repeat} ({time.monotonic() - started:.0f} s so far)",
                  file=sys.stderr, flush=True)
            for (kind, snd, name, k), res in results.items():
                if res.status in ("skipped", "failed"):
                    continue
                measure(res, files[kind], corpora[kind][1], tools, args, items[kind], label=f"{kind:<5} ")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["load"].append(os.getloadavg()[0])
    order = {n: i for i, n in enumerate(receivers)}
    done = sorted((finish(r) for r in results.values()),
                  key=lambda r: (kinds.index(r.kind), senders.index(r.sender), r.associations, order[r.receiver]))
    print(header(env, corpora, args))
    print(f"command: python -m stowage.bench.harness.compare {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"took {time.monotonic() - started:.0f} s")
    print()
    print(format_table(done, markdown=args.markdown))
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "env": env, "corpora": corpora,
                                         "results": [asdict(r) for r in done]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
