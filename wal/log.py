"""Opening the write-ahead log: validate, cut a torn tail, start writing.

    >>> import tempfile, uuid
    >>> from pages.fs import OsFileSystem
    >>> from wal.format import RecordType
    >>> d, db_id = tempfile.mkdtemp(), uuid.uuid4().bytes
    >>> log = WriteAheadLog.open(OsFileSystem(), d, db_id)
    >>> lsn = log.append(RecordType.NOOP, 1, b"hello")
    >>> log.flush(lsn)                 # durable once this returns
    >>> log.close()
    >>> log = WriteAheadLog.open(OsFileSystem(), d, db_id)
    >>> [r.payload for r in log.records()]
    [b'hello']
    >>> log.close()

The ``fs`` argument is the file-system seam (``pages.fs``), passed in because
``wal`` imports nothing from the layers above it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from wal import fsync_failure
from wal.errors import CorruptionError
from wal.failpoints import failpoint
from wal.format import COMPRESS_THRESHOLD, encode_segment_header, parse_segment_name, segment_name
from wal.reader import LogState, Segment, inspect_log
from wal.writer import LogWriter, check_writer_args

log = logging.getLogger("kvstore")


class WriteAheadLog(LogWriter):
    """The log of one database: a ``LogWriter`` opened over a validated log."""

    #: What open found: the segments, the end, the torn tail that was cut.
    opened_state: LogState

    @classmethod
    def open(
        cls,
        fs: Any,
        directory: str,
        db_id: bytes,
        *,
        durable_lsn: int = 0,
        segment_size: int = 16 * 2**20,
        sync: str = "full",
        compress_threshold: int = COMPRESS_THRESHOLD,
    ) -> WriteAheadLog:
        """Open the log in ``directory``, creating its first segment at
        ``durable_lsn`` if there is none.

        ``durable_lsn`` is an LSN the caller knows was durable (the checkpoint
        LSN of the page file): the log must reach it, and a bad record below
        it is damage.  A torn tail is cut off (the last segment truncated to
        its last good record, fsynced); zeros after the last record are the
        space the writer preallocated (L7 of ``wal.writer``) and stay, for
        the writer to go on over; damage raises CorruptionError and writes
        nothing.  A store's clean close leaves no zeros (L8), so in the
        common case open reads no more than the records.

        Raises TypeError/ValueError for bad arguments, CorruptionError for a
        damaged, foreign or incomplete log.
        """
        if not isinstance(db_id, bytes) or len(db_id) != 16:
            raise TypeError(f"db_id must be 16 bytes, not {db_id!r}")
        if not isinstance(durable_lsn, int) or durable_lsn < 0:
            raise ValueError(f"durable_lsn must be an int >= 0, not {durable_lsn!r}")
        check_writer_args(sync, segment_size)  # before anything is written
        # A failed fsync left a segment whose page-cache tail may not be on the disk: rewrite it first.
        fsync_failure.repair(fs, directory, lambda name: parse_segment_name(name) is not None)
        state = inspect_log(fs, directory, db_id, known_durable=durable_lsn)
        if state.segments and state.segments[0].first_lsn > durable_lsn:
            raise CorruptionError(
                directory,
                f"log starts at LSN {state.segments[0].first_lsn}, after the durable LSN {durable_lsn}: segments are missing",
            )
        if state.cut:
            cls._cut_tail(fs, state)
        if not state.segments:
            state.segments.append(cls._create_segment(fs, directory, db_id, durable_lsn))
            state.end_lsn = durable_lsn
        else:
            # The tail found may be only in the page cache (a process crash):
            # make it durable before anything states it is (L1, L5).
            f = fs.open(state.segments[-1].path)
            try:
                fsync_failure.fsync(fs, f, state.segments[-1].path)
            finally:
                f.close()
        self = cls(
            fs, directory, db_id, state.segments, segment_size=segment_size, sync=sync, compress_threshold=compress_threshold
        )
        self.opened_state = state
        return self

    @staticmethod
    def _cut_tail(fs: Any, state: LogState) -> None:
        """Carry out the cuts ``inspect_log`` decided (idempotent: a crash in
        the middle leaves a log that inspects to the same cuts or fewer)."""
        for action in state.cut:
            if action[0] == "remove":
                log.warning("WAL: removing segment %s whose creation was torn by a crash", action[1])
                fs.remove(action[1])
            else:
                _, path, size = action
                log.warning("WAL: cutting torn tail of %s at offset %d (LSN %s)", path, size, state.torn_lsn)
                f = fs.open(path)
                try:
                    f.truncate(size)
                    failpoint("wal.before_tail_cut_fsync")
                    fsync_failure.fsync(fs, f, path)
                finally:
                    f.close()

    @staticmethod
    def _create_segment(fs: Any, directory: str, db_id: bytes, first_lsn: int) -> Segment:
        path = os.path.join(directory, segment_name(first_lsn))
        f = fs.create(path)
        try:
            f.pwrite(0, encode_segment_header(db_id, first_lsn))
            fsync_failure.fsync(fs, f, path)  # L3 of wal.writer
        finally:
            f.close()
        return Segment(path, first_lsn, first_lsn)
