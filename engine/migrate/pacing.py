"""When to start new work: the --window of local time, the --max-rate budget, and the
back-off after failures (per study) and after a struggling source (for everyone).

Back-off policy: attempt n of a study waits retry_delay * 2**(n-1), at most MAX_DELAY_S;
four times that when the source said it is out of resources (0xA700/0xA701/0xA702) or a
retrieve stalled. Such an answer also pauses the start of every new study for the
study's delay: the source is struggling, and more associations would only make it worse.
"""
from __future__ import annotations

import datetime as dt
import re
import threading
import time
from dataclasses import dataclass

MAX_DELAY_S = 3600.0
BUSY_FACTOR = 4.0
_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(/s|inst/s|instances/s|MB/s|mb/s)?\s*$")


class PacingError(ValueError):
    """A --window or --max-rate that cannot be read."""


@dataclass(frozen=True)
class TimeWindow:
    """Local wall-clock hours in which new work may start, e.g. 19:00-07:00 (overnight)."""

    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> "TimeWindow":
        m = _WINDOW.match(text.strip())
        if not m or int(m[1]) > 23 or int(m[3]) > 23 or int(m[2]) > 59 or int(m[4]) > 59:
            raise PacingError(f"--window {text!r}: expected HH:MM-HH:MM in local time, e.g. 19:00-07:00")
        return cls(dt.time(int(m[1]), int(m[2])), dt.time(int(m[3]), int(m[4])))

    def is_open(self, now: dt.datetime) -> bool:
        t = now.time()
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def seconds_until_open(self, now: dt.datetime) -> float:
        if self.is_open(now):
            return 0.0
        opening = now.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opening <= now:
            opening += dt.timedelta(days=1)
        return (opening - now).total_seconds()

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class Rate:
    """A cap on instances/s ("50", "50/s") or on MB/s ("20MB/s")."""

    value: float
    unit: str  # "instances" or "MB"

    @classmethod
    def parse(cls, text: str) -> "Rate":
        m = _RATE.match(text)
        if not m or float(m[1]) <= 0:
            raise PacingError(f"--max-rate {text!r}: expected a positive number of instances/s (e.g. 50) "
                              "or MB/s (e.g. 20MB/s)")
        return cls(float(m[1]), "MB" if (m[2] or "").lower() == "mb/s" else "instances")


def retry_delay(base: float, attempts: int, busy: bool) -> float:
    delay = min(base * 2 ** max(0, attempts - 1), MAX_DELAY_S)
    return min(delay * BUSY_FACTOR, MAX_DELAY_S) if busy else delay


class Gate:
    """Decides whether a new study may start now (thread-safe)."""

    def __init__(self, window: TimeWindow | None, rate: Rate | None) -> None:
        self.window, self.rate = window, rate
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._t0 = time.monotonic()
        self._work = 0.0  # instances or MB done since start (what the rate is measured on)

    def pause(self, seconds: float) -> None:
        """The source struggles: start nothing new for `seconds`."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def account(self, instances: int, nbytes: int) -> None:
        with self._lock:
            self._work += nbytes / 1e6 if self.rate and self.rate.unit == "MB" else instances

    def wait(self, now: dt.datetime | None = None) -> tuple[float, str]:
        """(seconds to wait before starting anything new, why); (0, "") to go ahead."""
        with self._lock:
            if self.window is not None:
                closed = self.window.seconds_until_open(now or dt.datetime.now())
                if closed > 0:
                    return closed, f"outside the window {self.window}"
            paused = self._paused_until - time.monotonic()
            if paused > 0:
                return paused, "backing off: the source is out of resources or stalled"
            if self.rate is not None:
                ahead = self._work / self.rate.value - (time.monotonic() - self._t0)
                if ahead > 0:
                    return ahead, f"pacing to {self.rate.value:g} {self.rate.unit}/s"
        return 0.0, ""
