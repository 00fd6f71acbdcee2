"""Enumeration: every study at the source, by study-level C-FIND in windows.

A source may cap the number of matches it returns. It may say so (a failure status
after some matches; Orthanc 1.10's LimitFindResults ends with Cancel, 0xFE00, though
nobody cancelled), or not at all (success after the first N). So a window whose answer
looks capped -- another status than success after matches, or as many matches as the
--find-limit (or, without one, as the first window's answer: a suspected cap) -- is
split, and the split repeats until every window answers under the cap:

  all dates -> before 1900, decades, after next year, and studies with no date
  decades -> years -> months -> days -> hours (StudyTime ranges, plus "no time")
  -> one window per Modality (ModalitiesInStudy) -> per Patient Name initial (A*..Z*, 0*..9*)

A window that is still capped after the last split is recorded as possibly incomplete.
Windows "no date" / "no time" send a universal key and keep the matches whose value is
empty (C-FIND cannot ask for an empty value).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from stowage.engine.migrate.source import Answer
from stowage.protocol.status import CANCEL, SUCCESS

log = logging.getLogger("stowage.migrate")
FIRST_YEAR = 1900
# PS3.3 C.7.3.1.1.1 defined terms that studies are made of (plus a few retired ones
# legacy archives still hold).
MODALITIES = ("CT", "MR", "CR", "DX", "US", "NM", "PT", "XA", "RF", "MG", "OT", "SR", "PR", "KO", "SEG", "SC",
              "RTSTRUCT", "RTPLAN", "RTDOSE", "RTIMAGE", "RTRECORD", "REG", "ES", "XC", "OP", "OPT", "OPM", "OPV",
              "IO", "PX", "GM", "SM", "ECG", "HD", "EPS", "IVUS", "IVOCT", "AU", "BMD", "DOC", "LS", "PLAN", "BI",
              "DG", "TG", "SRF", "KER", "LEN", "AR", "VA", "HC", "FID", "IOL", "OSS", "RESP", "RWV", "STAIN", "XAPROTO",
              "CTPROTOCOL", "M3D", "DMS", "ASMT", "POS", "OAM", "OCT", "CD", "DD", "DS", "DF", "DM", "EC", "FA", "FS",
              "LP", "MA", "MS", "ST", "VF", "MF", "OTHER")
INITIALS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
              "NumberOfStudyRelatedSeries")


@dataclass(frozen=True)
class Window:
    """A slice of the source's studies. Dates are inclusive ISO strings; None is open."""

    lo: str | None = None
    hi: str | None = None
    everything: bool = False    # universal date match (the first window when no --since/--until)
    no_date: bool = False       # keep only matches without a StudyDate
    hour: int | None = None     # StudyTime hh0000-hh5959 of a one-day window
    no_time: bool = False       # keep only matches without a StudyTime (one-day window)
    modality: str | None = None
    initial: str | None = None

    @property
    def key(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, False)}, sort_keys=True)

    @classmethod
    def from_key(cls, key: str) -> "Window":
        return cls(**json.loads(key))

    def __str__(self) -> str:
        if self.everything:
            text = "all dates"
        elif self.no_date:
            text = "no date"
        else:
            text = f"{self.lo or '…'}..{self.hi or '…'}" if self.lo != self.hi else str(self.lo)
        if self.hour is not None:
            text += f" {self.hour:02d}h"
        if self.no_time:
            text += " no time"
        if self.modality:
            text += f" {self.modality}"
        if self.initial:
            text += f" {self.initial}*"
        return text

    def identifier(self) -> Dataset:
        """The study-level C-FIND identifier of this window."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_KEYS:
            setattr(ds, keyword, "")
        if not (self.everything or self.no_date):
            ds.StudyDate = _dicom_range(self.lo, self.hi)
        if self.hour is not None:
            ds.StudyTime = f"{self.hour:02d}0000-{self.hour:02d}5959.999999"
        if self.modality:
            ds.ModalitiesInStudy = self.modality
        if self.initial:
            ds.PatientName = f"{self.initial}*"
        return ds

    def keep(self, match: Dataset) -> bool:
        """Whether a match belongs to this window (the "no date/time" windows filter)."""
        if self.no_date and str(match.get("StudyDate", "") or "").strip():
            return False
        if self.no_time and str(match.get("StudyTime", "") or "").strip():
            return False
        return True


def _dicom_range(lo: str | None, hi: str | None) -> str:
    def da(d: str | None) -> str:
        return d.replace("-", "") if d else ""
    if lo and lo == hi:
        return da(lo)
    return f"{da(lo)}-{da(hi)}"


def first_windows(since: dt.date | None, until: dt.date | None) -> list[Window]:
    if since is None and until is None:
        return [Window(everything=True)]
    return [Window(since.isoformat() if since else None, until.isoformat() if until else None)]


def _d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


def _calendar(lo: dt.date, hi: dt.date) -> list[tuple[dt.date, dt.date]]:
    """[lo, hi] cut at the largest unit it spans more than one of: decade, year, month, day."""
    if hi.year // 10 != lo.year // 10:
        starts = [lo] + [dt.date(y, 1, 1) for y in range(lo.year // 10 * 10 + 10, hi.year + 1, 10)]
    elif hi.year != lo.year:
        starts = [lo] + [dt.date(y, 1, 1) for y in range(lo.year + 1, hi.year + 1)]
    elif hi.month != lo.month:
        starts = [lo] + [dt.date(lo.year, m, 1) for m in range(lo.month + 1, hi.month + 1)]
    else:
        starts = [lo + dt.timedelta(days=i) for i in range((hi - lo).days + 1)]
    ends = [s - dt.timedelta(days=1) for s in starts[1:]] + [hi]
    return list(zip(starts, ends))


def split(w: Window, today: dt.date | None = None) -> list[Window]:
    """The windows that together cover `w`, each narrower; [] when it cannot be split."""
    today = today or dt.date.today()
    last = dt.date(today.year + 1, 12, 31)  # studies dated up to next year are common (clock errors)
    first = dt.date(FIRST_YEAR, 1, 1)
    if w.everything:
        return [Window(no_date=True), Window(None, (first - dt.timedelta(days=1)).isoformat()),
                Window(first.isoformat(), last.isoformat()), Window((last + dt.timedelta(days=1)).isoformat(), None)]
    by_date = not (w.no_date or w.hour is not None or w.no_time or w.modality or w.initial)
    if by_date and w.lo is None and w.hi is not None and _d(w.hi) >= first:
        return [Window(None, (first - dt.timedelta(days=1)).isoformat()), Window(first.isoformat(), w.hi)]
    if by_date and w.hi is None and w.lo is not None and _d(w.lo) <= last:
        return [Window(w.lo, last.isoformat()), Window((last + dt.timedelta(days=1)).isoformat(), None)]
    if by_date and w.lo and w.hi and w.lo != w.hi:
        return [Window(a.isoformat(), b.isoformat()) for a, b in _calendar(_d(w.lo), _d(w.hi))]
    if by_date and w.lo and w.lo == w.hi:
        return [replace(w, hour=h) for h in range(24)] + [replace(w, no_time=True)]
    if w.modality is None:
        return [replace(w, modality=m) for m in MODALITIES]
    if w.initial is None:
        return [replace(w, initial=c) for c in INITIALS]
    return []


def looks_capped(answer: Answer, find_limit: int) -> bool:
    """Did the source stop short? A status other than success after matches (we never
    cancel a C-FIND, yet Orthanc ends a capped answer with Cancel, 0xFE00), or the cap."""
    if answer.status != SUCCESS and answer.count:
        return True
    return find_limit > 0 and answer.count >= find_limit


@dataclass
class Study:
    """One study as the source described it at enumeration."""

    uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modalities: str
    expected: int | None  # Number of Study Related Instances, when the source gave one

    @classmethod
    def of(cls, match: Dataset) -> "Study | None":
        value = match.get("StudyInstanceUID", "")
        uid = str(value or "").strip()
        if not uid or isinstance(value, MultiValue) or any(c in uid for c in "*?\\"):
            # A retrieve by such a key names no study, or (an SCP that wildcard-matches
            # UIDs) every study: the whole archive pulled again, attempt after attempt.
            log.warning("migrate: the source answered a study with StudyInstanceUID %r (patient %r): %s; left out",
                        uid, str(match.get("PatientID", "") or ""),
                        "no UID to retrieve it by" if not uid else "a wildcard or a list names no one study")
            return None
        count = match.get("NumberOfStudyRelatedInstances", None)
        try:
            expected = int(count) if count not in (None, "") else None
        except (TypeError, ValueError):
            expected = None
        mods = match.get("ModalitiesInStudy", "")
        mods = "\\".join(map(str, mods)) if isinstance(mods, MultiValue) else str(mods or "")
        return cls(uid, str(match.get("PatientID", "") or ""), str(match.get("PatientName", "") or ""),
                   str(match.get("StudyDate", "") or ""), mods, expected)


def _ignored_key(w: Window, studies: list[Study]) -> str:
    """The key of `w` that the source's matches show it did not honour ('' if none): then
    splitting further by the next key would only repeat the same answer."""
    if w.initial and any(not s.patient_name.upper().startswith(w.initial) for s in studies):
        return "PatientName"
    if w.modality and any(w.modality not in s.modalities.split("\\") for s in studies):
        return "ModalitiesInStudy"  # an SCP that matches on a key returns its value
    return ""


def enumerate_window(find: Callable[..., Answer], w: Window, find_limit: int,
                     ) -> tuple[str, list[Study], list[Window], str, int]:
    """Query one window: (outcome, studies, windows to query instead, note, matches sent).

    outcome: "done" (studies complete), "split" (capped: query the children instead),
    "incomplete" (capped and not splittable: the studies found are kept), "failed".
    """
    answer = find(w.identifier(), lambda m: Study.of(m) if w.keep(m) else None)
    if answer.status is None or (not answer.ok and not answer.count and answer.status != CANCEL):
        status = "no final status" if answer.status is None else f"status 0x{answer.status:04X}"
        return "failed", [], [], f"C-FIND {status} {answer.comment}".strip(), answer.count
    studies = answer.matches
    if not looks_capped(answer, find_limit):
        return "done", studies, [], f"{len(studies)} studies", answer.count
    ignored = _ignored_key(w, studies)
    if ignored:
        log.warning("migrate: window %s is capped and the source ignores %s matching: studies may be missing",
                    w, ignored)
        return "incomplete", studies, [], f"capped ({answer.count} matches), the source ignores {ignored}", \
            answer.count
    children = split(w)
    how = f"{answer.count} matches" + (f", status 0x{answer.status:04X}" if not answer.ok else "")
    if children:
        log.info("migrate: window %s looks capped (%s); splitting it in %d", w, how, len(children))
        return "split", studies, children, how, answer.count
    log.warning("migrate: window %s is still capped (%s) and cannot be split further: studies may be missing",
                w, how)
    return "incomplete", studies, [], f"capped ({how}), cannot split further", answer.count
