"""Seconds each test file took in a full run, for the order in which pytest-xdist hands the
files out (conftest.py: the longest first, so that the last ones handed out are short and the
test processes finish together).

    bash ops/test.sh --durations=0 > run.log; python tests/file_seconds.py run.log

rewrites tests/file_seconds.json from the run's durations (setup, call and teardown of every
test, by file). A file missing from it counts as short: it goes after the measured ones."""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE = HERE / "file_seconds.json"
_LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(tests/[^:]+\.py)::")


def load() -> dict[str, float]:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}


def main(log: str) -> None:
    seconds: dict[str, float] = defaultdict(float)
    for line in Path(log).read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m:
            seconds[Path(m.group(2)).name] += float(m.group(1))
    if not seconds:
        sys.exit(f"no --durations=0 lines in {log}")
    ordered = dict(sorted(((k, round(v, 1)) for k, v in seconds.items()), key=lambda kv: -kv[1]))
    TABLE.write_text(json.dumps(ordered, indent=0) + "\n")
    print(f"{len(ordered)} files, {sum(ordered.values()):.0f} s in all -> {TABLE}")


if __name__ == "__main__":
    main(sys.argv[1])
