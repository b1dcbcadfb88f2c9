"""kvstore: a transactional embedded key-value store in pure Python.

    >>> import kvstore, tempfile
    >>> with kvstore.open(tempfile.mkdtemp()) as db:
    ...     with db.transaction() as tx:
    ...         tx.put(b"hello", b"world")
    ...     db.get(b"hello")
    b'world'

See SPEC.md for the contract: ``open``, transactions with snapshot or
serializable isolation, two-phase commit, checkpoints, backup, the CLI.
"""

from kvstore.database import Database, open
from kvstore.transaction import Savepoint, Transaction
from wal.errors import (
    ClosedError,
    ConflictError,
    CorruptionError,
    DatabaseLockedError,
    Error,
    TransactionError,
)

__version__ = "0.1.0"

__all__ = [
    "open",
    "Database",
    "Transaction",
    "Savepoint",
    "ClosedError",
    "ConflictError",
    "CorruptionError",
    "DatabaseLockedError",
    "Error",
    "TransactionError",
    "__version__",
]
