"""The Query/Retrieve information models and their keys (PS3.4 C.6), generated from
`qr_keys.csv` (tags, levels and types transcribed from the standard) and pydicom's data
dictionary (names, VRs, VMs).

    python -m stowage.catalog.keys      prints the key tables, with where each key is answered from
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from pydicom.datadict import dictionary_description, dictionary_keyword, dictionary_VM, dictionary_VR

from stowage.catalog.schema import KEYWORD_TO_COLUMN

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE = {"PATIENT": 0x00100020, "STUDY": 0x0020000D, "SERIES": 0x0020000E, "IMAGE": 0x00080018}
# The FIND SOP classes of the three models: pydicom.uid names no Query/Retrieve class
# (pynetdicom.sop_class does; the catalog does not import pynetdicom).
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_STUDY_ONLY_FIND = "1.2.840.10008.5.1.4.1.2.3.1"

# Keys the archive computes from the instances it holds (PS3.4 C.3.4 and C.6).
DERIVED = frozenset({
    0x00201200, 0x00201202, 0x00201204,  # Number of Patient Related Studies / Series / Instances
    0x00201206, 0x00201208,              # Number of Study Related Series / Instances
    0x00201209,                          # Number of Series Related Instances
    0x00080061, 0x00080062,              # Modalities in Study, SOP Classes in Study
})


@dataclass(frozen=True)
class Key:
    """One key of a level: an attribute, its type there (R, U, O), and for a sequence
    the keys of its items."""

    tag: int
    type: str
    level: str
    items: tuple["Key", ...] = ()

    @property
    def keyword(self) -> str:
        return dictionary_keyword(self.tag)

    @property
    def name(self) -> str:
        return dictionary_description(self.tag)

    @property
    def vr(self) -> str:
        return dictionary_VR(self.tag)

    @property
    def vm(self) -> str:
        return dictionary_VM(self.tag)

    @property
    def source(self) -> str:
        """Where a value comes from: 'indexed' column, 'derived' by the archive, or 'header'."""
        if self.tag in DERIVED:
            return "derived"
        return "indexed" if self.keyword in KEYWORD_TO_COLUMN else "header"


@dataclass(frozen=True)
class Model:
    """One Query/Retrieve information model: its FIND SOP class and its levels' keys."""

    name: str
    find: str
    levels: tuple[str, ...]
    keys: dict[str, dict[int, Key]] = field(repr=False)

    def level_of(self, tag: int) -> str | None:
        """The level whose table lists `tag` in this model, or None."""
        for level in self.levels:
            if tag in self.keys[level]:
                return level
        return None

    def unique_keys_above(self, level: str) -> list[tuple[str, int]]:
        """(level, unique key) of each level above `level` in this model."""
        return [(lvl, UNIQUE[lvl]) for lvl in self.levels[:self.levels.index(level)]]


def _rows() -> list[tuple[str, list[int], str]]:
    with resources.files(__package__).joinpath("qr_keys.csv").open() as f:
        lines = [line for line in f if not line.startswith("#")]
    return [(r["level"], [int(t, 16) for t in r["path"].split("/")], r["type"])
            for r in csv.DictReader(lines)]


def _table(level: str, rows: list[tuple[str, list[int], str]]) -> dict[int, Key]:
    """The keys of one PS3.4 table, items nested under their sequences."""
    def build(prefix: list[int], as_level: str) -> tuple[Key, ...]:
        depth = len(prefix) + 1
        out = []
        for lvl, path, typ in rows:
            if lvl == level and len(path) == depth and path[:-1] == prefix:
                out.append(Key(path[-1], typ, as_level, build(path, as_level)))
        return tuple(out)
    return {k.tag: k for k in build([], level)}


@cache
def tables() -> dict[str, dict[int, Key]]:
    """Patient Root tables by level (C.6-1 to C.6-4)."""
    rows = _rows()
    return {level: _table(level, rows) for level in LEVELS}


@cache
def models() -> dict[str, Model]:
    """The three models, by FIND SOP Class UID."""
    t = tables()
    study_root_study = {tag: Key(tag, "R" if tag == UNIQUE["PATIENT"] else k.type, "STUDY", k.items)
                        for tag, k in t["PATIENT"].items()}
    study_root_study.update(t["STUDY"])
    found = [
        Model("Patient Root", PATIENT_ROOT_FIND, LEVELS, dict(t)),
        Model("Study Root", STUDY_ROOT_FIND, LEVELS[1:],
              {"STUDY": study_root_study, "SERIES": t["SERIES"], "IMAGE": t["IMAGE"]}),
        Model("Patient/Study Only", PATIENT_STUDY_ONLY_FIND, LEVELS[:2],
              {"PATIENT": t["PATIENT"], "STUDY": t["STUDY"]}),
    ]
    return {m.find: m for m in found}


@cache
def table_level(tag: int) -> str | None:
    """The level at which the Patient Root tables list `tag` (None: not a table key)."""
    for level in LEVELS:
        if tag in tables()[level]:
            return level
    return None


def describe() -> str:
    """The key tables as Markdown: model, level, key, type, where it is answered from."""
    out = []
    for m in models().values():
        out.append(f"### {m.name} ({m.find})\n")
        out.append("| level | key | tag | VR | type | answered from |")
        out.append("|---|---|---|---|---|---|")
        for level in m.levels:
            def walk(keys, depth: int) -> None:
                for k in keys:
                    out.append(f"| {level} | {'>' * depth}{k.keyword} | ({k.tag >> 16:04X},{k.tag & 0xFFFF:04X}) "
                               f"| {k.vr} | {k.type} | {k.source if not depth else 'header'} |")
                    walk(k.items, depth + 1)
            walk(m.keys[level].values(), 0)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(describe())
