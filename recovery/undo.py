"""Undoing a transaction through its undo chain, one CLR per step.

Both live rollback (``tx.rollback()``, ``rollback_to``, after a conflict) and
restart's undo of losers use ``rollback_chain``.  Each step restores the
previous version of one key (or removes a key the transaction created),
marks the undo record undone, and logs that as a compensation log record
(CLR) whose payload starts with the *undo-next* pointer: the next undo record
to process.  A CLR is redone but never undone, so a rollback interrupted by a
crash resumes where it stopped and no step is undone twice (ARIES).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pages.node import FLAG_DELETED, PageOp, pack_ops
from pages.rollback_segment import ABSENT, UNDONE, WAS_DELETED, RollbackSegment
from pages.store import PageStore
from wal.format import RecordType

_U64 = struct.Struct("<Q")

#: append_clr(txid, undo_next, ops) -> LSN
AppendClr = Callable[[int, int, list[PageOp]], int]


def rollback_chain(store: PageStore, txid: int, last_undo: int, stop_at: int, append_clr: AppendClr) -> int:
    """Undo ``txid``'s changes from ``last_undo`` back to (not including)
    ``stop_at``; return ``stop_at``.  Caller holds the engine latch."""
    tree, undo = store.tree, store.undo
    ptr = last_undo
    while ptr and ptr != stop_at:
        rec = undo.read(ptr)
        if rec.txid != txid:
            from wal.errors import CorruptionError

            raise CorruptionError(f"undo record {ptr:#x}", f"belongs to transaction {rec.txid}, not {txid}")
        nxt = rec.txn_prev
        ops: list[PageOp] = []
        RollbackSegment.plan_mark_undone(ptr, ops)

        def log(step_ops: list[PageOp], _next: int = nxt) -> int:
            return append_clr(txid, _next, step_ops)

        cell = tree.get(rec.key)
        if rec.flags & UNDONE or cell is None or cell[1] != txid or cell[2] != ptr:
            # already undone, or the change never reached the tree: only record progress
            store.pool.begin_op()
            try:
                from pages.redo import apply_live

                apply_live(store.pool, store.pagefile, log, ops)
            finally:
                store.pool.end_op()
        elif rec.flags & ABSENT:
            tree.delete(rec.key, free_old=True, extra_ops=ops, log=log)
        else:
            value = rec.value
            flags = FLAG_DELETED if rec.flags & WAS_DELETED else 0
            if isinstance(value, bytes):
                tree.put(rec.key, value, rec.prev_writer, rec.prev_undo, flags, free_old=True, extra_ops=ops, log=log)
            else:  # an overflow value: restore the reference itself
                assert value is not None, "only a record of an absent key has no value"
                tree.put_cell(rec.key, (flags, rec.prev_writer, rec.prev_undo, value), free_old=True, extra_ops=ops, log=log)
        ptr = nxt
    return stop_at


def clr_payload(undo_next: int, ops: list[PageOp]) -> bytes:
    return _U64.pack(undo_next) + pack_ops(ops)


def clr_undo_next(payload: bytes) -> int:
    undo_next: int = _U64.unpack_from(payload)[0]
    return undo_next


__all__ = ["rollback_chain", "clr_payload", "clr_undo_next", "RecordType"]
