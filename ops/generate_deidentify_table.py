"""Generate engine/deidentify/profile_table.json from the text of DICOM PS3.15 Annex E.

Both tables come from one edition of the standard, and the generator refuses two editions:

* Table E.1-1 (Application Level Confidentiality Profile Attributes) and
* Table E.3.10-1 (Safe Private Attributes),

each as pymedphys' table generator (lib/pymedphys/_dev/deid_tables) extracts it from NEMA's
chtml pages and writes it (lib/pymedphys/_dicom/deidentify/_standard/e1_1.json and
e3_10_1.json): one object per row, the edition, and the SHA-256 of the NEMA page it was read
from. Copies of both files are kept in ops/standard/ (this machine reaches no NEMA site):

    python3 ops/generate_deidentify_table.py \
        --table ops/standard/ps3.15-2026d/e1_1.json \
        --safe-private ops/standard/ps3.15-2026d/e3_10_1.json \
        --origin "pymedphys/pymedphys@a94ddab6f24cd9da967709c82845c7fa522fa52e" \
        --out engine/deidentify/profile_table.json

Nothing is typed by hand: the option names are the extraction's names of the table's columns,
each row's digest is recomputed against the one the file records (a file edited by hand is
refused), and so are an action code outside the legend of Table E.1-1, a tag or data element
that cannot be read, and a table whose edition differs from the other's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

# The columns of Table E.1-1 that name an option ("Rtn. Safe Priv. Opt." ... "Clean Graph.
# Opt."), by the extraction's names, which are ours too. Clean Pixel Data and Clean
# Recognizable Visual Features have no column: they act on pixels, not attributes.
OPTIONS = (
    "retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
    "retain_patient_characteristics", "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates", "clean_descriptors", "clean_structured_content", "clean_graphics",
)
# The legend of Table E.1-1 (Table E.1-1a): single codes and the combined ones it defines.
ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
_TAG = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")
_PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"
_SAFE_ELEMENT = re.compile(r"^\(([0-9A-F]{4}),XX([0-9A-F]{2})\)$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_extraction(path: Path, table: str) -> dict:
    """One extracted table, checked: it is the table asked for, and its rows are the ones its
    recorded digest was taken of (the extraction's canonical JSON of the row list)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("table") != f"PS3.15 Table {table}":
        sys.exit(f"{path}: holds {doc.get('table')!r}, not PS3.15 Table {table}")
    canonical = json.dumps(doc["rows"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if hashlib.sha256(canonical.encode("utf-8")).hexdigest() != doc["content_sha256"]:
        sys.exit(f"{path}: its rows do not match the digest it records; regenerate it, do not edit it")
    return doc


def attribute_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """The rows of Table E.1-1 as {tag, name, retired, in_std_iod, basic, options}, and the
    private-attributes row."""
    out, private = [], None
    for raw in rows:
        basic, options = raw["basic_profile"], raw["options"]
        if set(options) - set(OPTIONS):
            sys.exit(f"{raw['tag']} {raw['name']}: unknown option column(s) {sorted(set(options) - set(OPTIONS))}")
        for code in [basic, *options.values()]:
            if code not in ACTIONS:
                sys.exit(f"{raw['tag']} {raw['name']}: action {code!r} is not in the legend of Table E.1-1")
        if raw["tag"].upper() == _PRIVATE_ROW:
            private = {"name": raw["name"], "basic": basic, "options": options}
            continue
        m = _TAG.match(raw["tag"].upper())
        if not m:
            sys.exit(f"{raw['tag']!r} ({raw['name']}): not a tag this generator can read")
        out.append({"tag": m[1] + m[2], "name": raw["name"], "retired": raw["retired"],
                    "in_std_iod": raw["in_standard_iod"], "basic": basic, "options": options})
    if private is None:
        sys.exit("Table E.1-1 has no private attributes row")
    out.sort(key=lambda r: r["tag"])
    return out, private


def safe_private_rows(rows: list[dict]) -> list[dict]:
    """Table E.3.10-1 as {group, element (within the block), creator, vr, vm, meaning}."""
    out = []
    for raw in rows:
        m = _SAFE_ELEMENT.match(raw["tag"].upper())
        if not m:
            sys.exit(f"Table E.3.10-1: cannot read data element {raw['tag']!r}")
        if not raw["private_creator"].strip():
            sys.exit(f"Table E.3.10-1: {raw['tag']} has no Private Creator")
        out.append({"group": m[1], "element": m[2], "creator": raw["private_creator"],
                    "vr": raw["vr"], "vm": raw["vm"], "meaning": raw["meaning"]})
    return out


def source(path: Path, doc: dict, origin: str) -> dict:
    """What the generated file records of one source: where it came from, its own digest,
    and the edition and NEMA page(s) it was extracted from, with theirs."""
    return {"origin": f"{origin}, {path.name}", "file": path.name, "sha256": sha256(path),
            "edition": doc["edition"], "extracted_from": doc["sources"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True, help="the extraction of Table E.1-1 (e1_1.json)")
    p.add_argument("--safe-private", type=Path, required=True, help="the extraction of Table E.3.10-1 (e3_10_1.json)")
    p.add_argument("--origin", required=True, help="where the extractions came from (repository@commit)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    e11, e3101 = read_extraction(a.table, "E.1-1"), read_extraction(a.safe_private, "E.3.10-1")
    if e11["edition"] != e3101["edition"]:
        sys.exit(f"Table E.1-1 is of PS3.15 {e11['edition']} and Table E.3.10-1 of {e3101['edition']}: "
                 "use one edition for both")
    rows, private = attribute_rows(e11["rows"])
    safe = safe_private_rows(e3101["rows"])
    doc = {
        "generated_by": "ops/generate_deidentify_table.py",
        "edition": f"PS3.15 {e11['edition']}",
        "acknowledgement": e11["acknowledgement"],
        "sources": {
            "table_E.1-1": source(a.table, e11, a.origin),
            "table_E.3.10-1": source(a.safe_private, e3101, a.origin),
        },
        "options": sorted(OPTIONS),
        "private_attributes": private,
        "attributes": rows,
        "safe_private": safe,
    }
    a.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{a.out}: PS3.15 {e11['edition']}, {len(rows)} attributes, {len(safe)} safe private attributes")


if __name__ == "__main__":
    main()
