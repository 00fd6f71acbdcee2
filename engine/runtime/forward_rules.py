"""`[[forward]]` rules (docs/forwarding.md): what arrives, matched how, goes to which
remote AEs. Parsed and checked with the rest of the configuration, so a bad rule stops
`serve` with one line naming it; engine/forward/ applies them."""
from __future__ import annotations

import datetime
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from stowage.catalog import matching

LEVELS = ("instance", "series", "study")  # series, study: sent once none of it arrived for `quiet` s
_KEYS = {"name", "to", "calling_ae", "called_ae", "sop_class", "modality", "match", "level", "schedule", "quiet",
         "deidentify", "commit", "commit_port", "commit_timeout", "commit_tries"}
_WINDOW = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)-([01]?\d|2[0-3]):([0-5]\d)")


class RuleError(ValueError):
    """A rule that cannot be used; the message names the rule and the key."""


@dataclass(frozen=True)
class ForwardRule:
    name: str
    to: tuple[str, ...]                # [remotes.NAME] destinations
    calling_ae: tuple[str, ...] = ()   # empty: any
    called_ae: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    match: str = ""                    # C-FIND matching, "Modality=CT PatientName=DOE*"
    level: str = "instance"
    schedule: str = ""                 # "19:00-07:00": sent only then (local time); "": any time
    quiet: float = 60.0                # series/study level: seconds without a new instance of it
    deidentify: str = ""               # a [projects.NAME]: a de-identified copy goes out, never the record
    commit: bool = False               # storage commitment of each study (series at series level) once sent
    commit_port: int = 0               # listen here for a report sent on a new association (0: same one only)
    commit_timeout: float = 60.0       # seconds to wait for the destination's N-EVENT-REPORT
    commit_tries: int = 3              # requests without a report before the commitment is failed

    def commit_level(self) -> str:
        """What one storage commitment request covers: the series at series level, else the study."""
        return "series" if self.level == "series" else "study"

    def sends_at(self, now: datetime.datetime) -> bool:
        """Whether entries of this rule may be sent at local time `now`."""
        if not self.schedule:
            return True
        start, end = window(self.schedule)
        minute = now.hour * 60 + now.minute
        return start <= minute < end if start < end else minute >= start or minute < end


def window(text: str) -> tuple[int, int]:
    """'19:00-07:00' -> (start, end) in minutes after midnight; the window may wrap."""
    m = _WINDOW.fullmatch(text.replace(" ", ""))
    if not m:
        raise RuleError(f"schedule {text!r} is not a window like 19:00-07:00")
    h1, m1, h2, m2 = map(int, m.groups())
    if (h1, m1) == (h2, m2):
        raise RuleError(f"schedule {text!r} is not a window like 19:00-07:00 (it starts where it ends)")
    return h1 * 60 + m1, h2 * 60 + m2


def _strings(rule: str, key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in items):
        raise RuleError(f"forward rule {rule!r}: {key} must be a string or a list of strings")
    return tuple(v.strip() for v in items)


def conditions(text: str) -> list[tuple[str, matching.Match]]:
    """'Modality=CT PatientName=DOE*' -> [(keyword, Match)], matched as C-FIND matches
    (catalog/matching.py): wildcards, lists (CT\\MR), ranges (20240101-)."""
    # imported here: the configuration is loaded by every command, `--help` included, and
    # pydicom takes a good part of a second to import
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    from stowage.catalog import matching
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.escape = True, ""  # a backslash separates values (CT\MR), as in C-FIND
    try:
        words = list(lexer)
    except ValueError as e:
        raise RuleError(f"match {text!r}: {e}") from None
    out = []
    for word in words:
        keyword, eq, value = word.partition("=")
        if not eq or tag_for_keyword(keyword) is None:
            raise RuleError(f"match: {word!r} is not Keyword=value with a DICOM keyword (e.g. Modality=CT)")
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            raise RuleError(f"match: {keyword} is a sequence; match one of its top-level neighbours instead")
        try:
            out.append((keyword, matching.parse(DataElement(tag_for_keyword(keyword), vr, value))))
        except (matching.MatchError, ValueError) as e:
            raise RuleError(f"match: {word!r}: {e}") from None
    return out


