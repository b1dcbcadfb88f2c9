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

Not thread-safe: the caller holds the engine latch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pages.pagefile import PageFile
from wal import canary
from wal.errors import PoisonedError


class Frame:
    __slots__ = ("node", "dirty", "rec_lsn", "stamp")

    def __init__(self, node: Any, dirty: bool, rec_lsn: int, stamp: int) -> None:
        self.node = node
        self.dirty = dirty
        self.rec_lsn = rec_lsn  # LSN of the first change since the page was last written
        self.stamp = stamp  # the operation that last touched it


class BufferPool:
    """Caches the pages of one ``PageFile``.

    ``decode(ptype, body, page_lsn)`` turns page bytes into a node object;
    every node has ``ptype``, ``page_lsn`` and ``encode()``.
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
        self.capacity = max(8, cache_size // pagefile.page_size)
        self._flush_log = flush_log
        self._decode = decode
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        # the dirty frames, kept as they change so that a checkpoint need not
        # walk the whole pool under the latch
        self._dirty: dict[int, Frame] = {}
        self._op = 0  # the current operation's stamp; odd while one runs
        self._all_pinned = -1  # the operation during which every frame was found pinned
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.steals = 0

    # --- operations ------------------------------------------------------------

    def begin_op(self) -> None:
        self._op += 1

    def end_op(self) -> None:
        self._op += 1
        if len(self._frames) > self.capacity:
            self._evict()

    # --- pages -----------------------------------------------------------------

    def get(self, lid: int) -> Any:
        """The node of page ``lid``, read and decoded on a miss.

        Raises CorruptionError (from the page file) if the page is damaged.
        """
        frame = self._frames.get(lid)
        if frame is not None:
            self.hits += 1
            self._frames.move_to_end(lid)
            frame.stamp = self._op
            return frame.node
        self.misses += 1
        ptype, page_lsn, body = self.pagefile.read_page(lid)
        node = self._decode(ptype, body, page_lsn)
        self._frames[lid] = Frame(node, False, 0, self._op)
        if len(self._frames) > self.capacity and self._all_pinned != self._op:
            self._evict()
        return node

    def cached(self, lid: int) -> Any | None:
        frame = self._frames.get(lid)
        return frame.node if frame is not None else None

    def install(self, lid: int, node: Any, lsn: int) -> None:
        """Put a new or replaced page in the pool, dirty as of ``lsn``."""
        node.page_lsn = lsn
        frame = self._frames.get(lid)
        if frame is None:
            self._frames[lid] = self._dirty[lid] = Frame(node, True, lsn, self._op)
        else:
            frame.node = node
            if not frame.dirty:
                frame.dirty, frame.rec_lsn = True, lsn
                self._dirty[lid] = frame
            frame.stamp = self._op
            self._frames.move_to_end(lid)

    def mark_dirty(self, lid: int, node: Any, lsn: int) -> None:
        """Record that ``node`` (page ``lid``) was changed by the log record at ``lsn``."""
        node.page_lsn = lsn
        frame = self._frames.get(lid)
        if frame is None:  # evicted during this operation: bring the object back
            self._frames[lid] = self._dirty[lid] = Frame(node, True, lsn, self._op)
        elif not frame.dirty:
            frame.dirty, frame.rec_lsn = True, lsn
            self._dirty[lid] = frame

    def discard(self, lid: int) -> None:
        """Forget page ``lid`` (it was freed)."""
        self._frames.pop(lid, None)
        self._dirty.pop(lid, None)

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
        frames = self._frames
        op = self._op
        excess = len(frames) - self.capacity
        victims = []
        for lid, frame in frames.items():
            if excess <= 0:
                break
            if frame.stamp == op and op & 1:
                continue  # pinned by the running operation
            victims.append((lid, frame))
            excess -= 1
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
            self.evictions += 1

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
            "evictions": self.evictions,
            "steals": self.steals,
        }
