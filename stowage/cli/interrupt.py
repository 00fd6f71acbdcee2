"""Ctrl-C in a long command: it winds down (what it holds released, nothing half-written
left visible) and says in one line what was done and what was not, exit status 130."""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import click

T = TypeVar("T")


class Interrupted(click.ClickException):
    """Ctrl-C: one line saying what was done and what was not, exit status 130 (128 + SIGINT)
    as shells expect, instead of click's bare "Aborted!"."""

    exit_code = 130

    def __init__(self, message: str) -> None:
        super().__init__(f"interrupted: {message}")


def interruptible(work: Callable[[], T], stop: Callable[[], None]) -> tuple[T | None, bool]:
    """Run `work` in a thread while this (the main) thread waits for Ctrl-C; on Ctrl-C call
    `stop()` (which must make `work` wind down: finish its current item, release what it
    holds) and wait for it. Returns (what `work` returned, None if it raised, and whether
    Ctrl-C stopped it); an exception `work` raised is raised here unless Ctrl-C came first. A second Ctrl-C while it
    winds down is not caught: the process ends at once."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # noqa: B036 - handed to the main thread
            box["error"] = e
        finally:
            done.set()

    # waited for on an Event, not by Thread.join: a join that Ctrl-C interrupts can leave
    # the thread looking finished while it runs on (Python < 3.12)
    threading.Thread(target=run, name="interruptible", daemon=True).start()
    interrupted = False
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        interrupted = True
        stop()
        done.wait()
    if "error" in box and not interrupted:
        raise box["error"]
    return box.get("value"), interrupted