def parse_rules(specs: Any, remotes: Mapping[str, Any],
                projects: Mapping[str, Any] | None = None) -> tuple[ForwardRule, ...]:
    """The `forward` list of tables, checked against the configured remotes and projects."""
    if isinstance(specs, Mapping):
        specs = [specs]
    if not isinstance(specs, (list, tuple)):
        raise RuleError("forward: must be [[forward]] tables")
    rules = []
    for n, spec in enumerate(specs, 1):
        if isinstance(spec, ForwardRule):
            spec = {k: getattr(spec, k) for k in _KEYS}
        if not isinstance(spec, Mapping):
            raise RuleError(f"forward rule {n}: must be a table")
        name = str(spec.get("name") or f"rule-{n}")
        unknown = set(spec) - _KEYS
        if unknown:
            raise RuleError(f"forward rule {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        if "to" not in spec:
            raise RuleError(f"forward rule {name!r}: needs to = \"REMOTE\" (a [remotes.NAME] AE title)")
        to = _strings(name, "to", spec["to"])
        missing = [t for t in to if t not in remotes]
        if missing:
            raise RuleError(f"forward rule {name!r}: {', '.join(missing)} is not a configured [remotes.NAME]")
        level = str(spec.get("level", "instance"))
        if level not in LEVELS:
            raise RuleError(f"forward rule {name!r}: level {level!r} is not one of {', '.join(LEVELS)}")
        quiet = spec.get("quiet", 60.0)
        if isinstance(quiet, bool) or not isinstance(quiet, (int, float)) or not 0 <= quiet <= 86400:
            raise RuleError(f"forward rule {name!r}: quiet must be a number of seconds, 0-86400")
        match, schedule = str(spec.get("match", "") or ""), str(spec.get("schedule", "") or "")
        try:
            conditions(match)
            if schedule:
                window(schedule)
        except RuleError as e:
            raise RuleError(f"forward rule {name!r}: {e}") from None
        lists = {k: _strings(name, k, spec[k]) if spec.get(k) else () for k in
                 ("calling_ae", "called_ae", "sop_class", "modality")}
        project = spec.get("deidentify", "") or ""
        if not isinstance(project, str) or (project and project not in (projects or {})):
            raise RuleError(f"forward rule {name!r}: deidentify = {project!r} is not a configured [projects.NAME]")
        commit, port = spec.get("commit", False), spec.get("commit_port", 0) or 0
        if not isinstance(commit, bool):
            raise RuleError(f"forward rule {name!r}: commit must be true or false")
        if type(port) is not int or not 0 <= port <= 65535:
            raise RuleError(f"forward rule {name!r}: commit_port must be a port number (1-65535)")
        timeout, tries = spec.get("commit_timeout", 60.0), spec.get("commit_tries", 3)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise RuleError(f"forward rule {name!r}: commit_timeout must be a number of seconds, > 0 and <= 86400")
        if type(tries) is not int or not 1 <= tries <= 1000:
            raise RuleError(f"forward rule {name!r}: commit_tries must be a whole number, 1-1000")
        rules.append(ForwardRule(name, to, match=match, level=level, schedule=schedule, quiet=float(quiet),
                                 deidentify=project, commit=commit, commit_port=port, commit_timeout=float(timeout),
                                 commit_tries=tries, **lists))
    names = [r.name for r in rules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # e.g. a rule named "rule-2" first, and an unnamed second rule (its default name)
        raise RuleError(f"forward: two rules are named {twice[0]!r} (an unnamed rule N is named rule-N)")
    return tuple(rules)
