"""The comparison harness: benchmarks that start other archives and receivers beside stowage.
A repository tool, run from a checkout (`python -m stowage.bench.harness.compare ...`); not installed."""
