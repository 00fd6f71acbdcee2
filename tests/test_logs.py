"""The audit log on a disk that is full (/dev/full answers every write with ENOSPC): a
store's audit line that cannot be written must not cost the C-STORE its response, and
says so once on stderr instead of a traceback per line."""
from __future__ import annotations

import logging
import os

from engine import logs


def test_audit_lines_that_cannot_be_written_are_one_error_line(monkeypatch, caplog, capsys):
    fd = os.open("/dev/full", os.O_WRONLY)
    monkeypatch.setattr(logs, "_audit_fd", fd)
    monkeypatch.setattr(logs, "_audit_warned", [-1e9])
    audit = logging.getLogger("stowage.audit.test")
    audit.propagate = False
    handler = logs._AuditFile("/dev/full")
    audit.addHandler(handler)
    try:
        with caplog.at_level(logging.ERROR, logger="stowage.logs"):
            for i in range(3):
                logs.audit_line(f"store 1.2.{i} 0x0000", {"event": "store"})  # must not raise
                audit.info("association released %s", i)
    finally:
        audit.removeHandler(handler)
        handler.close()
        os.close(fd)
    errors = [r.getMessage() for r in caplog.records if r.name == "stowage.logs"]
    assert len(errors) == 1, errors  # once a minute, not once per line
    assert "No space left on device" in errors[0] and "audit.jsonl" in errors[0]
    assert "Traceback" not in capsys.readouterr().err
