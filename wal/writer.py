"""The log writer: appends records, group commit, preallocated segments,
segment roll, truncation.

``append`` only frames the record and queues it in memory (under a short
lock); it returns the record's LSN.  ``flush(lsn)`` returns once the record at
``lsn`` and everything before it is on stable storage.  When many threads
flush at once, one of them becomes the *write leader*: it takes every queued
record and writes them with one ``pwrite`` per segment; then one becomes the
*sync leader* and syncs once (``fdatasync``) for everything written.  Threads
that arrive while a sync runs write their records meanwhile and wait; the
next sync covers all of them.  So one sync serves many commits, and the
writing of one group overlaps the sync of the one before.

Preallocated segments
---------------------
A sync that must also make a file's new size and new blocks durable costs a
journal commit; an ``fdatasync`` of bytes written over space the file
already has, durably, costs only the data write (on the ext4 disk of issue 8,
about 6,000 a second against 3,200 appending fsyncs; SQLite's WAL gets the
same effect by overwriting the WAL file it reuses).  So under
``sync="full"`` the writer keeps zeros ahead of the records in the segment
being written:

* Before a write that would end past the end of the segment file, the
  write leader extends the file with zeros to a *step* past that write's
  end -- a step is as many bytes as the segment holds already, at least
  ``PREALLOC_MIN`` and at most ``PREALLOC_MAX``, and never reaches past
  ``segment_size`` -- and fsyncs it, so the new size and blocks are
  durable.  Then it writes the records over the zeros.  The extension
  says nothing about the records: they become durable as any others do,
  by the next sync (L1).  A write larger than a step, or one that reaches
  past ``segment_size`` (the segment rolls after it), just appends.
* So nearly every write lands on zeros the file already has durably, and
  the sync leader's ``fdatasync`` is a plain overwrite.

The committing thread that leads the write pays for a step, about 0.3 ms
for 64 KiB and 2.5 ms for 1 MiB (writing and fsyncing zeros on that disk;
a whole 16 MiB segment at once would take 19 ms), about once in 7,000
commits of 150 bytes once the steps reach 1 MiB.  No background thread does
it: the fault-injection tests need every run to make the same calls in the
same order.  A new segment (created on open or by a roll) is a header only,
as before; its first write makes the first step.

Zeros are written only past the end of the file, never over a record (L7).
The reader takes zeros after the last record for the end of the log
(``wal.reader``; a record never starts with zeros, its magic is not zero).
A segment is cut to its records before the next one is created (L2), so
only the last segment can end in zeros.

A clean close of the store must leave a log as small as its records, which
the next open reads at once.  The store's close calls ``start_segment`` and
checkpoints, which removes every segment before the new one; and a segment
that ``start_segment`` begins is *lean*: it is not preallocated until it
holds ``PREALLOC_MIN`` bytes (L8), so the closing checkpoint's records are
all it holds.  ``close`` itself writes nothing but what is queued: it
cannot tell whether the store above it is poisoned, and a poisoned store
must write nothing.  What stays after a close without that checkpoint (a
store closed with nothing logged since its last checkpoint, or after a
crash) is at most one step of zeros, which the next open reads as the end.

Under ``sync="normal"`` and ``"off"`` the log is synced at most every 100 ms,
where preallocation gains nothing, and its fsync would be a sync on the
commit path, which those modes promise commits never wait for: there the
writer appends as before (the syncs are still ``fdatasync``, which on Linux
flushes a grown size too).

State machine of the writer::

    open --append/flush--> open --I/O error--> poisoned --close--> closed
      \\---------------------------close-------------------------------/

Invariants (cited where they are kept and where tests check them):

L1. ``flush(lsn)`` (sync) returns only after a sync that covers the record
    at ``lsn`` has completed: the sync leader's ``fdatasync`` of the segment
    being written, or the fsync of a roll (L2).  ``durable_lsn`` never runs
    ahead of that.
L2. A segment is cut to the end of its last record and fsynced before the
    next segment is created, so a later segment proves every record of the
    earlier ones durable, and no segment but the last has zeros at its end.
L3. A new segment's header is written and fsynced (and its name made durable
    by the seam) before any record is written into it.
L4. After any failed write, fsync, fdatasync or truncate the writer is
    poisoned: every later append and flush raises PoisonedError, and no
    sync is retried (the kernel may have dropped the data and would report
    success next time).
L5. The ``durable_lsn`` stored in a record is at most the durable LSN at the
    moment it was queued, so it never claims more than was durable.
L6. ``truncate_before`` removes segments oldest first, each removal made
    durable before the next, and never the segment being written: after a
    crash the log is still a contiguous run of segments.
L7. Preallocation writes zeros only past the end of the segment file (so
    never over a record), and fsyncs them before any record is written
    over them.
L8. A segment begun by ``start_segment`` gets no zeros until it holds
    ``PREALLOC_MIN`` bytes: a store's clean close (``start_segment``, then a
    checkpoint) leaves a log without zeros.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from wal import canary, fsync_failure
from wal.errors import ClosedError, PoisonedError
from wal.failpoints import failpoint
from wal.format import (
    COMPRESS_THRESHOLD,
    KNOWN_TYPES,
    MAX_PAYLOAD,
    NO_LSN,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Record,
    decode_record,
    encode_record,
    encode_segment_header,
    prepare_payload,
    segment_name,
)
from wal.reader import Segment, read_segment_records

SYNC_MODES = ("full", "normal", "off")
_U64_MAX = 2**64 - 1
#: Under sync="normal", written but unsynced log is fsynced at least this often.
NORMAL_SYNC_INTERVAL = 0.1
#: Queued bytes that make an appender write them out (keeps memory bounded).
WRITE_BEHIND_BYTES = 1 << 20
#: Preallocation (sync="full"): the zeros written past the end of the
#: segment at a time are as many as it holds already, within these bounds.
PREALLOC_MIN = 64 * 1024
PREALLOC_MAX = 1 << 20


def check_writer_args(sync: object, segment_size: object) -> None:
    """Raise ValueError/TypeError for a bad sync mode or segment size."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
    if not isinstance(segment_size, int) or isinstance(segment_size, bool):
        raise TypeError(f"segment_size must be an int, not {type(segment_size).__name__}")
    if segment_size < 4096:
        raise ValueError(f"segment_size must be an int >= 4096 bytes, not {segment_size}")


