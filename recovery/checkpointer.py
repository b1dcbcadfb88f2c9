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
    latch: phase 3 of the flip -- free what only the old image used
    delete WAL segments wholly below B; CHECKPOINT_END

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
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from recovery.restart import encode_checkpoint
from wal.errors import PoisonedError
from wal.failpoints import failpoint
from wal.format import RecordType

log = logging.getLogger("kvstore")

BATCH = 64
POLL_SECONDS = 0.05
STALL_SECONDS = 10.0  # a write stall never lasts longer than this

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
        self.last_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # --- the checkpoint ------------------------------------------------------

    def checkpoint(self, latch_held: bool = False) -> dict[str, Any]:
        """Run a checkpoint now; return SPEC's fields (lsn, pages_written,
        seconds, wal_bytes_truncated).  ``latch_held``: the caller holds the
        engine latch (open and close), so nothing runs concurrently."""
        with self._mutex:
            self.running = True
            try:
                return self._run(contextlib.nullcontext() if latch_held else self._latch)
            except BaseException as e:
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("kvstore: checkpoint failed, the previous image and the log are intact: %s", e)
                if self._on_error is not None:
                    self._on_error(e)
                raise
            finally:
                self.running = False
                with self._done:
                    self._done.notify_all()

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
