"""wal: the write-ahead log of kvstore.

Records, segments, the writer with group commit, the reader, truncation.
Imports nothing from the other kvstore packages; the file system is passed in.
"""

from wal.errors import (
    ClosedError,
    ConflictError,
    CorruptionError,
    DatabaseLockedError,
    Error,
    PoisonedError,
    TransactionError,
)
from wal.format import NO_LSN, Record, RecordType
from wal.log import WriteAheadLog

__all__ = [
    "ClosedError",
    "ConflictError",
    "CorruptionError",
    "DatabaseLockedError",
    "Error",
    "PoisonedError",
    "TransactionError",
    "NO_LSN",
    "Record",
    "RecordType",
    "WriteAheadLog",
]
