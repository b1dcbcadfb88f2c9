"""Fuzzy checkpoints: a new durable image without stopping writers.

Protocol (``Checkpointer.checkpoint``)::

    latch: CHECKPOINT_BEGIN at LSN B, holding the transaction table;
           note the pages dirty now
    flush the log to its end                                   (no latch)
    repeat, in batches of 64 under short latch holds:
           write each noted page that is still dirty and whose page LSN
           is durable; flush the log for the rest              (no latch)
    latch: phase 1 of the flip -- the page-table image, slots reserved
    fsync, meta naming B as the checkpoint LSN, fsync          (no latch)
    latch: phase 3 of the flip -- free what only the old image used,
           and cut a free tail off the page file (durable with the next fsync)
    delete WAL segments wholly below B; CHECKPOINT_END
    compact, if that gives back enough (below)
    close's checkpoint: fsync the page file if a cut is not durable yet

Why it is correct: restart redoes from B, applying a record only where page
LSN < record LSN.  Every page is in the image as of some moment after B, or
(if dirtied after B and not noted) as of an earlier flip, so replaying from
B repeats exactly what the image misses.  Undo needs no log before B: it lives
in the rollback segment, which is in the image.  So the log below B can go.

A checkpoint that fails before its meta is durable leaves the previous image
and the log as they were; the error is reported (``stats()``, the log) and
the store keeps working -- unless an fsync failed, which poisons it (SPEC
guarantee 5).

Triggers: every ``interval`` seconds, and whenever ``wal_bytes`` of log have
been written since the last checkpoint (a background thread polls both), by
``db.checkpoint()`` and at ``close()``.

Compaction (``compact``) gives the page file's free tail back, as SQLite's
incremental vacuum does: shadow paging leaves the old copies of rewritten
pages as free slots, anywhere in the file, and the file only shrinks by a
free tail.  So::

    latch: plan -- the smallest end E the pages fit below (``PageFile.compaction_plan``)
    repeat, in batches of 64 under short latch holds:
           copy each page living at E or beyond into the lowest free slot
    latch: phase 1 of a flip (page-table pages living at E or beyond rewritten too)
    flush the log; fsync, meta naming the durable image's checkpoint LSN B, fsync
    latch: phase 3 -- the old slots are free now (P4), the free tail is cut (P5)
    fsync the page file: the cut is durable

It logs nothing: no page changes, only where pages live.  The meta it writes
names the same B as the checkpoint before it, and is correct for the same
reason a checkpoint's is -- every page in the image is as of some moment
after B -- so restart from it is the same restart.  A crash anywhere leaves
the previous image or the new one, each whole (P2-P5 of ``pages.pagefile``).

When: after every checkpoint, once cutting would give back at least
``CLOSE_MIN_GAIN`` of the file's slots for the last checkpoint of a session
(the one ``close()`` runs: with the latch held, after ``stop()``), and
``AUTO_MIN_GAIN`` for any other (so a store that shrank -- deletes, purged
undo pages -- gives the space back while it runs, but a store whose pages are
rewritten at every checkpoint does not move them all twice); never for less
than ``MIN_GAIN_SLOTS``.  ``compact()`` runs it on demand.  It is an
optimisation: an I/O error in it is logged and counted (``compaction_errors``)
and the checkpoint still returns -- except a failed fsync, which poisons the
store as always, and damage found in a page it would move, which raises
CorruptionError (nothing durable has changed then).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from recovery.restart import encode_checkpoint
from wal.errors import CorruptionError, PoisonedError
from wal.failpoints import failpoint
from wal.format import RecordType

log = logging.getLogger("kvstore")

BATCH = 64
POLL_SECONDS = 0.05
STALL_SECONDS = 10.0  # a write stall never lasts longer than this

#: Compact after the last checkpoint of a session once at least this share of
#: the page file's slots would go ...
CLOSE_MIN_GAIN = 1 / 16
#: ... and after any other checkpoint once at least this share would.
AUTO_MIN_GAIN = 1 / 2
#: Never compact for fewer slots than this.
MIN_GAIN_SLOTS = 16

#: table_fn() -> ({txid: (last undo, last LSN, gid or None)}, next txid)
TableFn = Callable[[], tuple[dict[int, tuple[int, int, bytes | None]], int]]
#: extra_fn() -> bytes for the meta's application area
ExtraFn = Callable[[], bytes]


class Checkpointer:
    """Runs checkpoints of one database, on demand and in the background."""

    def __init__(
        self,
        latch: Any,
        store: Any,
        wal: Any,
        table_fn: TableFn,
        extra_fn: ExtraFn,
        *,
        interval: float = 60.0,
        wal_bytes: int = 64 * 2**20,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._latch = latch
        self._store = store
        self._wal = wal
        self._table_fn = table_fn
        self._extra_fn = extra_fn
        self.interval = interval
        self.wal_bytes = wal_bytes
        self._on_error = on_error
        self._mutex = threading.Lock()  # one checkpoint at a time
        self._done = threading.Condition()  # notified when a checkpoint ends
        self.running = False
        self.last_lsn = store.pagefile.meta.checkpoint_lsn
        self.last_end: int | None = None  # the log's end right after the last checkpoint
        self.last_time = time.monotonic()
        self.last_wall_time = time.time()
        self.count = 0
        self.stalls = 0  # commits that waited for a checkpoint
        self.errors = 0
        self.last_error: str | None = None
        self.compactions = 0
        self.compaction_errors = 0
        self.slots_given_back = 0
        self.last_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # --- the checkpoint ------------------------------------------------------

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Hold the mutex with ``running`` set; at the end, whatever
        happened, clear it and wake the commits that stalled on the log."""
        with self._mutex:
            self.running = True
            try:
                yield
            finally:
                self.running = False
                with self._done:
                    self._done.notify_all()

    def checkpoint(self, latch_held: bool = False) -> dict[str, Any]:
        """Run a checkpoint now; return SPEC's fields (lsn, pages_written,
        seconds, wal_bytes_truncated), then compact if that would give back
        enough (module docstring), adding ``pages_relocated`` and
        ``slots_truncated``.  ``latch_held``: the caller holds the engine
        latch (open and close), so nothing runs concurrently."""
        with self._running():
            try:
                latch = contextlib.nullcontext() if latch_held else self._latch
                result = self._run(latch)
                with self._done:
                    self._done.notify_all()  # the log is cut: stalled commits may go on
                final = latch_held and self._stop.is_set()  # close's checkpoint
                result.update(self._compact_quietly(latch, CLOSE_MIN_GAIN if final else AUTO_MIN_GAIN))
                if final:
                    self._store.pagefile.sync_cut()  # no later flip will make the file's last cut durable
                return result
            except BaseException as e:
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("kvstore: checkpoint failed, the previous image and the log are intact: %s", e)
                if self._on_error is not None:
                    self._on_error(e)
                raise

    def _run(self, latch: Any) -> dict[str, Any]:
        store, wal = self._store, self._wal
        pool, pagefile = store.pool, store.pagefile
        started = time.monotonic()
        with latch:
            table, next_txid = self._table_fn()
            begin = wal.append(RecordType.CHECKPOINT_BEGIN, 0, encode_checkpoint(table, next_txid))
            pending = pool.dirty_lids()
        wal.flush()
        written = 0
        shared = latch is self._latch  # not restart's, whose caller holds the latch throughout
        at = 0
        while at < len(pending):
            with latch:
                batch = pending[at : at + BATCH]
                at += BATCH
                n, later = pool.write_some(batch, wal.durable_lsn)
            if shared:
                # Hand the latch over: Python's locks are not fair, and without a
                # pause this thread takes the latch back before a waiting committer
                # is even scheduled -- commits then starve for the whole loop.
                time.sleep(0)
            written += n
            if later:
                wal.flush()
                pending = later + pending[at:]
                at = 0
        failpoint("recovery.checkpoint_before_flip")
        with latch:
            state = pagefile.begin_flip()
            app = store.app_area(self._extra_fn())
        try:
            # The page table and roots just taken may reflect records appended
            # since the log was last flushed (a purge or a merge freeing pages):
            # the meta that makes them durable must follow those records (P1
            # for the page table).
            wal.flush()
            pagefile.flip_io(state, begin, app)
        except BaseException:
            with latch:
                pagefile.abort_flip(state)
            raise
        with latch:
            pagefile.complete_flip(state)
        failpoint("recovery.checkpoint_before_truncate")
        truncated = wal.truncate_before(begin)
        wal.append(RecordType.CHECKPOINT_END, 0, struct.pack("<Q", begin))
        self.last_end = wal.end_lsn
        seconds = time.monotonic() - started
        self.last_lsn = begin
        self.last_time = time.monotonic()
        self.last_wall_time = time.time()
        self.last_seconds = seconds
        self.count += 1
        log.debug("kvstore: checkpoint at LSN %d: %d pages, %.3f s, %d WAL bytes removed", begin, written, seconds, truncated)
        return {"lsn": begin, "pages_written": written, "seconds": seconds, "wal_bytes_truncated": truncated}

    # --- compaction ----------------------------------------------------------------

    def compact(self, latch_held: bool = False, min_gain: float = CLOSE_MIN_GAIN) -> dict[str, int]:
        """Give the page file's free tail back now, if that would cut at
        least ``min_gain`` of its slots (and ``MIN_GAIN_SLOTS``); return
        ``pages_relocated`` and ``slots_truncated`` (both 0 when it did
        nothing, and then it wrote nothing).  Errors as in the module
        docstring.  ``latch_held`` as for ``checkpoint``."""
        with self._running():
            try:
                return self._compact_quietly(contextlib.nullcontext() if latch_held else self._latch, min_gain)
            except BaseException as e:
                if self._on_error is not None:
                    self._on_error(e)
                raise

    def _compact_quietly(self, latch: Any, min_gain: float) -> dict[str, int]:
        """``_compact``, with an I/O error that poisons nothing logged and
        counted instead of raised: the store is as it was, or compacted."""
        try:
            return self._compact(latch, min_gain)
        except (PoisonedError, CorruptionError):
            self.compaction_errors += 1
            raise
        except OSError as e:
            self.compaction_errors += 1
            log.warning("kvstore: compaction of %s failed, the page file stays as it was: %s", self._store.pagefile.path, e)
            return {"pages_relocated": 0, "slots_truncated": 0}

    def _compact(self, latch: Any, min_gain: float) -> dict[str, int]:
        """The protocol of the module docstring.  Caller holds ``_mutex``."""
        store, wal = self._store, self._wal
        pagefile = store.pagefile
        with latch:
            nslots = pagefile.nslots
            wanted = max(MIN_GAIN_SLOTS, nslots * min_gain)
            if pagefile.reclaimable_at_most() < wanted:  # O(1): the usual case
                return {"pages_relocated": 0, "slots_truncated": 0}
            end, lids = pagefile.compaction_plan()
        if nslots - end < wanted:
            return {"pages_relocated": 0, "slots_truncated": 0}
        shared = latch is self._latch
        moved = 0
        for at in range(0, len(lids), BATCH):
            with latch:
                for lid in lids[at : at + BATCH]:
                    moved += pagefile.relocate(lid, end)  # skips a page a writer moved meanwhile
            if shared:
                time.sleep(0)  # hand the latch over (see _run)
        failpoint("recovery.compact_before_flip")
        with latch:
            pagefile.mark_tail_page_table(end)
            state = pagefile.begin_flip()
            app = store.app_area(self._extra_fn())
        try:
            wal.flush()  # as in _run: the table may reflect records not yet durable
            pagefile.flip_io(state, pagefile.meta.checkpoint_lsn, app)
        except BaseException:
            with latch:
                pagefile.abort_flip(state)
            raise
        with latch:
            cut = pagefile.complete_flip(state)["slots_truncated"]
        failpoint("recovery.compact_before_sync")
        pagefile.sync_cut()  # the cut is durable (a failure poisons, S3)
        self.compactions += 1
        self.slots_given_back += cut
        log.debug("kvstore: compacted %s: %d pages moved, %d slots cut", pagefile.path, moved, cut)
        return {"pages_relocated": moved, "slots_truncated": cut}

    # --- the background trigger ------------------------------------------------

    def idle_since_last(self) -> bool:
        """Nothing was logged since the last checkpoint (so another would
        write nothing new)."""
        return self.last_end is not None and self._wal.end_lsn == self.last_end

    def due(self) -> bool:
        wal = self._wal
        if wal.end_lsn - self.last_lsn >= self.wal_bytes:
            return True
        # by time, only if something was logged since the last checkpoint ended
        return not self.idle_since_last() and time.monotonic() - self.last_time >= self.interval

    def poke(self) -> None:
        """Called on the commit path, without the latch: wake the thread at
        once when the log has grown past ``wal_bytes``; past 1.5 times that,
        while a checkpoint runs, wait for it (a write stall, as RocksDB does:
        the log stays bounded however slow a checkpoint is).  Cheap when
        nothing is due: two attribute reads."""
        grown = self._wal.end_lsn - self.last_lsn
        if grown < self.wal_bytes:
            return
        self._wake.set()
        stall_at = self.wal_bytes * 3 // 2  # plus a segment below it (a quarter) stays under 2x
        if grown < stall_at or self._thread is None:
            return
        deadline = time.monotonic() + STALL_SECONDS
        with self._done:
            while self.running and self._wal.end_lsn - self.last_lsn >= stall_at:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._done.wait(left)
        self.stalls += 1

    def start(self) -> None:
        # The thread holds only a weak reference, so a database dropped
        # without close() (a test's simulated crash) does not keep it alive.
        self._thread = threading.Thread(
            target=_loop, args=(weakref.ref(self), self._stop, self._wake), name="kvstore-checkpointer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None



def _loop(ref: weakref.ref[Checkpointer], stop: threading.Event, wake: threading.Event) -> None:
    while True:
        wake.wait(POLL_SECONDS)
        wake.clear()
        if stop.is_set():
            return
        self = ref()
        if self is None:
            return
        try:
            if self.due():
                self.checkpoint()
        except PoisonedError:
            return  # the store is read-only until reopened
        except Exception:  # reported by checkpoint(); try again later
            self.last_time = time.monotonic()
        del self
