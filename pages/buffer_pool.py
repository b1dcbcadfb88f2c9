"""The buffer pool: decoded pages in memory under a byte budget.

Frames hold decoded node objects (``pages.node``, ``pages.rollback_segment``)
so a hot read costs a dictionary lookup.  Eviction is LRU.  Steal is allowed:
a dirty page, even one holding uncommitted data, may be evicted; it is written
to a free slot of the page file (never over the durable image, P2) after the
log is flushed to its page LSN (P1, through the ``flush_log`` callable the
owner passes in -- ``pages`` does not import the log).

Pinning is by operation: between ``begin_op()`` and ``end_op()`` every page
the operation touched stays in memory, so a structure change never works on a
copy that was evicted and read back.  The pool may exceed its budget during
one operation; ``end_op`` evicts down to it.

The budget (``cache_size``) is bytes of memory, not pages
---------------------------------------------------------

A decoded page costs more than its bytes: a leaf of 16-byte keys and
100-byte values (29 cells, 4,033 bytes encoded) holds 9,950 bytes of Python
objects as tracemalloc counts them, and 11,006 bytes of RSS -- 2.5 to 2.7
times its page.  So each frame is charged an estimate of the memory it holds
(``memory_cost``), and the pool keeps the sum (``used``) at or under its
``budget``: ``cache_size`` less what the page file's in-memory table takes
(``PageFile.memory_bytes``: 8 bytes a page id and a byte a slot, so it
grows with the database; never more than half of ``cache_size`` is given
to it), so that ``cache_size`` bounds the pool and the table together:

    frame                FRAME_COST  (the Frame, its OrderedDict and dirty-table
                                      entries, its page id, LSN and stamp ints)
    leaf                 LEAF_COST + encoded size + cells * CELL_COST
                                   + overflow references * REF_COST
    internal node        INTERNAL_COST + encoded size + separators * SEPARATOR_COST
    overflow, undo page  PAGE_COST + encoded size (an undo page's bytearray:
                                      its allocated size, ``__sizeof__``)

The constants are measured, not guessed (CPython 3.11, 64-bit; the script
decodes 2,000 pages of each shape under tracemalloc and, in a separate
process, 20,000 leaves against VmRSS):

    ============================  =========================  ==========
    what                          tracemalloc, bytes         charged
    ============================  =========================  ==========
    per cell beyond its encoding  196-222 (8 to 32-byte      CELL_COST
    (key and value ``bytes``      keys, 0 to 1,300-byte      = 232
    headers 33 each, cell tuple   values); in RSS 221-244
    72, txid and undo ints 28-32, (pymalloc rounds each of
    a slot in each of two lists)  the five objects up to a
                                  multiple of 16 bytes)
    per overflow reference (an    +155 to +159               REF_COST
    ``OverflowRef`` of 5 ints)                               = 176
    per leaf (node, two lists,    about 200                  LEAF_COST
    page LSN)                                                = 224
    per separator (key ``bytes``, 68-74                      SEPARATOR_COST
    child int, two list slots)                               = 80
    per internal node             about 300                  INTERNAL_COST
                                                             = 320
    per overflow or undo page     89 (overflow), 113 (undo)  PAGE_COST
                                                             = 128
    per frame                     284                        FRAME_COST
                                                             = 320
    ============================  =========================  ==========

So a leaf is charged 2.5 times its page for 16/100-byte pairs, 6 times for
8/8-byte pairs, 1.2 times for 1,300-byte values; for a leaf read from disk
the charge is within 1% of its RSS (10,985 bytes against 11,006 for the
16/100 leaf above).  Objects shared with others are charged as if the pool
held the only reference -- cells written by live puts share their
transaction's txid int, and the ``bytes`` the caller passed -- so the
estimate errs high there, by about 10% for such leaves (``sys.getsizeof``
of what they hold, tests/test_pool_memory.py).

When the charge is made -- never on a hit: ``BTree.get`` inlines the hit
path (it reads ``_frames``, moves frames to the young end, sets
``frame.stamp``, adds to ``hits``; a warm get is all hits), and a hit changes
no page, so the get path costs what it did:

- a miss decodes a page and charges it in full; ``install`` (a new or
  replaced page) likewise;
- ``mark_dirty``, which follows every change made to a cached node in place
  (``LEAF_PUT``, ``INT_INSERT``, ``UNDO_APPEND``, ...), re-charges in O(1)
  from the node's encoded size and entry count.  Only the count of overflow
  references needs a pass over a leaf's cells; that pass runs on every
  ``cells // 8 + 1``-th change of a frame (about 8 cells looked at per
  change), and between passes the count last taken stands, so a leaf is
  under-charged by at most that many new references;
- ``discard`` and eviction give the charge back;
- ``peek`` reads a page for its caller alone: nothing is cached or charged.

Invariants (``_check``):

B1. ``used`` is the sum of the frames' charges, and each frame's charge is
    its node's ``memory_cost`` plus the overflow-reference bytes last counted.
B2. After ``end_op`` (and after a miss outside an operation), ``used <=
    cache_size`` and ``len(pool) <= capacity`` (``cache_size // page_size``
    frames), unless only ``MIN_FRAMES`` (8) frames are left -- a structure
    change needs a few pages whatever the budget -- or the frames left over
    budget are dirty pages of a poisoned store, which cannot be written.

Not thread-safe: the caller holds the engine latch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pages.node import InternalNode, LeafNode, OverflowRef
from pages.pagefile import PageFile
from wal import canary
from wal.errors import PoisonedError

#: Bytes charged per frame and per node part; measured (module docstring).
FRAME_COST = 320
LEAF_COST = 224
CELL_COST = 232
REF_COST = 176
INTERNAL_COST = 320
SEPARATOR_COST = 80
PAGE_COST = 128
#: The pool never evicts below this many frames, whatever the budget.
MIN_FRAMES = 8
_LEAF_FIXED = FRAME_COST + LEAF_COST
_NEVER = 1 << 62


def memory_cost(node: Any) -> int:
    """Estimated bytes of memory a frame holding ``node`` costs, without the
    overflow references of a leaf (``ref_cost``).  O(1).

    >>> memory_cost(LeafNode([b"k" * 16], [(0, 7, 0, b"v" * 100)]))
    917
    """
    cls = node.__class__
    size: int = node.size
    if cls is LeafNode:
        return _LEAF_FIXED + size + len(node.keys) * CELL_COST
    if cls is InternalNode:
        return FRAME_COST + INTERNAL_COST + size + len(node.keys) * SEPARATOR_COST
    data = getattr(node, "data", None)
    if data.__class__ is bytearray:  # an undo page: over-allocated as records are appended
        allocated: int = data.__sizeof__()
        return FRAME_COST + PAGE_COST + allocated
    return FRAME_COST + PAGE_COST + size  # an overflow page, the undo header


def ref_cost(node: Any) -> int:
    """The bytes ``memory_cost`` leaves out: a leaf's overflow references
    (``OverflowRef`` tuples and their ints).  O(cells)."""
    if node.__class__ is not LeafNode:
        return 0
    refs = 0
    for cell in node.cells:
        if cell[3].__class__ is OverflowRef:
            refs += 1
    return refs * REF_COST


class Frame:
    __slots__ = ("node", "dirty", "rec_lsn", "stamp", "cost", "refs", "due")

    def __init__(self, node: Any, dirty: bool, rec_lsn: int, stamp: int) -> None:
        self.node = node
        self.dirty = dirty
        self.rec_lsn = rec_lsn  # LSN of the first change since the page was last written
        self.stamp = stamp  # the operation that last touched it
        self.cost = 0  # bytes charged to the pool's budget for it (B1)
        self.refs = 0  # the part of cost that is overflow references, as last counted
        self.due = 0  # changes left before the references are counted again


class BufferPool:
    """Caches the pages of one ``PageFile`` in at most ``cache_size`` bytes
    of memory (see the module docstring for what is counted).

    ``decode(ptype, body, page_lsn)`` turns page bytes into a node object;
    every node has ``ptype``, ``page_lsn``, ``size`` (its encoded length) and
    ``encode()``.

    Raises ValueError if ``cache_size`` is not an int >= 0.
    """

    def __init__(
        self,
        pagefile: PageFile,
        cache_size: int,
        flush_log: Callable[[int], None],
        decode: Callable[[int, bytes, int], Any],
    ) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 bytes, not {cache_size!r}")
        self.pagefile = pagefile
        self.cache_size = cache_size
        self.budget = cache_size  # bytes the frames may be charged (B2): what the page table leaves
        self.capacity = max(MIN_FRAMES, cache_size // pagefile.page_size)  # frames at most (B2)
        self.used = 0  # bytes charged: the sum of the frames' costs (B1)
        self._flush_log = flush_log
        self._decode = decode
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        # the dirty frames, kept as they change so that a checkpoint need not
        # walk the whole pool under the latch
        self._dirty: dict[int, Frame] = {}
        self._op = 0  # the current operation's stamp; odd while one runs
        pagefile.on_table_change = self.refresh_budget
        self.refresh_budget()
        self._all_pinned = -1  # the operation during which every frame was found pinned
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.steals = 0

    # --- operations ------------------------------------------------------------

    def refresh_budget(self) -> None:
        """Charge the page file's in-memory table (``PageFile.memory_bytes``,
        which grows with the database) to ``cache_size`` as well: the frames
        get what it leaves, but never less than half of ``cache_size``.  The
        page file calls this as its table grows (every 1,024 ids or slots)
        and after each flip; the next eviction goes down to the new budget."""
        self.budget = max(self.cache_size // 2, self.cache_size - self.pagefile.memory_bytes())

    def begin_op(self) -> None:
        self._op += 1

    def end_op(self) -> None:
        self._op += 1
        if self.used > self.budget or len(self._frames) > self.capacity:
            self._evict()

    # --- pages -----------------------------------------------------------------

    def get(self, lid: int) -> Any:
        """The node of page ``lid``, read and decoded on a miss.

        Raises CorruptionError (from the page file) if the page is damaged.
        """
        frame = self._frames.get(lid)
        if frame is not None:  # the hit path, inlined in BTree.get: keep them alike
            self.hits += 1
            self._frames.move_to_end(lid)
            frame.stamp = self._op
            return frame.node
        self.misses += 1
        ptype, page_lsn, body = self.pagefile.read_page(lid)
        node = self._decode(ptype, body, page_lsn)
        self._frames[lid] = frame = Frame(node, False, 0, self._op)
        self._charge(frame)
        if (self.used > self.budget or len(self._frames) > self.capacity) and self._all_pinned != self._op:
            self._evict()
        return node

    def peek(self, lid: int) -> Any:
        """The node of page ``lid`` without caching it: the pool's node if the
        page is cached (its place in the LRU unchanged), else one read and
        decoded for the caller alone, which must not change it.  For a pass
        over cold pages that should not push the working set out (purge
        reading the undo pages it frees).  A page that is not cached has its
        latest image in the page file: eviction writes a dirty page first.

        Raises CorruptionError (from the page file) if the page is damaged.
        """
        frame = self._frames.get(lid)
        if frame is not None:
            return frame.node
        self.misses += 1
        ptype, page_lsn, body = self.pagefile.read_page(lid)
        return self._decode(ptype, body, page_lsn)

    def cached(self, lid: int) -> Any | None:
        frame = self._frames.get(lid)
        return frame.node if frame is not None else None

    def install(self, lid: int, node: Any, lsn: int) -> None:
        """Put a new or replaced page in the pool, dirty as of ``lsn``."""
        node.page_lsn = lsn
        frame = self._frames.get(lid)
        if frame is None:
            self._frames[lid] = self._dirty[lid] = frame = Frame(node, True, lsn, self._op)
        else:
            frame.node = node
            if not frame.dirty:
                frame.dirty, frame.rec_lsn = True, lsn
                self._dirty[lid] = frame
            frame.stamp = self._op
            self._frames.move_to_end(lid)
        self._charge(frame)

    def mark_dirty(self, lid: int, node: Any, lsn: int) -> None:
        """Record that ``node`` (page ``lid``) was changed by the log record at
        ``lsn``, and charge its new size.  O(1) amortised."""
        node.page_lsn = lsn
        frame = self._frames.get(lid)
        if frame is None:  # evicted during this operation: bring the object back
            self._frames[lid] = self._dirty[lid] = frame = Frame(node, True, lsn, self._op)
            self._charge(frame)
            return
        if not frame.dirty:
            frame.dirty, frame.rec_lsn = True, lsn
            self._dirty[lid] = frame
        due = frame.due - 1
        if due > 0:  # the O(1) re-charge (memory_cost inlined for a leaf: once per put)
            frame.due = due
            node = frame.node
            if node.__class__ is LeafNode:
                cost = _LEAF_FIXED + node.size + len(node.keys) * CELL_COST + frame.refs
            else:
                cost = memory_cost(node)
            self.used += cost - frame.cost
            frame.cost = cost
        else:
            self._charge(frame)

    def discard(self, lid: int) -> None:
        """Forget page ``lid`` (it was freed)."""
        frame = self._frames.pop(lid, None)
        if frame is not None:
            self.used -= frame.cost
        self._dirty.pop(lid, None)

    def _charge(self, frame: Frame) -> None:
        """Charge ``frame`` its node's whole cost, overflow references counted
        (B1).  O(cells) for a leaf, O(1) otherwise."""
        node = frame.node
        refs = ref_cost(node)
        cost = memory_cost(node) + refs
        self.used += cost - frame.cost
        frame.cost, frame.refs = cost, refs
        # a leaf's references are counted again after cells // 8 + 1 changes;
        # other nodes have none to count
        frame.due = (len(node.keys) >> 3) + 1 if node.__class__ is LeafNode else _NEVER

    # --- writing -----------------------------------------------------------------

    def _write(self, lid: int, frame: Frame) -> None:
        node = frame.node
        if not canary.page_before_log:
            self._flush_log(node.page_lsn)  # P1
        self.pagefile.write_page(lid, node.ptype, node.page_lsn, node.encode())
        frame.dirty = False
        frame.rec_lsn = 0
        del self._dirty[lid]

    def _evict(self) -> None:
        """Evict least recently used frames, not pinned by the running
        operation, until the pool is within its budget and capacity (B2).
        A steal's write may take a new slot and so lower the budget (the
        page table grew): then it goes round again."""
        budget = self.budget
        while self._evict_some() and self.budget < budget and self.used > self.budget:
            budget = self.budget

    def _evict_some(self) -> bool:
        """One round of ``_evict`` against the budget as it stands; return
        whether it evicted anything."""
        frames = self._frames
        op = self._op
        excess_frames = len(frames) - self.capacity
        excess_bytes = self.used - self.budget
        spare = len(frames) - MIN_FRAMES
        victims = []
        for lid, frame in frames.items():
            if (excess_frames <= 0 and excess_bytes <= 0) or spare <= 0:
                break
            if frame.stamp == op and op & 1:
                continue  # pinned by the running operation
            victims.append((lid, frame))
            excess_frames -= 1
            excess_bytes -= frame.cost
            spare -= 1
        if not victims and op & 1:
            # Everything is pinned by this operation; frames it adds are pinned
            # too, so do not rescan on every miss (that was O(n^2)) until it ends.
            self._all_pinned = op
        for lid, frame in victims:
            if frame.dirty:
                try:
                    self._write(lid, frame)  # steal
                except PoisonedError:
                    continue  # read-only until reopened: keep it, so reads still work
                self.steals += 1
            del frames[lid]
            self.used -= frame.cost
            self.evictions += 1
        return bool(victims)

    def write_dirty(self) -> int:
        """Write every dirty page (before a flip); return how many."""
        dirty = list(self._dirty.items())
        if dirty and not canary.page_before_log:
            self._flush_log(max(f.node.page_lsn for _, f in dirty))  # P1, once for all
        for lid, frame in dirty:
            node = frame.node
            self.pagefile.write_page(lid, node.ptype, node.page_lsn, node.encode())
            frame.dirty = False
            frame.rec_lsn = 0
            del self._dirty[lid]
        return len(dirty)

    def write_some(self, lids: list[int], durable_lsn: int) -> tuple[int, list[int]]:
        """Write those of ``lids`` that are still dirty and whose page LSN the
        log has made durable (P1 without waiting); return (pages written, ids
        still waiting for the log).  For the fuzzy checkpoint, in batches under
        short holds of the latch."""
        written, later = 0, []
        frames = self._frames
        for lid in lids:
            frame = frames.get(lid)
            if frame is None or not frame.dirty:
                continue  # evicted (written by steal) or freed since
            node = frame.node
            if node.page_lsn >= durable_lsn and not canary.page_before_log:
                later.append(lid)
                continue
            self.pagefile.write_page(lid, node.ptype, node.page_lsn, node.encode())
            frame.dirty = False
            frame.rec_lsn = 0
            del self._dirty[lid]
            written += 1
        return written, later

    def dirty_table(self) -> dict[int, int]:
        """{page id: recLSN} of the dirty pages."""
        return {lid: f.rec_lsn for lid, f in self._dirty.items()}

    def dirty_lids(self) -> list[int]:
        """The ids of the dirty pages."""
        return list(self._dirty)

    def __len__(self) -> int:
        return len(self._frames)

    def stats(self) -> dict[str, int]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_pages": len(self._frames),
            "cache_capacity": self.capacity,
            "cache_bytes": self.used,
            "cache_budget": self.budget,
            "evictions": self.evictions,
            "steals": self.steals,
        }

    def _check(self) -> None:
        """Raise AssertionError if B1 does not hold or the dirty table
        disagrees with the frames.  O(frames + cells)."""
        total = 0
        for lid, frame in self._frames.items():
            node = frame.node
            assert frame.cost == memory_cost(node) + frame.refs, f"page {lid} charged {frame.cost}, costs {memory_cost(node)} + {frame.refs}"
            total += frame.cost
            assert (self._dirty.get(lid) is frame) == frame.dirty, f"page {lid}: dirty {frame.dirty}, in the dirty table {lid in self._dirty}"
        assert total == self.used, f"pool charged {self.used} bytes, its frames {total}"
        assert all(lid in self._frames for lid in self._dirty), "a dirty page is not in the pool"
