"""Benchmarks for the stowage archive: a seeded DICOM corpus generator and an ingest benchmark."""