class LogWriter:
    """Appends to the log in ``directory`` from its end at ``segments[-1]``.

    Use ``wal.log.WriteAheadLog.open``, which validates the log and cuts a
    torn tail first; this class assumes a valid log.
    """

    def __init__(
        self,
        fs: Any,
        directory: str,
        db_id: bytes,
        segments: list[Segment],
        *,
        segment_size: int = 16 * 2**20,
        sync: str = "full",
        compress_threshold: int = COMPRESS_THRESHOLD,
    ) -> None:
        check_writer_args(sync, segment_size)
        self._fs = fs
        self._dir = directory
        self._db_id = db_id
        self.segment_size = segment_size
        self.sync = sync
        self._compress_threshold = compress_threshold
        self._lock = threading.Lock()
        # _cond's lock; ``with self._lock`` where no wait or notify follows
        # skips Condition.__enter__/__exit__ (Python calls) on every append
        self._cond = threading.Condition(self._lock)
        # callers of flush asleep until an I/O ends: (target, sync, gate);
        # guarded by _cond (see _wait and _wake)
        self._sleepers: list[tuple[int, bool, Any]] = []
        last = segments[-1]
        # guarded by self._cond:
        self._next_lsn = last.end_lsn  # LSN the next append gets
        self._written_lsn = last.end_lsn  # end of what the OS has
        self._durable_lsn = last.end_lsn  # end of what is fsynced (L1)
        self._pending: list[bytes | int] = []  # records; an int is a segment roll at that LSN
        self._lean_rolls: set[int] = set()  # rolls start_segment asked for: lean segments (L8)
        self._pending_bytes = 0
        self._roll_base = last.first_lsn  # first LSN of the segment appends go to
        self._io_busy = False  # a write leader is writing
        self._syncing = False  # a sync leader is fsyncing
        self._poison: PoisonedError | None = None
        self._closed = False
        # guarded by self._seg_lock (the leader rolls while others read):
        self._seg_lock = threading.Lock()
        self._roll_lock = threading.Lock()  # held while the file is switched, and by the sync leader
        self._segments = list(segments)
        self._file = fs.open(last.path)  # used by the leader only
        self._file_first = last.first_lsn
        # written by the write leader only (and by close, once no I/O runs):
        self._file_size: int = self._file.size()  # what the file has: records, then zeros (L7)
        self._preallocate_ahead = sync == "full"
        self._lean = False  # the segment being written was begun by start_segment (L8)
        # statistics (approximate, unguarded increments are fine)
        self.fsyncs = 0
        self.writes = 0
        self._syncer: threading.Thread | None = None
        self._stop = threading.Event()
        if sync == "normal":
            self._syncer = threading.Thread(
                target=_sync_loop, args=(weakref.ref(self), self._stop), name="kvstore-wal-sync", daemon=True
            )
            self._syncer.start()

    # --- state ----------------------------------------------------------

    @property
    def end_lsn(self) -> int:
        """LSN the next record will get (the end of everything appended)."""
        return self._next_lsn

    @property
    def durable_lsn(self) -> int:
        """Everything below this LSN is on stable storage."""
        return self._durable_lsn

    @property
    def poisoned(self) -> PoisonedError | None:
        return self._poison

    def segments(self) -> list[Segment]:
        """The segments, oldest first (the last one's end is the written end)."""
        with self._seg_lock:
            segs = [Segment(s.path, s.first_lsn, s.end_lsn) for s in self._segments]
        for a, b in itertools.pairwise(segs):  # each segment ends where the next begins
            a.end_lsn = b.first_lsn
        segs[-1].end_lsn = self._written_lsn
        return segs

    # --- appending ------------------------------------------------------

    def append(self, rtype: int, txid: int, payload: bytes, prev_lsn: int = NO_LSN) -> int:
        """Queue a record; return its LSN.  Nothing is durable until ``flush``.

        Raises PoisonedError after an I/O error (L4), ClosedError after close,
        ValueError for a payload over ``MAX_PAYLOAD``.
        """
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"log record payload is {len(payload)} bytes, the limit is {MAX_PAYLOAD}")
        if rtype not in KNOWN_TYPES:
            raise ValueError(f"unknown log record type {rtype!r} (expected a wal.format.RecordType)")
        if not 0 <= txid <= _U64_MAX or not 0 <= prev_lsn <= _U64_MAX:
            raise ValueError(f"txid and prev_lsn must be unsigned 64-bit integers, got {txid!r}, {prev_lsn!r}")
        stored, flags, pcrc = prepare_payload(payload, self._compress_threshold)
        with self._lock:
            if self._poison is not None:
                raise self._poison
            if self._closed:
                raise ClosedError("the log is closed")
            lsn = self._next_lsn
            if lsn - self._roll_base >= self.segment_size:
                self._pending.append(lsn)  # the leader rolls here (records never span segments)
                self._roll_base = lsn
            rec = encode_record(lsn, rtype, txid, prev_lsn, self._durable_lsn, stored, flags, pcrc)  # L5
            self._pending.append(rec)
            self._next_lsn = lsn + len(rec)
            self._pending_bytes += len(rec)
            write_behind = self._pending_bytes >= WRITE_BEHIND_BYTES and not self._io_busy
        failpoint("wal.after_append")
        if write_behind:
            self.flush(lsn, sync=False)
        return lsn

    def start_segment(self) -> None:
        """Make the next record start a new segment (if the current one holds
        any), so that a checkpoint beginning there can remove every segment
        before it: a clean close leaves a log of one small segment, which
        the next open reads at once.  The new segment is lean (L8): no
        zeros until it holds ``PREALLOC_MIN`` bytes."""
        with self._cond:
            if self._poison is not None:
                raise self._poison
            if self._closed:
                raise ClosedError("the log is closed")
            if self._next_lsn > self._roll_base:
                self._lean_rolls.add(self._next_lsn)
                self._pending.append(self._next_lsn)  # the leader rolls here
                self._roll_base = self._next_lsn

    def flush(self, lsn: int | None = None, *, sync: bool = True) -> None:
        """Return once the record at ``lsn`` (default: everything appended)
        and all before it are durable (``sync``) or at least written to the OS.

        Group commit, in two stages that overlap: a *write leader* writes
        everything queued; a *sync leader* fsyncs everything written.  While
        one fsync runs, the next records are written and their owners wait
        for the fsync after it, which covers them all.  Callers that need only
        the OS to have their record (sync="off" and "normal" commits) never
        wait for an fsync.  Raises PoisonedError if this or an earlier I/O
        failed (L4).
        """
        with self._lock:
            if lsn is not None and lsn >= self._next_lsn:
                raise ValueError(f"LSN {lsn} has not been appended (the log ends at {self._next_lsn})")
            target = self._next_lsn if lsn is None else lsn + 1
            try:
                while True:
                    if (self._durable_lsn if sync else self._written_lsn) >= target:
                        return
                    if self._poison is not None:
                        raise self._poison
                    if self._written_lsn < target:
                        if self._io_busy:
                            self._wait(target, sync)
                        else:
                            self._lead_write()
                    elif self._syncing:
                        self._wait(target, sync)  # it may cover us; if not, the next one will
                    else:
                        self._lead_sync()
            except BaseException:
                # woken to lead, this caller leaves without leading (the log
                # is poisoned, or an interrupt): pass the wake-up on
                if self._sleepers:
                    self._wake()
                raise

    def sync_written(self) -> None:
        """fsync what the OS already has, without holding up writers (the
        sync="normal" background thread).  Raises PoisonedError if it fails."""
        with self._cond:
            if self._poison is not None:
                raise self._poison
            if self._syncing or self._written_lsn <= self._durable_lsn:
                return
            self._lead_sync()

    def commit_wait(self, lsn: int) -> None:
        """Wait for a commit record at ``lsn`` as the sync mode says:
        ``full`` until it is durable, ``normal`` and ``off`` until the OS has it."""
        self.flush(lsn, sync=self.sync == "full")

    @property
    def preallocated_bytes(self) -> int:
        """Zeros the segment being written has past its last record (L7)."""
        with self._cond:
            return self._file_size - (SEGMENT_HEADER_SIZE + self._written_lsn - self._file_first)

    def _lead_write(self) -> None:
        """Write everything queued, for everybody.  Caller holds self._cond;
        it is released during the I/O and held again on return."""
        items, self._pending = self._pending, []
        self._pending_bytes = 0
        start, end = self._written_lsn, self._next_lsn
        self._io_busy = True
        self._cond.release()
        error: BaseException | None = None
        rolled_to = None
        try:
            rolled_to = self._write_out(items, start)
        except BaseException as e:  # anything that stops the I/O half-way poisons (L4)
            error = e
        finally:
            self._cond.acquire()
            self._io_busy = False
            if error is None:
                self._written_lsn = end
                if rolled_to is not None and rolled_to > self._durable_lsn:
                    self._durable_lsn = rolled_to  # the roll fsynced the segments below it (L2)
            self._finish_io(error, "I/O")

    def _lead_sync(self) -> None:
        """Sync everything written, for everybody: an ``fdatasync`` of the
        segment being written (the earlier ones were fsynced when they were
        rolled, L2).  Caller holds self._cond; it is released during the
        sync and held again on return."""
        target = self._written_lsn
        self._syncing = True
        self._cond.release()
        error: BaseException | None = None
        try:
            with self._roll_lock:  # the file is not switched (and closed) under us
                # Bytes below target are in this file, or in earlier segments,
                # which were fsynced when they were rolled (L2).
                f = self._file
                failpoint("wal.before_fsync")
                self.fsyncs += 1
                if canary.skip_wal_fsync:
                    pass  # the bug: acknowledged without being durable
                elif canary.retry_fsync:
                    try:
                        f.fdatasync()
                    except OSError:
                        f.fdatasync()  # the bug: Linux reports success, the data is gone
                else:
                    path = os.path.join(self._dir, segment_name(self._file_first))
                    fsync_failure.fsync(self._fs, f, path, datasync=True)  # L1
                failpoint("wal.after_fsync")
        except BaseException as e:  # a failed fsync is never retried (L4)
            error = e
        finally:
            self._cond.acquire()
            self._syncing = False
            if error is None and target > self._durable_lsn:
                self._durable_lsn = target
            self._finish_io(error, "fsync")

    def _wait(self, target: int = 0, sync: bool = False) -> None:
        """Sleep until an I/O's end lets this caller go on: its record at
        ``target`` written (or durable, with ``sync``), or a stage it can
        lead idle (``_wake``); ``target`` 0: at the next I/O's end, whatever
        it did.  Caller holds ``_cond``, which is released while asleep.

        Each sleeper has a gate of its own, so an I/O's end wakes only the
        callers it lets go on, and one leader per idle stage: with
        ``notify_all`` on one condition every committer woke at every I/O,
        and eight committing threads spent most of their time holding the
        GIL handing out wake-ups."""
        gate = threading.Lock()
        gate.acquire()
        entry = (target, sync, gate)
        woke = False
        try:
            self._sleepers.append(entry)
            self._lock.release()
            try:
                gate.acquire()
                woke = True
            finally:
                self._lock.acquire()
        finally:
            if not woke and entry in self._sleepers:  # interrupted: no gate to open for it
                self._sleepers.remove(entry)

    def _wake(self) -> None:
        """Open the gates of the sleepers that may go on: those whose record
        is written (or durable, for ``sync``), every one once the log is
        poisoned (they raise), those with no target, and the first that
        needs each idle stage: a write when none runs, an fsync of what is
        written when none runs -- it leads it.  Caller holds ``_cond``."""
        written, durable = self._written_lsn, self._durable_lsn
        go_on = self._poison is not None
        lead_write, lead_sync = not self._io_busy, not self._syncing
        keep = []
        for entry in self._sleepers:
            target, sync, gate = entry
            if go_on or not target or (durable if sync else written) >= target:
                gate.release()
            elif written < target:
                if lead_write:
                    gate.release()
                    lead_write = False
                else:
                    keep.append(entry)
            elif lead_sync:
                gate.release()
                lead_sync = False
            else:
                keep.append(entry)
        self._sleepers = keep

    def _finish_io(self, error: BaseException | None, what: str) -> None:
        """Wake the waiters; after a failure, poison and raise.  Caller holds
        self._cond."""
        if error is not None and self._poison is None:
            self._poison = PoisonedError(f"write-ahead log {what} failed, the log is read-only until reopened: {error}", error)
            self._poison.__cause__ = error
        if self._sleepers:
            self._wake()
        if error is not None:
            if not isinstance(error, OSError):
                raise error  # e.g. KeyboardInterrupt: the log is poisoned all the same
            assert self._poison is not None  # set above, or by an earlier failure
            raise self._poison from error

    def _write_out(self, items: list[bytes | int], lsn: int) -> int | None:
        """Write queued items from ``lsn`` on, rolling segments where they
        say.  No lock held (only one write leader at a time).  Returns the LSN
        up to which a roll made the log durable (L2), if any."""
        rolled_to = None
        chunk: list[bytes] = []
        for item in items:
            if isinstance(item, int):  # a roll marker (items are bytes or int, never bool)
                lsn = self._write_chunk(chunk, lsn)
                chunk = []
                self._mark_written(lsn)
                self._roll(item)
                rolled_to = item
            else:
                chunk.append(item)
        self._write_chunk(chunk, lsn)
        return rolled_to

    def _mark_written(self, lsn: int) -> None:
        """The OS has the log below ``lsn``: release the callers that need no
        more (sync="off" and "normal" commits) before an fsync, which can take
        long when much was written unsynced."""
        with self._cond:
            if lsn > self._written_lsn:
                self._written_lsn = lsn
                if self._sleepers:
                    self._wake()

    def _write_chunk(self, chunk: list[bytes], lsn: int) -> int:
        """Write ``chunk`` at ``lsn`` into the segment being written, over
        preallocated zeros where it can (L7); return the LSN after it."""
        if not chunk:
            return lsn
        data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
        offset = SEGMENT_HEADER_SIZE + lsn - self._file_first
        end = offset + len(data)
        if end > self._file_size and self._preallocate_ahead:
            self._preallocate(end)
        self.writes += 1
        self._file.pwrite(offset, data)
        failpoint("wal.after_write")
        if end > self._file_size:
            self._file_size = end
        return lsn + len(data)

    def _preallocate(self, end: int) -> None:
        """Extend the segment being written with zeros to past file offset
        ``end`` and fsync it (L7), before a write that would end there.

        The step is as many bytes as the segment holds, within
        ``PREALLOC_MIN`` .. ``PREALLOC_MAX``, and stops at ``segment_size``.
        Nothing for a write that reaches past ``segment_size`` (the segment
        rolls after it) or that is larger than a step (zeros under it would
        double its I/O, and such a write is rare), nor in a lean segment (L8)
        below ``PREALLOC_MIN``: such a write appends.  Caller: the write
        leader."""
        size = self._file_size
        limit = SEGMENT_HEADER_SIZE + self.segment_size
        step = min(PREALLOC_MAX, max(PREALLOC_MIN, size - SEGMENT_HEADER_SIZE))
        if end > limit or end - size > step:
            return
        if self._lean and end - SEGMENT_HEADER_SIZE < PREALLOC_MIN:
            return  # L8
        target = min(limit, end + step)
        self._file.pwrite(size, bytes(target - size))  # past the end of the file only: no record is overwritten
        self._file_size = target
        failpoint("wal.before_preallocate_fsync")
        self.fsyncs += 1
        fsync_failure.fsync(self._fs, self._file, os.path.join(self._dir, segment_name(self._file_first)))  # L7

    def _roll(self, first_lsn: int) -> None:
        """Start a new segment at ``first_lsn`` (L2, L3)."""
        failpoint("wal.before_roll_fsync")
        old_path = os.path.join(self._dir, segment_name(self._file_first))
        used = SEGMENT_HEADER_SIZE + first_lsn - self._file_first
        if self._file_size > used:
            self._file.truncate(used)  # L2: only the last segment may end in zeros
            self._file_size = used
        self.fsyncs += 1
        fsync_failure.fsync(self._fs, self._file, old_path)  # L2
        path = os.path.join(self._dir, segment_name(first_lsn))
        new = self._fs.create(path)
        try:
            new.pwrite(0, encode_segment_header(self._db_id, first_lsn))
            failpoint("wal.before_segment_header_fsync")
            self.fsyncs += 1
            fsync_failure.fsync(self._fs, new, path)  # L3
        except BaseException:
            new.close()
            raise
        with self._cond:
            lean = first_lsn in self._lean_rolls
            self._lean_rolls.discard(first_lsn)
        with self._roll_lock:
            old, self._file, self._file_first = self._file, new, first_lsn
            self._file_size = SEGMENT_HEADER_SIZE
            self._lean = lean
            old.close()
        with self._seg_lock:
            self._segments[-1].end_lsn = first_lsn
            self._segments.append(Segment(path, first_lsn, first_lsn))

    # --- reading ----------------------------------------------------------

    def read(self, lsn: int) -> Record:
        """The record at ``lsn``.  Raises CorruptionError if none is there,
        ValueError if ``lsn`` is beyond the end of the log."""
        if lsn >= self._next_lsn:
            raise ValueError(f"LSN {lsn} is beyond the end of the log ({self._next_lsn})")
        if lsn >= self._written_lsn:
            self.flush(lsn, sync=False)
        for seg in reversed(self.segments()):
            if seg.first_lsn <= lsn < seg.end_lsn:
                break
        else:
            raise ValueError(f"LSN {lsn} is not in the log (it holds {self.segments()[0].first_lsn}..{self._written_lsn})")
        f = self._fs.open(seg.path)
        try:
            offset = SEGMENT_HEADER_SIZE + lsn - seg.first_lsn
            head = f.pread(offset, RECORD_HEADER_SIZE)
            length = RECORD_HEADER.unpack_from(head, 4)[3] if len(head) == RECORD_HEADER_SIZE else 0
            buf = f.pread(offset, RECORD_HEADER_SIZE + min(length, MAX_PAYLOAD))
        finally:
            f.close()
        rec = decode_record(buf, 0, lsn)
        if rec is None:
            from wal.errors import CorruptionError

            raise CorruptionError(f"{seg.path} at LSN {lsn}", "no valid record at this LSN")
        return rec

    def records(self, from_lsn: int | None = None) -> Iterator[Record]:
        """Records from ``from_lsn`` (default: the oldest) to the written end.

        Raises CorruptionError on a record that does not decode.
        """
        self.flush(sync=False)
        segs = self.segments()
        if from_lsn is None:
            from_lsn = segs[0].first_lsn
        for seg in segs:
            if seg.end_lsn <= from_lsn:
                continue
            f = self._fs.open(seg.path)
            try:
                data = f.pread(0, SEGMENT_HEADER_SIZE + seg.end_lsn - seg.first_lsn)
            finally:
                f.close()
            yield from read_segment_records(data, seg.path, seg.first_lsn, max(from_lsn, seg.first_lsn), seg.end_lsn)

    def transaction_records(self, last_lsn: int) -> Iterator[Record]:
        """One transaction's records, newest first, by following prev-LSN."""
        lsn = last_lsn
        while lsn != NO_LSN:
            rec = self.read(lsn)
            yield rec
            lsn = rec.prev_lsn

    # --- truncation and close -------------------------------------------

    def truncate_before(self, lsn: int) -> int:
        """Remove the segments that lie wholly below ``lsn`` (L6); return the
        number of bytes of log removed.  The segment being written stays.

        A failure poisons the log (L4): a lost removal followed by a durable
        later one would leave a gap.
        """
        if self._poison is not None:
            raise self._poison
        removed = 0
        while True:
            with self._seg_lock:
                if len(self._segments) < 2 or self._segments[1].first_lsn > lsn:
                    return removed
                victim, nxt = self._segments[0], self._segments[1]
            failpoint("wal.before_segment_remove")
            try:
                self._fs.remove(victim.path)  # the seam fsyncs the directory: L6
            except OSError as e:
                with self._cond:
                    self._poison = PoisonedError(f"removing {victim.path} failed, the log is read-only until reopened: {e}", e)
                    if self._sleepers:
                        self._wake()  # every sleeper raises it
                raise self._poison from e
            with self._seg_lock:
                self._segments.pop(0)
            removed += nxt.first_lsn - victim.first_lsn

    def close(self, flush: bool = True) -> None:
        """Flush everything (if not poisoned and ``flush``) and close.
        ``flush=False`` drops what is queued and not yet written (a refused
        open must change nothing on disk).  Writes nothing else: preallocated
        zeros stay (L8 keeps a store's clean close free of them).
        Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        try:
            if self._poison is None and flush:
                self.flush()
        finally:
            with self._cond:
                self._closed = True
                while self._io_busy or self._syncing:
                    self._wait()
            self._file.close()


def _sync_loop(ref: weakref.ref[LogWriter], stop: threading.Event) -> None:
    """sync="normal": fsync what the OS has at least every 100 ms.  Holds the
    writer weakly, so a log dropped without close() lets the thread end."""
    while not stop.wait(NORMAL_SYNC_INTERVAL):
        self = ref()
        if self is None or self._poison is not None or self._closed:
            return
        if self._written_lsn > self._durable_lsn:
            try:
                self.sync_written()
            except Exception:
                return  # poisoned: the next append reports it
        del self
