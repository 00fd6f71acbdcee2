"""The segment store: records in zstd segment files (segment), group commit (writer), the
archive API every door stores and reads through (archive), recovery after a crash,
slots (one writer per segment), file meta, integrity marks, where a record lives now
(locate), free space and usage, rejection notes (applied as they are stored), and the
storage commitment verdict and report queue."""
