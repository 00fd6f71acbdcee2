"""C-MOVE benchmark: DCMTK movescu asks stowage to move one study of generated CT
instances to DCMTK storescp (+B, writing files); the same study sent by `stowage send`;
and, if /usr/sbin/Orthanc is installed, the same C-MOVE served by Orthanc from the same
data, in the same run, as a ratio. Then the same study fetched by C-GET with DCMTK getscu
(+B, or --ignore with --dest-ignore) from stowage and from Orthanc.

    python -m stowage.bench.harness.move --count 500 [--kind ct] [--repeat 3] [--dest-fork] [--associations 2]

Steps: generate the corpus (one patient, one study, one series), start `stowage serve`
(knowing DEST in [remotes]) and Orthanc (DEST and the requester registered as
modalities, TCP_NODELAY=1 in its environment as bench/compare runs it) on free 127.0.0.1 ports, ingest it into both with storescu, then time each
transfer into a fresh storescp output directory (the same port every time), from the
requester's start to its exit. Prints medians: instances/s, MB/s (file bytes) and the
ratio to Orthanc's C-MOVE.

`--dest-ignore` runs storescp --ignore (it receives every instance but writes nothing),
so that what is measured is the C-MOVE SCP rather than the destination's disk: writing
263 MB per run without fsync, storescp otherwise slows once the kernel starts writing
back its dirty pages, and so does every sender in the same run.

The same storescp is also known to stowage as DEST2 with `associations = N`: the row
"stowage C-MOVE xN" moves to it on N associations at once. Against a plain storescp,
which serves one association at a time, that cannot help; with `--dest-fork` (storescp
--fork, a process per association, as a PACS serves several) it can. Orthanc's C-MOVE
uses one association whatever the destination.

The row "ceiling: in-memory sender" is what the destination and this machine allow any
sender: the same datasets, already in memory (no archive behind them, no reading, no
decompression), C-STOREd by the load generator (bench/loadgen.py, the same lean
association the archive sends on) on one association (N with --dest-fork), timed from
its start signal to its last response (no process start-up). A C-MOVE cannot beat it;
its ratio to Orthanc bounds the ratio any archive could reach in that run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from stowage.bench import loadgen
from stowage.bench.harness.orthanc import Orthanc, executable
from stowage.bench.harness.transfer import arrived, one_study, receiving, store_files
from stowage.bench.procs import find_dcmtk, free_port, serve_stowage, stop_tree, tear_down
from stowage.bench.report import timed_medians


def _timed(cmd: list[str] | Callable[[], tuple[float, str]]) -> tuple[float, str]:
    """Seconds a transfer took, and why it failed ('' if it did not)."""
    if callable(cmd):
        return cmd()
    t = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - t
    return seconds, (f"exit {done.returncode}: {done.stderr[-2000:]}" if done.returncode else "")


def _get(getscu: str, aec: str, port: int, keys: list[str], out: Path, count: int, ignore: bool,
         nodelay: bool) -> tuple[float, str]:
    """A C-GET by DCMTK getscu (the requester receives, as the destination does in a move:
    --ignore, or +B into `out`), timed from its start to its exit; and why it failed."""
    out.mkdir(parents=True, exist_ok=True)
    mode = ["--ignore"] if ignore else ["+B", "-od", str(out)]
    env = dict(os.environ, TCP_NODELAY="1") if nodelay else None
    t = time.monotonic()
    done = subprocess.run([getscu, "-v", "-S", *mode, "-aet", "GETSCU", "-aec", aec, *keys, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=1800, env=env)
    seconds = time.monotonic() - t
    log = done.stdout + done.stderr
    got = log.count("Sending C-STORE Response (Success)") if ignore else sum(1 for _ in out.iterdir())
    return seconds, ("" if done.returncode == 0 and got == count else
                     f"getscu exit {done.returncode}, {got} of {count} received: {log[-1500:]}")


def _in_memory(items: list[loadgen.Item], port: int, associations: int) -> tuple[float, str]:
    """The corpus C-STOREd from memory by the load generator: the ceiling row."""
    run = loadgen.run(loadgen.Target("127.0.0.1", port, "DEST", "MOVESCU"), items, associations,
                      monitor_target=False, progress=False)
    failed = run.instances - run.completed - run.warning
    return run.wall_s, (f"{failed} not stored: {run.statuses} {run.errors[:3]}" if failed else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--kind", default="ct")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--dest-nodelay", action="store_true",
                    help="storescp with TCP_NODELAY=1 (its C-STORE-RSP then costs a sender that does not "
                         "ACK at once, as Orthanc, no 40 ms delayed ACK)")
    ap.add_argument("--dest-fork", action="store_true", help="storescp --fork: one process per association")
    ap.add_argument("--dest-ignore", action="store_true",
                    help="storescp --ignore: receives but does not store, so that the destination's disk "
                         "does not bound the rate (arrivals counted from its log)")
    ap.add_argument("--zstd-level", type=int, default=None, help="stowage's zstd_level for the stored study")
    ap.add_argument("--associations", type=int, default=2,
                    help="associations at once for the 'stowage C-MOVE xN' row (DEST2)")
    args = ap.parse_args(argv)
    storescp, storescu, echoscu, movescu, getscu = (find_dcmtk(n) for n in
                                                    ("storescp", "storescu", "echoscu", "movescu", "getscu"))
    if not all((storescp, storescu, echoscu, movescu, getscu)):
        sys.exit("DCMTK is needed: apt-get install dcmtk")
    work = Path(tempfile.mkdtemp(prefix="stowage-bench-move-"))
    server = orthanc = None
    try:
        files, mb, study = one_study(work, args.kind, args.count)
        dest_port, port = free_port(), free_port()
        data = work / "data"
        cfg = work / "stowage.toml"
        level = f"zstd_level = {args.zstd_level}\n\n" if args.zstd_level is not None else ""
        cfg.write_text(level + f'[remotes.DEST]\nhost = "127.0.0.1"\nport = {dest_port}\n\n'
                       f'[remotes.DEST2]\nhost = "127.0.0.1"\nport = {dest_port}\nassociations = {args.associations}\n')
        server = serve_stowage(data, port, echoscu, "--config", str(cfg))
        store_files(storescu, "STOWAGE", port, files)
        move_keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
        commands = {
            "stowage C-MOVE": [movescu, "-S", "-aet", "MOVESCU", "-aec", "STOWAGE", "-aem", "DEST", *move_keys,
                               "127.0.0.1", str(port)],
            f"stowage C-MOVE x{args.associations}": [movescu, "-S", "-aet", "MOVESCU", "-aec", "STOWAGE", "-aem",
                                                     "DEST2", *move_keys, "127.0.0.1", str(port)],
            "stowage send": [sys.executable, "-m", "stowage.cli", "send", "--data-dir", str(data), "-q",
                             "--config", str(cfg), "--to", "DEST", "--study", study],
        }
        if not args.no_orthanc and executable():
            # Nagle off in Orthanc's DCMTK network layer, as bench/compare runs it (else each
            # sub-operation waits out a 40 ms delayed ACK).
            orthanc = Orthanc(work / "orthanc", nodelay=True)
            store_files(storescu, "ORTHANC", orthanc.dicom_port, files)
            orthanc.rest("PUT", "/modalities/dest", {"AET": "DEST", "Host": "127.0.0.1", "Port": dest_port})
            orthanc.rest("PUT", "/modalities/movescu", {"AET": "MOVESCU", "Host": "127.0.0.1", "Port": 1})
            commands["orthanc C-MOVE"] = [movescu, "-S", "-aet", "MOVESCU", "-aec", "ORTHANC", "-aem", "DEST",
                                          *move_keys, "127.0.0.1", str(orthanc.dicom_port)]
            orthanc.rest("PUT", "/modalities/getscu", {"AET": "GETSCU", "Host": "127.0.0.1", "Port": 1})
        gets = {"stowage C-GET": ("STOWAGE", port)}
        if orthanc is not None:
            gets["orthanc C-GET"] = ("ORTHANC", orthanc.dicom_port)
        items = loadgen.load_corpus(files)
        ceiling_assocs = args.associations if args.dest_fork else 1
        ceiling = f"ceiling: in-memory sender x{ceiling_assocs}"
        commands[ceiling] = lambda: _in_memory(items, dest_port, ceiling_assocs)
        results: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(args.repeat):
            for name, cmd in commands.items():  # interleaved
                out = work / f"rx-{r}-{name.replace(' ', '_').replace(':', '')}"
                with receiving(storescp, echoscu, out, dest_port, nodelay=args.dest_nodelay, fork=args.dest_fork,
                               ignore=args.dest_ignore) as rx:
                    seconds, failure = _timed(cmd)
                    results[name].append(seconds)
                    stop_tree(rx, None)  # storescp has written its log
                    got = arrived(out, args.dest_ignore)
                    if failure or got != args.count:
                        raise RuntimeError(f"{name}: {got} of {args.count} arrived\n{failure}")
            for name, (aec, p) in gets.items():  # the requester receives: no storescp
                out = work / f"get-{r}-{name.replace(' ', '_')}"
                seconds, failure = _get(getscu, aec, p, move_keys, out, args.count, args.dest_ignore,
                                        args.dest_nodelay)
                if failure:
                    raise RuntimeError(f"{name}: {failure}")
                results.setdefault(name, []).append(seconds)
                shutil.rmtree(out)
        print(f"{args.count} {args.kind} instances, {mb:.0f} MB, one study, to DCMTK storescp "
              f"{'--ignore (received, not stored)' if args.dest_ignore else '+B -od'}"
              f"{' --fork' if args.dest_fork else ''}{' (TCP_NODELAY=1)' if args.dest_nodelay else ''}; "
              f"medians of {args.repeat} interleaved runs")
        moves = {k: v for k, v in results.items() if "C-GET" not in k}
        print("\n".join(timed_medians(moves, args.count, mb, "orthanc C-MOVE")))
        get_rows = {k: v for k, v in results.items() if "C-GET" in k}
        if get_rows:
            print(f"C-GET of the same study by DCMTK getscu {'--ignore' if args.dest_ignore else '+B -od'}:")
            print("\n".join(timed_medians(get_rows, args.count, mb, "orthanc C-GET")))
    finally:
        tear_down(work, server, orthanc)


if __name__ == "__main__":
    main()
