"""kvstore: a transactional embedded key-value store in pure Python.

The store itself (``kvstore.open``) arrives with the transactions issue; the
layers below it are ``wal`` (write-ahead log), ``pages`` (file-system seam,
page file) and ``recovery``.
"""

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
    "ClosedError",
    "ConflictError",
    "CorruptionError",
    "DatabaseLockedError",
    "Error",
    "TransactionError",
    "__version__",
]
