"""Apply the Basic Application Level Confidentiality Profile and options (PS3.15 E.1.1,
Table E.1-1) to one data set, in place, at every nesting depth.

What the table leaves to the implementation, and what this module does (docs/deidentification.md):
* Combined codes need the attribute's Type in the IOD, which a de-identifier working on any
  SOP Class does not have at hand; we take the choice that is conformant whatever the Type:
  X/Z -> Z (present, empty), Z/D, X/D and X/Z/D -> D (present, a dummy), X/Z/U* -> the
  sequence stays and the UIDs in it are replaced (U). A dummy carries no information.
* D on a sequence keeps its items, de-identifies them, and replaces every text in them that
  the table does not name with a dummy; Z empties it; X removes it.
* C (clean): dates move by the patient's offset (Modified Dates), AE titles become keyed
  pseudonyms (Device Identity), sequences are de-identified item by item, and text has the
  patient's own identifiers and any run of six or more digits replaced by "*".
* Patient's Name and Patient ID (Z, Z/D) get the patient's keyed pseudonym rather than an
  empty or constant dummy, so that one patient's studies stay together.
* The curves groups (50xx) go whole, and so do overlay groups (60xx), not just Overlay
  Data and Overlay Comments: an Overlay Plane without its data fails its IOD. Clean
  Graphics cannot tell text from drawing in an overlay bitmap, so it removes them too.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from stowage.engine.deidentify import table
from stowage.engine.deidentify.dates import shift_da, shift_dt
from stowage.engine.deidentify.keys import Keyed

DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D", "IS": "0", "DS": "0",
          "UR": "http://anonymized.invalid/", "AT": 0}
_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_FREE_TEXT_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_NUMERIC_BINARY = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
_PATIENT_NAME, _PATIENT_ID = 0x00100010, 0x00100020
_DIGIT_RUN = re.compile(r"\d{6,}")

# Our option name -> the CID 7050 code that names it (pydicom's copy of PS3.16).
OPTION_CODES = {
    "clean_pixel_data": codes.DCM.CleanPixelDataOption,
    "clean_recognizable_visual_features": codes.DCM.CleanRecognizableVisualFeaturesOption,
    "clean_graphics": codes.DCM.CleanGraphicsOption,
    "clean_structured_content": codes.DCM.CleanStructuredContentOption,
    "clean_descriptors": codes.DCM.CleanDescriptorsOption,
    "retain_longitudinal_full_dates": codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption,
    "retain_longitudinal_modified_dates": codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
    "retain_patient_characteristics": codes.DCM.RetainPatientCharacteristicsOption,
    "retain_device_identity": codes.DCM.RetainDeviceIdentityOption,
    "retain_uids": codes.DCM.RetainUidsOption,
    "retain_safe_private": codes.DCM.RetainSafePrivateOption,
    "retain_institution_identity": codes.DCM.RetainInstitutionIdentityOption,
}
BASIC_PROFILE = codes.DCM.BasicApplicationConfidentialityProfile


@dataclass
class Outcome:
    """What one de-identification did: for the pseudonym table and the audit line."""

    patient_id: str
    patient_name: str
    pseudonym: str
    date_offset_days: int
    sop_instance_uid: tuple[str, str]            # (original, new)
    study_instance_uid: tuple[str, str]
    uids: dict[str, str] = field(default_factory=dict)  # every UID replaced, original -> new


@functools.lru_cache(maxsize=4096)
def _patient(keyed: Keyed, patient_id: str, name: str, issuer: str, birth: str, accession: str,
             other: tuple[str, ...]) -> tuple[str, str, int, re.Pattern | None]:
    """(key, pseudonym, date offset, scrub pattern) of one patient as one instance names
    them; the same for each instance of a study, so remembered (bounded)."""
    # A patient is their ID within its issuer; without an ID, their name and birth date.
    who = f"id:{issuer}:{patient_id}" if patient_id else f"name:{name}:{birth}"
    words = {patient_id, accession, birth, *other}
    words |= {w for w in re.split(r"[\^=\s,]+", name) if len(w) >= 2}
    words = sorted((w for w in words if w and len(w) >= 2), key=len, reverse=True)
    scrub = re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE) if words else None
    return who, keyed.token("patient", who), keyed.date_offset_days(who), scrub


class _Instance:
    """Per-instance state: the patient's pseudonym and offset, and text to scrub. `get` gives a
    top-level attribute's value by keyword ("" when absent); multi-valued ones as a list."""

    def __init__(self, get, keyed: Keyed) -> None:
        # Padding is no part of who the patient is: encoded.py reads values without their
        # leading and trailing spaces, pydicom keeps leading ones (" 123", a right-aligned ID),
        # and both paths must give one patient one pseudonym.
        def text(keyword: str) -> str:
            return str(get(keyword) or "").strip(" \0")
        self.patient_id = text("PatientID")
        self.patient_name = text("PatientName")
        other = get("OtherPatientIDs") or []
        other = tuple(str(v).strip(" \0") for v in (other if isinstance(other, (list, MultiValue)) else [other]))
        self.patient_key, self.pseudonym, self.offset, self.scrub = _patient(
            keyed, self.patient_id, self.patient_name, text("IssuerOfPatientID"), text("PatientBirthDate"),
            text("AccessionNumber"), other)
        self.uids: dict[str, str] = {}



