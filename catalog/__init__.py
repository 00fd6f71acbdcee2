"""The catalog: one metadata row per stored instance, in immutable Parquet files plus
per-worker tails of not-yet-sealed rows, read through DuckDB."""
