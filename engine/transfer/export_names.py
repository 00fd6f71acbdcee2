"""Readable, safe file names for `stowage export --layout tree`.

Every value that ends up in a name came from the network, so it is sanitized before it
touches a path: only letters, digits and marks (any script), `-` and `.` survive, the
rest becomes `_`; no name starts or ends with `.`, `_` or `-`; names are capped in
characters and in UTF-8 bytes; and each folder ends with a short hash of the UIDs (or
Patient ID) it stands for, so two patients, studies or series whose readable parts
sanitize to the same text never share a folder. See docs/export.md.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

_KEEP = frozenset("-.")
_RUNS = re.compile(r"[._-]*_[._-]*")  # a run of separators around a replaced character
_EDGES = "_.- "
NAME_BYTES = 120  # a folder name's cap, well under the 255 bytes file systems allow
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def suffix(*key: str | None) -> str:
    """8 hex digits that stand for `key` (stable across runs and machines)."""
    raw = "\x00".join(k or "" for k in key).encode("utf-8", "surrogatepass")
    return hashlib.sha1(raw).hexdigest()[:8]


def _fit(text: str, chars: int, nbytes: int) -> str:
    """`text` cut to `chars` characters and `nbytes` UTF-8 bytes, never inside a character."""
    text = text[:chars]
    while len(text.encode("utf-8")) > nbytes:
        text = text[:-1]
    return text.strip(_EDGES)


def clean(value: object, cap: int = 40) -> str:
    """`value` as a piece of a file name: safe characters only, at most `cap` characters
    (and 4*cap bytes); "" if nothing readable is left."""
    if value is None:
        return ""
    text = unicodedata.normalize("NFC", str(value))
    out = [c if c in _KEEP or unicodedata.category(c)[0] in "LNM" else "_" for c in text]
    text = _RUNS.sub("_", "".join(out)).strip(_EDGES)
    text = re.sub(r"\.{2,}", ".", text)
    return _fit(text, cap, 4 * cap)


def number(value: object, width: int) -> str:
    """An IS value zero-padded so that names sort in order; other text cleaned."""
    text = str(value).strip() if value is not None else ""
    if text.lstrip("+").isdigit() and text.isascii():
        return str(int(text)).zfill(width)
    return clean(text, 12)


def folder(parts: list[tuple[object, int]], fallback: str, *key: str | None) -> str:
    """A folder name from readable (value, cap) parts, the `fallback` (a UID) when all are
    empty, and the key's hash suffix."""
    words = [w for w in (clean(v, cap) for v, cap in parts) if w]
    base = "_".join(words) or clean(fallback, 64) or "unnamed"
    return f"{_fit(base, NAME_BYTES, NAME_BYTES)}_{suffix(*key)}"


def uid_name(uid: str) -> str:
    """A SOP Instance UID as a file name stem: itself when it is a well-formed UID (as the
    store validates them), else its cleaned text plus a hash, so it still names one file."""
    if len(uid) <= 64 and _UID.fullmatch(uid):
        return uid
    return f"{clean(uid, 64) or 'uid'}_{suffix(uid)}"


@dataclass(frozen=True)
class Names:
    """The readable values of one instance's patient, study and series (those of the
    earliest-received instance of each, see engine.export_tree) and its own."""
    patient: tuple[str | None, ...]   # issuer, patient id, study uid when no id
    patient_name: str | None
    patient_id: str | None
    study_uid: str
    study_date: str | None
    accession: str | None
    study_id: str | None
    study_description: str | None
    series_uid: str
    series_number: str | None
    modality: str | None
    series_description: str | None


def tree_parts(n: Names) -> tuple[str, str, str]:
    """(patient, study, series) folder names."""
    patient = folder([(n.patient_name, 40), (n.patient_id, 32)], n.study_uid, *n.patient)
    study = folder([(n.study_date, 8), (n.accession or n.study_id, 16), (n.study_description, 40)],
                   n.study_uid, n.study_uid)
    series = folder([(number(n.series_number, 3), 12), (n.modality, 8), (n.series_description, 40)],
                    n.series_uid, n.series_uid)
    return patient, study, series


def file_name(instance_number: object, uid: str) -> str:
    """`<InstanceNumber>_<SOP Instance UID>.dcm`, or `<UID>.dcm` without a number."""
    num = number(instance_number, 4)
    return f"{num}_{uid_name(uid)}.dcm" if num else f"{uid_name(uid)}.dcm"


class Existing:
    """What a previous export left: a folder or file that ends with the same suffix (the
    key's hash, or `_<UID>.dcm`) is reused, so that re-running an export never writes an
    instance twice even if a readable value has changed since."""

    def __init__(self) -> None:
        self._listed: dict[Path, dict[str, str]] = {}

    def _listing(self, parent: Path) -> dict[str, str]:
        if parent not in self._listed:
            names: dict[str, str] = {}
            try:
                with os.scandir(parent) as it:
                    for entry in it:
                        if not entry.name.startswith("."):
                            names.setdefault(_tail(entry.name), entry.name)
            except FileNotFoundError:
                pass
            self._listed[parent] = names
        return self._listed[parent]

    def name(self, parent: Path, wanted: str) -> str:
        """The name to use in `parent` for `wanted`: an existing one with its tail, else it."""
        names = self._listing(parent)
        return names.setdefault(_tail(wanted), wanted)


def _tail(name: str) -> str:
    """The part of a name that identifies what it holds: the hash after the last `_` of a
    folder; the UID of an instance file."""
    if name.endswith(".dcm"):
        stem = name[:-4]
        return "uid:" + stem.split("_", 1)[1] if "_" in stem and stem.split("_", 1)[0].isdigit() else "uid:" + stem
    return "key:" + name.rsplit("_", 1)[-1]
