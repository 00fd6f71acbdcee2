"""Deletions made while a transfer runs: a C-MOVE, C-GET or `stowage send` selects its
instances once, and a study deleted meanwhile (a wrong-patient study, a rejection note)
must not keep going out.

The watch notes where the tombstone log (catalog/tombstones.py) ends when the transfer
starts, before its selection is made; before each instance goes out it asks, in one
stat(), whether the log grew, and reads only what was added. A record named by a new
tombstone (by SOP Instance UID and received_at; by UID alone where the transfer's
instance does not carry received_at) fails its sub-operation with the tombstone's reason.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from stowage.catalog import tombstones
from stowage.engine.transfer.results import Instance


class DeletionWatch:
    """Tombstones added since the watch started, asked about per instance (thread-safe)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = tombstones.directory(data_dir)
        self._lock = threading.Lock()
        self._stamp = tombstones.stamp_of(self.dir)
        try:
            st = os.stat(self.dir / tombstones.LOG)
            self._ino, self._offset = st.st_ino, st.st_size
        except FileNotFoundError:
            self._ino, self._offset = None, 0
        self._hidden: dict[str, dict[int | None, str]] = {}  # uid -> {received_at: reason}

    def why_deleted(self, inst: Instance) -> str | None:
        """Why `inst` may no longer go out (deleted since the watch started), or None."""
        if tombstones.stamp_of(self.dir) != self._stamp:
            self._catch_up()
        versions = self._hidden.get(inst.sop_instance_uid)
        if not versions:
            return None
        if inst.received_at is None:
            reason = next(iter(versions.values()))
        else:
            reason = versions.get(inst.received_at)
            if reason is None:
                return None
        return f"{'deleted' if reason == 'deleted' else reason} from the archive during the transfer"

    def _catch_up(self) -> None:
        with self._lock:
            stamp = tombstones.stamp_of(self.dir)
            if stamp == self._stamp:
                return
            fresh, self._ino, self._offset = tombstones.read_from(self.dir, self._ino, self._offset)
            self._stamp = stamp
            for uid, at, reason in zip(fresh["sop_instance_uid"].to_pylist(),
                                       fresh["received_at"].cast("int64").to_pylist(),
                                       fresh["reason"].to_pylist()):
                if at is not None:
                    self._hidden.setdefault(uid, {})[at] = reason
