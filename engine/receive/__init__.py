"""Instances arriving over DICOM, for the worker processes and `stowage migrate` alike:
association negotiation on the lean path, the lean C-STORE reader (ingest), the Storage
SCP adapter onto the archive (store), spill to disk of large data sets, and the C-GET
SCU that receives its C-STOREs on the same path."""
