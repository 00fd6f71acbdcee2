"""Verification SCP (C-ECHO)."""
from pynetdicom import evt

from stowage.protocol.status import SUCCESS


def handle_echo(event: evt.Event) -> int:
    return SUCCESS
