"""The catalog as Apache Iceberg tables (issue #24): every sealed catalog file and every
tombstone batch of this node committed to two Iceberg tables, `instances` and
`deletions`, by a background publisher, so that any Iceberg engine can read the archive's
metadata with stowage stopped (docs/scale-out.md)."""
