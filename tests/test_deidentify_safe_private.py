"""The profile table is generated from one edition of PS3.15 (issue #22): the generator
reproduces engine/deidentify/profile_table.json from the extractions kept in ops/standard/,
refuses an edited extraction or two editions; and the Retain Safe Private option keeps
exactly the private attributes of Table E.3.10-1, on both de-identification paths."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence

from stowage.engine.deidentify import encoded, table
from stowage.engine.deidentify.keys import Keyed
from stowage.engine.deidentify.profile import Profile

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / "ops" / "standard" / "ps3.15-2026d"
KEY = bytes(range(32))
# A value of each VR that Table E.3.10-1 lists ("" when the table gives none: written as UN).
_VALUES = {"DS": "1.5", "IS": "7", "FL": 1.5, "FD": 2.5, "US": 7, "SS": -7, "UL": 7, "SL": -7, "CS": "SAFE",
           "LO": "safe value", "SH": "safe", "LT": "safe text", "ST": "safe text", "UI": "1.2.3.4.5",
           "AT": 0x00100010, "OB": b"\x01\x02", "OW": b"\x01\x02", "UN": b"\x01\x02"}


def _generate(tmp_path: Path, table_file: Path, safe_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "ops/generate_deidentify_table.py", "--table", str(table_file),
                           "--safe-private", str(safe_file), "--origin",
                           "pymedphys/pymedphys@a94ddab6f24cd9da967709c82845c7fa522fa52e "
                           "lib/pymedphys/_dicom/deidentify/_standard", "--out", str(tmp_path / "out.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_generator_reproduces_the_table_from_one_edition(tmp_path):
    r = _generate(tmp_path, SOURCES / "e1_1.json", SOURCES / "e3_10_1.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.json").read_bytes() == table.TABLE_FILE.read_bytes()
    doc = table.load()
    assert doc["edition"] == "PS3.15 2026d"
    for key, name, page in (("table_E.1-1", "e1_1.json", "chtml/part15/chapter_E.html"),
                            ("table_E.3.10-1", "e3_10_1.json", "chtml/part15/sect_E.3.10.html")):
        src = doc["sources"][key]
        assert src["edition"] == "2026d" and src["extracted_from"][0]["path"] == page
        assert src["sha256"] == hashlib.sha256((SOURCES / name).read_bytes()).hexdigest()
    assert len(doc["safe_private"]) == len(json.loads((SOURCES / "e3_10_1.json").read_text())["rows"]) == 479


def test_the_generator_refuses_an_edited_extraction_and_two_editions(tmp_path):
    edited = json.loads((SOURCES / "e1_1.json").read_text())
    edited["rows"][0]["basic_profile"] = "K"  # Accession Number kept: not what the standard says
    (tmp_path / "e1_1.json").write_text(json.dumps(edited))
    r = _generate(tmp_path, tmp_path / "e1_1.json", SOURCES / "e3_10_1.json")
    assert r.returncode != 0 and "do not match the digest" in r.stderr
    other = json.loads((SOURCES / "e3_10_1.json").read_text())
    other["edition"] = "2024b"
    (tmp_path / "e3_10_1.json").write_text(json.dumps(other))
    r = _generate(tmp_path, SOURCES / "e1_1.json", tmp_path / "e3_10_1.json")
    assert r.returncode != 0 and "use one edition for both" in r.stderr
    assert not (tmp_path / "out.json").exists()


def _with_every_safe_private_attribute() -> tuple[Dataset, set[int], set[int]]:
    """An instance holding one element for each row of Table E.3.10-1, each in a block of its
    creator, plus in every block an element the table does not list, and the listed element
    numbers again under a creator the table does not name. Returns it, the tags that the
    option must keep (elements and their creators) and those it must remove."""
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.SOPInstanceUID = "Doe^Jane", "MRN1", "1.2.826.0.1.3680043.2.1.1"
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"
    rows = table.load()["safe_private"]
    listed = {(int(r["group"], 16), r["creator"]): set() for r in rows}
    for r in rows:
        listed[(int(r["group"], 16), r["creator"])].add(int(r["element"], 16))
    keep, remove = set(), set()
    for r in rows:
        group, creator, element = int(r["group"], 16), r["creator"], int(r["element"], 16)
        block = ds.private_block(group, creator, create=True)
        vr = {"": "UN", "OW/OB": "OB"}.get(r["vr"], r["vr"])
        value = Sequence([Dataset()]) if vr == "SQ" else _VALUES[vr]
        block.add_new(element, vr, value)
        keep |= {block.get_tag(element), (group << 16) | block.block_start >> 8}
    for (group, creator), elements in listed.items():
        block = ds.private_block(group, creator)
        unlisted = next(e for e in range(0x100) if e not in elements)
        block.add_new(unlisted, "LO", "Doe^Jane")
        remove.add(block.get_tag(unlisted))
        stranger = ds.private_block(group, f"NOT IN E.3.10-1 {creator}"[:64], create=True)
        for e in sorted(elements)[:3]:
            stranger.add_new(e, "LO", "Doe^Jane")
            remove.add(stranger.get_tag(e))
        remove.add((group << 16) | stranger.block_start >> 8)
    return ds, keep, remove


def _bytes(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize("path", ["pydicom", "element-by-element"])
def test_retain_safe_private_keeps_exactly_the_attributes_of_table_e_3_10_1(path):
    src, keep, remove = _with_every_safe_private_attribute()
    assert len(keep) > 479 and remove and not keep & remove
    profile = Profile(frozenset({"retain_safe_private"}), Keyed(KEY))
    if path == "pydicom":
        out = read_dataset(pydicom.filebase.DicomBytesIO(_bytes(src)), False, True)
        profile.apply(out)
    else:
        data, _outcome, _cls = encoded.deidentify(profile, _bytes(src), pydicom.uid.ExplicitVRLittleEndian)
        out = read_dataset(pydicom.filebase.DicomBytesIO(data), False, True)
    private = {t for t in out.keys() if (t >> 16) & 1}
    assert private == keep
    for tag in keep:
        if out[tag].VR != "SQ":
            assert out[tag].value == src[tag].value, hex(tag)
    assert "Doe^Jane" not in str(out)
    assert list(out.DeidentificationMethodCodeSequence)[1].CodeValue == "113111"


def test_without_the_option_no_private_attribute_is_kept():
    src, _keep, _remove = _with_every_safe_private_attribute()
    data, _outcome, _cls = encoded.deidentify(Profile(frozenset(), Keyed(KEY)), _bytes(src),
                                              pydicom.uid.ExplicitVRLittleEndian)
    out = read_dataset(pydicom.filebase.DicomBytesIO(data), False, True)
    assert not {t for t in out.keys() if (t >> 16) & 1}
