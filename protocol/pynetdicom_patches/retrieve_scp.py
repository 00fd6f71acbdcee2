"""Patch 5 (the package's docstring): pynetdicom's C-MOVE and C-GET SCP methods hand the
request to ours (workers/retrieve.py), which sends its own sub-operations."""
from __future__ import annotations

from typing import Any, Callable

from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.service_class import QueryRetrieveServiceClass

RetrieveScp = Callable[[QueryRetrieveServiceClass, Any, Any, type], None]
handler: RetrieveScp | None = None  # install(retrieve_scp=...)


def move_scp(self: QueryRetrieveServiceClass, req: C_MOVE, context: Any) -> None:
    assert handler is not None
    handler(self, req, context, C_MOVE)


def get_scp(self: QueryRetrieveServiceClass, req: C_GET, context: Any) -> None:
    assert handler is not None
    handler(self, req, context, C_GET)
