"""Hold one transaction's ``commit()`` inside its wait for the log.

Group commit releases the engine latch there: the commit is decided (and
numbered for SSI) but not yet visible to new snapshots.  Tests use the window
to interleave other transactions exactly there.  Test-only instrumentation of
``db._wal.commit_wait``; the engine is not changed.
"""

from __future__ import annotations

import threading

from kvstore import ConflictError


class CommitWindow:
    """``commit_in_background(tx)`` starts ``tx.commit()`` in a thread and
    returns once it waits for the log; ``release()`` lets it finish.
    ``outcome["t1"]`` is "committed" or the ConflictError; ``error`` is any
    other exception."""

    def __init__(self, db) -> None:
        self.wal = db._wal
        self.real_wait = self.wal.commit_wait
        self.waiting, self.released = threading.Event(), threading.Event()
        self.outcome: dict = {}
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def _held_wait(self, lsn):
        if threading.current_thread() is self.thread:
            self.waiting.set()
            self.released.wait(10)
        return self.real_wait(lsn)

    def commit_in_background(self, tx) -> None:
        def commit():
            try:
                tx.commit()
                self.outcome["t1"] = "committed"
            except ConflictError as e:
                self.outcome["t1"] = e
            except BaseException as e:
                self.error = e

        self.wal.commit_wait = self._held_wait
        self.thread = threading.Thread(target=commit, name="held-commit")
        self.thread.start()
        assert self.waiting.wait(10), "the commit never reached the log wait"

    def release(self) -> None:
        self.released.set()
        if self.thread is not None:
            self.thread.join(10)
        self.wal.commit_wait = self.real_wait
