"""The presentation contexts a transfer proposes, and what the peer accepted of them."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from pynetdicom.association import Association

from stowage.engine.transfer import convert
from stowage.engine.transfer.results import Context, Instance

FALLBACKS = convert.TARGETS  # proposed besides the syntaxes an instance is stored in
MAX_CONTEXTS = 128


def context_batches(instances: Sequence[Instance]) -> list[list[Context]]:
    """Presentation contexts to propose, split into association batches of at most 128.
    Each SOP class lies wholly within one batch."""
    stored: OrderedDict[str, list[str]] = OrderedDict()
    for inst in instances:
        syntaxes = stored.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax_uid not in syntaxes:
            syntaxes.append(inst.transfer_syntax_uid)
    batches: list[list[Context]] = [[]]
    for sop_class, syntaxes in stored.items():
        wanted = syntaxes + [ts for ts in FALLBACKS if ts not in syntaxes]
        contexts = [(sop_class, ts) for ts in wanted[:MAX_CONTEXTS]]
        if len(batches[-1]) + len(contexts) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend(contexts)
    return [b for b in batches if b]


def accepted_syntaxes(assoc: Association) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes the peer accepted for it (as SCP: we are the SCU)."""
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu is False:  # role selection gave us no SCU role on this context
            continue
        out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return out
