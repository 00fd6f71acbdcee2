"""The instances of a transfer still to send, shared by its associations: a fixed batch
(`Work`), or one given more while it sends (`Feed`, forwarding)."""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Iterable, Sequence

from stowage.engine.transfer.contexts import context_batches
from stowage.engine.transfer.results import Context, Instance


class Work:
    """The instances of one transfer batch still to send, shared by its associations."""

    def __init__(self, items: list[Instance]) -> None:
        self.items: deque[Instance] = deque(items)
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)  # a Feed was given more, or ended
        self.open_ended = False  # a Feed: more may come until it ends
        self.attempts: dict[str, int] = {}
        self.links = 0              # associations open on it now
        self.pending_opens = 0      # associations being opened now
        self.ever_opened = False
        self.first_open = threading.Event()

    def take(self) -> Instance | None:
        with self.lock:
            return self.items.popleft() if self.items else None

    def give_back(self, inst: Instance) -> None:
        with self.lock:
            self.items.appendleft(inst)

    def unfinished(self) -> bool:
        """Whether there is, or may still be, something to send."""
        with self.lock:
            return bool(self.items) or self.open_ended

    def wait_for_more(self, cancelled: Callable[[], bool]) -> bool:
        """Whether there is something to take now: for a Feed, after waiting until it is
        given more or ends (or the transfer is cancelled)."""
        with self.lock:
            while not self.items and self.open_ended and not cancelled():
                self.arrived.wait(0.2)
            return bool(self.items) and not cancelled()

    def drain(self) -> list[Instance]:
        with self.lock:
            out = list(self.items)
            self.items.clear()
            return out

    def opening(self) -> None:
        with self.lock:
            self.pending_opens += 1

    def opened(self) -> None:
        with self.lock:
            self.pending_opens -= 1
            self.links += 1
            self.ever_opened = True
            self.first_open.set()

    def open_failed(self) -> bool:
        """Whether other associations are open or being opened (they carry the work)."""
        with self.lock:
            self.pending_opens -= 1
            return self.links + self.pending_opens > 0

    def closed(self) -> None:
        with self.lock:
            self.links -= 1


class Feed(Work):
    """Instances for `Sender.send_feed`, given (`give`) before and while it sends. Its
    associations propose the presentation contexts of `expected` (their SOP classes as
    `send` would, up to 128 contexts); `fits` says which instances they can carry."""

    def __init__(self, expected: Sequence[Instance]) -> None:
        batches = context_batches(expected)
        self.contexts: list[Context] = batches[0] if batches else []
        self._fit = set(self.contexts)
        super().__init__([])
        self.open_ended = True

    def fits(self, inst: Instance) -> bool:
        return (inst.sop_class_uid, inst.transfer_syntax_uid) in self._fit

    def give(self, instances: Iterable[Instance]) -> None:
        """More to send (each one that `fits`), after what was given before."""
        with self.lock:
            self.items.extend(instances)
            self.arrived.notify_all()

    def end(self) -> None:
        """Nothing more will be given: the associations close once what was given is sent."""
        with self.lock:
            self.open_ended = False
            self.arrived.notify_all()
