"""A destination's sending process (engine/forward/sending.py, ~120 MB resident) is stopped
once nothing has been due for it for `forward_sender_idle` seconds, and started again by
the next instance to forward, which arrives as any other."""
from __future__ import annotations

import psutil

from conftest import MR, copies, wait_for
from test_forward import sending_processes, storescu, uids, write_config
from test_send import StoreSCP, scps  # noqa: F401  (scps: fixture)


def test_an_idle_sending_process_stops_and_the_next_instance_starts_it(make_server, scps, tmp_path):
    dest = scps(tmp_path / "dest")
    conf = write_config(tmp_path / "f.toml", {"DEST": dest.port}, '[[forward]]\nto = "DEST"\n')
    conf.write_text("forward_sender_idle = 1\n" + conf.read_text())  # a top-level key: before the tables
    server = make_server("--workers", "1", "--config", str(conf))
    first = copies(MR, tmp_path / "first", 2, "first")
    storescu(server.port, first)
    wait_for(lambda: uids(first) <= set(dest.received()), 60, lambda: f"not forwarded:\n{server.log()}")
    sender, = sending_processes(server)
    wait_for(lambda: not sending_processes(server), 30, lambda: f"the idle sending process still runs:\n{server.log()}")
    assert not psutil.pid_exists(sender.pid) or sender.status() == psutil.STATUS_ZOMBIE
    # logged once the process has ended: a moment after it is gone from the process table
    wait_for(lambda: "sending process for DEST stopped: nothing due for 1 s" in server.log(), 10,
             lambda: f"no line for the stop:\n{server.log()}")
    later = copies(MR, tmp_path / "later", 2, "later")
    storescu(server.port, later)
    wait_for(lambda: uids(later) <= set(dest.received()), 60, lambda: f"not forwarded after the stop:\n{server.log()}")
    restarted, = sending_processes(server)
    assert restarted.pid != sender.pid
