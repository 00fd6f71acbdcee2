"""Logging: human-readable lines on stderr by default, JSON lines with log_format=json;
the audit logger (`stowage.audit`) also goes to <data_dir>/audit.jsonl."""
from __future__ import annotations

import json
import logging
import sys
import time

from engine.config import Config


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
             "level": record.levelname.lower(), "logger": record.name, "process": record.processName,
             "msg": record.getMessage()}
        d.update(getattr(record, "fields", {}))
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


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
    config.data_dir.mkdir(parents=True, exist_ok=True)
    audit = logging.FileHandler(config.data_dir / "audit.jsonl")
    audit.setFormatter(JsonFormatter())
    audit_logger = logging.getLogger("stowage.audit")
    audit_logger.addHandler(audit)
    audit_logger.propagate = False  # one line per store belongs in the audit file, not on stderr
