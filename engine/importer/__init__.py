"""`stowage import`: DICOM files from folders into the archive, without the network,
through `Archive.store` (the C-STORE storage API): part10 reads files, scan finds them,
ledger remembers what is in, loader stores (one slot per process), run drives it all."""
