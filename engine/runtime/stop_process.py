"""Stopping a child process by PID: SIGTERM, a bounded wait, then SIGKILL (one place for the
pattern every supervisor and harness needs)."""
from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, timeout: float, kill_wait: float | None = None) -> int:
    """SIGTERM `proc` (if it is still running), wait up to `timeout` seconds, then SIGKILL and
    wait up to `kill_wait` (None: until it is reaped). Returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(kill_wait)
