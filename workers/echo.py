"""Verification SCP (C-ECHO)."""
from pynetdicom import evt


def handle_echo(event: evt.Event) -> int:
    return 0x0000
