"""The fork server: one process that imports the archive's modules once, then forks every
worker, HTTP and helper process the acceptor starts.

A fresh `python -m stowage.workers.worker` spends ~1.5 s of CPU importing pydicom,
pynetdicom, pyarrow and DuckDB before it does anything, and `serve` starts two workers, two
HTTP processes and a scrub at the least: a start or restart took ~6.5 s until the HTTP port
answered, and a crashed worker was replaced ~2 s later. Forked from here, a child starts in
~20 ms with those modules imported (their pages shared until written). multiprocessing's
forkserver does the same for multiprocessing.Process; this one runs `python -m` modules,
which is what the acceptor's children are, and hands back a Popen-like handle.

The server is a fresh interpreter the acceptor starts from its main thread, before any
thread of the acceptor's matters: it imports, then only forks, so no child inherits a lock
held elsewhere. A child
- runs as `python -m <module> <args>` would: as __main__, with sys.argv, the environment and
  working directory the acceptor gives, non-daemon threads joined and atexit handlers run
  at its end, and the command it would have had as its title (setproctitle: ps, psutil);
- gets the file descriptors the acceptor passes (SCM_RIGHTS), at numbers written into its
  arguments (`Fd`), and the server's pid where its arguments ask for `PARENT`;
- gets SIGTERM when the server dies, and the server SIGKILL when the acceptor dies
  (PR_SET_PDEATHSIG), so nothing outlives the acceptor.

Frames (frames.py) on one stream socket are an 8-byte length and JSON. Acceptor to server:
{"module", "args", "env", "cwd"} with the descriptors attached; server to acceptor: {"pid"}
for each request in order, {"exit": pid, "code"} when a child ended (the code as Popen's
returncode), {"preloaded": true} once it has imported what it preloads. client.py is the acceptor's side, forking.py the server's and its children's
(not server.py: a submodule by that name would hide the package's `server()`).
"""
from stowage.engine.runtime.forkserver.client import (PRELOAD, UNKNOWN_EXIT, ForkedProcess, ForkServer,
                                                      server, spawn, stop)
from stowage.engine.runtime.forkserver.frames import PARENT, Fd
from stowage.engine.runtime.forkserver.forking import die_with_parent

__all__ = ["PARENT", "PRELOAD", "UNKNOWN_EXIT", "Fd", "ForkServer", "ForkedProcess", "die_with_parent",
           "server", "spawn", "stop"]