def single_action(action: str, vr: str) -> str:
    """The one action a combined code of Table E.1-1 comes to for an element of VR `vr`:
    the choice that stays conformant whatever the attribute's type in the IOD
    (docs/deidentification.md): X/Z empty, Z/D, X/D and X/Z/D a dummy, X/Z/U* a sequence's
    UIDs replaced and anything else emptied."""
    if action == "X/Z/U*":
        return "U" if vr == "SQ" else "Z"
    if action == "X/Z":
        return "Z"
    if action in ("Z/D", "X/D", "X/Z/D"):
        return "D"
    return action

class Profile:
    """The basic profile plus a set of options, bound to one project's key."""

    def __init__(self, options: frozenset[str], keyed: Keyed) -> None:
        self.options = table.check_options(options)
        self.actions = table.actions_for(frozenset(o for o in self.options if o not in table.PIXEL_OPTIONS))
        self.keyed = keyed
        self.retain_uids = "retain_uids" in self.options
        self.modified_dates = "retain_longitudinal_modified_dates" in self.options
        self.full_dates = "retain_longitudinal_full_dates" in self.options
        self.acted: dict = {}  # encoded.py's remembered element rewrites (bounded there)

    # -- the whole instance ---------------------------------------------------------------
    def apply(self, ds: Dataset) -> Outcome:
        """De-identify `ds` (and its file meta, if any) in place."""
        inst = _Instance(lambda keyword: ds.get(keyword, ""), self.keyed)
        sop = str(ds.get("SOPInstanceUID", "") or "")
        study = str(ds.get("StudyInstanceUID", "") or "")
        self._dataset(ds, inst, dummy_text=False)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta and not self.retain_uids:
                meta.MediaStorageSOPInstanceUID = self._uid(str(meta.MediaStorageSOPInstanceUID), inst)
            if "SourceApplicationEntityTitle" in meta and "retain_device_identity" not in self.options:
                del meta.SourceApplicationEntityTitle
        self._mark(ds)
        new_sop = str(ds.get("SOPInstanceUID", "") or "")
        new_study = str(ds.get("StudyInstanceUID", "") or "")
        return Outcome(inst.patient_id, inst.patient_name, inst.pseudonym, inst.offset if self.modified_dates else 0,
                       (sop, new_sop), (study, new_study), inst.uids)

    def _mark(self, ds: Dataset) -> None:
        """The attributes that say what was done (PS3.15 E.1.1, PS3.3 C.7.1.1)."""
        ds.PatientIdentityRemoved = "YES"
        chosen = [BASIC_PROFILE] + [OPTION_CODES[o] for o in sorted(self.options)]
        ds.DeidentificationMethod = [c.meaning[:64] for c in chosen]
        items = []
        for code in chosen:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, \
                code.meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.modified_dates else \
            "UNMODIFIED" if self.full_dates else "REMOVED"

    # -- one data set (the top level or a sequence item) --------------------------------
    def _dataset(self, ds: Dataset, inst: _Instance, dummy_text: bool) -> None:
        private_tags = []
        for tag in list(ds.keys()):
            group = tag >> 16
            if group & 1:
                private_tags.append(tag)
                continue
            if 0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E:
                del ds[tag]  # curves and overlays, whole (module docstring)
                continue
            action = self.actions.by_tag.get(tag)
            if tag in (_PATIENT_NAME, _PATIENT_ID) and action not in ("K", None):
                ds[tag].value = inst.pseudonym
                continue
            if action is None:
                self._unlisted(ds, tag, inst, dummy_text)
            else:
                self._act(ds, tag, action, inst, dummy_text)
        if private_tags:
            self._private(ds, private_tags)

    def _vr(self, ds: Dataset, tag: int) -> str:
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if vr and vr != "UN":
            return vr
        try:
            return dictionary_VR(tag)
        except KeyError:
            return vr or "UN"

    def _unlisted(self, ds: Dataset, tag: int, inst: _Instance, dummy_text: bool) -> None:
        """Attributes the table does not name are kept (E.1.1); their sequences are walked."""
        vr = self._vr(ds, tag)
        if vr == "SQ":
            for item in ds[tag].value:
                self._dataset(item, inst, dummy_text)
        elif dummy_text and vr in _FREE_TEXT_VRS and ds[tag].value not in (None, ""):
            ds[tag].value = DUMMY_TEXT

    def _act(self, ds: Dataset, tag: int, action: str, inst: _Instance, dummy_text: bool) -> None:
        if action == "X":
            del ds[tag]
            return
        elem = ds[tag]
        vr = elem.VR
        action = single_action(action, vr)
        if action == "K":
            if vr == "SQ":
                for item in elem.value:
                    self._dataset(item, inst, dummy_text)
        elif action == "Z":
            elem.value = Sequence() if vr == "SQ" else None
        elif action == "D":
            self._dummy(elem, inst)
        elif action == "U":
            self._replace_uids(elem, inst, dummy_text)
        elif action == "C":
            self._clean(elem, inst)
        else:
            raise ValueError(f"action {action!r} for {Tag(tag)}")

    def _dummy(self, elem: DataElement, inst: _Instance) -> None:
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value:
                self._dataset(item, inst, dummy_text=True)
        elif vr == "UI":
            self._replace_uids(elem, inst, False)
        elif vr in _NUMERIC_BINARY:
            elem.value = 0
        elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            elem.value = b"\0\0"
        elif vr in _DUMMY:
            if _DUMMY[vr] is not None:
                elem.value = _DUMMY[vr]
        else:
            elem.value = DUMMY_TEXT

    def _uid(self, uid: str, inst: _Instance) -> str:
        new = inst.uids.get(uid)
        if new is None:
            new = inst.uids[uid] = self.keyed.uid(uid)
        return new

    def _replace_uids(self, elem: DataElement, inst: _Instance, dummy_text: bool) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self._dataset(item, inst, dummy_text)
        elif elem.VR == "UI" and elem.value:
            if elem.VM > 1:
                elem.value = [self._uid(str(v), inst) for v in elem.value]
            else:
                elem.value = self._uid(str(elem.value), inst)
        elif elem.VR != "UI":
            elem.value = None

    def _clean(self, elem: DataElement, inst: _Instance) -> None:
        vr, value = elem.VR, elem.value
        if vr == "SQ":
            for item in value:
                self._dataset(item, inst, dummy_text=False)
                for sub in list(item.keys()):  # structured content: scrub the items' own text
                    e = item.get(sub)
                    if e is not None and not (sub >> 16) & 1 and e.VR in _FREE_TEXT_VRS and e.value:
                        self._clean(e, inst)
        elif value in (None, ""):
            return
        elif vr in ("DA", "DT"):
            if self.modified_dates:
                shift = shift_da if vr == "DA" else shift_dt
                elem.value = [shift(str(v), inst.offset) for v in value] if elem.VM > 1 else \
                    shift(str(value), inst.offset)
            elif not self.full_dates:
                self._dummy(elem, inst)
        elif vr == "TM":
            return  # whole-day shifts keep times of day
        elif vr == "AE":
            elem.value = "AE" + self.keyed.token("ae", str(value), 12)
        elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            self._dummy(elem, inst)  # bytes cannot be cleaned: a dummy takes their place
        elif vr in _FREE_TEXT_VRS:
            elem.value = [self._scrub(str(v), inst) for v in value] if elem.VM > 1 else self._scrub(str(value), inst)

    def _scrub(self, text: str, inst: _Instance) -> str:
        if inst.scrub is not None:
            text = inst.scrub.sub("*", text)
        return _DIGIT_RUN.sub("*", text)

    # -- private attributes ---------------------------------------------------------------
    def _private(self, ds: Dataset, tags: list[int]) -> None:
        """Removed (X), or under Retain Safe Private only those Table E.3.10-1 lists kept."""
        keep: set[int] = set()
        if self.actions.private == "C":
            creators = {}
            for tag in tags:
                if 0x10 <= (tag & 0xFFFF) <= 0xFF:
                    creators[(tag >> 16, tag & 0xFF)] = str(ds[tag].value or "").strip()
            for tag in tags:
                elem_no = tag & 0xFFFF
                if elem_no < 0x1000:
                    continue
                creator = creators.get((tag >> 16, elem_no >> 8))
                if creator and (tag >> 16, creator, elem_no & 0xFF) in self.actions.safe_private:
                    keep |= {tag, ((tag >> 16) << 16) | (elem_no >> 8)}
        for tag in tags:
            if tag not in keep:
                del ds[tag]
