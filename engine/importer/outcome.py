"""What an import process says about each file: a small module the main process can
import without loading the store path (pydicom, pyarrow…), so that it starts the import
processes first and their start-up overlaps its own work."""
from __future__ import annotations

from dataclasses import dataclass

# Outcomes, as the main process counts and reports them.
STORED, HELD, SKIPPED, REFUSED, NOT_ATTEMPTED = "stored", "held", "skipped", "refused", "not-attempted"

Task = tuple[int, str, int]  # (index in the scan, path, size when scanned)


@dataclass(frozen=True)
class Outcome:
    index: int
    kind: str
    reason: str = ""
    nbytes: int = 0
    missing: tuple[str, ...] = ()  # a DICOMDIR's referenced files that are not there
