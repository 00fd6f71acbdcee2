"""DICOM attribute matching (PS3.4 C.2.2.2), two ways that agree: as SQL conditions on
the catalog's indexed columns (values always bound as parameters, never SQL text), and
in Python on values from a stored header.

Matching types: universal (zero length, or `*`), single value, wildcard (`*`, `?`; on the
VRs that allow it), range (DA, TM, DT: `a-b`, `-b`, `a-`), list of values (UIDs, and
backslash-separated values of any other key: any one matches), sequence (one item of
keys, all of which an item must match). Date and time ranges given together are one
date-time range (C.2.2.2.5.1) when the request asks for it (catalog.query decides).

Person names (PN): each component group (alphabetic, ideographic, phonetic) is matched on
its own and a name matches when any group does (or, when the key has several groups,
when each non-empty group of the key matches the same group of the name); trailing
component separators are insignificant. Case- and accent-sensitive by default;
`pn_insensitive` folds both (DuckDB's lower(strip_accents()) on both sides in SQL, the
same rules in Python).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
_TOP = "~"  # sorts after every character of DA, TM and DT values: an inclusive upper bound


class MatchError(ValueError):
    """A key whose value cannot be matched as the standard says (becomes 0xA900)."""


@dataclass
class Match:
    """How one key is matched."""

    kind: str                       # universal, single, wildcard, range, list, sequence
    vr: str
    value: str = ""                 # single, wildcard
    values: list[str] = field(default_factory=list)   # list
    low: str | None = None          # range bounds, as given (None: open)
    high: str | None = None
    items: dict[int, "Match"] = field(default_factory=dict)  # sequence: item keys

    @property
    def universal(self) -> bool:
        """Universal matching: so is a sequence whose item holds only universal keys
        (return keys, C.2.2.2.3): it matches entities without the sequence too."""
        if self.kind == "sequence":
            return all(m.universal for m in self.items.values())
        return self.kind == "universal"


def _text(value: Any) -> str:
    if isinstance(value, (list, MultiValue)):
        return "\\".join(_text(v) for v in value)
    if value is None:
        return ""
    return str(value)


def parse(elem: DataElement) -> Match:
    """The matching a request element asks for."""
    vr = str(elem.VR)
    if vr == "SQ":
        items = list(elem.value or [])
        if not items:
            return Match("universal", vr)
        if len(items) > 1:
            raise MatchError(f"sequence key {elem.tag} has {len(items)} items; one at most")
        return Match("sequence", vr, items={int(e.tag): parse(e) for e in items[0]})
    text = _text(elem.value).strip(" ") if vr not in ("PN",) else _text(elem.value).rstrip(" ")
    if text == "" or text == "*":
        return Match("universal", vr)
    if "\\" in text and vr not in ("LT", "ST", "UT"):
        values = [v.strip(" ") for v in text.split("\\")]
        if any(v == "" for v in values):
            raise MatchError(f"key {elem.tag} lists an empty value")
        if vr in RANGE_VRS and any("-" in v for v in values):
            raise MatchError(f"key {elem.tag}: a list of ranges is not supported")
        if vr in WILDCARD_VRS and any("*" in v or "?" in v for v in values):
            raise MatchError(f"key {elem.tag}: a list of wildcards is not supported")
        return Match("list", vr, values=values)
    if vr in RANGE_VRS and "-" in text and not (vr == "DT" and _dt_offset_only(text)):
        low, _, high = text.partition("-")
        low, high = low.strip() or None, high.strip() or None
        if low is None and high is None:
            return Match("universal", vr)
        return Match("range", vr, low=low, high=high)
    if vr in WILDCARD_VRS and ("*" in text or "?" in text):
        return Match("wildcard", vr, value=text)
    if vr in NUMERIC_VRS:
        try:
            float(text)
        except ValueError:
            raise MatchError(f"key {elem.tag} ({vr}) value {text[:20]!r} is not a number") from None
    return Match("single", vr, value=text)


def _wraps(m: Match) -> bool:
    """A time range whose start is after its end (`2300-0100`): the times on either side
    of midnight, as dcm4chee matches it; read literally it would match nothing. Matters
    when a Study Time range is matched on its own (no combined date-time matching)."""
    return m.vr == "TM" and m.low is not None and m.high is not None and m.low > m.high


def _dt_offset_only(text: str) -> bool:
    """A DT whose only '-' is a UTC offset (YYYYMMDDHHMMSS-0500), not a range."""
    return text.count("-") == 1 and len(text.partition("-")[0]) > 8 and "&" not in text and \
        len(text.partition("-")[2]) == 4 and text.partition("-")[2].isdigit() and len(text) > 13


# --- PN ---------------------------------------------------------------------------------


def _pn_groups(text: str) -> list[str]:
    return [g.rstrip("^ ") for g in text.split("=")]


def fold(text: str) -> str:
    """Case and accents folded (the `pn_insensitive` policy), as DuckDB's lower(strip_accents())."""
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


