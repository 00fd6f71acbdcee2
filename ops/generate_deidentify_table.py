"""Generate engine/deidentify/profile_table.json from the text of DICOM PS3.15 Annex E.

Two sources, both public copies of the standard's text (this machine reaches no NEMA site):

* Table E.1-1 (Application Level Confidentiality Profile Attributes): the rows as
  innolitics/dicom-standard extracts them from the standard's HTML
  (standard/confidentiality_profile_attributes.json, one object per row, one key per
  column that has a value).
* Table E.3.10-1 (Safe Private Attributes): the reStructuredText conversion of PS3.15
  Annex E in chsasank/dicom_standard (source/part15/chapter_E.rst), a grid table.

    python3 ops/generate_deidentify_table.py \
        --table  <innolitics checkout>/standard/confidentiality_profile_attributes.json \
        --table-origin "innolitics/dicom-standard@7f4749d..., PS3.15 2024b" \
        --annex  <chsasank checkout>/source/part15/chapter_E.rst \
        --annex-origin "chsasank/dicom_standard@2384a79..., PS3.15 2020" \
        --out engine/deidentify/profile_table.json

Nothing is typed by hand: the column names below are the standard's column headings,
mapped to our option names, and the script refuses a table whose rows it does not
understand (an action code outside the legend of E.1-1, a tag it cannot read).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

# Column of Table E.1-1 (the extract's key) -> our option name. The headings are the
# standard's own ("Rtn. Safe Priv. Opt.", ...); the Clean Pixel Data and Clean
# Recognizable Visual Features options have no column: they act on pixels, not attributes.
COLUMNS = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_longitudinal_full_dates",
    "rtnLongModifDatesOpt": "retain_longitudinal_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}
# The legend of Table E.1-1: single codes and the combined ones it defines.
ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
_TAG = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")
_PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"
_SAFE_ELEMENT = re.compile(r"^\(([0-9A-F]{4}),XX([0-9A-F]{2})\)$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def attribute_rows(table: list[dict]) -> tuple[list[dict], dict]:
    """The rows of Table E.1-1 as {tag, name, basic, options}, and the private-attributes row."""
    rows, private = [], None
    for raw in table:
        basic = raw["basicProfile"].strip()
        options = {COLUMNS[k]: v.strip() for k, v in raw.items() if k in COLUMNS}
        for code in [basic, *options.values()]:
            if code not in ACTIONS:
                sys.exit(f"{raw['tag']} {raw['name']}: action {code!r} is not in the legend of Table E.1-1")
        if raw["tag"].upper() == _PRIVATE_ROW:
            private = {"name": raw["name"], "basic": basic, "options": options}
            continue
        m = _TAG.match(raw["tag"].upper())
        if not m:
            sys.exit(f"{raw['tag']!r} ({raw['name']}): not a tag this generator can read")
        rows.append({"tag": m[1] + m[2], "name": raw["name"], "in_std_iod": raw.get("stdCompIOD") == "Y",
                     "basic": basic, "options": options})
    if private is None:
        sys.exit("Table E.1-1 has no private attributes row")
    rows.sort(key=lambda r: r["tag"])
    return rows, private


def _grid_rows(lines: list[str]) -> list[list[str]]:
    """Cells of an RST grid table: each row's continuation lines joined with a space."""
    rows, current = [], None
    for line in lines:
        text = line.strip()
        if text.startswith("+"):
            if current is not None:
                rows.append([" ".join(" ".join(parts).split()) for parts in current])
            current = None
        elif text.startswith("|"):
            cells = [c.strip() for c in text.strip("|").split("|")]
            if current is None:
                current = [[] for _ in cells]
            for parts, cell in zip(current, cells):
                if cell:
                    parts.append(cell)
    return rows


def safe_private_rows(annex: str) -> list[dict]:
    """Table E.3.10-1, read from the RST text of Annex E."""
    start = annex.index(".. table:: Safe Private Attributes")
    block = []
    for line in annex[start:].splitlines()[1:]:
        if block and not line.strip():
            break
        if line.strip():
            block.append(line)
    rows = _grid_rows(block)
    header, body = rows[0], rows[1:]
    if not header[0].startswith("**Data") or "Creator" not in header[1]:
        sys.exit(f"Table E.3.10-1 header not as expected: {header}")
    out = []
    for element, creator, vr, vm, meaning in body:
        m = _SAFE_ELEMENT.match(element.upper())
        if not m:
            sys.exit(f"Table E.3.10-1: cannot read data element {element!r}")
        # The converter renders superscripts as :sup:`st`; keep the words.
        meaning = re.sub(r"\\? ?:s ?up:`([^`]*)`\\? ?", r"\1 ", meaning).strip()
        out.append({"group": m[1], "element": m[2], "creator": creator, "vr": vr, "vm": vm, "meaning": meaning})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--table-origin", required=True)
    p.add_argument("--annex", type=Path, required=True)
    p.add_argument("--annex-origin", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    rows, private = attribute_rows(json.loads(a.table.read_text()))
    safe = safe_private_rows(a.annex.read_text())
    doc = {
        "generated_by": "ops/generate_deidentify_table.py",
        "sources": {
            "table_E.1-1": {"origin": a.table_origin, "file": a.table.name, "sha256": sha256(a.table)},
            "table_E.3.10-1": {"origin": a.annex_origin, "file": a.annex.name, "sha256": sha256(a.annex)},
        },
        "options": sorted(COLUMNS.values()),
        "private_attributes": private,
        "attributes": rows,
        "safe_private": safe,
    }
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{a.out}: {len(rows)} attributes, {len(safe)} safe private attributes")


if __name__ == "__main__":
    main()
