"""Moving DA and DT values by a whole number of days (Retain Longitudinal Temporal
Information with Modified Dates, PS3.15 E.3.6): intervals between any two dates of one
patient are kept, times of day are kept, and so is a DT's UTC offset."""
from __future__ import annotations

import datetime as _dt
import functools


@functools.lru_cache(maxsize=16384)  # one study's dates repeat in each of its instances
def shift_da(value: str, days: int) -> str:
    """A DA (YYYYMMDD, or a range A-B) moved back `days`; a value it cannot read becomes empty."""
    value = value.strip()
    if "-" in value:
        return "-".join(shift_da(v, days) if v else "" for v in value.split("-", 1))
    try:
        date = _dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) if len(value) == 8 else None
    except ValueError:
        date = None
    if date is None:
        return ""
    try:
        moved = date - _dt.timedelta(days=days)
    except OverflowError:
        return "00010101"
    # not strftime: its %Y gives "911" for the year 911, an invalid DA of seven digits
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


@functools.lru_cache(maxsize=16384)
def shift_dt(value: str, days: int) -> str:
    """A DT moved back `days`: the date part moves, the rest (time, fraction, offset) stays.
    A DT of only a year or year-month moves as its first day does, keeping its precision."""
    value = value.strip()
    if len(value) < 4 or not value[:4].isdigit():
        return ""
    digits = len(value) - len(value.lstrip("0123456789"))
    head = min(digits, 8)
    if head not in (4, 6, 8):
        return ""
    full = value[:head] + "0101"[: 8 - head] if head < 8 else value[:8]
    moved = shift_da(full, days)
    return moved[:head] + value[head:] if moved else ""
