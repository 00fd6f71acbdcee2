"""What the record codec costs each side of a WADO-RS retrieve, in-process, per MB of
Part-10 bytes: for each way of storing a native-syntax payload (byte-shuffled zstd at a
level, or raw), the bytes on disk, the ingest CPU (shuffle + compress, as
engine/store/archive.py does it) and the serving CPU (decompress + unshuffle into a reused
buffer, as engine/store/payload_into.py does it; raw: one copy). CPU time (process_time),
best of `--passes`, so the machine's load matters less.

    python -m stowage.bench.harness.dicomweb_codec DIR_OF_DCM_FILES --levels 1 -1 -5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

from stowage.engine.store import segment


def _best(fn, passes: int) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def measure(payloads: list[bytes], level: int | None, passes: int) -> dict:
    """One way of storing: `level` None is raw."""
    total = sum(len(p) for p in payloads)
    out = np.empty(max(len(p) for p in payloads), np.uint8)
    if level is None:
        def serve() -> None:
            for p in payloads:
                out[:len(p)] = np.frombuffer(p, np.uint8)
        return {"stored": "raw", "disk_ratio": 1.0, "ingest_us_per_mb": 0.0,
                "serve_us_per_mb": round(_best(serve, passes) / total * 1e12)}
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    packed = [cctx.compress(segment.shuffle(p)) for p in payloads]
    plain = np.empty(len(out), np.uint8)

    def ingest() -> None:
        for p in payloads:
            cctx.compress(segment.shuffle(p))

    def serve() -> None:
        for z, p in zip(packed, payloads):
            with dctx.stream_reader(z, read_size=len(z), read_across_frames=False) as r:
                view, got = memoryview(plain)[:len(p)], 0
                while got < len(p):
                    got += r.readinto(view[got:])
            segment._lanes_into(plain[:len(p)], out[:len(p)], inverse=True)

    return {"stored": f"zstd {level}, shuffled", "disk_ratio": round(sum(map(len, packed)) / total, 3),
            "ingest_us_per_mb": round(_best(ingest, passes) / total * 1e12),
            "serve_us_per_mb": round(_best(serve, passes) / total * 1e12)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--levels", type=int, nargs="*", default=[1, -1, -5])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args(argv)
    payloads = [p.read_bytes()[128:] for p in sorted(args.corpus.glob("**/*.dcm"))[:args.count]]
    print(f"{len(payloads)} payloads, {sum(map(len, payloads)) / 1e6:.1f} MB")
    for level in [*args.levels, None]:
        print(measure(payloads, level, args.passes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
