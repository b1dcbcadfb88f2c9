"""A B+tree over logical pages, logged physiologically.

Keys are 1..1024 bytes, ordered bytewise.  Each leaf cell carries a value (or
an overflow reference), the writer's transaction id, an undo pointer and a
delete mark (``pages.node``).  The root's page id never changes: a root split
moves the root's content to a new page, a root collapse moves its only child's
content up, so the root id can live in the meta without being logged.

Every change is logged before it is applied (log first, then mutate):

* a put or delete that fits in its leaf is one record with one op;
* a structure change (split, merge, redistribution, root change) is one
  redo-only record holding every page op of it -- new pages as IMAGE ops,
  cuts and separator changes as small ops -- so a torn log never holds half
  of one.  The live path applies those ops with the same function restart
  uses (``pages.redo``), so replaying the log repeats history exactly.

Fill rule: cells bigger than a third of a page body go to overflow pages, so a
split always yields two halves that fit; a non-root node below a quarter of a
page body is merged with or refilled from a sibling.

Not thread-safe: the caller holds the engine latch.  Scans yield one leaf's
worth at a time and re-seek between leaves, so the caller may release the
latch between batches and the tree may change meanwhile.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import TypeVar

import crc32c
import lz4.block  # type: ignore[import-untyped]  # lz4 ships neither type hints nor stubs

from pages import redo
from pages.buffer_pool import BufferPool
from pages.node import (
    CELL_OVERHEAD,
    FLAG_DELETED,
    OVF_REF_SIZE,
    Cell,
    InternalNode,
    LeafNode,
    Op,
    OverflowNode,
    OverflowRef,
    PageOp,
    TreeNode,
    Value,
    body_capacity,
    cell_size,
    op_image,
    op_index_key,
    op_leaf_del,
    op_leaf_put,
)
from pages.pagefile import PageFile

MAX_KEY = 1024
MAX_VALUE = 64 * 2**20

_T = TypeVar("_T")
LogOps = Callable[[list[PageOp]], int]  # append a record of [(page id, Op, data)], return its LSN
Path = list[tuple[int, TreeNode]]  # (page id, node) from the root down to a leaf


class BTree:
    """A B+tree rooted at page ``root``.  Create one with ``BTree.create``."""

    def __init__(self, pool: BufferPool, pagefile: PageFile, log_ops: LogOps, root: int, capacity: int | None = None) -> None:
        self.pool = pool
        self.pagefile = pagefile
        # the pool's frame table, for the read path's inlined hit (the pool
        # never replaces it)
        self._find = pool._frames.get
        self._to_young_end = pool._frames.move_to_end
        self._log = log_ops
        self.root = root
        self.capacity = capacity or body_capacity(pagefile.page_size)
        self.max_cell = self.capacity // 3
        self.min_fill = self.capacity // 4
        self._ovf_chunk = body_capacity(pagefile.page_size) - 8

    @classmethod
    def create(cls, pool: BufferPool, pagefile: PageFile, log_ops: LogOps, capacity: int | None = None) -> BTree:
        """A new empty tree (an empty root leaf), logged."""
        root = pagefile.allocate()
        pool.begin_op()
        try:
            redo.apply_live(pool, pagefile, log_ops, [(root, Op.IMAGE, op_image(LeafNode()))])
        finally:
            pool.end_op()
        return cls(pool, pagefile, log_ops, root, capacity)

    # --- reads ---------------------------------------------------------------------

    def _leaf(self, key: bytes) -> LeafNode:
        """The leaf that holds ``key`` (if anything does): one descent.

        BufferPool.get's hit path is inlined (a warm get is all hits).  Only
        the leaf moves to the LRU's young end: internal nodes are found again
        by every descent below them, so they are re-read at worst once per
        turn of the cache, and moving them would cost every get.
        """
        pool = self.pool
        frames = pool._frames
        op = pool._op
        lid = self.root
        hits = 0  # of internal nodes (pool.get counts its own)
        while True:
            frame = frames.get(lid)
            if frame is None:
                node = pool.get(lid)
                if node.__class__ is not InternalNode:
                    pool.hits += hits
                    return node  # type: ignore[no-any-return]
            else:
                frame.stamp = op
                node = frame.node
                if node.__class__ is not InternalNode:
                    frames.move_to_end(lid)
                    pool.hits += hits + 1
                    return node  # type: ignore[no-any-return]
                hits += 1
            lid = node.children[bisect_right(node.keys, key)]

    def leaf_for_write(self, key: bytes) -> tuple[int, LeafNode, bool]:
        """(page id, node) of the leaf for ``key``, and whether it is the
        root: ``_path``'s descent without the path, for a write that will
        change the leaf alone.  Caller has begun a pool operation, which pins
        what the descent reads until it ends."""
        get = self.pool.get
        lid = self.root
        node = get(lid)
        if node.__class__ is not InternalNode:
            return lid, node, True
        while True:
            lid = node.children[bisect_right(node.keys, key)]
            node = get(lid)
            if node.__class__ is not InternalNode:
                return lid, node, False

    def get(self, key: bytes) -> Cell | None:
        """The cell stored for ``key``, or None.  Cost: one root-to-leaf descent."""
        leaf = self._leaf(key)
        keys = leaf.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return leaf.cells[i]
        return None

    def cells_of(self, keys: list[bytes]) -> list[Cell | None]:
        """The cells stored for sorted, distinct ``keys`` (None where a key
        has none): ``get`` for each, in one descent per leaf they share."""
        out: list[Cell | None] = []
        append = out.append
        n, i = len(keys), 0
        while i < n:
            leaf, upper = self._seek(keys[i])
            lkeys, lcells = leaf.keys, leaf.cells
            j = n if upper is None else bisect_left(keys, upper, i + 1)
            m = len(lkeys)
            for k in keys[i:j]:
                p = bisect_left(lkeys, k)
                append(lcells[p] if p < m and lkeys[p] == k else None)
            i = j
        return out

    def get_visible(self, key: bytes, horizon: int, own: int) -> bytes | Cell | None:
        """``get`` for the read path: the value itself (bytes) when the
        newest version is a plain value written below ``horizon`` or by
        ``own`` (visible to the snapshot without its undo chain); None when
        the key has no cell; otherwise (a delete mark, an overflow value, a
        version the snapshot may not see) the cell, for the caller to resolve.
        The descent is ``_leaf``'s, inlined: this is the hottest path.  It
        stamps no frame: a read runs outside any pool operation, so a stamp
        would pin nothing (``BufferPool._evict`` pins only during one)."""
        find = self._find
        lid = self.root
        hits = 0
        while True:
            frame = find(lid)
            if frame is None:
                pool = self.pool
                node = pool.get(lid)
                if node.__class__ is not InternalNode:
                    pool.hits += hits
                    break
            else:
                node = frame.node
                if node.__class__ is not InternalNode:
                    self._to_young_end(lid)
                    self.pool.hits += hits + 1
                    break
                hits += 1
            lid = node.children[bisect_right(node.keys, key)]
        keys = node.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            cell: Cell = node.cells[i]
            if not cell[0]:  # no delete mark
                writer = cell[1]
                if writer < horizon or writer == own:
                    value = cell[3]
                    if value.__class__ is bytes:  # not an OverflowRef
                        return value
            return cell
        return None

    def read_value(self, cell: Cell) -> bytes:
        """The value of a cell, following its overflow chain if it has one.

        Raises CorruptionError if the chain is damaged.
        """
        v = cell[3]
        if not isinstance(v, OverflowRef):
            return v
        parts = []
        lid = v.first
        got = 0
        while lid and got < v.stored:
            node = self.pool.get(lid)
            if node.__class__ is not OverflowNode:
                from wal.errors import CorruptionError

                raise CorruptionError(f"page {lid}", "expected an overflow page in a value's chain")
            parts.append(node.data)
            got += len(node.data)
            lid = node.next
        data = b"".join(parts)[: v.stored]
        if v.compressed:
            data = lz4.block.decompress(data)
        if len(data) != v.length or crc32c.crc32c(data) != v.crc:
            from wal.errors import CorruptionError

            raise CorruptionError(f"overflow chain at page {v.first}", "value does not match its length or checksum")
        return data

    def scan(self, start: bytes | None = None, stop: bytes | None = None, reverse: bool = False) -> Iterator[tuple[bytes, Cell]]:
        """(key, cell) for keys in [start, stop), ascending (or descending)."""
        for batch in self.scan_batches(start, stop, reverse):
            yield from batch

    def scan_batches(self, start: bytes | None, stop: bytes | None, reverse: bool = False) -> Iterator[list[tuple[bytes, Cell]]]:
        """Like ``scan``, one leaf per batch; the tree may change between
        batches (each batch re-seeks from the root)."""
        if not reverse:
            pos: bytes | None = start if start is not None else b""
            while pos is not None:
                leaf, upper = self._seek(pos)
                keys = leaf.keys
                i = bisect_left(keys, pos)
                j = len(keys) if stop is None or (upper is not None and upper <= stop) else bisect_left(keys, stop)
                if i < j:
                    yield list(zip(keys[i:j], leaf.cells[i:j], strict=True))
                if upper is None or (stop is not None and upper >= stop):
                    return
                pos = upper
        else:
            bound: bytes | None = stop  # exclusive upper bound; None = +infinity
            while True:
                leaf, lower = self._seek_rev(bound)
                keys = leaf.keys
                j = len(keys) if bound is None else bisect_left(keys, bound)
                i = 0 if start is None else bisect_left(keys, start, 0, j)
                if i < j:
                    yield list(zip(reversed(keys[i:j]), reversed(leaf.cells[i:j]), strict=True))
                if lower is None or (start is not None and lower <= start):
                    return
                bound = lower

    def _seek(self, key: bytes) -> tuple[LeafNode, bytes | None]:
        """The leaf where ``key`` belongs and the smallest separator above it."""
        get = self.pool.get
        node = get(self.root)
        upper = None
        while node.__class__ is InternalNode:
            i = bisect_right(node.keys, key)
            if i < len(node.keys):
                upper = node.keys[i]
            node = get(node.children[i])
        return node, upper

    def _seek_rev(self, bound: bytes | None) -> tuple[LeafNode, bytes | None]:
        """The leaf holding the largest keys below ``bound`` (None: the last
        leaf), and the separator that is that leaf's lower limit."""
        get = self.pool.get
        node = get(self.root)
        lower = None
        while node.__class__ is InternalNode:
            i = len(node.keys) if bound is None else bisect_left(node.keys, bound)
            if i > 0:
                lower = node.keys[i - 1]
            node = get(node.children[i])
        return node, lower

    # --- writes ------------------------------------------------------------------

    def put(
        self,
        key: bytes,
        value: bytes,
        txid: int = 0,
        undo: int = 0,
        flags: int = 0,
        free_old: bool = True,
        extra_ops: list[PageOp] | None = None,
        log: LogOps | None = None,
    ) -> Cell | None:
        """Insert or replace ``key``; return the old cell (or None).

        ``free_old`` frees the old value's overflow chain (the MVCC layer keeps
        it for an undo record instead).  ``extra_ops`` (e.g. the undo record of
        this change) go into the same log record, first; ``log`` replaces the
        tree's log function for this call (to write a transaction's record).
        Cost: O(depth), plus a split now and then.
        """
        if len(key) > MAX_KEY or not key:
            raise ValueError(f"key must be 1..{MAX_KEY} bytes, got {len(key)}")
        if len(value) > MAX_VALUE:
            raise ValueError(f"value must be at most {MAX_VALUE} bytes, got {len(value)}")
        ops: list[PageOp] = list(extra_ops) if extra_ops else []

        def plan_and_put(log_once: LogOps) -> Cell | None:
            v: Value = value
            if CELL_OVERHEAD + len(key) + len(value) > self.max_cell:
                v = self._plan_overflow(value, ops)
            return self._put((flags, txid, undo, v), key, free_old, ops, log_once)

        return self._guarded(ops, log or self._log, plan_and_put)

    def _guarded(self, ops: list[PageOp], log_ops: LogOps, fn: Callable[[LogOps], _T]) -> _T:
        """``fn(log)`` as one pool operation; if it fails before ``log``
        wrote its record, the page ids its plan (``ops``) allocated are given
        back."""
        logged = [False]

        def log_once(planned: list[PageOp]) -> int:
            lsn = log_ops(planned)
            logged[0] = True
            return lsn

        self.pool.begin_op()
        try:
            return fn(log_once)
        except BaseException:
            if not logged[0]:
                self.release_planned(ops)
            raise
        finally:
            self.pool.end_op()

    def release_planned(self, ops: list[PageOp]) -> None:
        """An operation failed before its record was logged (a read whose
        eviction could not write, say): give back the page ids its plan
        allocated -- pages that are neither written nor cached -- so none is
        left allocated without content."""
        pagefile, pool = self.pagefile, self.pool
        for lid, op, _ in ops:
            if op == Op.IMAGE and pagefile.is_allocated(lid) and not pagefile.has_image(lid) and pool.cached(lid) is None:
                pagefile.release_unwritten(lid)

    def put_cell(
        self, key: bytes, cell: Cell, free_old: bool = True, extra_ops: list[PageOp] | None = None, log: LogOps | None = None
    ) -> Cell | None:
        """Store a prepared cell (whose value may be an existing overflow
        reference, as rollback restores it); otherwise like ``put``."""
        ops: list[PageOp] = list(extra_ops) if extra_ops else []
        return self._guarded(ops, log or self._log, lambda log_once: self._put(cell, key, free_old, ops, log_once))

    def put_run(
        self,
        keys: list[bytes],
        start: int,
        stop: int,
        plan: Callable[[int, int, list[Cell | None], list[PageOp]], list[Cell]],
        log: LogOps | None = None,
    ) -> int:
        """Put a run of sorted, distinct ``keys[start:j]`` that land in one
        leaf, in one log record; return ``j`` (``start < j <= stop``): the
        run stops at ``stop`` or at the leaf's upper bound.

        ``plan(start, j, olds, ops)`` is told the keys' old cells (None for an
        absent key), may add ops that go first (their undo records), and
        returns the new cells, whose values must fit inline.  Old values are
        kept (as ``put(free_old=False)``).  A run that over-fills the leaf
        splits it into as few pieces as fit (``_plan_split(pack=True)``), so
        ascending runs leave full leaves behind them.
        """
        ops: list[PageOp] = []
        pool = self.pool

        def run(log_once: LogOps) -> int:
            path = self._path(keys[start])
            leaf_lid, leaf = _leaf_of(path)
            bound = None
            for _, node in path[:-1]:
                i = bisect_right(node.keys, keys[start])
                if i < len(node.keys):
                    bound = node.keys[i]  # deeper bounds are tighter
            j = stop if bound is None else bisect_left(keys, bound, start + 1, stop)
            lkeys, lcells = leaf.keys, leaf.cells
            olds: list[Cell | None] = []
            for k in keys[start:j]:
                i = bisect_left(lkeys, k)
                olds.append(lcells[i] if i < len(lkeys) and lkeys[i] == k else None)
            cells = plan(start, j, olds, ops)
            new_size = leaf.size
            for k, c, o in zip(keys[start:j], cells, olds, strict=True):
                new_size += cell_size(k, c) - (cell_size(k, o) if o is not None else 0)
            first = len(ops)
            if self.min_fill <= new_size <= self.capacity or len(path) == 1 and new_size <= self.capacity:
                for k, c in zip(keys[start:j], cells, strict=True):
                    ops.append((leaf_lid, Op.LEAF_PUT, op_leaf_put(k, c)))
                lsn = log_once(ops)
                if first:
                    redo.apply_logged(pool, self.pagefile, ops[:first], lsn)
                put = leaf.put
                for k, c in zip(keys[start:j], cells, strict=True):
                    put(k, c)
                pool.mark_dirty(leaf_lid, leaf, lsn)
                return j
            merged = dict(zip(lkeys, lcells, strict=True))
            merged.update(zip(keys[start:j], cells, strict=True))
            order = sorted(merged)
            virtual = LeafNode.sized(order, [merged[k] for k in order], new_size)
            built: redo.Built = {}
            if new_size > self.capacity:
                self._plan_split(path, virtual, ops, pack=True, built=built)
            else:
                self._plan_rebalance(path, virtual, ops)
            redo.apply_live(pool, self.pagefile, log_once, ops, built)
            return j

        return self._guarded(ops, log or self._log, run)

    def _put(self, cell: Cell, key: bytes, free_old: bool, ops: list[PageOp], log_ops: LogOps) -> Cell | None:
        """Caller has begun a pool operation; ``ops`` holds what goes first."""
        pool = self.pool
        path = self._path(key)
        leaf_lid, leaf = _leaf_of(path)
        i = bisect_left(leaf.keys, key)
        old = leaf.cells[i] if i < len(leaf.keys) and leaf.keys[i] == key else None
        if old is not None and free_old:
            self._plan_free_value(old, ops)
        new_size = leaf.size + cell_size(key, cell) - (cell_size(key, old) if old is not None else 0)
        first = len(ops)
        ops.append((leaf_lid, Op.LEAF_PUT, op_leaf_put(key, cell)))
        if self.min_fill <= new_size <= self.capacity or len(path) == 1 and new_size <= self.capacity:
            # the common case: log, apply the ops before the leaf's, change the leaf directly
            lsn = log_ops(ops)
            if first:
                redo.apply_logged(pool, self.pagefile, ops[:first], lsn)
            leaf.put(key, cell)
            pool.mark_dirty(leaf_lid, leaf, lsn)
            return old
        virtual = LeafNode.sized(list(leaf.keys), list(leaf.cells), leaf.size)
        virtual.put(key, cell)
        built: redo.Built = {}
        if new_size > self.capacity:
            self._plan_split(path, virtual, ops, built=built)
        else:
            self._plan_rebalance(path, virtual, ops)
        redo.apply_live(pool, self.pagefile, log_ops, ops, built)
        return old

    def delete(self, key: bytes, free_old: bool = True, extra_ops: list[PageOp] | None = None, log: LogOps | None = None) -> Cell | None:
        """Remove ``key``; return its old cell, or None if it was absent (and
        then log nothing, not even ``extra_ops``)."""
        pool = self.pool
        log_ops = log or self._log
        pool.begin_op()
        try:
            path = self._path(key)
            leaf_lid, leaf = _leaf_of(path)
            i = bisect_left(leaf.keys, key)
            if i == len(leaf.keys) or leaf.keys[i] != key:
                return None
            old = leaf.cells[i]
            ops: list[PageOp] = list(extra_ops) if extra_ops else []
            if free_old:
                self._plan_free_value(old, ops)
            ops.append((leaf_lid, Op.LEAF_DEL, op_leaf_del(key)))
            new_size = leaf.size - cell_size(key, old)
            if new_size >= self.min_fill or len(path) == 1:
                if len(ops) == 1:
                    lsn = log_ops(ops)
                    leaf.remove(key)
                    pool.mark_dirty(leaf_lid, leaf, lsn)
                else:
                    redo.apply_live(pool, self.pagefile, log_ops, ops)
                return old
            virtual = LeafNode(list(leaf.keys), list(leaf.cells))
            virtual.remove(key)
            self._plan_rebalance(path, virtual, ops)
            redo.apply_live(pool, self.pagefile, log_ops, ops)
            return old
        finally:
            pool.end_op()

    def free_value(self, cell: Cell, extra_ops: list[PageOp] | None = None) -> None:
        """Free a value's overflow chain (logged, with ``extra_ops`` in the
        same record); no-op for inline values."""
        ops: list[PageOp] = list(extra_ops) if extra_ops else []
        self.pool.begin_op()
        try:
            self._plan_free_value(cell, ops)
            if ops:
                redo.apply_live(self.pool, self.pagefile, self._log, ops)
        finally:
            self.pool.end_op()

    def _path(self, key: bytes) -> Path:
        get = self.pool.get
        lid = self.root
        node = get(lid)
        path: Path = [(lid, node)]
        while node.__class__ is InternalNode:
            lid = node.children[bisect_right(node.keys, key)]
            node = get(lid)
            path.append((lid, node))
        return path

    # --- planning structure changes -------------------------------------------------
    # Each planner appends ops and keeps a "virtual" copy of every node it
    # changes, so cascades see the state the earlier ops will have made.

    def _plan_overflow(self, value: bytes, ops: list[PageOp]) -> OverflowRef:
        data, compressed = value, 0
        packed: bytes = lz4.block.compress(value)
        if len(packed) < len(value) - len(value) // 16:
            data, compressed = packed, 1
        chunk = self._ovf_chunk
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
        lids = [self.pagefile.allocate() for _ in pieces]
        for n, piece in enumerate(pieces):
            nxt = lids[n + 1] if n + 1 < len(lids) else 0
            ops.append((lids[n], Op.IMAGE, op_image(OverflowNode(nxt, piece))))
        return OverflowRef(lids[0], len(data), len(value), compressed, crc32c.crc32c(value))

    def _plan_free_value(self, cell: Cell, ops: list[PageOp]) -> None:
        v = cell[3]
        if not isinstance(v, OverflowRef):
            return
        lid = v.first
        while lid:
            node = self.pool.get(lid)
            ops.append((lid, Op.FREE, b""))
            lid = node.next

    def _halves(self, node: TreeNode) -> tuple[TreeNode, bytes, TreeNode]:
        """(left, separator, right): ``node``'s content split where the halves'
        bytes balance best.  A leaf's separator is the right half's first key;
        an internal node's moves up and is in neither half.

        A leaf splits where the two halves' bytes are closest: they then
        differ by at most one cell (a third of a page body), so both stay
        above the minimum fill."""
        keys = node.keys
        if isinstance(node, LeafNode):
            cells = node.cells
            sizes = [cell_size(k, c) for k, c in zip(keys, cells, strict=True)]
            i = _balanced_split(sizes)
            left = 2 + sum(sizes[:i])
            return LeafNode.sized(keys[:i], cells[:i], left), keys[i], LeafNode.sized(keys[i:], cells[i:], node.size - left + 2)
        sizes = [10 + len(k) for k in keys]
        m = self._split_internal(sizes)
        left = 10 + sum(sizes[:m])
        children = node.children
        return (
            InternalNode.sized(keys[:m], children[: m + 1], left),
            keys[m],
            InternalNode.sized(keys[m + 1 :], children[m + 1 :], node.size - left + 10 - sizes[m]),
        )

    @staticmethod
    def _split_internal(sizes: list[int]) -> int:
        """Index of the separator that moves up when splitting an over-full
        internal node whose entries take ``sizes`` bytes: the one that
        balances the halves' bytes best (keys vary from 1 to 1024 bytes, so
        the middle index could over-fill one)."""
        n = len(sizes)
        total = sum(sizes)
        best, best_gap, left = 1, None, 0
        for m in range(n):  # keys[:m] left, keys[m] up, keys[m+1:] right
            if 1 <= m <= n - 2:
                gap = abs(left - (total - left - sizes[m]))
                if best_gap is None or gap < best_gap:
                    best, best_gap = m, gap
            left += sizes[m]
        return best

    def _plan_split(self, path: Path, node: TreeNode, ops: list[PageOp], pack: bool = False, built: redo.Built | None = None) -> None:
        """Split ``node`` (the virtual state of the last page of ``path``) and
        every ancestor it over-fills.  A node splits into balanced halves
        when they fit (a node over-full by one entry); with ``pack`` (a run
        of puts), or when halves would not fit, into as few pieces as hold
        it, filled in key order (``_pack``).  ``built`` collects the new
        nodes by their IMAGE ops, for ``redo.apply_live`` to install as
        they are rather than decode what they were just encoded to."""
        level = len(path) - 1
        while node.size > self.capacity:
            lid = path[level][0]
            pieces, seps = self._pack(node) if pack else self._halves_or_pack(node)
            if level == 0:  # root split: the root id stays; the pieces move down
                lids = [self.pagefile.allocate() for _ in pieces[1:]]
                lids.insert(0, self.pagefile.allocate())  # as before packing: the right half's id first
                for piece_lid, piece in zip(lids, pieces, strict=True):
                    _image(ops, piece_lid, piece, built)
                node = InternalNode(seps, lids)
                if node.size <= self.capacity:
                    _image(ops, lid, node, built)
                    return
                path = [(lid, node)]  # a root too big for one page: split it again, a level up
                continue
            new_lids = [self.pagefile.allocate() for _ in pieces[1:]]
            for piece_lid, piece in zip(new_lids, pieces[1:], strict=True):
                _image(ops, piece_lid, piece, built)
            _image(ops, lid, pieces[0], built)
            parent_lid, parent = _parent_of(path, level)
            virtual = InternalNode.sized(list(parent.keys), list(parent.children), parent.size)
            idx = virtual.child_index(seps[0])
            for n, (sep, piece_lid) in enumerate(zip(seps, new_lids, strict=True)):
                virtual.insert(idx + n, sep, piece_lid)
                ops.append((parent_lid, Op.INT_INSERT, op_index_key(idx + n, sep, piece_lid)))
            node = virtual
            level -= 1

    def _halves_or_pack(self, node: TreeNode) -> tuple[list[TreeNode], list[bytes]]:
        """Balanced halves when both fit a page (a node over-full by one
        entry), else ``_pack``."""
        left, sep, right = self._halves(node)
        if left.size <= self.capacity and right.size <= self.capacity:
            return [left, right], [sep]
        return self._pack(node)

    def _pack(self, node: TreeNode) -> tuple[list[TreeNode], list[bytes]]:
        """(pieces, separators): ``node``'s content cut greedily, in key order,
        into pieces that each fill a page as far as the next entry allows;
        when the last piece would be under-full, it and the one before share
        their content evenly (``_halves``: their sum is over a page, so both
        halves are above the minimum fill)."""
        cap = self.capacity
        pieces: list[TreeNode] = []
        seps: list[bytes] = []
        keys = node.keys
        if isinstance(node, LeafNode):
            cells = node.cells
            begin, size = 0, 2
            for i, k in enumerate(keys):
                cs = cell_size(k, cells[i])
                if size + cs > cap and i > begin:
                    pieces.append(LeafNode.sized(keys[begin:i], cells[begin:i], size))
                    seps.append(k)
                    begin, size = i, 2
                size += cs
            pieces.append(LeafNode.sized(keys[begin:], cells[begin:], size))
        else:
            children = node.children
            begin, size = 0, 10
            i = 0
            while i < len(keys):
                es = 10 + len(keys[i])
                if size + es > cap and i > begin:  # keys[i] moves up between the pieces
                    pieces.append(InternalNode(keys[begin:i], children[begin : i + 1]))
                    seps.append(keys[i])
                    begin, size = i + 1, 10
                else:
                    size += es
                i += 1
            pieces.append(InternalNode(keys[begin:], children[begin:]))
        last = pieces[-1]
        if len(pieces) > 1 and (last.size < self.min_fill or isinstance(last, InternalNode) and not last.keys):
            left, sep, right = self._halves(_merge(pieces[-2], seps[-1], last))
            pieces[-2:] = [left, right]
            seps[-1] = sep
        return pieces, seps

    def _plan_rebalance(self, path: Path, node: TreeNode, ops: list[PageOp]) -> None:
        """Fix an under-full ``node`` (virtual state of path[level]) by merging
        with or borrowing from a sibling, cascading up; collapse the root."""
        level = len(path) - 1
        lid = path[level][0]
        ops.append((lid, Op.IMAGE, op_image(node)))
        while level > 0 and node.size < self.min_fill:
            parent_lid, parent_real = _parent_of(path, level)
            parent = InternalNode.sized(list(parent_real.keys), list(parent_real.children), parent_real.size)
            idx = parent.children.index(lid)
            if idx > 0:
                li, left_lid, right_lid = idx - 1, parent.children[idx - 1], lid
                left, right = self._virtual(left_lid, ops), node
            else:
                li, left_lid, right_lid = 0, lid, parent.children[1]
                left, right = node, self._virtual(right_lid, ops)
            merged = _merge(left, parent.keys[li], right)
            if merged.size <= self.capacity:
                ops.append((left_lid, Op.IMAGE, op_image(merged)))
                ops.append((right_lid, Op.FREE, b""))
                parent.remove(li)
                ops.append((parent_lid, Op.INT_REMOVE, op_index_key(li, b"")))
            else:  # redistribute: split the combined content evenly
                nl, new_sep, nr = self._halves(merged)
                ops.append((left_lid, Op.IMAGE, op_image(nl)))
                ops.append((right_lid, Op.IMAGE, op_image(nr)))
                parent.set_key(li, new_sep)
                ops.append((parent_lid, Op.INT_SETKEY, op_index_key(li, new_sep)))
                if parent.size > self.capacity:  # a longer separator can over-fill the parent
                    self._plan_split(path[:level], parent, ops)
                    return
                # a shorter one can leave it under-full: go on rebalancing upward
            node, lid, level = parent, parent_lid, level - 1
        if level == 0 and isinstance(node, InternalNode) and not node.keys:
            # root collapse: pull the only child's content up into the root id
            child_lid = node.children[0]
            child = self._virtual(child_lid, ops)
            ops.append((lid, Op.IMAGE, op_image(child)))
            ops.append((child_lid, Op.FREE, b""))

    def _virtual(self, lid: int, ops: list[PageOp]) -> TreeNode:
        """A copy of page ``lid`` as the planned ops so far leave it."""
        node = self.pool.get(lid)
        copy: TreeNode
        if node.__class__ is LeafNode:
            copy = LeafNode.sized(list(node.keys), list(node.cells), node.size)
        else:
            copy = InternalNode.sized(list(node.keys), list(node.children), node.size)
        for olid, op, data in ops:
            if olid == lid:
                copy = redo.apply_to_node(copy, op, data)
        return copy

    # --- inspection ----------------------------------------------------------------

    def depth(self) -> int:
        node = self.pool.get(self.root)
        d = 1
        while node.__class__ is InternalNode:
            node = self.pool.get(node.children[0])
            d += 1
        return d

    def _check(self) -> dict[str, int]:
        """Raise AssertionError on a broken invariant: key order, separator
        bounds, equal leaf depth, fill, overflow chains.  Returns counts."""
        counts = {"leaves": 0, "internal": 0, "keys": 0, "overflow_pages": 0}
        leaf_depths: set[int] = set()

        def walk(lid: int, lo: bytes | None, hi: bytes | None, depth: int) -> None:
            node = self.pool.get(lid)
            assert node.size <= self.capacity, f"page {lid} over-full: {node.size} > {self.capacity}"
            if lid != self.root:
                assert node.size >= self.min_fill, (
                    f"page {lid} ({type(node).__name__}, {len(node.keys)} keys) under-full: {node.size} < {self.min_fill}"
                )
            keys = node.keys
            assert all(a < b for a, b in pairwise(keys)), f"page {lid}: keys out of order"
            if keys:
                assert lo is None or keys[0] >= lo, f"page {lid}: key below its lower bound"
                assert hi is None or keys[-1] < hi, f"page {lid}: key above its upper bound"
            if node.__class__ is LeafNode:
                counts["leaves"] += 1
                counts["keys"] += len(keys)
                leaf_depths.add(depth)
                assert len(node.cells) == len(keys), f"page {lid}: {len(keys)} keys but {len(node.cells)} cells"
                assert node.size == 2 + sum(cell_size(k, c) for k, c in zip(keys, node.cells, strict=True)), f"page {lid}: size"
                for c in node.cells:
                    if c[3].__class__ is OverflowRef:
                        counts["overflow_pages"] += self._check_chain(c[3])
                return
            counts["internal"] += 1
            assert len(node.children) == len(keys) + 1, f"page {lid}: children do not match keys"
            assert lid == self.root or keys, f"page {lid}: internal node without keys"
            bounds = [lo] + list(keys) + [hi]
            for i, child in enumerate(node.children):
                walk(child, bounds[i], bounds[i + 1], depth + 1)

        self.pool.begin_op()
        try:
            walk(self.root, None, None, 1)
        finally:
            self.pool.end_op()
        assert len(leaf_depths) <= 1, f"leaves at different depths: {leaf_depths}"
        return counts

    def _check_chain(self, ref: OverflowRef) -> int:
        n, got, lid = 0, 0, ref.first
        while lid:
            node = self.pool.get(lid)
            assert node.__class__ is OverflowNode, f"page {lid} in an overflow chain is not an overflow page"
            got += len(node.data)
            n += 1
            lid = node.next
        assert got == ref.stored, f"overflow chain at {ref.first} holds {got} bytes, expected {ref.stored}"
        return n


