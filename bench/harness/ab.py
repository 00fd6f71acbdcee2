"""A/B of stowage's receiver CPU per instance: two checkouts, alternating, same corpus.

    python -m stowage.bench.harness.ab A_DIR B_DIR --kind small --count 20000 --repeat 4 [--corpus DIR]

Each run starts `python -m stowage.cli serve` from one checkout's root (so that checkout's
code runs), fresh, and sends the corpus with DCMTK storescu over K associations
(bench/harness/ingest.run_once: the receiver measured from when its process tree has
settled). The order alternates every repeat (A B, B A, ...). On a shared, noisy machine
compare CPU per instance of the receiver's process tree, not rates.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from stowage.bench.corpus import generate
from stowage.bench.harness import ingest
from stowage.bench.harness.receivers import RECEIVERS, Receiver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stowage.bench.harness.ab", description=__doc__.split("\n")[0])
    ap.add_argument("checkouts", nargs=2, type=Path, help="A and B: repository roots")
    ap.add_argument("--kind", default="small")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--corpus", type=Path, help="send these .dcm files instead of generating --kind/--count")
    ap.add_argument("--stowage-workers", type=int)
    ap.add_argument("--tmp", help="parent dir for temp dirs")
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--send-timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    args.nagle, args.keep = False, False
    tools = ingest.sender_tools()
    if tools is None:
        return 2
    work = Path(tempfile.mkdtemp(prefix="stowage-ab-", dir=args.tmp))
    try:
        files = sorted(args.corpus.glob("*.dcm")) if args.corpus else generate(work / args.kind, args.kind, args.count)
        total = sum(f.stat().st_size for f in files)
        base = RECEIVERS["stowage"]
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        for rep in range(args.repeat):
            order = ("A", "B") if rep % 2 == 0 else ("B", "A")
            for label in order:
                ingest.REPO_ROOT = args.checkouts[0 if label == "A" else 1].resolve()
                run, _ = ingest.run_once(Receiver(base.name, base.aet, base.build, False), files, total,
                                         args.associations, tools, args)
                per = run.cpu_s / len(files) * 1e3
                cpu[label].append(per)
                print(f"rep {rep + 1} {label}: {per:.3f} ms/inst  {run.inst_per_s:7.1f} inst/s  "
                      f"{run.errors or ''}", flush=True)
        for label, vals in cpu.items():
            print(f"{label} {args.checkouts[0 if label == 'A' else 1]}: median {statistics.median(vals):.3f} "
                  f"ms/inst of {', '.join(f'{v:.3f}' for v in vals)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
