"""Instances leaving the archive: the associations we open (requestor), send (C-STORE SCU
with transfer-syntax conversion), export to folders and DICOMDIR File-sets, selection of
what to send, and the storage commitment SCU."""
