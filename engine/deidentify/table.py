"""Table E.1-1 and Table E.3.10-1 of PS3.15, as ops/generate_deidentify_table.py wrote them
into profile_table.json, turned into per-tag actions for a chosen set of options."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

TABLE_FILE = Path(__file__).with_name("profile_table.json")

# Options with no column in Table E.1-1: they act on the pixel data (PS3.15 E.3.1, E.3.2).
PIXEL_OPTIONS = ("clean_pixel_data", "clean_recognizable_visual_features")


@functools.cache
def load() -> dict:
    return json.loads(TABLE_FILE.read_text())


def options() -> tuple[str, ...]:
    """Every option of Table E.1-1, by our name."""
    return tuple(sorted((*load()["options"], *PIXEL_OPTIONS)))


class OptionError(ValueError):
    """An option name that Table E.1-1 does not have, or two that exclude each other."""


def check_options(chosen: frozenset[str] | set[str]) -> frozenset[str]:
    unknown = set(chosen) - set(options())
    if unknown:
        raise OptionError(f"unknown de-identification option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(options())}")
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(chosen):
        raise OptionError("retain_longitudinal_full_dates and retain_longitudinal_modified_dates exclude each other")
    return frozenset(chosen)


# When two chosen options both name an action for one attribute, the one that keeps more
# wins: K (keep) over C (clean) over the basic profile's action.
_PRECEDENCE = {"K": 0, "C": 1}


@dataclass(frozen=True)
class Actions:
    """The action for each tag under one profile-plus-options choice."""

    by_tag: dict[int, str]
    private: str                                  # action on private attributes: X, or C (keep safe ones)
    curves: str                                   # (50xx,xxxx)
    overlays: str                                 # (60xx,3000) and (60xx,4000)
    safe_private: frozenset[tuple[int, str, int]]  # (group, private creator, element low byte)


def _resolve(basic: str, per_option: dict[str, str], chosen: frozenset[str]) -> str:
    picked = [per_option[o] for o in chosen if o in per_option]
    return min(picked, key=lambda a: _PRECEDENCE.get(a, 9)) if picked else basic


@functools.cache
def actions_for(chosen: frozenset[str]) -> Actions:
    doc = load()
    by_tag, curves, overlays = {}, "X", "X"
    for row in doc["attributes"]:
        action = _resolve(row["basic"], row["options"], chosen)
        tag = row["tag"]
        if tag.startswith("50XX"):
            curves = action
        elif tag.startswith("60XX"):
            overlays = action
        else:
            by_tag[int(tag, 16)] = action
    priv = doc["private_attributes"]
    safe = frozenset((int(s["group"], 16), s["creator"], int(s["element"], 16)) for s in doc["safe_private"])
    return Actions(by_tag, _resolve(priv["basic"], priv["options"], chosen), curves, overlays, safe)


def sources() -> dict:
    """Where the table's text came from, and which edition (recorded by the generator)."""
    return load()["sources"]
