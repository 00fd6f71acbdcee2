"""The audit log on a disk that is full (/dev/full answers every write with ENOSPC): a
store's audit line that cannot be written must not cost the C-STORE its response, and
says so once on stderr instead of a traceback per line."""
from __future__ import annotations

import logging
import os
import re

from stowage.engine.runtime import logs


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


def test_a_peers_invalid_values_are_one_warning_line_each(make_server):
    """pydicom warns about values that break their VR (here a date and a UID a peer sent in a
    C-FIND identifier); each such warning is one line of the server's log, not Python's
    two (message, then the source line that warned)."""
    from pydicom.dataset import Dataset
    from pydicom.dataelem import RawDataElement
    from pynetdicom import AE
    from conftest import HOST
    server = make_server("--workers", "1")
    ae = AE("LOGTEST")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    # Raw elements: the bad values go out as they are, without our own side validating them.
    ident[0x00100030] = RawDataElement(0x00100030, "DA", 8, b"20XX0101", 0, False, True)
    ident[0x0020000D] = RawDataElement(0x0020000D, "UI", 6, b"1.2.ab", 0, False, True)
    assoc = ae.associate(HOST, server.port, ae_title="STOWAGE")
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(ident, "1.2.840.10008.5.1.4.1.2.2.1"))
        assert responses and responses[-1][0] is not None
    finally:
        assoc.release()
    server.stop()
    lines = server.log().splitlines()
    assert len([line for line in lines if "1.2.ab" in line]) == 1, "\n".join(lines[-40:])
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEC] ")
    assert all(stamped.match(line) for line in lines), "\n".join(lines[-40:])


def test_the_store_line_is_the_audit_lines_json(monkeypatch, tmp_path):
    """The per-C-STORE audit line is formatted by hand (it is on every store's path): for
    plain and hostile values alike it must be what audit_line writes, key for key and in
    the same order, and one line each."""
    import json
    path = tmp_path / "audit.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    monkeypatch.setattr(logs, "_audit_fd", fd)
    monkeypatch.setattr(logs, "_process", 'worker "0"')
    cases = [("1.2.840.113619.2.55.3", 0x0000, 10240, "STORESCU", ""),
             ('1.2."x\\\n', 0xC000, 5, 'A"E\\ é', 'bad "uid" ü\n'),
             ("", 0xA700, 0, "", "out of resources")]
    try:
        for uid, status, length, ae, comment in cases:
            logs.audit_store_line(uid, status, length, ae, comment)
            logs.audit_line(f"store {uid} 0x{status:04X}", {
                "event": "store", "sop_instance_uid": uid, "status": f"0x{status:04X}", "bytes": length,
                "calling_ae": ae, **({"comment": comment} if comment else {})})
    finally:
        os.close(fd)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * len(cases)
    for fast, reference in zip(lines[::2], lines[1::2]):
        a, b = json.loads(fast), json.loads(reference)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", a.pop("ts"))
        b.pop("ts")
        assert list(a.items()) == list(b.items())
