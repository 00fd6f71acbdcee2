"""STOWAGE_TRACEMALLOC=<directory>, a probe's switch (bench/harness/fuzz_memory.py
--tracemalloc): a serving process traces Python's allocations, and on SIGUSR2 writes a
snapshot as <role>-<pid>-<n>.tm and what DuckDB holds in each of its catalog views as
<role>-<pid>-<n>.json (each written aside, then renamed)."""
from __future__ import annotations

import json
import os
from typing import Callable


def start(role: str) -> Callable[[], None] | None:
    """Start tracing if the switch is set; the dump to call on each SIGUSR2, else None."""
    where = os.environ.get("STOWAGE_TRACEMALLOC")
    if not where:
        return None
    import tracemalloc

    from stowage.catalog import reader
    tracemalloc.start(8)
    taken = [0]

    def dump() -> None:
        path = os.path.join(where, f"{role}-{os.getpid()}-{taken[0]}")
        with open(path + ".json.tmp", "w") as f:
            json.dump(reader.memory_report(), f)
        tracemalloc.take_snapshot().dump(path + ".tm.tmp")
        os.replace(path + ".json.tmp", path + ".json")
        os.replace(path + ".tm.tmp", path + ".tm")
        taken[0] += 1
    return dump
