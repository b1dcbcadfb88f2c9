"""The error hierarchy of kvstore.

It lives here, in the lowest layer that raises these errors, and is
re-exported by ``kvstore``.  Bad arguments raise the built-in ``TypeError``
and ``ValueError`` instead.

    Error
     +-- ConflictError        a transaction lost a conflict; retry it
     +-- TransactionError     a finished transaction was used, or a write in a
     |                        read-only one; a programming error
     +-- CorruptionError      damage was detected on disk; nothing was changed
     +-- DatabaseLockedError  the database is open elsewhere
     +-- ClosedError          the database (or log) was closed or poisoned
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error kvstore raises on purpose."""


class ConflictError(Error):
    """Raised when a transaction conflicts with another and must be retried.

    The transaction has been rolled back.  ``key`` names the key the conflict
    was found on (``None`` when a commit validation cannot name one) and
    ``kind`` says which kind of conflict it was (e.g. ``"write-write"`` or
    ``"rw-antidependency"``).  Retry the whole transaction (``db.run`` does).
    """

    def __init__(self, message: str, key: bytes | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.kind = kind


class TransactionError(Error):
    """Raised when a finished transaction is used again, or on a write in a
    read-only transaction.  This is a programming error: fix the caller."""


class CorruptionError(Error):
    """Raised when damage is found on disk: a checksum that does not match, a
    structure that breaks its invariants, a log segment that is missing,
    swapped or foreign.

    ``where`` names the place (a file, a page, an LSN) and ``reason`` what was
    wrong.  Whatever raised it has changed nothing on disk; restore from a
    backup or run ``kvstore check`` to see the extent of the damage.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class DatabaseLockedError(Error):
    """Raised by ``open`` when the database is already open, in this process
    or another.  Close the other handle first."""


class ClosedError(Error):
    """Raised when a closed object is used: a closed database, a database
    inherited across ``fork()``, or a log after close."""


class PoisonedError(ClosedError):
    """Raised on every write after an fsync (or a write to the log) failed.

    The operating system may have dropped the data of the failed call and will
    not report it again, so the only safe course is to stop writing.  Reopen
    the database: recovery starts again from what is durable.  ``cause`` is the
    original ``OSError``.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
