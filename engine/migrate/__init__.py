"""`stowage migrate`: move a whole legacy archive into stowage over DICOM.

enumerate  study-level C-FIND windows, how they split when the source's cap is hit
scan       the enumeration run: windows from the checkpoint to the source and back
pull       one study by C-MOVE (to the running archive) or C-GET (stored here)
verify     SOP Instance UIDs at the source against the catalog; optionally the records
checkpoint the SQLite file in <data-dir>/migrate/ that makes kill -9 and re-run safe
pacing     --window, --max-rate and back-off after a struggling source's answers
report     the final report (text, CSV, JSON) and --status
run        the loop that ties them together, with a progress bar
command    the CLI's arguments checked, and --status
"""