# --- SQL ----------------------------------------------------------------------------------


def _like(pattern: str) -> str:
    """A DICOM wildcard pattern as a LIKE pattern with '\\' as its escape character."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def sql(column: str, m: Match, params: list[Any], pn_insensitive: bool = False) -> str | None:
    """A condition on `column` (an identifier from our own schema) for `m`; appends the
    values it binds to params. None for universal matching."""
    col = f'"{column}"'
    if m.kind == "universal":
        return None
    if m.vr == "PN":
        return _pn_sql(col, m, params, pn_insensitive)
    if m.kind == "single":
        if m.vr in NUMERIC_VRS:
            params.append(float(m.value))
            return f"TRY_CAST({col} AS DOUBLE) = ?"
        params.append(m.value)
        return f"{col} = ?"
    if m.kind == "wildcard":
        params.append(_like(m.value))
        return f"{col} LIKE ? ESCAPE '\\'"
    if m.kind == "list":
        if m.vr in NUMERIC_VRS:
            params.append([float(v) for v in m.values])
            return f"TRY_CAST({col} AS DOUBLE) IN (SELECT unnest(?))"
        params.append(m.values)
        return f"{col} IN (SELECT unnest(?))"
    if m.kind == "range":
        if _wraps(m):  # 2300-0100: either side of midnight
            params.extend([m.low, m.high + _TOP])
            return f"({col} >= ? OR {col} <= ?)"
        parts = []
        if m.low is not None:
            params.append(m.low)
            parts.append(f"{col} >= ?")
        if m.high is not None:
            params.append(m.high + _TOP)
            parts.append(f"{col} <= ?")
        return " AND ".join(parts)
    raise MatchError(f"{m.kind} matching is not supported on indexed column {column}")


def _pn_sql(col: str, m: Match, params: list[Any], insensitive: bool) -> str:
    def side(expr: str) -> str:
        return f"lower(strip_accents({expr}))" if insensitive else expr

    def one(expr: str, value: str, wildcard: bool) -> str:
        params.append(_like(value) if wildcard else value)
        target = side("?")
        return f"{side(expr)} LIKE {target} ESCAPE '\\'" if wildcard else f"{side(expr)} = {target}"

    def group(n: int) -> str:
        return f"rtrim(split_part({col}, '=', {n}), '^ ')"

    values = m.values if m.kind == "list" else [m.value]
    wildcard = m.kind == "wildcard"
    alternatives = []
    for value in values:
        groups = _pn_groups(value)
        if len(groups) == 1:  # any group of the name may match
            # Most names have one group and no trailing separators: the plain comparison
            # decides those; the rest (a '=' or a trailing '^') are matched group by group.
            fast = one(col, groups[0], wildcard)
            plain = one(f"rtrim({col}, '^ ')", groups[0], wildcard)
            by_group = " OR ".join(one(group(n), groups[0], wildcard) for n in (1, 2, 3))
            alternatives.append(f"({fast} OR (({col} LIKE '%^' OR {col} LIKE '%^ ' OR strpos({col}, '=') > 0) AND "
                                f"CASE WHEN strpos({col}, '=') = 0 THEN {plain} ELSE ({by_group}) END))")
        else:  # each non-empty group of the key matches the same group of the name
            conds = [one(group(n + 1), g, wildcard) for n, g in enumerate(groups) if g not in ("", "*")]
            alternatives.append("(" + " AND ".join(conds or ["TRUE"]) + ")")
    return alternatives[0] if len(alternatives) == 1 else "(" + " OR ".join(alternatives) + ")"


def datetime_sql(date_col: str, time_col: str, date: Match, time: Match, params: list[Any]) -> str:
    """The combined date-time range of C.2.2.2.5.1: date and time ranges given together."""
    stamp = f'("{date_col}" || coalesce("{time_col}", \'\'))'
    parts = [f'"{date_col}" IS NOT NULL']
    if date.low is not None:
        params.append(date.low + (time.low or ""))
        parts.append(f"{stamp} >= ?")
    if date.high is not None:
        params.append(date.high + (time.high or "") + _TOP)
        parts.append(f"{stamp} <= ?")
    return " AND ".join(parts)


# --- Python, on header values -------------------------------------------------------------


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, MultiValue)) and not isinstance(value, Sequence):
        return [v for v in value if v is not None and v != ""]
    return [value]


class _Piece:
    """A run of a wildcard pattern between two `*`: literal characters and `?`."""

    __slots__ = ("rx", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        # Fixed length, no `*`: a regex of literals and `.` cannot backtrack.
        self.rx = re.compile("".join("." if c == "?" else re.escape(c) for c in text), re.S) if "?" in text else None

    def at(self, value: str, pos: int) -> bool:
        """Does the piece match `value` at `pos` exactly?"""
        if self.rx is None:
            return value.startswith(self.text, pos)
        return self.rx.match(value, pos) is not None

    def find(self, value: str, start: int, end: int) -> int:
        """Where the piece first matches within value[start:end], or -1."""
        if self.rx is None:
            return value.find(self.text, start, end)
        m = self.rx.search(value, start, end)
        return m.start() if m else -1


class _Wildcard:
    """A DICOM wildcard pattern (`*` any run of characters, `?` any one; PS3.4
    C.2.2.2.4), matched without backtracking: the piece before the first `*` must start
    the value, the piece after the last end it, and the pieces between are found left to
    right, each at its first place after the one before. Taking the first place is never
    wrong (a later one leaves less room for the rest), so one pass decides: time linear in
    the value for each piece, where a regex of `.*` took exponential time on values like
    `aaaa…` against `*a*a*a*…b` (issue #25)."""

    __slots__ = ("head", "middle", "starred", "tail")

    def __init__(self, pattern: str) -> None:
        pieces = pattern.split("*")
        self.starred = len(pieces) > 1
        self.head, self.tail = _Piece(pieces[0]), _Piece(pieces[-1])
        self.middle = [_Piece(p) for p in pieces[1:-1] if p]

    def fullmatch(self, value: str) -> bool:
        """Does the whole of `value` match the pattern?"""
        head, tail = self.head, self.tail
        if not self.starred:
            return len(value) == len(head.text) and head.at(value, 0)
        end = len(value) - len(tail.text)
        if end < len(head.text) or not head.at(value, 0) or not tail.at(value, end):
            return False
        pos = len(head.text)
        for piece in self.middle:
            found = piece.find(value, pos, end)
            if found < 0:
                return False
            pos = found + len(piece.text)
        return True


@lru_cache(maxsize=256)
def _wild(pattern: str) -> _Wildcard:
    return _Wildcard(pattern)


def _pn_matches(m: Match, stored: str, insensitive: bool) -> bool:
    f = fold if insensitive else (lambda s: s)
    name_groups = [f(g) for g in _pn_groups(stored)]
    keys = m.values if m.kind == "list" else [m.value]
    for key in keys:
        groups = [f(g) for g in _pn_groups(key)]

        def ok(pattern: str, text: str) -> bool:
            return bool(_wild(pattern).fullmatch(text)) if m.kind == "wildcard" else pattern == text
        if len(groups) == 1:
            whole = f(stored.rstrip("^ "))
            if ok(groups[0], whole) or any(ok(groups[0], g) for g in name_groups):
                return True
        elif all(g in ("", "*") or (n < len(name_groups) and ok(g, name_groups[n])) for n, g in enumerate(groups)):
            return True
    return False


def matches(m: Match, value: Any, pn_insensitive: bool = False) -> bool:
    """Does a stored value (pydicom's, from a header) match? Multi-valued: any value."""
    if m.universal:
        return True
    if m.kind == "sequence":
        return any(all(matches(sub, item.get(tag).value if tag in item else None, pn_insensitive)
                       for tag, sub in m.items.items())
                   for item in (value or []))
    stored = _values(value)
    if m.vr == "PN":
        return any(_pn_matches(m, str(v), pn_insensitive) for v in stored)
    if m.vr in NUMERIC_VRS:
        wanted = [float(v) for v in (m.values if m.kind == "list" else [m.value])]
        return any(_number(v) in wanted for v in stored)
    texts = [str(v).strip(" ") for v in stored]
    if m.kind == "single":
        return m.value in texts
    if m.kind == "list":
        return any(t in m.values for t in texts)
    if m.kind == "wildcard":
        rx = _wild(m.value)
        return any(rx.fullmatch(t) for t in texts)
    if m.kind == "range":
        if _wraps(m):
            return any(t >= m.low or t <= m.high + _TOP for t in texts)
        return any((m.low is None or t >= m.low) and (m.high is None or t <= m.high + _TOP) for t in texts)
    return False


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def matching_items(m: Match, value: Any, pn_insensitive: bool = False) -> list[Any]:
    """The items of a stored sequence that a sequence key matches (all, when universal)."""
    items = list(value or [])
    if m.kind != "sequence":
        return items
    return [item for item in items
            if all(matches(sub, item.get(tag).value if tag in item else None, pn_insensitive)
                   for tag, sub in m.items.items())]