def _image(ops: list[PageOp], lid: int, node: TreeNode, built: redo.Built | None) -> None:
    """Add the IMAGE op that makes page ``lid`` hold ``node``, and note the
    node in ``built`` (keyed by the op's bytes) when given."""
    data = op_image(node)
    if built is not None:
        built[id(data)] = node
    ops.append((lid, Op.IMAGE, data))


def _leaf_of(path: Path) -> tuple[int, LeafNode]:
    """(page id, node) of the leaf that ends ``path``."""
    lid, node = path[-1]
    assert isinstance(node, LeafNode), f"page {lid} at the end of a path is not a leaf"
    return lid, node


def _parent_of(path: Path, level: int) -> tuple[int, InternalNode]:
    """(page id, node) of the parent of ``path[level]``."""
    lid, node = path[level - 1]
    assert isinstance(node, InternalNode), f"page {lid} above another on a path is not an internal node"
    return lid, node


def _merge(left: TreeNode, sep: bytes, right: TreeNode) -> TreeNode:
    """Two siblings' content in one node; ``sep``, the parent's separator
    between them, comes down between internal nodes' keys."""
    if isinstance(left, LeafNode):
        assert isinstance(right, LeafNode), f"siblings of different kinds: {left!r}, {right!r}"
        return LeafNode(left.keys + right.keys, left.cells + right.cells)
    assert isinstance(right, InternalNode), f"siblings of different kinds: {left!r}, {right!r}"
    return InternalNode(left.keys + [sep] + right.keys, left.children + right.children)


def _balanced_split(sizes: list[int]) -> int:
    """The index i in 1..n-1 where sum(sizes[:i]) and sum(sizes[i:]) are closest."""
    total = sum(sizes)
    best, best_gap, left = 1, None, 0
    for i in range(1, len(sizes)):
        left += sizes[i - 1]
        gap = abs(2 * left - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = i, gap
    return best


__all__ = ["BTree", "MAX_KEY", "MAX_VALUE", "FLAG_DELETED", "OVF_REF_SIZE"]
