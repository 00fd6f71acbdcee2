"""Logging: human-readable lines on stderr by default, JSON lines with log_format=json;
the audit logger (`stowage.audit`) also goes to <data_dir>/audit.jsonl."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import uuid
import warnings

from stowage.engine.runtime.config import Config


_second = [-1, ""]  # the last whole second formatted, and its text: one strftime a second


def _timestamp(created: float) -> str:
    whole = int(created)
    if whole != _second[0]:
        _second[:] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": _timestamp(record.created), "level": record.levelname.lower(), "logger": record.name,
             "process": record.processName, "msg": record.getMessage()}
        d.update(getattr(record, "fields", {}))
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


_AUDIT = "stowage.audit"
_audit_fd = -1
_process = ""


def audit_line(msg: str, fields: dict) -> None:
    """One audit.jsonl line, the same as the audit logger writes, without the logging
    machinery: the per-store line is on the store path (one O_APPEND write, whole lines
    from every process)."""
    if _audit_fd < 0:  # logging not set up (tests, tools): the audit logger decides
        logging.getLogger(_AUDIT).info(msg, extra={"fields": fields})
        return
    try:
        os.write(_audit_fd, _json_line(_timestamp(time.time()), msg, fields).encode())
    except OSError as e:
        audit_write_failed(e)


def audit_lines(lines: list[tuple[str, dict]]) -> None:
    """Several `audit_line`s (message, fields) in one write: a sender that settles its
    outcomes in batches (forwarding) writes a batch's lines at once, not one syscall each."""
    if _audit_fd < 0:
        for msg, fields in lines:
            audit_line(msg, fields)
        return
    ts = _timestamp(time.time())
    text = "".join(_json_line(ts, msg, fields) for msg, fields in lines)
    try:
        os.write(_audit_fd, text.encode())
    except OSError as e:
        audit_write_failed(e)


def _json_line(ts: str, msg: str, fields: dict) -> str:
    """An audit.jsonl line as the audit logger's JsonFormatter writes it (fields last, so they
    win: a field never takes the name of one of the line's own keys, "level" least of all)."""
    return json.dumps({"ts": ts, "level": "info", "logger": _AUDIT, "process": _process, "msg": msg, **fields}) + "\n"


_UID_CHARS = frozenset("0123456789.")


@functools.lru_cache(maxsize=1024)
def _json_text(text: str) -> str:
    return json.dumps(text)


def audit_store_line(sop_instance_uid: str, status: int, length: int, calling_ae: str, comment: str = "") -> None:
    """The per-C-STORE audit line: the same JSON as `audit_line` writes (same keys, same
    order, same separators), formatted without building and encoding a dict, since every
    instance pays for it. A UID of digits and dots needs no escaping; anything else (a
    peer's invalid UID) goes through json.dumps."""
    if _audit_fd < 0:
        audit_line(f"store {sop_instance_uid} 0x{status:04X}", {
            "event": "store", "sop_instance_uid": sop_instance_uid, "status": f"0x{status:04X}", "bytes": length,
            "calling_ae": calling_ae, **({"comment": comment} if comment else {})})
        return
    uid = f'"{sop_instance_uid}"' if _UID_CHARS.issuperset(sop_instance_uid) else json.dumps(sop_instance_uid)
    msg = f'"store {sop_instance_uid} 0x{status:04X}"' if uid[0] == '"' and uid[1:-1] == sop_instance_uid \
        else json.dumps(f"store {sop_instance_uid} 0x{status:04X}")
    line = (f'{{"ts": "{_timestamp(time.time())}", "level": "info", "logger": "{_AUDIT}", "process": '
            f'{_json_text(_process)}, "msg": {msg}, "event": "store", "sop_instance_uid": {uid}, '
            f'"status": "0x{status:04X}", "bytes": {length}, "calling_ae": {_json_text(calling_ae)}'
            + (f', "comment": {json.dumps(comment)}}}\n' if comment else "}\n"))
    try:
        os.write(_audit_fd, line.encode())
    except OSError as e:
        audit_write_failed(e)


_AUDIT_WARN_EVERY_S = 60.0
_audit_warned = [0.0]


def audit_write_failed(e: BaseException | None) -> None:
    """An audit line could not be written (a full disk): say so on stderr in one line, at
    most once a minute, and go on. Nothing that the audit log records depends on it."""
    now = time.monotonic()
    if now - _audit_warned[0] >= _AUDIT_WARN_EVERY_S:
        _audit_warned[0] = now
        why = getattr(e, "strerror", None) or e
        logging.getLogger("stowage.logs").error("audit.jsonl: cannot write (%s); audit lines are lost until "
                                                "it can be written again", why)


class _AuditFile(logging.FileHandler):
    """The audit logger's file: a failed write is one line on stderr, not a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        audit_write_failed(sys.exc_info()[1])

    def close(self) -> None:
        """Closing flushes what a full disk refused: that too is the one line, not a raise."""
        try:
            super().close()
        except OSError as e:
            audit_write_failed(e)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (pydicom's about a peer's invalid values, mostly) as one log
    line, not Python's two (the message, then the source line that warned)."""
    text = " ".join(str(message).split())
    logging.getLogger("stowage.warnings").warning("%s: %s", category.__name__, text[:500])


def setup_logging(config: Config, process: str) -> None:
    import multiprocessing
    multiprocessing.current_process().name = process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname).1s %(processName)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # per-PDU chatter; we log per association
    # pydicom both logs and warns each invalid value (warn_and_log): keep the warning, as one line.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.showwarning = _warning_line
    config.data_dir.mkdir(parents=True, exist_ok=True)
    audit = _AuditFile(config.data_dir / "audit.jsonl")
    audit.setFormatter(JsonFormatter())
    global _audit_fd, _process
    if _audit_fd >= 0:
        os.close(_audit_fd)
    _audit_fd = os.open(config.data_dir / "audit.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _process = process
    audit_logger = logging.getLogger(_AUDIT)
    for h in [h for h in audit_logger.handlers if isinstance(h, _AuditFile)]:  # set up again: one file, not two
        audit_logger.removeHandler(h)
        h.close()
    audit_logger.addHandler(audit)
    audit_logger.propagate = False  # one line per store belongs in the audit file, not on stderr


def log_reference(logger: logging.Logger, message: str, *args: object, level: int = logging.ERROR) -> str:
    """Log the exception being handled, with its traceback, under a new short reference,
    and return the reference. An Error Comment names it instead of the exception's text,
    which holds paths and internals that are no business of the peer's: the peer's
    operator quotes it to ours, who finds the whole story in the log."""
    ref = uuid.uuid4().hex[:8]
    if level >= logging.ERROR:
        logger.log(level, message + " (reference %s)", *args, ref, exc_info=True)
        return ref
    # Below ERROR it is the peer's input that could not be read, not a fault of ours: one
    # line with what the decoder said, no traceback (issue #20: bad input leaves none).
    error = sys.exc_info()[1]
    logger.log(level, message + " (reference %s): %s: %s", *args, ref, type(error).__name__,
               str(error)[:300].replace("\n", " "))
    return ref
