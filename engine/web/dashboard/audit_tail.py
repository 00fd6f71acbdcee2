"""The end of <data_dir>/audit.jsonl, read incrementally: the recent events a person wants
to see (associations, deletions, rejections, imports; not the one line per C-STORE) and,
from the association lines of the last hour, how long associations took per instance."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path

FIRST_READ = 32 << 20   # at start, read back at most this much of the log
MAX_READ = 64 << 20     # per refresh, read at most this much new log
HOUR = 3600.0


class AuditTail:
    def __init__(self, path: Path, keep: int = 50) -> None:
        self.path = path
        self.events: deque[dict] = deque(maxlen=keep)
        self.associations: deque[tuple[float, float, int]] = deque()  # (ended, seconds, stored)
        self._offset = -1
        self._inode = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if st.st_ino != self._inode or st.st_size < self._offset:
                        self._inode, self._offset = st.st_ino, max(0, st.st_size - FIRST_READ)
                        self.events.clear()
                        self.associations.clear()
                    f.seek(self._offset)
                    chunk = f.read(MAX_READ)
            except OSError:
                return
            end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read next time
            lines = chunk[:end].split(b"\n")
            if self._offset and not chunk.startswith(b"{"):  # started mid-line
                lines = lines[1:]
            self._offset += end
            for line in lines:
                self._take(line)
            cutoff = time.time() - HOUR
            while self.associations and self.associations[0][0] < cutoff:
                self.associations.popleft()

    def _take(self, line: bytes) -> None:
        if not line or b'"event": "store"' in line:
            return
        try:
            d = json.loads(line)
        except ValueError:
            return
        self.events.append(d)
        if d.get("event") == "association" and d.get("stored"):
            ended = _epoch(d.get("ts", ""))
            if ended:
                self.associations.append((ended, float(d.get("seconds", 0)), int(d["stored"])))

    def recent(self, n: int = 20) -> list[dict]:
        return list(self.events)[-n:][::-1]

    def per_instance_ms(self, since: float) -> dict[int, float]:
        """minute (epoch seconds) -> association seconds per stored instance, in ms, over the
        associations that ended in that minute."""
        sums: dict[int, list[float]] = {}
        for ended, seconds, stored in list(self.associations):
            if ended >= since:
                s = sums.setdefault(int(ended // 60 * 60), [0.0, 0])
                s[0] += seconds
                s[1] += stored
        return {m: 1000 * s / n for m, (s, n) in sums.items() if n}


def _epoch(ts: str) -> float:
    from datetime import datetime
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
