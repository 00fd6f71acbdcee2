"""Forwarding (docs/forwarding.md): `[[forward]]` rules turn what the archive stored into
entries of a durable queue (queue.py, filled by scan.py from the catalog), which a process
of its own (process.py) delivers to each destination (deliver.py)."""
