"""Transactions: the user's handle on a snapshot and its writes.

State machine (the method that makes each move)::

    active --commit()--> committing --(log durable)--> committed
      |  \\--prepare(gid)--> prepared --commit_prepared / rollback_prepared-->
      |
      +--rollback() / ConflictError / exception in ``with``--> aborted

Any call on a transaction that is not active raises TransactionError (a
second ``commit()`` or ``rollback()`` included); so does a write in a
read-only transaction.  One transaction is used by one thread at a time; many
transactions run at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from threading import get_ident
from typing import TYPE_CHECKING, Any

from wal.errors import ConflictError, CorruptionError, TransactionError

if TYPE_CHECKING:
    from kvstore.database import Database
    from kvstore.mvcc import Snapshot
    from kvstore.ssi import SsiTxn

ACTIVE, COMMITTING, PREPARED, COMMITTED, ABORTED = "active", "committing", "prepared", "committed", "aborted"


def _as_bytes(value: object, what: str) -> bytes:
    if value.__class__ is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, bytearray or memoryview, not {type(value).__name__}")


MAX_KEY = 1024
MAX_VALUE = 64 * 2**20


def check_key(key: object) -> bytes:
    k = _as_bytes(key, "key")
    if not 1 <= len(k) <= MAX_KEY:
        raise ValueError(f"key must be 1 to 1024 bytes long, got {len(k)}")
    return k


def check_value(value: object) -> bytes:
    v = _as_bytes(value, "value")
    if len(v) > MAX_VALUE:
        raise ValueError(f"value must be at most 64 MiB (67108864 bytes), got {len(v)}")
    return v


def check_bound(bound: object, what: str) -> bytes | None:
    if bound is None:
        return None
    return _as_bytes(bound, what)


class Savepoint:
    """A point inside a transaction to roll back to (``tx.rollback_to``)."""

    __slots__ = ("tx", "undo", "seq")

    def __init__(self, tx: Transaction, undo: int, seq: int) -> None:
        self.tx = tx
        self.undo = undo  # the transaction's last undo pointer when taken
        self.seq = seq

    def __repr__(self) -> str:
        return f"<Savepoint {self.seq} of transaction {self.tx.txid or '(no writes yet)'}>"


class Transaction:
    """A transaction; create it with ``db.begin()`` or ``db.transaction()``."""

    __slots__ = (
        "db", "txid", "snapshot", "readonly", "isolation", "state", "last_undo",
        "last_lsn", "savepoints", "ssi", "writes", "gid", "_in_with", "_blocked_by", "_line", "_thread",
    )

    def __init__(self, db: Database, snapshot: Snapshot, readonly: bool, isolation: str, ssi: SsiTxn | None) -> None:
        self.db = db
        self.txid = 0  # assigned at the first write
        self.snapshot = snapshot
        self.readonly = readonly
        self.isolation = isolation
        self.state = ACTIVE
        self.last_undo = 0  # head of this transaction's undo chain
        self.last_lsn = 0xFFFF_FFFF_FFFF_FFFF  # prev-LSN chain in the log (NO_LSN)
        self.savepoints: list[Savepoint] = []
        self.ssi = ssi
        self.writes = 0
        self.gid: bytes | None = None
        self._in_with = False
        self._blocked_by = 0  # the unfinished writer a write conflicted with (for db.run; -1: a wait line)
        self._line: object = None  # db.run's place in a key's wait line (see Database.run)
        self._thread = get_ident()  # who began it: db.run never waits on its own thread's transaction

    # --- reads ---------------------------------------------------------------------

    def get(self, key: bytes, default: Any = None) -> Any:
        """The value of ``key`` in this transaction's snapshot, or ``default``.

        Raises TypeError/ValueError for a bad key, TransactionError if the
        transaction is finished, ConflictError under serializable isolation
        when the read makes this transaction the victim of a dangerous
        structure.
        """
        if key.__class__ is not bytes or not 0 < len(key) <= MAX_KEY:
            key = check_key(key)
        db = self.db
        if self.ssi is None and self.state == ACTIVE:
            # The hot path (Database._get_snapshot inlined): a plain value the
            # snapshot sees without its undo chain, or an absent key.
            snap = self.snapshot
            with db._latch:
                if not db._closed:
                    try:
                        found = db._tree.get_visible(key, snap.horizon, snap.own)
                    except CorruptionError:
                        db._damaged = True
                        raise
                    if found.__class__ is bytes:
                        return found
                    if found is None:
                        return default
            return db._get_snapshot(self, key, default)
        self._check_active()
        return db._get(self, key, default)

    def scan(self, start: bytes | None = None, stop: bytes | None = None, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs with start <= key < stop in this snapshot,
        ascending (or descending with ``reverse``).  ``None`` bounds are open.

        The scan is lazy: it reads one leaf at a time.
        """
        self._check_active()
        return self.db._scan(self, check_bound(start, "start"), check_bound(stop, "stop"), bool(reverse))

    # --- writes --------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value``.

        Raises ConflictError (after rolling the transaction back) if another
        transaction wrote the key and has not finished, or committed it after
        this transaction began.
        """
        db = self.db
        if db._closed or self.state != ACTIVE or self.readonly:
            self._check_writable()  # raises
        if key.__class__ is not bytes or not 0 < len(key) <= MAX_KEY:
            key = check_key(key)
        if value.__class__ is not bytes or len(value) > MAX_VALUE:
            value = check_value(value)
        db._put(self, key, value)

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Set many keys: the same as ``put`` for each ``(key, value)`` pair
        in order (a later pair for the same key wins), but the batch is
        sorted and written a leaf at a time -- one descent and one log record
        per run of keys that share a leaf -- so a bulk load costs a fraction
        of the puts one by one and leaves full pages behind it.

        Every pair is checked before anything is written: a bad key or value
        raises TypeError/ValueError and writes nothing.  A conflict on any key
        raises ConflictError (after rolling the transaction back), as ``put``.
        """
        self._check_writable()
        batch: dict[bytes, bytes] = {}
        for pair in items:
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise TypeError(f"put_many expects (key, value) pairs, got {pair!r:.80}") from None
            batch[check_key(key)] = check_value(value)
        if batch:
            keys = sorted(batch)
            self.db._put_many(self, keys, [batch[k] for k in keys])

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; return whether it existed, as this transaction saw it."""
        self._check_writable()
        return self.db._delete(self, check_key(key))

    # --- savepoints ---------------------------------------------------------------

    def savepoint(self) -> Savepoint:
        """Mark the current point; ``rollback_to`` it undoes what follows."""
        self._check_active()
        sp = Savepoint(self, self.last_undo, len(self.savepoints))
        self.savepoints.append(sp)
        return sp

    def rollback_to(self, savepoint: Savepoint) -> None:
        """Undo every write made after ``savepoint``.  The savepoint stays
        valid (roll back to it again later); savepoints taken after it are
        gone.  Raises ValueError for a savepoint of another transaction or one
        that is gone."""
        self._check_active()
        if not isinstance(savepoint, Savepoint):
            raise TypeError(f"rollback_to expects a Savepoint, not {type(savepoint).__name__}")
        if savepoint.tx is not self:
            raise ValueError("that savepoint belongs to another transaction")
        if savepoint.seq >= len(self.savepoints) or self.savepoints[savepoint.seq] is not savepoint:
            raise ValueError("that savepoint is gone: a rollback_to an earlier savepoint released it")
        self.db._rollback_to(self, savepoint.undo)
        del self.savepoints[savepoint.seq + 1 :]

    # --- ending --------------------------------------------------------------------

    def commit(self) -> None:
        """Commit.  Under ``sync="full"`` returns once the commit is durable.

        Raises ConflictError (the transaction is rolled back) if serializable
        validation fails, TransactionError if it is already finished.
        """
        db = self.db
        if db._closed or self.state != ACTIVE:
            self._check_active()  # raises
        db._commit(self)

    def rollback(self) -> None:
        """Undo every write and end the transaction."""
        if self.db._closed:
            self.db._raise_closed()
        if self.state != ACTIVE:
            raise TransactionError(f"transaction is already {self.state}")
        self.db._rollback(self)

    def prepare(self, gid: bytes) -> None:
        """First phase of two-phase commit: make the transaction durable but
        in doubt under the global id ``gid``; finish it with
        ``db.commit_prepared(gid)`` or ``db.rollback_prepared(gid)``."""
        self._check_active()
        self.db._prepare(self, _as_bytes(gid, "gid"))

    def _check_active(self) -> None:
        db = self.db
        if db._closed:
            db._raise_closed()
        if self.state != ACTIVE:
            raise TransactionError(f"transaction is already {self.state}")

    def _check_writable(self) -> None:
        self._check_active()
        if self.readonly:
            raise TransactionError("cannot write in a read-only transaction")

    @property
    def finished(self) -> bool:
        return self.state in (COMMITTED, ABORTED)

    # --- the with statement ---------------------------------------------------------

    def __enter__(self) -> Transaction:
        self._in_with = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.state != ACTIVE:
            return  # ended explicitly inside the block: nothing more to do
        if exc_type is None:
            self.commit()
        elif not self.db._closed:
            self.rollback()

    def __repr__(self) -> str:
        return f"<Transaction {self.txid or '-'} {self.state}{' readonly' if self.readonly else ''} {self.isolation}>"


__all__ = ["Transaction", "Savepoint", "ConflictError"]
