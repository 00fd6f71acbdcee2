"""Finding the files to import: walk the given folders (recursively, without following
symbolic links to folders, so a link loop cannot trap us: such links are listed as
skipped, and broken links as refused), stat each file once, and leave out those the
ledger says are already imported and unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stowage.engine.importer.ledger import Key, Ledger


@dataclass
class Scan:
    files: list[tuple[str, Key]] = field(default_factory=list)   # to read: (absolute path, key)
    total_bytes: int = 0
    unchanged: int = 0          # in the ledger and unchanged: skipped without reading
    unchanged_bytes: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, why it could not be listed)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was left out)


def roots_of(paths: list[Path]) -> list[str]:
    """Absolute roots to walk. A DICOMDIR given by name stands for its folder: its
    referenced files live below it (PS3.10 8.5: File IDs are relative to it)."""
    roots = []
    for p in paths:
        p = Path(os.path.abspath(p))
        if p.is_file() and p.name.upper() == "DICOMDIR":
            p = p.parent
        roots.append(str(p))
    return roots


def _key(st: os.stat_result) -> Key:
    return st.st_size, st.st_mtime_ns, st.st_ino


def scan(roots: list[str], ledger: Ledger) -> Scan:
    out = Scan()
    seen: set[str] = set()
    for root in roots:
        known = ledger.known(root if os.path.isfile(root) else root.rstrip("/") + "/")
        if os.path.isfile(root):
            _consider(out, root, os.stat(root), known, seen)
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                out.errors.append((folder, f"cannot list the folder: {e.strerror or e}"))
                continue
            subfolders = []
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subfolders.append(entry.path)
                    elif entry.is_file():
                        _consider(out, entry.path, entry.stat(), known, seen)
                    elif entry.is_symlink():
                        _link(out, entry)
                except OSError as e:
                    out.errors.append((entry.path, f"cannot stat: {e.strerror or e}"))
            stack.extend(reversed(subfolders))
    return out


def _link(out: Scan, entry: os.DirEntry) -> None:
    """A symbolic link that is not to a file: said in the report, never left out in
    silence (a symbolic link farm whose storage is not mounted imported nothing, "0
    refused", exit status 0)."""
    if entry.is_dir():
        out.skipped.append((entry.path, "a symbolic link to a folder: not followed (name that folder to import it)"))
        return
    try:
        target = os.readlink(entry.path)
    except OSError as e:
        target = f"({e.strerror})"
    out.errors.append((entry.path, f"unreadable: a broken symbolic link (to {target}, which does not exist)"))


def _consider(out: Scan, path: str, st: os.stat_result, known: dict[str, Key], seen: set[str]) -> None:
    if path in seen:  # the same file named twice on the command line
        return
    seen.add(path)
    key = _key(st)
    if known.get(path) == key:
        out.unchanged += 1
        out.unchanged_bytes += key[0]
        return
    out.files.append((path, key))
    out.total_bytes += key[0]
