"""The forwarding process that `stowage serve` runs beside its workers: one scanner thread
(engine/forward/scan.py) and one delivering thread per destination
(engine/forward/deliver.py), each with a sending process of its own
(engine/forward/sending.py). A process of its own, so sending never takes CPU time from
the workers' GIL; if it dies, the acceptor starts it again and it resumes from the queue."""
from __future__ import annotations

import logging
import threading
import time

from stowage.engine.runtime.config import Config
from stowage.engine.runtime.supervised import SupervisedProcess, child_start, wait_for_lock
from stowage.engine.storage.remote import read_from_bucket

log = logging.getLogger("stowage.forward")

SCAN_INTERVAL_S = 0.5
# While instances pour in, scan less often: a scan's cost is mostly refreshing the catalog's
# view of the tails, whatever it finds (40% of forwarding's CPU at 0.5 s during an ingest
# burst); a burst's entries then wait up to 2 s more, and are sent in bigger batches.
BUSY_SCAN_INTERVAL_S = 2.0
BUSY_ENTRIES = 100  # a scan that queued at least this many
NICE = 10  # ingest first: under a full load forwarding lags and catches up once it eases
RESTART_AFTER_S = 5.0
PRUNE_INTERVAL_S = 3600.0
LOCK = "forward.lock"


class ForwardStartError(RuntimeError):
    """The queue cannot be opened (a full disk, permissions); the message says which file."""


def destinations(config: Config) -> list[str]:
    return sorted({to for rule in config.forward for to in rule.to})


def _scan_loop(config: Config, stop: threading.Event, deletions, scanned) -> None:
    from stowage.engine.forward.queue import Queue
    from stowage.engine.forward.scan import Scanner
    queue = Queue(config.data_dir)
    scanner = Scanner(config, queue, deletions, scanned)
    try:
        pruned_at, interval = 0.0, SCAN_INTERVAL_S
        while not stop.wait(interval):
            try:
                added = scanner.scan()
                interval = BUSY_SCAN_INTERVAL_S if added >= BUSY_ENTRIES else SCAN_INTERVAL_S
                if time.monotonic() - pruned_at > PRUNE_INTERVAL_S:
                    pruned_at = time.monotonic()
                    queue.prune()
            except Exception:  # the catalog mid-compaction, a full disk: the next scan tries again
                log.exception("forward: scanning the catalog failed; will retry")
    finally:
        scanner.close()
        queue.close()


def main() -> None:
    config, stop = child_start("STOWAGE_FORWARD_CONFIG", "forward", NICE)
    read_from_bucket(config)  # segments evicted after their upload: read from the bucket
    # The sender logs each failed instance; a destination that is down gets one line per attempt from deliver.py.
    logging.getLogger("stowage.send").setLevel(logging.ERROR)
    from stowage.engine.forward.deliver import Destination
    from stowage.engine.forward.queue import path_of
    with open(path_of(config.data_dir).parent / LOCK, "a") as lock:
        if not wait_for_lock(lock, stop, 0.5):
            return
        from stowage.catalog import tombstones
        from stowage.engine.forward.scan import Deletions, Scanned
        deletions, scanned = Deletions(config.data_dir / tombstones.DIRECTORY), Scanned()
        threads = [threading.Thread(target=_scan_loop, args=(config, stop, deletions, scanned), name="forward-scan",
                                    daemon=True)]
        threads += [Destination(config, name, stop, deletions, scanned) for name in destinations(config)]
        from stowage.engine.forward.commitment import committers
        threads += committers(config, destinations(config), stop)
        for t in threads:
            t.start()
        log.info("forwarding: %d rule(s) to %s", len(config.forward), ", ".join(destinations(config)))
        stop.wait()
        for t in threads:
            t.join(timeout=config.dimse_timeout)
    logging.shutdown()


class ForwardProcess(SupervisedProcess):
    """The acceptor's handle on the forwarding process (none without [[forward]] rules)."""

    name, module, config_env, restart_after = "forwarding", "stowage.engine.forward.process", \
        "STOWAGE_FORWARD_CONFIG", RESTART_AFTER_S

    def start_cursor(self) -> None:
        """Create the queue and its cursor; before the first association is accepted, so
        that what is stored from then on is forwarded, even if the process is killed at once."""
        if not self.config.forward:
            return
        import sqlite3
        from stowage.engine.forward.queue import Queue, path_of
        try:
            queue = Queue(self.config.data_dir)
            try:
                queue.start_cursor(time.time_ns() // 1000)
            finally:
                queue.close()
        except sqlite3.Error as e:
            raise ForwardStartError(f"{path_of(self.config.data_dir)}: {e}") from None

    def start(self) -> None:
        """Start the process (after start_cursor)."""
        if self.config.forward:
            self.launch()

if __name__ == "__main__":
    main()
