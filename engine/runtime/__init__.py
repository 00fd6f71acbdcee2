"""What every stowage process shares: configuration, logging and the audit trail,
per-process counters, TLS contexts, malloc tuning. Imports nothing else of the engine."""
