"""A catalog merge gives its memory back (issue #20, docs/fuzzing.md, "A worker's memory
after a merge"): the 100,000-case soak's one violation was a worker's resident size rising
over the last eighth of the run. A merge (catalog.sealer.compact, run by the worker's
sealing thread) reads eight catalog files whole in Arrow and sorts them; Arrow's default
pool (mimalloc) kept every page of that peak after the tables were freed, so each merge
larger than the last raised the worker's resident size for good."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_ROWS = 1250  # per file; eight of them: a third-tier merge (files of 512 rows and more), as late in a soak
_HEADER = 6000  # bytes of kept header per row, as CT_small's in the soak's catalog (5.8 kB)
_CHILD = r"""
import gc, json, random, sys, threading, time
from datetime import datetime, timezone
from pathlib import Path
import psutil, pyarrow as pa, pyarrow.parquet as pq
from stowage.catalog import manifest, sealer
from stowage.catalog.schema import SCHEMA
from stowage.engine.runtime.malloc import keep_large_buffers_in_heap

directory, rows, header = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
keep_large_buffers_in_heap()  # as a worker (workers/worker.py); Arrow's pool left as a worker has it

def table(part):
    rng = random.Random(part)
    n = {f.name: [] for f in SCHEMA}
    for i in range(rows):
        for f in SCHEMA:
            if f.name == "header":
                v = rng.randbytes(header // 4) * 4
            elif f.name == "received_at":
                v = datetime.now(timezone.utc)
            elif str(f.type) == "int64":
                v = i
            else:
                v = f"2.25.{rng.getrandbits(100)}"
            n[f.name].append(v)
    return pa.table(n, schema=SCHEMA)

def resident():
    gc.collect()
    time.sleep(0.3)
    return psutil.Process().memory_info().rss

def in_thread(fn):  # the worker seals and merges on its sealing thread
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]

for part in range(8):
    in_thread(lambda: sealer.seal_rows(directory, table(part)))
before = resident()
merged = in_thread(lambda: sealer.compact(directory, 8))
after = resident()
files = manifest.load(directory).files
print(json.dumps({"before": before, "after": after, "merged": merged, "files": files,
                  "read": pq.read_table(directory / merged).num_rows}))
"""


def test_a_merge_of_eight_catalog_files_gives_its_memory_back(tmp_path):
    """Eight catalog files of 1,250 rows with 6 kB headers each (the merged table about
    60 MB in Arrow) merged in a new process tuned as a worker is, on a thread as the
    worker's sealer does. Measured before the fix: resident 209 -> 532 MiB after the
    merge, kept (the merged rows' pages: read, concatenated, sorted); fixed, 185 -> 149
    and 146 -> 156 MiB.
    The merge must leave one file of the 10,000 rows, readable, and the process's
    resident size at most 32 MiB above where it was before the merge."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(_ROWS), str(_HEADER)],
                         capture_output=True, text=True, timeout=120, cwd=repo,
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["files"] == {got["merged"]: 8 * _ROWS} and got["read"] == 8 * _ROWS
    grown = (got["after"] - got["before"]) >> 20
    assert grown <= 32, f"resident {got['before'] >> 20} -> {got['after'] >> 20} MiB after one merge: kept {grown} MiB"
