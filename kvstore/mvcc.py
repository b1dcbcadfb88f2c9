"""Snapshots and visibility: which version of a key a transaction sees.

A version is a leaf cell ``(flags, writer txid, undo pointer, value)`` or an
undo record holding the version before it.  A snapshot is taken at ``begin``:

    low     the next transaction id at begin: writers >= low began later
    active  ids of the writing transactions that were unfinished at begin
            (prepared ones included)

A version written by W is visible to a snapshot of transaction T when W is T
itself, or W < low and W is not in active: W had finished -- committed, since
rolled-back versions are physically undone -- before T began.  Otherwise the
reader follows the undo chain to an older version, and finds the newest one
visible (or none: the key did not exist for it).

    >>> s = Snapshot(own=0, low=10, active=frozenset({7}))
    >>> s.sees(5), s.sees(7), s.sees(10)
    (True, False, False)

The purge horizon is the smallest id some live snapshot may not see; every
version written below it is visible to all, so nobody needs what its undo
record holds.
"""

from __future__ import annotations

from collections.abc import Callable

from pages.node import FLAG_DELETED, Cell, Value
from pages.rollback_segment import UndoRecord


class Snapshot:
    """What one transaction sees (immutable after begin)."""

    __slots__ = ("own", "low", "active", "horizon", "commit_seq")

    def __init__(self, own: int, low: int, active: frozenset[int], commit_seq: int = 0) -> None:
        self.own = own  # the transaction's own id (0 for a read-only one)
        self.low = low
        self.active = active
        self.horizon = min(active) if active else low  # ids below this are visible
        self.commit_seq = commit_seq  # commits finished at begin (for SSI)

    def sees(self, writer: int) -> bool:
        """Whether versions written by ``writer`` are visible."""
        if writer < self.horizon or writer == self.own:
            return True
        return writer < self.low and writer not in self.active


def visible_version(
    snap: Snapshot,
    cell: Cell,
    read_undo: Callable[[int], UndoRecord],
    skipped: list[int] | None = None,
) -> tuple[bool, Value | None]:
    """The version of a key ``snap`` sees, starting from its leaf ``cell``.

    Returns (exists, value) where value is bytes or an OverflowRef.  If
    ``skipped`` is given, the writers of newer versions that were invisible
    are appended to it (serializable transactions record them as
    read-write anti-dependencies).
    """
    value: Value | None  # None only in an undo record of an absent key, which returns first
    flags, writer, undo, value = cell
    while True:
        if snap.sees(writer):
            if flags & FLAG_DELETED:
                return False, None
            return True, value
        if skipped is not None:
            skipped.append(writer)
        if not undo:
            return False, None
        rec = read_undo(undo)
        if rec.flags & 0x01:  # ABSENT: the key did not exist before this writer
            return False, None
        flags = FLAG_DELETED if rec.flags & 0x02 else 0
        writer, undo, value = rec.prev_writer, rec.prev_undo, rec.value
