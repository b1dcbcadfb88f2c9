"""The store: opening a database directory, transactions, MVCC, commit.

State machine of a Database (the method behind each move)::

    opening --open()--> recovering --restart()--> ready --close()--> closed
                                                   |
                                                   +--fsync/log failure--> poisoned
                                                   |   (reads work, writes raise
                                                   |    until reopened)
                                                   +--os.fork() (in the child)--> closed

Concurrency: one engine latch (``self._latch``) guards the page layer, the
transaction table and the SSI state for the short time an operation touches
them.  Nobody holds it across an fsync or a wait: ``commit`` appends its
commit record under the latch, releases it, waits for group commit, and takes
it again to publish the commit.  Conflicts are detected, never waited on.

Directory layout: ``pages.db`` (the page file), ``wal-*.log`` (the log),
``LOCK`` (held with an OS lock while open).
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
import time
import uuid
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from kvstore.mvcc import Snapshot, visible_version
from kvstore.ssi import SsiManager
from kvstore.transaction import (
    ABORTED,
    ACTIVE,
    COMMITTED,
    COMMITTING,
    PREPARED,
    Transaction,
    check_key,
)
from pages import redo
from pages.fs import FileSystem, OsFileSystem
from pages.node import CELL_OVERHEAD, FLAG_DELETED, Cell, Op, OverflowRef, PageOp, Value, cell_size, encode_cell, pack_ops
from pages.pagefile import PAGE_FILE_NAME, TMP_SUFFIX, PageFile
from pages.rollback_segment import WAS_DELETED, WROTE_VALUE, RollbackSegment, UndoPage, encode_undo
from pages.store import PageStore
from recovery.undo import clr_payload, rollback_chain
from wal import canary, fsync_failure
from wal.errors import ClosedError, ConflictError, CorruptionError, DatabaseLockedError, PoisonedError, TransactionError
from wal.format import NO_LSN, RecordType, parse_segment_name
from wal.log import WriteAheadLog

if TYPE_CHECKING:
    from pages.btree import BTree
    from recovery.checkpointer import Checkpointer

log = logging.getLogger("kvstore")

#: the wait-line mark of a db.run transaction that is not in a line
_IN_RUN = object()

LOCK_FILE_NAME = "LOCK"
SYNC_MODES = ("full", "normal", "off")
ISOLATION_LEVELS = ("snapshot", "serializable")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_EXTRA = struct.Struct("<QQ")  # meta application area: next txid, commits so far

#: Open databases of this process, marked unusable in a forked child.
_open_databases: weakref.WeakSet[Database] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for db in list(_open_databases):
        db._forked = True
        db._closed = True
        if db._file_lock is not None:
            # Drop the inherited descriptor without unlocking (the lock is the
            # parent's), so the child can open the path once the parent closed.
            db._file_lock.forget_in_child()
            db._file_lock = None
    OsFileSystem.forget_locks_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_database_file(name: str) -> bool:
    if fsync_failure.is_marker_or_rewrite(name):
        name = name.rsplit(".", 1)[0]
    return name in (PAGE_FILE_NAME, PAGE_FILE_NAME + TMP_SUFFIX, LOCK_FILE_NAME) or parse_segment_name(name) is not None


def open(  # noqa: A001 - the contract's name
    path: str | os.PathLike[str],
    *,
    create: bool = True,
    sync: str = "full",
    page_size: int = 4096,
    cache_size: int = 64 * 2**20,
    isolation: str = "snapshot",
    checkpoint_interval: float = 60.0,
    checkpoint_wal_bytes: int = 64 * 2**20,
    _fs: FileSystem | None = None,
) -> Database:
    """Open (or create) the database in directory ``path``.

    Raises FileNotFoundError if ``path`` is missing and ``create`` is false;
    ValueError if it is a non-empty directory that is not a database (nothing
    is written) or an argument is out of range; TypeError for a wrong type;
    DatabaseLockedError if the database is open elsewhere; CorruptionError if
    it is damaged.
    """
    return Database(
        os.fspath(path),
        create=create,
        sync=sync,
        page_size=page_size,
        cache_size=cache_size,
        isolation=isolation,
        checkpoint_interval=checkpoint_interval,
        checkpoint_wal_bytes=checkpoint_wal_bytes,
        fs=_fs,
    )


def _check_args(sync: object, page_size: object, cache_size: object, isolation: object, interval: object, wal_bytes: object) -> None:
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of 'full', 'normal', 'off', not {sync!r}")
    if isolation not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be 'snapshot' or 'serializable', not {isolation!r}")
    from pages.format import check_page_size

    if not isinstance(page_size, int) or isinstance(page_size, bool):
        raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
    check_page_size(page_size)
    if not isinstance(cache_size, int) or isinstance(cache_size, bool):
        raise TypeError(f"cache_size must be an int, not {type(cache_size).__name__}")
    if cache_size < 0:
        raise ValueError(f"cache_size must be >= 0 bytes, not {cache_size}")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool):
        raise TypeError(f"checkpoint_interval must be a number of seconds, not {type(interval).__name__}")
    if not interval > 0:
        raise ValueError(f"checkpoint_interval must be > 0 seconds, not {interval}")
    if not isinstance(wal_bytes, int) or isinstance(wal_bytes, bool):
        raise TypeError(f"checkpoint_wal_bytes must be an int, not {type(wal_bytes).__name__}")
    if wal_bytes < 4096:
        raise ValueError(f"checkpoint_wal_bytes must be >= 4096, not {wal_bytes}")


class Database:
    """An open database.  Use ``kvstore.open``."""

    def __init__(
        self,
        path: str,
        *,
        create: bool,
        sync: str,
        page_size: int,
        cache_size: int,
        isolation: str,
        checkpoint_interval: float,
        checkpoint_wal_bytes: int,
        fs: FileSystem | None,
    ) -> None:
        _check_args(sync, page_size, cache_size, isolation, checkpoint_interval, checkpoint_wal_bytes)
        self._closed = True  # until open succeeds
        self._forked = False
        self.path = path
        self.sync = sync
        self.isolation = isolation
        self.checkpoint_interval = float(checkpoint_interval)
        self.checkpoint_wal_bytes = checkpoint_wal_bytes
        self._fs = fs if fs is not None else OsFileSystem()
        self._latch = threading.Lock()
        # notified (under the latch) whenever a writing transaction finishes
        self._writer_done = threading.Condition(self._latch)
        # db.run calls waiting for a key they lost to an unfinished writer, in
        # arrival order (guarded by the latch)
        self._lines: dict[bytes, list[object]] = {}
        self._file_lock: Any = None
        self._wal: WriteAheadLog | None = None
        self._store: PageStore | None = None
        # transaction state, guarded by self._latch
        self._next_txid = 1
        self._commit_seq = 0
        self._writers: dict[int, Transaction] = {}  # unfinished transactions with writes (and prepared)
        self._live: dict[Transaction, Snapshot] = {}  # every unfinished transaction
        self._prepared: dict[bytes, Transaction] = {}
        self._ssi = SsiManager()
        self._stats = {"commits": 0, "aborts": 0, "conflicts": 0, "purged_undo_pages": 0, "purged_keys": 0}
        self._recovery: dict[str, Any] = {"recovery_seconds": 0.0}
        self._commits_since_purge = 0
        self._poison: BaseException | None = None
        self._checkpointer: Checkpointer  # set by _open (_make_checkpointer) before the database is returned
        self._damaged = False  # a CorruptionError was raised while open
        self._end_at_open = 0
        self._open(create, page_size, cache_size)
        self._tree: BTree = self._opened_store().tree  # fixed once open (Transaction.get's hot path)
        self._closed = False
        _open_databases.add(self)
        self._checkpointer.start()

    # --- opening -----------------------------------------------------------------

    def _open(self, create: bool, page_size: int, cache_size: int) -> None:
        fs, path = self._fs, self.path
        if not fs.exists(path):
            if not create:
                raise FileNotFoundError(f"no database at {path!r} (and create=False)")
            self._makedirs(path)
        elif not fs.is_dir(path):
            raise ValueError(f"{path!r} is not a directory, so it cannot hold a database")
        names = fs.listdir(path)
        foreign = [n for n in names if not _is_database_file(n)]
        if foreign:
            raise ValueError(f"{path!r} is not empty and is not a kvstore database (it holds {foreign[:3]})")
        if PAGE_FILE_NAME not in names:
            if any(parse_segment_name(n) is not None for n in names):
                raise ValueError(f"{path!r} holds log segments but no page file: it is not a kvstore database")
            if not create:
                raise FileNotFoundError(f"no database at {path!r} (and create=False)")
        elif not self._looks_like_page_file(os.path.join(path, PAGE_FILE_NAME)):
            if any(parse_segment_name(n) is not None for n in names):  # a database whose metas are both damaged
                raise CorruptionError(
                    os.path.join(path, PAGE_FILE_NAME), "neither meta page carries the kvstore magic, though the directory holds log segments"
                )
            raise ValueError(f"{path!r} holds a {PAGE_FILE_NAME} that is not a kvstore page file")
        try:
            self._file_lock = fs.lock(os.path.join(path, LOCK_FILE_NAME))
        except BlockingIOError:
            raise DatabaseLockedError(f"the database at {path!r} is already open (in this or another process)") from None
        try:
            started = time.monotonic()
            page_path = os.path.join(path, PAGE_FILE_NAME)
            if fs.exists(page_path):
                pagefile = PageFile.open(fs, page_path)
                try:
                    self._wal = WriteAheadLog.open(
                        fs, path, pagefile.db_id, durable_lsn=pagefile.meta.checkpoint_lsn, sync=self.sync, segment_size=self._segment_size()
                    )
                except CorruptionError as e:
                    pagefile.close()
                    if pagefile.meta_damage:  # the log does not fit the older meta: the newer one is damaged
                        raise CorruptionError(
                            page_path, f"a meta page is damaged ({pagefile.meta_damage}); the older meta's log does not fit it: {e}"
                        ) from e
                    if e.where == path:  # the log as a whole does not fit the meta (not one damaged segment)
                        raise CorruptionError(
                            page_path,
                            f"its meta page (checkpoint LSN {pagefile.meta.checkpoint_lsn}) does not fit the log, "
                            f"a stale page file or a lost segment: {e}",
                        ) from e
                    raise
                self._store = PageStore(pagefile, self._wal, cache_size, None)
                if PageStore.roots_of(pagefile.meta.app) == (0, 0):
                    self._initialise()  # a creation that a crash interrupted
                else:
                    self._store = PageStore(pagefile, self._wal, cache_size, PageStore.roots_of(pagefile.meta.app))
                    self._next_txid, self._commit_seq = _EXTRA.unpack_from(self._store.app_extra)
                    self._next_txid = max(self._next_txid, 1)
                    self._make_checkpointer()
                    self._restart()
            else:
                # Creation: the page file first, atomically (its existence marks
                # a database), then the log, then the empty tree and rollback segment.
                db_id = uuid.uuid4().bytes
                # The directory's own name must be durable too, though an earlier
                # attempt (or the caller) made it: that attempt's fsync may have failed.
                fs.fsync_dir(os.path.dirname(os.path.abspath(path)) or "/")
                pagefile = PageFile.create(fs, page_path, page_size, db_id)
                self._wal = WriteAheadLog.open(fs, path, db_id, durable_lsn=0, sync=self.sync, segment_size=self._segment_size())
                self._store = PageStore(pagefile, self._wal, cache_size, None)
                self._initialise()
            self._recovery["recovery_seconds"] = time.monotonic() - started
            self._end_at_open = self._wal.end_lsn
        except BaseException:
            self._release_files(flush=False)  # a refused open writes nothing more
            raise

    def _opened_store(self) -> PageStore:
        assert self._store is not None, "the page store is set by _open"
        return self._store

    def _looks_like_page_file(self, page_path: str) -> bool:
        """Whether the file starts like a kvstore page file (read only)."""
        from pages.format import META_MAGIC

        f = self._fs.open(page_path)
        try:
            head = f.pread(0, 8)
            # meta 1 is one page in; the page size is in the metas, so try each
            seconds = [f.pread(size + 4, 4) for size in (512 << i for i in range(8))]
        finally:
            f.close()
        # short or zeroed: a damaged meta 0, which the page file falls back from or reports
        return len(head) < 8 or head[4:8] == META_MAGIC or head == bytes(8) or META_MAGIC in seconds

    def _segment_size(self) -> int:
        """A quarter of ``checkpoint_wal_bytes`` (4 KiB to 16 MiB), so that
        truncation, which removes whole segments, keeps the log near it."""
        return max(4096, min(16 * 2**20, self.checkpoint_wal_bytes // 4))

    def _makedirs(self, path: str) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        if parent and not self._fs.exists(parent):
            self._makedirs(parent)
        self._fs.mkdir(path)

    def _make_checkpointer(self) -> None:
        from recovery.checkpointer import Checkpointer

        self._checkpointer = Checkpointer(
            self._latch,
            self._store,
            self._wal,
            self._checkpoint_table,
            lambda: _EXTRA.pack(self._next_txid, self._commit_seq),
            interval=self.checkpoint_interval,
            wal_bytes=self.checkpoint_wal_bytes,
            on_error=self._checkpoint_failed,
        )

    def _checkpoint_table(self) -> tuple[dict[int, tuple[int, int, bytes | None]], int]:
        """The transaction table for CHECKPOINT_BEGIN.  Caller holds the latch.

        A transaction whose COMMIT is already logged (waiting for group
        commit) is not in it: that record lies before the checkpoint, so
        restart from here must treat the transaction as committed."""
        table = {
            t.txid: (t.last_undo, t.last_lsn, t.gid if t.state == PREPARED else None)
            for t in self._writers.values()
            if t.state != COMMITTING
        }
        return table, self._next_txid

    def _checkpoint_failed(self, err: BaseException) -> None:
        store = self._store
        if isinstance(err, PoisonedError) or (store is not None and store.pagefile._poison is not None):
            self._poisoned(err)

    def _initialise(self) -> None:
        from pages.btree import BTree
        from pages.rollback_segment import RollbackSegment

        store = self._store
        assert store is not None
        store.tree = BTree.create(store.pool, store.pagefile, store.log_ops)
        store.undo = RollbackSegment.create(store.pool, store.pagefile, store.log_ops)
        self._make_checkpointer()
        self._checkpointer.checkpoint(latch_held=True)

    def _restart(self) -> None:
        """Recover after an unclean shutdown (nothing to do after a clean one)."""
        from recovery.restart import restart

        store, wal = self._store, self._wal
        assert store is not None and wal is not None
        report = restart(store, wal, self._append_clr_for)
        self._recovery.update(report.as_dict())
        self._next_txid = max(self._next_txid, report.max_txid + 1)
        for txid, (last_undo, last_lsn, gid) in report.prepared.items():
            tx = Transaction(self, Snapshot(txid, txid, frozenset()), False, "snapshot", None)
            tx.txid, tx.last_undo, tx.last_lsn, tx.state, tx.gid = txid, last_undo, last_lsn, PREPARED, gid
            self._writers[txid] = tx
            self._live[tx] = tx.snapshot
            self._prepared[gid] = tx
        if report.records_scanned or report.prepared:
            log.info(
                "kvstore: recovered %s: %d log records scanned, %d ops redone on %d pages, %d transactions undone, %d in doubt, %.3f s",
                self.path, report.records_scanned, report.ops_redone, report.pages_redone, report.undone, len(report.prepared),
                report.seconds,
            )
        if report.records_scanned:
            self._checkpointer.checkpoint(latch_held=True)

    def _append_clr_for(self, txid: int, undo_next: int, ops: list[PageOp], prev_lsn: int = NO_LSN) -> int:
        assert self._wal is not None
        return self._wal.append(RecordType.CLR, txid, clr_payload(undo_next, ops), prev_lsn)

    # --- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint and release the lock.  Idempotent.  Unfinished
        transactions are rolled back (prepared ones stay in doubt)."""
        if self._closed:
            if self._forked:
                self._raise_closed()  # never touch the parent's files from a forked child
            return
        self._checkpointer.stop()
        with self._latch:
            for tx in list(self._live):
                if tx.state == ACTIVE:
                    self._rollback_locked(tx)
            try:
                # No checkpoint when it would change nothing, or when damage was
                # seen: reading a damaged store must leave it as it was.
                if self._poison is None and not self._damaged:
                    if not self._clean_since_open():
                        assert self._wal is not None
                        # No snapshot outlives the close (prepared ones excepted):
                        # give back the undo pages, so the file can shrink.
                        self._purge_locked(max_pages=1 << 30)
                        self._wal.start_segment()  # the checkpoint then removes every older segment
                        self._checkpointer.checkpoint(latch_held=True)  # the last one: it compacts too
                    else:
                        self._checkpointer.compact(latch_held=True)  # nothing to checkpoint: still give a free tail back
            finally:
                self._closed = True
                self._release_files()
        _open_databases.discard(self)

    def _clean_since_open(self) -> bool:
        """Nothing was logged since open, or since the last checkpoint."""
        assert self._wal is not None
        return self._wal.end_lsn == self._end_at_open or self._checkpointer.idle_since_last()

    def _release_files(self, flush: bool = True) -> None:
        wal, store, file_lock = self._wal, self._store, self._file_lock
        for closer in (
            (lambda: wal.close(flush)) if wal is not None else None,
            (lambda: store.close()) if store is not None else None,
            (lambda: file_lock.release()) if file_lock is not None else None,
        ):
            if closer is not None:
                try:
                    closer()
                except Exception as e:  # closing must release everything it can
                    log.warning("kvstore: error while closing %s: %s", self.path, e)
        self._wal = None
        self._file_lock = None

    def __enter__(self) -> Database:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_closed(self) -> None:
        if self._forked:
            raise ClosedError("this Database was inherited across fork(); open the path again in the child")
        raise ClosedError("the database is closed")

    def _check_open(self) -> None:
        if self._closed:
            self._raise_closed()

    def _check_writable(self) -> None:
        if self._poison is not None:
            raise PoisonedError(f"the database is read-only until reopened: {self._poison}", self._poison)

    def _poisoned(self, err: BaseException) -> None:
        if self._poison is None:
            self._poison = err
            log.error("kvstore: %s is read-only until reopened: %s", self.path, err)

    # --- transactions --------------------------------------------------------------

    def begin(self, readonly: bool = False, isolation: str | None = None) -> Transaction:
        """Start a transaction with a snapshot taken now.

        ``isolation`` overrides the database's level for this transaction.
        """
        self._check_open()
        level = self.isolation if isolation is None else isolation
        if level not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be 'snapshot' or 'serializable', not {level!r}")
        with self._latch:
            snap = Snapshot(0, self._next_txid, frozenset(self._writers), self._commit_seq)
            ssi = self._ssi.begin(0, self._commit_seq, bool(readonly), snap) if level == "serializable" else None
            tx = Transaction(self, snap, bool(readonly), level, ssi)
            self._live[tx] = snap
        return tx

    def transaction(self, readonly: bool = False, isolation: str | None = None) -> Transaction:
        """A transaction for a ``with`` block: commits on normal exit, rolls
        back on an exception."""
        return self.begin(readonly=readonly, isolation=isolation)

    def run(self, fn: Callable[[Transaction], Any], retries: int = 10) -> Any:
        """Call ``fn(tx)`` in a fresh transaction and commit; on ConflictError
        retry, up to ``retries`` more times.  Returns ``fn``'s result.

        A retry after losing a key to a writer that has not finished (often
        one waiting for its commit to be durable) would lose again at once,
        so it waits for that writer, in line (first come, first served) with
        the other ``run`` calls that lost the same key -- as PostgreSQL waits
        on a row lock.  Any other conflict backs off, exponentially, with
        jitter.  No wait lasts longer than a second, and nobody waits on a
        prepared transaction, which may stay in doubt."""
        if not callable(fn):
            raise TypeError(f"run expects a callable, not {type(fn).__name__}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        attempt = 0
        place: tuple[bytes, object] | None = None  # (key, token) in a wait line
        patience = [1.0]  # seconds left to wait on transactions held open (see _wait_in_line)
        try:
            while True:
                tx = self.begin()
                tx._line = _IN_RUN if place is None else place[1]
                try:
                    result = fn(tx)
                    if tx.state == ACTIVE:
                        tx.commit()
                    return result
                except ConflictError as e:
                    if tx.state == ACTIVE:
                        tx.rollback()
                    attempt += 1
                    if attempt > retries:
                        raise
                    if tx._blocked_by and e.key is not None:
                        if place is None or place[0] != e.key:
                            self._leave_line(place)
                            place = self._join_line(e.key)
                        if self._wait_in_line(place, tx._blocked_by, 1.0, patience):
                            continue
                    time.sleep(random.random() * min(0.0005 * 2**attempt, 0.05))
                except BaseException:
                    if tx.state == ACTIVE and not self._closed:
                        tx.rollback()
                    raise
        finally:
            self._leave_line(place)

    def _join_line(self, key: bytes) -> tuple[bytes, object]:
        token = object()
        with self._writer_done:
            self._lines.setdefault(key, []).append(token)
        return key, token

    def _leave_line(self, place: tuple[bytes, object] | None) -> None:
        if place is None:
            return
        key, token = place
        with self._writer_done:
            line = self._lines.get(key)
            if line is not None and token in line:
                line.remove(token)
                if not line:
                    del self._lines[key]
                self._writer_done.notify_all()

    def _wait_in_line(self, place: tuple[bytes, object], txid: int, timeout: float, patience: list[float]) -> bool:
        """Wait until writer ``txid`` has finished and this ``run`` is first
        in line for the key; False (back off instead) if ``timeout`` passed.

        Committing writers and other ``run`` calls finish on their own, so
        they get the full ``timeout``.  A transaction the caller holds open
        may not: one prepared may stay in doubt, one begun by this thread
        cannot end while it waits, and other open ones share ``patience``
        (seconds, across all retries of one ``run``), so a retry loop
        against a transaction left open elsewhere gives up in about a
        second, not ``retries`` seconds."""
        key, token = place
        with self._writer_done:
            tx = self._writers.get(txid) if txid > 0 else None
            held_open = tx is not None and tx.state != COMMITTING and tx._line is None
            if held_open:
                assert tx is not None  # held_open implies it
                if tx.state == PREPARED or tx._thread == threading.get_ident():
                    return False
                timeout = min(timeout, patience[0])
                if timeout <= 0:
                    return False
            line = self._lines[key]
            started = time.monotonic()
            done = self._writer_done.wait_for(lambda: (txid < 0 or txid not in self._writers) and line[0] is token, timeout)
            if held_open:
                patience[0] -= time.monotonic() - started
            return done

    # autocommit helpers
    def get(self, key: bytes, default: Any = None) -> Any:
        """``key``'s committed value, or ``default``."""
        if self.isolation == "snapshot":
            # The common case without a transaction: under the latch, the
            # newest version is the answer when its writer has finished (a
            # writer leaves _writers when its commit becomes visible).
            key = check_key(key)
            with self._latch:
                self._check_open()
                store = self._store
                assert store is not None
                try:
                    cell = store.tree.get(key)
                    if cell is None:
                        return default
                    if cell[1] not in self._writers:
                        if cell[0] & FLAG_DELETED:
                            return default
                        value = cell[3]
                        return value if value.__class__ is not OverflowRef else store.tree.read_value(cell)
                except CorruptionError:
                    self._damaged = True
                    raise
        tx = self.begin(readonly=True)
        try:
            return tx.get(key, default)
        finally:
            self._end_readonly(tx)

    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key`` in a transaction of its own."""
        self.run(lambda tx: tx.put(key, value), retries=10)

    def delete(self, key: bytes) -> bool:
        """Delete ``key`` in a transaction of its own; return whether it existed."""
        return bool(self.run(lambda tx: tx.delete(key), retries=10))

    def scan(self, start: bytes | None = None, stop: bytes | None = None, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs in [start, stop) from one read-only snapshot,
        taken now (the pairs are read lazily, a leaf at a time)."""
        tx = self.begin(readonly=True)
        try:
            it = tx.scan(start, stop, reverse)
        except BaseException:
            self._end_readonly(tx)
            raise
        return self._autocommit_scan(tx, it)

    def _autocommit_scan(self, tx: Transaction, it: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        try:
            yield from it
        finally:
            self._end_readonly(tx)

    def _end_readonly(self, tx: Transaction) -> None:
        if tx.state == ACTIVE:
            tx.commit()

    # --- reads (called by Transaction) -----------------------------------------------

    def _read_undo(self, ptr: int) -> Any:
        assert self._store is not None
        return self._store.undo.read(ptr)

    def _get(self, tx: Transaction, key: bytes, default: Any) -> Any:
        try:
            return self._get_locked(tx, key, default)
        except CorruptionError:
            self._damaged = True
            raise

    def _get_snapshot(self, tx: Transaction, key: bytes, default: Any) -> Any:
        """``tx.get`` for a transaction that records no reads (not
        serializable): the hot path, one latch trip and one descent.  A plain
        value written below the snapshot's horizon (or by ``tx`` itself) is
        the answer without consulting the undo chain."""
        snap = tx.snapshot
        with self._latch:
            if self._closed:
                self._raise_closed()
            store = self._store
            assert store is not None
            try:
                found = store.tree.get_visible(key, snap.horizon, snap.own)
                if found.__class__ is bytes:
                    return found
                if found is None:
                    return default
                exists, value = visible_version(snap, found, store.undo.read)  # type: ignore[arg-type]
                if not exists:
                    return default
                return value if value.__class__ is not OverflowRef else store.tree.read_value((0, 0, 0, value))
            except CorruptionError:
                self._damaged = True
                raise

    def _get_locked(self, tx: Transaction, key: bytes, default: Any) -> Any:
        ssi = tx.ssi
        with self._latch:
            self._check_open()
            store = self._store
            assert store is not None
            cell = store.tree.get(key)
            if cell is None:
                exists, value = False, None
                if ssi is not None:
                    self._ssi_call(tx, self._ssi.on_read, ssi, key, ())
            else:
                skipped: list[int] | None = [] if ssi is not None else None
                exists, value = visible_version(tx.snapshot, cell, store.undo.read, skipped)
                if ssi is not None:
                    self._ssi_call(tx, self._ssi.on_read, ssi, key, skipped)
                if exists and value.__class__ is OverflowRef:
                    value = store.tree.read_value((0, 0, 0, value))
        return value if exists else default

    def _scan(self, tx: Transaction, start: bytes | None, stop: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        ssi = tx.ssi
        if ssi is not None:
            with self._latch:
                self._ssi_call(tx, self._ssi.on_scan, ssi, start, stop)
        store = self._store
        assert store is not None
        batches = store.tree.scan_batches(start, stop, reverse)
        while True:
            try:
                out = self._scan_batch(tx, batches)
            except CorruptionError:
                self._damaged = True
                raise
            if out is None:
                return
            yield from out

    def _scan_batch(self, tx: Transaction, batches: Iterator[list[tuple[bytes, Cell]]]) -> list[tuple[bytes, bytes]] | None:
        """The visible pairs of the next leaf, or None at the end."""
        ssi = tx.ssi
        snap = tx.snapshot
        store = self._store
        assert store is not None
        with self._latch:
            if tx.state != ACTIVE:
                raise TransactionError(f"transaction is already {tx.state}")
            self._check_open()
            batch = next(batches, None)
            if batch is None:
                return None
            out: list[tuple[bytes, bytes]] = []
            read_undo = store.undo.read
            for key, cell in batch:
                value: Value | None
                if cell[1] == 0 or (cell[1] < snap.horizon and not cell[0] & FLAG_DELETED):
                    exists, value = True, cell[3]
                    skipped: list[int] | None = None
                else:
                    skipped = [] if ssi is not None else None
                    exists, value = visible_version(snap, cell, read_undo, skipped)
                if skipped:
                    self._ssi_call(tx, self._ssi.on_read, ssi, key, skipped)
                if exists:
                    if isinstance(value, OverflowRef):  # no subclasses: the same test as ``__class__ is``
                        value = store.tree.read_value((0, 0, 0, value))
                    assert value is not None  # visible_version returns a value whenever exists is true
                    out.append((key, value))
        return out

    def _ssi_call(self, tx: Transaction, fn: Callable[..., None], *args: Any) -> None:
        """Run an SSI check; on ConflictError roll ``tx`` back and re-raise.
        Caller holds the latch."""
        try:
            fn(*args)
        except ConflictError:
            self._stats["conflicts"] += 1
            self._rollback_locked(tx)
            raise

    # --- writes ----------------------------------------------------------------------

    def _write_precheck(self, tx: Transaction, key: bytes) -> Any:
        """Conflict checks before a write (first updater wins); return the
        key's current cell.  Caller holds the latch."""
        self._check_open()
        self._check_writable()
        store = self._store
        assert store is not None
        return self._check_write(tx, key, store.tree.get(key))

    def _check_write(self, tx: Transaction, key: bytes, cell: Any) -> Any:
        """``_write_precheck`` given the key's current cell (``cell``, or
        None), which the caller looked up; return it."""
        if cell is not None:
            writer = cell[1]
            if writer != tx.txid or not writer:
                if writer in self._writers and writer != tx.txid:
                    tx._blocked_by = writer
                    self._conflict(tx, key, "write-write", "it was written by a transaction that has not finished")
                if not tx.snapshot.sees(writer) and not canary.no_write_conflicts:
                    self._conflict(tx, key, "write-write", "it was changed by a transaction that committed after this one began")
        if self._lines and tx._line is not None:  # db.run: no overtaking those in line
            line = self._lines.get(key)
            if line and line[0] is not tx._line:
                tx._blocked_by = -1
                self._conflict(tx, key, "write-write", "earlier db.run calls are waiting for it (first come, first served)")
        if tx.ssi is not None:
            self._ssi_call(tx, self._ssi.on_write, tx.ssi, key)
        if not tx.txid:
            self._assign_txid(tx)
        return cell

    def _assign_txid(self, tx: Transaction) -> int:
        """Give ``tx`` its id, at its first write; return it.  Caller holds
        the latch."""
        tx.txid = txid = self._next_txid
        self._next_txid += 1
        tx.snapshot.own = txid
        self._writers[txid] = tx
        if tx.ssi is not None:
            tx.ssi.txid = txid
            self._ssi.by_txid[txid] = tx.ssi
        return txid

    def _conflict(self, tx: Transaction, key: bytes, kind: str, why: str) -> None:
        self._stats["conflicts"] += 1
        self._rollback_locked(tx)
        raise ConflictError(f"{kind} conflict on key {key!r}: {why}; the transaction was rolled back, retry it", key, kind)

    def _log_write(self, tx: Transaction, undo_ptr: int) -> Callable[[list[PageOp]], int]:
        wal = self._wal
        assert wal is not None

        def log_ops(ops: list[PageOp]) -> int:
            lsn = wal.append(RecordType.TXN_WRITE, tx.txid, _U64.pack(undo_ptr) + pack_ops(ops), tx.last_lsn)
            tx.last_lsn = lsn
            # Logged means applied and part of the transaction, even if the
            # put fails after this (a steal's write in end_op): rollback must
            # undo it.
            tx.last_undo = undo_ptr
            return lsn

        return log_ops

    def _put(self, tx: Transaction, key: bytes, value: bytes) -> None:
        with self._latch:
            if not self._put_in_leaf(tx, key, value):
                cell = self._write_precheck(tx, key)
                self._write_version(tx, key, value, cell, 0)

    def _put_in_leaf(self, tx: Transaction, key: bytes, value: bytes) -> bool:
        """The common put, in one descent and one function: an inline value
        whose leaf stays within its fill bounds, no conflict, no SSI, no
        ``db.run`` wait line.  It logs the very record ``_write_version``
        would (the undo record's ops, then the leaf put) and applies it; a
        record that fits the tail undo page is appended to it in place.
        Returns False, having changed nothing
        but perhaps the transaction's id, when any of that does not hold:
        the caller takes the general path (``_write_precheck`` and
        ``_write_version``), which also raises the conflict.  Caller holds
        the latch."""
        store = self._store
        if self._closed or self._poison is not None or store is None or tx.ssi is not None or (self._lines and tx._line is not None):
            return False
        tree = store.tree
        size = CELL_OVERHEAD + len(key) + len(value)
        if size > tree.max_cell:
            return False
        pool = tree.pool
        pool.begin_op()
        try:
            leaf_lid, leaf, is_root = tree.leaf_for_write(key)
            keys = leaf.keys
            i = bisect_left(keys, key)
            old = leaf.cells[i] if i < len(keys) and keys[i] == key else None
            new_size = leaf.size + size
            txid = tx.txid
            if old is not None:
                new_size -= cell_size(key, old)
                writer = old[1]
                if (writer != txid or not writer) and (
                    writer in self._writers and writer != txid or not tx.snapshot.sees(writer) and not canary.no_write_conflicts
                ):
                    return False  # a conflict
            if not (tree.min_fill <= new_size <= tree.capacity or is_root and new_size <= tree.capacity):
                return False  # a split or a merge
            if not txid:
                txid = self._assign_txid(tx)
            if old is None:
                rec = encode_undo(txid, tx.last_undo, 0, 0, WROTE_VALUE, key, None)
            else:
                was_deleted = WAS_DELETED if old[0] & FLAG_DELETED else 0
                rec = encode_undo(txid, tx.last_undo, old[1], old[2], was_deleted | WROTE_VALUE, key, old[3])
            room = store.undo.tail_room(len(rec))
            ops: list[PageOp]
            if room is not None:
                tail_lid, tail = room
                offset = len(tail.data)
                ptr = (tail_lid << 16) | offset
                ops = [(tail_lid, Op.UNDO_APPEND, _U32.pack(offset) + rec)]
            else:  # the record opens an undo page (one put in a page's worth)
                ops = []
                ptr = store.undo.plan_append(rec, ops)
            cell = (0, txid, ptr, value)
            ops.append((leaf_lid, Op.LEAF_PUT, encode_cell(key, cell)))
            wal = self._wal
            assert wal is not None
            try:
                lsn = wal.append(RecordType.TXN_WRITE, txid, _U64.pack(ptr) + pack_ops(ops), tx.last_lsn)
            except BaseException as e:
                if room is None:
                    tree.release_planned(ops)  # the page it allocated
                if isinstance(e, PoisonedError):
                    self._poisoned(e)
                raise
            tx.last_lsn = lsn
            tx.last_undo = ptr
            if room is not None:
                tail.data += rec  # apply_undo_op's UNDO_APPEND at the end of the page
                pool.mark_dirty(tail_lid, tail, lsn)
            else:
                redo.apply_logged(pool, store.pagefile, ops[:-1], lsn)
            if old is None:
                keys.insert(i, key)
                leaf.cells.insert(i, cell)
            else:
                leaf.cells[i] = cell
            leaf.size = new_size
            pool.mark_dirty(leaf_lid, leaf, lsn)
            tx.writes += 1
            return True
        finally:
            pool.end_op()

    def _put_many(self, tx: Transaction, keys: list[bytes], values: list[bytes]) -> None:
        """Put sorted, distinct ``keys``: every key's conflict checks first
        (a conflict rolls the transaction back before anything of the batch is
        written), then runs of keys that share a leaf, each in one descent and
        one log record (``BTree.put_run``).  A value too large for a cell
        goes the way of a single put, and so does every key of a batch with
        fewer keys than half the store's pages: its keys would rarely share
        a leaf, and a run of one costs more than a single put."""
        with self._latch:
            self._check_open()
            self._check_writable()
            store = self._store
            assert store is not None
            olds = store.tree.cells_of(keys)  # a descent per leaf, not per key
            check = self._check_write
            for k, old in zip(keys, olds, strict=True):
                check(tx, k, old)
            if 2 * len(keys) < store.pagefile.nlids:
                put_in_leaf = self._put_in_leaf
                for k, v, old in zip(keys, values, olds, strict=True):
                    if not put_in_leaf(tx, k, v):
                        self._write_version(tx, k, v, old, 0)  # poisons the store on a PoisonedError itself
                return
            tree, undo, txid = store.tree, store.undo, tx.txid

            def plan(start: int, end: int, cells: list[Cell | None], ops: list[PageOp]) -> list[Cell]:
                records = []
                for k, old in zip(keys[start:end], cells, strict=True):
                    if old is None:
                        records.append(encode_undo(txid, 0, 0, 0, WROTE_VALUE, k, None))
                    else:
                        was_deleted = WAS_DELETED if old[0] & FLAG_DELETED else 0
                        records.append(encode_undo(txid, 0, old[1], old[2], was_deleted | WROTE_VALUE, k, old[3]))
                ptrs = undo.plan_append_many(records, ops, tx.last_undo)
                chain_end[0] = ptrs[-1]
                return [(0, txid, ptr, v) for ptr, v in zip(ptrs, values[start:end], strict=True)]

            chain_end = [0]

            def log_run(ops: list[PageOp]) -> int:
                return self._log_write(tx, chain_end[0])(ops)

            # where each run must stop: at the next value that needs overflow
            # pages, and after about two pages of cells (the log record's size)
            n = len(keys)
            sizes = [CELL_OVERHEAD + len(k) + len(v) for k, v in zip(keys, values, strict=True)]
            ends = list(accumulate(sizes))
            big = [i for i, size in enumerate(sizes) if size > tree.max_cell] + [n]
            record_bytes = 2 * tree.capacity
            i, next_big = 0, 0
            try:
                while i < n:
                    if i == big[next_big]:  # an overflow value: the single-put path
                        self._write_version(tx, keys[i], values[i], olds[i], 0)
                        i += 1
                        next_big += 1
                        continue
                    stop = min(big[next_big], max(i + 1, bisect_right(ends, ends[i] - sizes[i] + record_bytes)))
                    j = tree.put_run(keys, i, stop, plan, log=log_run)
                    tx.writes += j - i
                    i = j
            except PoisonedError as e:
                self._poisoned(e)
                raise

    def _delete(self, tx: Transaction, key: bytes) -> bool:
        with self._latch:
            self._check_open()
            self._check_writable()
            store = self._store
            assert store is not None
            cell = store.tree.get(key)
            skipped: list[int] = []
            if cell is None:
                existed = False
            else:
                existed, _ = visible_version(tx.snapshot, cell, store.undo.read, skipped)
            if not existed:
                if tx.ssi is not None:  # reading "absent" is a read too
                    self._ssi_call(tx, self._ssi.on_read, tx.ssi, key, skipped)
                return False
            cell = self._write_precheck(tx, key)
            self._write_version(tx, key, b"", cell, FLAG_DELETED)
            return True

    def _write_version(self, tx: Transaction, key: bytes, value: bytes, cell: Any, flags: int) -> None:
        """Write a new version of ``key`` with its undo record, in one log
        record.  Caller holds the latch and has run ``_write_precheck``."""
        store = self._store
        assert store is not None
        wrote = 0 if flags & FLAG_DELETED else WROTE_VALUE
        if cell is None:
            rec = encode_undo(tx.txid, tx.last_undo, 0, 0, wrote, key, None)
        else:
            was_deleted = WAS_DELETED if cell[0] & FLAG_DELETED else 0
            rec = encode_undo(tx.txid, tx.last_undo, cell[1], cell[2], was_deleted | wrote, key, cell[3])
        ops: list[PageOp] = []
        try:
            ptr = store.undo.plan_append(rec, ops)
            store.tree.put(key, value, tx.txid, ptr, flags, free_old=False, extra_ops=ops, log=self._log_write(tx, ptr))
        except PoisonedError as e:
            self._poisoned(e)
            raise
        tx.writes += 1

    # --- rollback ---------------------------------------------------------------------

    def _rollback_to(self, tx: Transaction, undo_ptr: int) -> None:
        with self._latch:
            self._check_open()
            self._undo_locked(tx, undo_ptr)

    def _undo_locked(self, tx: Transaction, stop_at: int) -> None:
        if tx.last_undo == stop_at:
            return
        self._check_writable()
        store = self._store
        assert store is not None

        def append_clr(txid: int, undo_next: int, ops: list[PageOp]) -> int:
            lsn = self._append_clr_for(txid, undo_next, ops, tx.last_lsn)
            tx.last_lsn = lsn
            tx.last_undo = undo_next
            return lsn

        try:
            rollback_chain(store, tx.txid, tx.last_undo, stop_at, append_clr)
        except PoisonedError as e:
            self._poisoned(e)
            raise
        tx.last_undo = stop_at

    def _rollback(self, tx: Transaction) -> None:
        with self._latch:
            if self._closed:
                self._raise_closed()
            self._rollback_locked(tx)

    def _rollback_locked(self, tx: Transaction) -> None:
        """Undo everything and end ``tx``.  Caller holds the latch."""
        if tx.state not in (ACTIVE, PREPARED):
            return
        if tx.txid:
            try:
                self._undo_locked(tx, 0)
                assert self._wal is not None
                self._wal.append(RecordType.ABORT, tx.txid, b"", tx.last_lsn)
                self._writers.pop(tx.txid, None)
                self._writer_done.notify_all()
            except PoisonedError:
                # The log is gone and the undo may not have run: reopening
                # undoes the transaction.  Until then it stays in the writers
                # table, so no snapshot sees what it left behind.
                pass
        tx.state = ABORTED
        self._live.pop(tx, None)
        if tx.gid is not None:
            self._prepared.pop(tx.gid, None)
        if tx.ssi is not None:
            self._ssi.aborted(tx.ssi)
        self._stats["aborts"] += 1

    # --- commit -----------------------------------------------------------------------

    def _commit(self, tx: Transaction) -> None:
        ssi = tx.ssi
        with self._latch:
            self._check_open()
            if ssi is not None:
                self._ssi_call(tx, self._ssi.check_commit, ssi)
            if not tx.txid:  # nothing written: nothing to log
                self._finish_commit(tx)
                return
            self._check_writable()
            lsn = self._log_append(RecordType.COMMIT, tx, b"")
            tx.last_lsn = lsn
            tx.state = COMMITTING
            if ssi is not None:  # SSI orders commits at the decision
                self._commit_seq += 1
                self._ssi.decided(ssi, self._commit_seq)
        assert self._wal is not None
        try:
            self._wal.commit_wait(lsn)  # group commit; no latch held
        except PoisonedError as e:
            with self._latch:
                self._poisoned(e)
            raise
        with self._latch:
            self._writers.pop(tx.txid, None)
            if self._lines:  # only db.run waits on _writer_done, from a wait line
                self._writer_done.notify_all()
            self._finish_commit(tx)
            self._stats["commits"] += 1
            self._commits_since_purge += 1
            if self._commits_since_purge >= 64:
                self._commits_since_purge = 0
                # keep up with what was produced: every undo page added since
                # the last purge, twice over, so a backlog shrinks
                store = self._store
                assert store is not None  # set by _open and never cleared
                added = store.undo.take_pages_added()
                self._purge_locked(max_pages=16 + 2 * added)
        self._checkpointer.poke()

    def _log_append(self, rtype: int, tx: Transaction, payload: bytes) -> int:
        """Append ``tx``'s next record (chained to its last); a failure
        poisons the store.  Caller holds the latch."""
        assert self._wal is not None
        try:
            return self._wal.append(rtype, tx.txid, payload, tx.last_lsn)
        except PoisonedError as e:
            self._poisoned(e)
            raise

    def _finish_commit(self, tx: Transaction) -> None:
        tx.state = COMMITTED
        self._live.pop(tx, None)
        if tx.ssi is not None:
            if tx.ssi.prepare_seq is None:  # a transaction that wrote nothing
                self._commit_seq += 1
                self._ssi.decided(tx.ssi, self._commit_seq)
        # One sequence numbers both SSI decisions and commits becoming
        # visible (kvstore/ssi.py); snapshots record where it stood.
        self._commit_seq += 1
        if tx.ssi is not None:
            self._ssi.made_visible(tx.ssi, self._commit_seq)

    # --- two-phase commit (participant side) -------------------------------------------

    def _prepare(self, tx: Transaction, gid: bytes) -> None:
        if not 1 <= len(gid) <= 1024:
            raise ValueError(f"gid must be 1 to 1024 bytes, got {len(gid)}")
        ssi = tx.ssi
        with self._latch:
            self._check_open()
            self._check_writable()
            if gid in self._prepared:
                raise ValueError(f"a transaction is already prepared as {gid!r}")
            if ssi is not None:
                self._ssi_call(tx, self._ssi.check_commit, ssi)
            if not tx.txid:  # nothing written: take an id so the decision is durable
                tx.txid = self._next_txid
                self._next_txid += 1
                tx.snapshot.own = tx.txid
                self._writers[tx.txid] = tx
            lsn = self._log_append(RecordType.PREPARE, tx, gid)
            tx.last_lsn = lsn
            tx.state = PREPARED
            tx.gid = gid
            self._prepared[gid] = tx
            if ssi is not None:
                # Prepared means it must be able to commit: for SSI it counts
                # as committed from now on, so it is never chosen as a victim.
                self._commit_seq += 1
                self._ssi.decided(ssi, self._commit_seq)
        assert self._wal is not None
        try:
            self._wal.flush(lsn)  # prepare is durable in every sync mode
        except PoisonedError as e:
            with self._latch:
                self._poisoned(e)
            raise

    def prepared(self) -> list[bytes]:
        """Global ids of the prepared (in-doubt) transactions."""
        self._check_open()
        with self._latch:
            return sorted(self._prepared)

    def _take_prepared(self, gid: object) -> Transaction:
        if not isinstance(gid, (bytes, bytearray, memoryview)):
            raise TypeError(f"gid must be bytes, not {type(gid).__name__}")
        tx = self._prepared.get(bytes(gid))
        if tx is None:
            raise ValueError(f"no prepared transaction with gid {bytes(gid)!r}")
        return tx

    def commit_prepared(self, gid: bytes) -> None:
        """Commit the prepared transaction ``gid`` (durably under sync="full")."""
        self._check_open()
        with self._latch:
            self._check_writable()
            tx = self._take_prepared(gid)
            lsn = self._log_append(RecordType.COMMIT, tx, b"")
            tx.state = COMMITTING
            assert tx.gid is not None  # it was found in _prepared under its gid
            del self._prepared[tx.gid]
        assert self._wal is not None
        try:
            self._wal.flush(lsn)
        except PoisonedError as e:  # the outcome is in doubt again: a reopen finds it prepared or committed
            with self._latch:
                self._poisoned(e)
            raise
        with self._latch:
            self._writers.pop(tx.txid, None)
            self._writer_done.notify_all()
            self._finish_commit(tx)
            self._stats["commits"] += 1

    def rollback_prepared(self, gid: bytes) -> None:
        """Roll back the prepared transaction ``gid``."""
        self._check_open()
        with self._latch:
            self._check_writable()
            tx = self._take_prepared(gid)
            self._rollback_locked(tx)
            assert self._wal is not None
            lsn = self._wal.end_lsn
        self._wal.flush(lsn - 1 if lsn else None)

    # --- purge ------------------------------------------------------------------------

    def _horizon(self) -> int:
        """Versions written below this id are visible to every live snapshot."""
        return min((s.horizon for s in self._live.values()), default=self._next_txid)

    def _purge_locked(self, max_pages: int = 16) -> None:
        """Remove undo records no snapshot needs, and delete-marked keys no
        snapshot can see.  Caller holds the latch; bounded work per call."""
        if self._poison is not None:
            return
        store = self._store
        assert store is not None
        horizon = self._horizon()
        budget = [max_pages]

        def finished(page: UndoPage, lid: int) -> bool:
            if budget[0] <= 0 or page.newest_txid(lid) >= horizon:
                return False
            budget[0] -= 1
            # the records not undone (by a rollback, or by a purge before a
            # crash) that wrote a delete mark or hold an overflow value
            for r in page.purge_work(lid):
                if not r.flags & WROTE_VALUE:  # it may have left a delete mark
                    cell = store.tree.get(r.key)
                    if cell is not None and cell[1] == r.txid and cell[0] & FLAG_DELETED:
                        store.tree.delete(r.key, free_old=True)  # idempotent: checks the version first
                        self._stats["purged_keys"] += 1
                if r.value.__class__ is OverflowRef:
                    # Free the old value and mark the record in one log record,
                    # so a crash before the page is freed never frees it twice.
                    ops: list[PageOp] = []
                    RollbackSegment.plan_mark_undone(r.ptr, ops)
                    store.tree.free_value((0, 0, 0, r.value), extra_ops=ops)
            return True

        try:
            freed = store.undo.free_pages_before(lambda page, lid: not finished(page, lid))
        except PoisonedError as e:
            self._poisoned(e)
            return
        self._stats["purged_undo_pages"] += freed
        if freed:
            log.debug("kvstore: purge freed %d undo pages of %s", freed, self.path)

    def purge(self) -> None:
        """Purge now (it also runs by itself every 64 commits)."""
        self._check_open()
        with self._latch:
            self._purge_locked(max_pages=1 << 30)

    # --- checkpoints -------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Run a checkpoint now: the current state becomes the durable image
        and the log before it is deleted.  Returns ``lsn``, ``pages_written``,
        ``seconds``, ``wal_bytes_truncated``.  Writers keep running meanwhile.

        Raises the I/O error if it fails; the previous image and the log are
        then intact and the store keeps working (unless an fsync failed).
        """
        self._check_open()
        self._check_writable()
        return self._checkpointer.checkpoint()

    # --- inspection ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and sizes (see SPEC.md for the fields)."""
        self._check_open()
        with self._latch:
            store, wal = self._store, self._wal
            assert store is not None and wal is not None
            segs = wal.segments()
            pool = store.pool.stats()
            pf = store.pagefile.stats()
            return {
                **self._stats,
                "checkpoints": self._checkpointer.count,
                "compactions": self._checkpointer.compactions,
                "slots_given_back": self._checkpointer.slots_given_back,
                "last_checkpoint_seconds": self._checkpointer.last_seconds,
                "last_checkpoint_lsn": self._checkpointer.last_lsn,
                "last_checkpoint_time": self._checkpointer.last_wall_time,
                "checkpoint_errors": self._checkpointer.errors,
                "write_stalls": self._checkpointer.stalls,
                "last_checkpoint_error": self._checkpointer.last_error,
                "wal_bytes": sum(s.end_lsn - s.first_lsn for s in segs),
                "wal_segments": len(segs),
                "pages": store.pagefile.allocated(),
                "page_size": pf["page_size"],
                "free_slots": pf["free_slots"],
                "cache_hits": pool["cache_hits"],
                "cache_misses": pool["cache_misses"],
                "active_transactions": len(self._live),
                "prepared_transactions": len(self._prepared),
                "undo_pages": len(store.undo.pages()),
                "tree_depth": store.tree.depth(),
                **self._recovery,
            }

    def check(self) -> dict[str, Any]:
        """Walk every page and structure and the log; return what was checked.

        Raises CorruptionError naming the page (or structure) on damage.
        """
        from kvstore.check import check

        self._check_open()
        try:
            return check(self)
        except CorruptionError:
            self._damaged = True
            raise

    def backup(self, dest: str | os.PathLike[str]) -> dict[str, Any]:
        """Write a consistent copy of the database into directory ``dest``
        (which must not exist, or be empty) while it stays in use;
        ``kvstore.open(dest)`` opens it.  Raises ValueError for a bad ``dest``."""
        from kvstore.backup import backup

        self._check_open()
        return backup(self, os.fspath(dest))

    def _check_structures(self) -> dict[str, int]:
        """Walk the structures and raise AssertionError on a broken invariant."""
        with self._latch:
            assert self._store is not None
            return self._store._check()

    def __repr__(self) -> str:
        return f"<kvstore.Database {self.path!r}{' closed' if self._closed else ''}>"
