"""The Iceberg publisher as a process of its own beside the workers (off the store path:
a slow or unreachable catalog never holds up a C-STORE; sealed files simply wait in the
outbox). Supervised by the acceptor like the scrub and forwarding: started once the
workers are up, restarted after it dies, stopped on drain; one at a time per data
directory (the flock of <data_dir>/iceberg/publisher.lock)."""
from __future__ import annotations

import logging
import threading

from stowage.engine.runtime.config import Config
from stowage.engine.runtime.supervised import SupervisedProcess, child_start, wait_for_lock

log = logging.getLogger("stowage.iceberg")

LOCK = "publisher.lock"
NICE = 10
RESTART_AFTER_S = 10.0
REBUILT_REPEAT_S = 300.0


def publish_until(config: Config, stop: threading.Event) -> None:
    """A pass every iceberg_interval seconds until `stop`; a failed pass (the catalog
    unreachable, a commit given up) is logged and the next one tries again."""
    from stowage.engine.iceberg.publisher import CatalogRebuilt, Publisher
    publisher = None
    while True:
        wait = config.iceberg_interval
        try:
            if publisher is None:
                publisher = Publisher(config)
                queued = publisher.start()
                log.info("iceberg: publishing to %s (namespace %s, node %s)%s", config.iceberg_catalog,
                         config.iceberg_namespace, config.node, f", {queued} sealed file(s) queued" if queued else "")
            done = publisher.run_once()
            if done.instance_files or done.deletion_rows or done.relocated_rows:
                log.info("iceberg: %d file(s) (%d row(s)), %d deletion(s) and %d relocated row(s) committed in %d "
                         "commit(s), %d conflict(s) retried", done.instance_files, done.instance_rows,
                         done.deletion_rows, done.relocated_rows, len(done.commit_seconds), done.conflicts)
        except CatalogRebuilt as e:  # it needs an operator: said every few minutes, not every pass
            log.error("iceberg: %s", e)
            publisher, wait = None, max(wait, REBUILT_REPEAT_S)
        except Exception as e:  # noqa: BLE001 - the catalog away, the network down: try again later
            log.error("iceberg: a publication pass failed (%s: %s); trying again in %g s", type(e).__name__, e,
                      config.iceberg_interval)
            publisher = None
        if stop.wait(wait):
            return


def main() -> None:
    config, stop = child_start("STOWAGE_ICEBERG_CONFIG", "iceberg", NICE)
    home = config.data_dir / "iceberg"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as lock:
        if wait_for_lock(lock, stop, 0.5):
            if config.cluster_refresh:  # the view of the other nodes, refreshed beside the publication
                from stowage.engine.iceberg.view import refresh_until
                follower = threading.Thread(target=refresh_until, args=(config, stop), name="cluster-view",
                                            daemon=True)
                follower.start()
            publish_until(config, stop)
    logging.shutdown()


class IcebergProcess(SupervisedProcess):
    """The acceptor's handle on the publisher (none unless iceberg_catalog is set)."""

    name, module, config_env, restart_after = "iceberg publisher", "stowage.engine.iceberg.process", \
        "STOWAGE_ICEBERG_CONFIG", RESTART_AFTER_S

    def start(self) -> None:
        """Queue every file sealed from now on (and before) before the first association,
        then start the process."""
        if not self.config.iceberg_catalog:
            return
        from stowage.engine.iceberg.publisher import CatalogRebuilt, enable
        try:
            enable(self.config.data_dir, self.config.iceberg_namespace)
        except CatalogRebuilt as e:  # the process says so again at every pass, and publishes nothing
            log.error("iceberg: %s", e)
        self.launch(f", catalog {self.config.iceberg_catalog}")


if __name__ == "__main__":
    main()
