"""The enumeration run: windows from the checkpoint to the source and their answers back,
until none is pending (the window logic itself is in enumerate.py)."""
from __future__ import annotations

import logging
import time
from typing import Callable

from stowage.engine.migrate.checkpoint import Checkpoint
from stowage.engine.migrate.enumerate import Window, enumerate_window, split
from stowage.engine.migrate.source import Session

log = logging.getLogger("stowage.migrate")
WINDOW_TRIES = 3


def _filtered(w: Window) -> bool:
    """A "no date" or "no time" window: a universal query, filtered here."""
    return w.no_date or w.no_time


class Scan:
    """Enumerates one source into its checkpoint."""

    def __init__(self, cp: Checkpoint, connect: Callable[[], Session], find_limit: int,
                 wait_gate: Callable[[], object], retry_delay: float) -> None:
        self.cp, self.connect, self.find_limit = cp, connect, find_limit
        self.wait_gate, self.retry_delay = wait_gate, retry_delay

    def run(self, firsts: list[Window], rescan: bool) -> None:
        """Query windows until none is pending.

        Without --find-limit, the first window's count N is suspected to be a silent cap:
        dated windows answering N or more are split. Once more than N studies are known, the
        cap is proven and applies to every window (the "no date/time" ones, answered by a
        universal query, are asked again); if the source turns out to hold no more than N,
        the suspicion was wrong and nothing was missed."""
        self.cp.seed_windows(firsts, rescan)
        session: Session | None = None
        tries: dict[str, int] = {}
        try:
            while pending := self.cp.pending_windows():
                for w in pending:
                    self.wait_gate()
                    if session is None or not session.established:
                        session = self.connect()
                    limit = self._limit(w)
                    outcome, studies, children, note, count = enumerate_window(session.find, w, limit)
                    if outcome == "failed":
                        tries[w.key] = tries.get(w.key, 0) + 1
                        log.warning("migrate: window %s: %s (try %d of %d)", w, note, tries[w.key], WINDOW_TRIES)
                        if tries[w.key] < WINDOW_TRIES:
                            session.close()
                            session = None
                            time.sleep(min(self.retry_delay, 30))
                            continue
                    if outcome == "done" and not self.find_limit and w in firsts and count >= 2 \
                            and not self.cp.meta("suspected_cap"):
                        self.cp.set_meta(suspected_cap=str(count))
                        outcome, children, note = "split", split(w), f"{count} matches: a silent cap? splitting"
                    self.cp.window_done(w, outcome, studies, children, note, count)
                    self._prove_suspicion()
        except BaseException:  # Ctrl-C, SIGTERM or an error mid-answer: abort, no release handshake to wait for
            if session is not None:
                session.close(abort=True)
                session = None
            raise
        finally:
            if session is not None:
                session.close()
        self._settle_suspicion()

    def _limit(self, w: Window) -> int:
        if self.find_limit:
            return self.find_limit
        suspected = int(self.cp.meta("suspected_cap") or 0)
        if self.cp.meta("cap_proven") or not _filtered(w):
            return suspected
        return 0  # a universal query under mere suspicion tells nothing new: not split

    def _prove_suspicion(self) -> None:
        suspected = int(self.cp.meta("suspected_cap") or 0)
        if not suspected or self.find_limit or self.cp.meta("cap_proven"):
            return
        if self.cp.study_count() > suspected:
            self.cp.set_meta(cap_proven="1")
            log.warning("migrate: the source answers at most %d C-FIND matches without saying so (a cap); "
                        "splitting under it (tell it with --find-limit %d next time)", suspected, suspected)
            universal = [k for k, _state in self.cp.windows_with(suspected) if _filtered(Window.from_key(k))]
            self.cp.requeue(universal)

    def _settle_suspicion(self) -> None:
        """A suspected cap that was never proven was no cap: nothing was missed."""
        suspected = int(self.cp.meta("suspected_cap") or 0)
        if suspected and not self.find_limit and not self.cp.meta("cap_proven"):
            self.cp.clear_incomplete(f"the source holds {self.cp.study_count()} studies: its first answer "
                                     "was complete")
