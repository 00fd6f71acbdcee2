"""Received datasets that spill to disk past a threshold, so that a worker's memory does
not grow with instance size (DESIGN.md, invariant 7).

pynetdicom collects each DIMSE message's dataset in a BytesIO. We put `SpillBuffer` (a
BytesIO) in its place (protocol/pynetdicom_patches.py, `install(dataset_buffer=...)`): small datasets stay in memory exactly as before; past
`threshold` bytes the rest goes to a spool file on the archive's own disk, from which the
store path streams (compression and the segment copy never hold it whole).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path


class SpillBuffer(io.BytesIO):
    directory: Path | None = None
    threshold: int = 16 << 20

    def __init__(self, initial: bytes = b"") -> None:
        super().__init__(initial)
        self._file: io.BufferedWriter | None = None
        self.path: Path | None = None

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def write(self, data) -> int:  # type: ignore[override]
        if self._file is None:
            if self.directory is None or super().tell() + len(data) <= self.threshold:
                return super().write(data)
            self._spill()
        assert self._file is not None
        return self._file.write(data)

    def _spill(self) -> None:
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".part", dir=self.directory)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.path = Path(name)
        self._file.write(super().getvalue())
        super().seek(0)
        super().truncate(0)

    def getvalue(self) -> bytes:
        if self.spilled:
            raise RuntimeError("the dataset was spilled to disk: read it from .path")
        return super().getvalue()

    def finish(self) -> tuple[Path, int]:
        """Close the spool file; returns its path and length."""
        assert self._file is not None and self.path is not None
        self._file.close()
        return self.path, self.path.stat().st_size

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __del__(self) -> None:  # an aborted association leaves its partial dataset behind
        try:
            self.discard()
        except Exception:
            pass


def prepare(directory: Path, threshold: int) -> type[SpillBuffer]:
    """SpillBuffers of this process spill into `directory` (emptied) past `threshold` bytes."""
    if directory.exists():
        shutil.rmtree(directory)  # partial datasets of a previous life of this worker
    directory.mkdir(parents=True)
    SpillBuffer.directory, SpillBuffer.threshold = directory, threshold
    return SpillBuffer
