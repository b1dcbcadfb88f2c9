"""Applying page ops: the one function both the live path and restart use.

A log record of type PAGE_REDO carries a list of page ops
(``pages.node.pack_ops``).  ``apply_live`` logs the ops and applies them now;
``redo_record`` re-applies a logged record during restart, skipping every
page whose page LSN shows it already has the change (ARIES' redo rule: apply
only where page LSN < record LSN).  Because both go through ``_apply``, the
state after replay equals the state that was live.

Page lifetime ops: IMAGE creates a page (allocating its id if needed) or
replaces its content; FREE releases it.  An op on a page that is not
allocated is skipped during redo: every page starts life with an IMAGE, so
the page was created before the redo start and freed after this record, and
the image already reflects that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pages.format import PageType
from pages.node import Op, PageOp, apply_tree_op, decode_node, pack_ops, unpack_ops

_UNDO_OPS = (Op.UNDO_APPEND, Op.UNDO_SETNEXT, Op.UNDO_MARK)

#: Nodes a structure change built while planning, by ``id()`` of the IMAGE
#: op's bytes they were encoded to: the live path installs the node itself
#: instead of decoding those bytes back (restart decodes them; the two are
#: equal because encoding round-trips, which ``CHECK_BUILT`` verifies).
Built = dict[int, Any]
#: Tests set this: every built node is compared with the decoding of its
#: image (type, keys, cells or children, size) before it is installed.
CHECK_BUILT = False


def decode_any(ptype: int, body: bytes, page_lsn: int = 0) -> Any:
    """The decoded node for any page type the buffer pool holds."""
    if ptype in (PageType.UNDO, PageType.UNDO_HEADER):
        from pages.rollback_segment import UndoHeader, UndoPage

        cls = UndoPage if ptype == PageType.UNDO else UndoHeader
        return cls.decode(body, page_lsn)
    return decode_node(ptype, body, page_lsn)


def apply_to_node(node: Any, op: int, data: bytes) -> Any:
    """Apply one content op to a node object; return the (possibly new) node."""
    if op == Op.IMAGE:
        return decode_any(data[0], data[1:])
    if op in _UNDO_OPS:
        from pages.rollback_segment import apply_undo_op

        return apply_undo_op(node, op, data)
    return apply_tree_op(node, op, data)


def _apply(pool: Any, pagefile: Any, lid: int, op: int, data: bytes, lsn: int, built: Built | None = None) -> None:
    """Apply one op at ``lsn`` (the redo decision has been made)."""
    if op == Op.FREE:
        if pagefile.is_allocated(lid):
            pool.discard(lid)
            pagefile.free(lid)
        return
    if op == Op.IMAGE:
        pagefile.ensure_allocated(lid)
        node = built.pop(id(data), None) if built else None
        if node is None:
            node = decode_any(data[0], data[1:])
        elif CHECK_BUILT:
            _check_built(node, data)
        pool.install(lid, node, lsn)
        return
    if not pagefile.is_allocated(lid):
        raise ValueError(f"op {op} on page {lid}, which is not allocated")
    node = pool.get(lid)
    new = apply_to_node(node, op, data)
    if new is node:
        pool.mark_dirty(lid, node, lsn)
    else:
        pool.install(lid, new, lsn)


def _needs_redo(pool: Any, pagefile: Any, lid: int, first_op: int, lsn: int) -> bool:
    """ARIES' redo rule for one page of a record, judged on the page as it
    was before the record: apply only where page LSN < record LSN.  A page
    that does not exist is created by an IMAGE; any other op on it is
    superseded (see the module docstring)."""
    if pagefile.has_image(lid) or pool.cached(lid) is not None:
        page_lsn: int = pool.get(lid).page_lsn
        return page_lsn < lsn
    if pagefile.is_allocated(lid):
        return True  # allocated during this restart, content still to come
    return first_op == Op.IMAGE


def _check_built(node: Any, data: bytes) -> None:
    decoded = decode_any(data[0], data[1:])
    same = type(node) is type(decoded) and node.keys == decoded.keys and node.size == decoded.size
    if same:
        same = node.cells == decoded.cells if hasattr(node, "cells") else node.children == decoded.children
    if not same:
        raise AssertionError(f"a built node differs from the decoding of its logged image: {node!r} against {decoded!r}")


def apply_live(pool: Any, pagefile: Any, log_ops: Callable[[list[PageOp]], int], ops: list[PageOp], built: Built | None = None) -> int:
    """Log ``ops`` as one record, then apply them; return the record's LSN.
    ``built``: nodes to install for IMAGE ops (``Built``)."""
    lsn = log_ops(ops)
    apply_logged(pool, pagefile, ops, lsn, built)
    return lsn


def apply_logged(pool: Any, pagefile: Any, ops: list[PageOp], lsn: int, built: Built | None = None) -> None:
    """Apply ``ops`` that the caller logged at ``lsn``."""
    for lid, op, data in ops:
        _apply(pool, pagefile, lid, op, data, lsn, built)


def redo_record(pool: Any, pagefile: Any, lsn: int, payload: bytes, touched: set[int] | None = None) -> int:
    """Re-apply a logged PAGE_REDO record; return how many ops changed a
    page.  Adds every page the record names to ``touched``."""
    pool.begin_op()
    try:
        decided: dict[int, bool] = {}
        applied = 0
        for lid, op, data in unpack_ops(payload):
            go = decided.get(lid)
            if go is None:
                go = decided[lid] = _needs_redo(pool, pagefile, lid, op, lsn)
                if touched is not None:
                    touched.add(lid)
            if go:
                _apply(pool, pagefile, lid, op, data, lsn)
                applied += 1
        return applied
    finally:
        pool.end_op()


__all__ = ["apply_live", "redo_record", "apply_to_node", "decode_any", "pack_ops", "unpack_ops"]
