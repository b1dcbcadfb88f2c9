"""The page file: slots, the shadow page table, free space, and the flip.

Pages have logical ids (1, 2, ...; 0 means "none").  A page table maps each
logical id to the physical slot holding its newest written image and that
image's crc.  The table itself is stored in page-table pages, a radix tree
whose root the meta page names; it is copy-on-write like everything else.

Three images of the table exist:

* the *durable* one, which the valid meta with the highest generation names;
* the *current* one, in memory: where every page was last written;
* between them, pages written since the last flip (stolen by the buffer pool,
  or written by a flip in progress) sit in free slots that no durable
  structure references.

``flip()`` makes the current image durable::

    dirty pages -> free slots          (the buffer pool, before calling flip)
    changed page-table pages -> free slots
    fsync(page file)                                  P3
    meta (generation + 1) -> the other meta slot
    fsync(page file)
    slots the old image used and the new one does not -> free      P4

Invariants:

P1. A page reaches the page file only after the log is durable up to its page
    LSN (kept by the buffer pool, which calls the log flush it was given).
P2. No write ever goes to a slot the durable meta references, directly or
    through the page table: the durable image is never overwritten.
P3. A meta page is written only after every page and page-table page it
    references is durable (the fsync before it).
P4. A slot freed by a flip is reused only after that flip's meta is durable.
P5. Truncation cuts off free slots only: never a slot that the durable
    image, a flip in flight or the current table references.

Free space is derived, not stored: on open, every slot that the durable page
table does not reference is free.  (ARCHITECTURE.md keeps a free-space map in
the meta; deriving it cannot disagree with the page table, and costs one pass
over the table, which open reads anyway.)  The meta records the slot count
of its image (one past the highest slot it references); open takes the
larger of that and the file's length, so slots written after the flip, or a
tail a crash kept from being cut, are free too.

Compaction gives free space back to the file system, as SQLite's
incremental vacuum does.  Shadow paging leaves free slots wherever the old
copies of rewritten pages lived, and the file never shrinks below its
highest used slot.  ``compaction_plan`` finds the smallest slot count E such
that the pages living at E or beyond, plus every page-table page a flip may
write, fit into the free slots below E; ``relocate`` copies each such page's
bytes, checked, into the lowest free slot (the crc covers the logical id,
not the slot, so the copy is valid as it is); ``mark_tail_page_table`` has
the flip rewrite page-table pages that live at E or beyond.  Then an
ordinary flip makes the new places durable -- relocated pages are written
like any other, to free slots (P2), and their old slots are released like
any superseded copy, so they are free only once that flip is durable (P4) --
and the flip's shrink cuts the free tail (P5); ``sync_cut`` makes the cut
durable.  A crash anywhere leaves the old image or the new one, each whole:
the data is the same in both, only where pages live differs.  Who calls it,
and when, is the checkpointer's business (``recovery/checkpointer.py``).
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sortedcontainers import SortedList

from pages.format import (
    MIN_PAGE_SIZE,
    PAGE_HEADER_SIZE,
    PT_ENTRY,
    TEST_MIN_PAGE_SIZE,
    Meta,
    PageType,
    check_page_size,
    decode_page,
    encode_page,
    pt_fanout,
)
from wal import canary, fsync_failure
from wal.errors import CorruptionError, PoisonedError
from wal.failpoints import failpoint

log = logging.getLogger("kvstore")

PAGE_FILE_NAME = "pages.db"
TMP_SUFFIX = ".tmp"
_META_SLOTS = 2


def _u32_table(n: int) -> array[int]:
    """``n`` zeros as 4-byte unsigned ints: a page-table column (slot or
    crc), 4 bytes an entry where a list of ints cost about 40."""
    return array("I", bytes(4 * n))


assert array("I").itemsize == 4, "the page table needs 4-byte unsigned ints"


class SlotBitmap:
    """A set of slot numbers, one byte a slot: the slots the durable image
    references, a flip's new image, the slots waiting for the next flip
    (P4) and the free slots.  A ``set`` or ``SortedList`` of ints cost 36
    to 60 bytes a slot, and the free and pending slots grew with the
    pages written between two flips -- with the tree many times the cache,
    nearly one a put -- so that a flip's bookkeeping raised peak memory
    with the size of the store.  Here a slot costs one byte whatever the
    set holds, and the bulk operations run over bounded chunks as big
    ints, in C.

    ``_low`` is a hint for ``pop_lowest``: no slot below it is in the set."""

    __slots__ = ("_bits", "_count", "_low")

    def __init__(self, slots: Iterable[int] = ()) -> None:
        self._bits = bytearray()
        self._count = 0
        self._low = 0
        for s in slots:
            self.add(s)

    @classmethod
    def complement(cls, used: SlotBitmap, lo: int, hi: int) -> SlotBitmap:
        """The slots in ``lo .. hi - 1`` that ``used`` lacks."""
        free = cls()
        bits = bytearray(bytes(used._bits[:hi]).ljust(hi, b"\0").translate(_SWAP01))
        bits[:lo] = bytes(min(lo, hi))
        free._bits = bits
        free._count = bits.count(1)
        return free

    def __contains__(self, slot: object) -> bool:
        bits = self._bits
        return isinstance(slot, int) and 0 <= slot < len(bits) and bits[slot] != 0

    def add(self, slot: int) -> None:
        bits = self._bits
        if slot >= len(bits):
            bits.extend(bytes(slot + 1 - len(bits) + len(bits) // 2))
        if not bits[slot]:
            bits[slot] = 1
            self._count += 1
            if slot < self._low:
                self._low = slot

    def update(self, slots: Iterable[int]) -> None:
        for s in slots:
            self.add(s)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        """The slots, ascending."""
        bits = self._bits
        i = bits.find(1)
        while i >= 0:
            yield i
            i = bits.find(1, i + 1)

    def lowest(self) -> int:
        """The lowest slot (-1 if none)."""
        bits = self._bits
        i = bits.find(1, self._low)
        self._low = len(bits) if i < 0 else i
        return i

    def pop_lowest(self) -> int:
        """Remove the lowest slot and return it (-1 if none)."""
        i = self.lowest()
        if i >= 0:
            self._bits[i] = 0
            self._count -= 1
            self._low = i + 1
        return i

    def highest(self) -> int:
        """The highest slot (-1 if none)."""
        return self._bits.rfind(1)

    def count_below(self, end: int) -> int:
        """How many slots are below ``end``."""
        return self._bits.count(1, 0, max(end, 0))

    def take_tail(self, top: int) -> int:
        """Remove the run of slots that ends just below ``top`` (``top -
        1``, ``top - 2``, ... as far as each is in the set) and return where
        it begins: ``top`` when ``top - 1`` is not in the set.  The caller
        knows no slot at or above ``top`` is in the set."""
        bits = self._bits
        assert bits.find(1, max(top, 0)) < 0, "a slot at or above the cut is in the set"
        if not 0 < top <= len(bits) or not bits[top - 1]:
            return top
        start = bits.rfind(0, 0, top) + 1
        self._count -= top - start
        del bits[start:]
        self._low = min(self._low, start)
        return start

    def add_difference(self, sources: list[SlotBitmap], minus: SlotBitmap) -> int:
        """Add every slot that is in one of ``sources`` and not in ``minus``;
        return how many were not in the set before."""
        n = max((len(s._bits) for s in sources), default=0)
        bits = self._bits
        if len(bits) < n:
            bits.extend(bytes(n - len(bits)))
        added = 0
        for off in range(0, n, _CHUNK):
            stop = min(off + _CHUNK, n)
            x = 0
            for s in sources:
                x |= int.from_bytes(s._bits[off:stop], "little")
            if not x:
                continue
            x &= ~int.from_bytes(minus._bits[off:stop], "little")
            mine = int.from_bytes(bits[off:stop], "little")
            new = x & ~mine
            if new:
                added += new.bit_count()  # a byte a slot, each 0 or 1
                bits[off:stop] = (mine | new).to_bytes(stop - off, "little")
                self._low = min(self._low, off)
        self._count += added
        return added

    def keep_only(self, other: SlotBitmap) -> None:
        """Remove every slot that ``other`` lacks."""
        bits = self._bits
        n = len(bits)
        for off in range(0, n, _CHUNK):
            stop = min(off + _CHUNK, n)
            mine = int.from_bytes(bits[off:stop], "little")
            if mine:
                bits[off:stop] = (mine & int.from_bytes(other._bits[off:stop], "little")).to_bytes(stop - off, "little")
        self._count = bits.count(1)

    def clear(self) -> None:
        self._bits = bytearray()
        self._count = 0
        self._low = 0


#: bytes per chunk of a ``SlotBitmap``'s bulk operations (bounds their
#: temporary big ints whatever the file's size)
_CHUNK = 1 << 16
#: ``PageFile.on_table_change`` runs each time the table of ids or the file
#: grows past a multiple of this plus one (1,024 ids: 8 KiB of table)
_TABLE_STEP = 1023
_SWAP01 = bytes.maketrans(b"\x00\x01", b"\x01\x00")


class PageFile:
    """The page file of one database.  Not thread-safe: the caller holds the
    engine latch around every call."""

    def __init__(self, fs: Any, path: str, file: Any, meta: Meta, meta_slot: int) -> None:
        self._fs = fs
        self.path = path
        self._file = file
        self.page_size = meta.page_size
        self.db_id = meta.db_id
        self.meta = meta  # the durable meta
        self._meta_slot = meta_slot  # where the durable meta lives
        self.meta_damage = ""
        self._fanout = pt_fanout(self.page_size)
        # the current page table, indexed by logical id
        self._slot = _u32_table(1)
        self._crc = _u32_table(1)
        self._free_lids: SortedList = SortedList()
        self._allocated: set[int] = set()  # ids allocated but not written yet
        # page-table pages of the durable image: level -> index -> (slot, crc)
        self._pt_pages: list[dict[int, tuple[int, int]]] = []
        self._pt_dirty: set[int] = set()  # level-0 page-table pages changed since the flip
        self._durable_slots = SlotBitmap()  # every slot the durable image references (P2)
        self._pending_free = SlotBitmap()  # freed by the next flip (P4)
        self._free_slots = SlotBitmap()
        self._nslots = _META_SLOTS
        self._poison: PoisonedError | None = None
        self._flip: FlipState | None = None  # a flip in flight (between phases 1 and 3)
        self.pages_written = 0
        self.pages_read = 0
        self.pages_relocated = 0
        self._cut_unsynced = False  # a truncate no fsync has covered yet
        #: called when ``memory_bytes`` may have grown or shrunk by a step
        #: (the buffer pool charges it to ``cache_size``)
        self.on_table_change: Callable[[], None] | None = None

    # --- create and open --------------------------------------------------

    @classmethod
    def create(
        cls, fs: Any, path: str, page_size: int, db_id: bytes, app: bytes = b"", min_page_size: int = MIN_PAGE_SIZE
    ) -> PageFile:
        """Create a new page file with an empty page table (generation 1).

        Atomic: the file is written and fsynced under ``path + ".tmp"`` and
        then renamed into place (the seam fsyncs the directory), so a crash
        leaves either no page file or a valid one.  Raises FileExistsError if
        ``path`` exists, ValueError for a bad ``page_size``.  (``min_page_size``
        lets tests use tiny pages.)
        """
        check_page_size(page_size, min_page_size)
        if fs.exists(path):
            raise FileExistsError(f"{path} exists")
        tmp = path + TMP_SUFFIX
        if fs.exists(tmp):
            fs.remove(tmp)  # the leftover of a creation a crash interrupted
        meta = Meta(page_size, 1, db_id, 0, 0, 0, 0, _META_SLOTS, 1, app)
        f = fs.create(tmp)
        try:
            f.pwrite(0, meta.encode().ljust(page_size, b"\0"))
            f.pwrite(page_size, bytes(page_size))
            failpoint("pages.before_create_fsync")
            f.fsync()
        finally:
            f.close()
        fs.rename(tmp, path)
        return cls.open(fs, path)

    @classmethod
    def open(cls, fs: Any, path: str) -> PageFile:
        """Open an existing page file at its newest valid meta.

        Raises CorruptionError if neither meta page is valid, or if a
        page-table page is damaged; nothing is written -- except that a file
        an fsync failed on is first rewritten as it reads (``wal.fsync_failure``).
        """
        directory, name = os.path.split(path)
        fsync_failure.repair(fs, directory or ".", lambda n: n == name)
        f = fs.open(path)
        try:
            meta, slot, damage = cls._read_metas(f, path)
            if damage and meta.nslots * meta.page_size > f.size():
                # The newest meta is damaged and the older one's image reaches
                # past the end of the file: a compaction cut it (P5 frees only
                # what the newer image no longer needs).
                raise CorruptionError(
                    path, f"a meta page is damaged ({damage}) and the other meta's image is no longer whole (the file was shortened after it)"
                )
            self = cls(fs, path, f, meta, slot)
            #: why a meta page was passed over, if one was (for error messages)
            self.meta_damage = damage
            self._load_page_table()
        except BaseException:
            f.close()
            raise
        return self

    @staticmethod
    def _read_metas(f: Any, path: str) -> tuple[Meta, int, str]:
        found: list[tuple[int, int, Meta]] = []
        errors = []
        try:
            m0 = Meta.decode(f.pread(0, MIN_PAGE_SIZE), f"{path} meta slot 0")
            check_page_size(m0.page_size, TEST_MIN_PAGE_SIZE)
            found.append((m0.generation, 0, m0))
            sizes = [m0.page_size]
        except (CorruptionError, ValueError) as e:
            errors.append(str(e))
            sizes = [TEST_MIN_PAGE_SIZE << i for i in range(8)]
        for size in sizes:
            try:
                m1 = Meta.decode(f.pread(size, MIN_PAGE_SIZE), f"{path} meta slot 1")
            except CorruptionError as e:
                errors.append(str(e))
                continue
            if m1.page_size == size:
                found.append((m1.generation, 1, m1))
                break
        if not found:
            raise CorruptionError(path, "both meta pages are damaged: " + "; ".join(errors[:2]))
        if len(found) == 2 and found[0][2].db_id != found[1][2].db_id:
            raise CorruptionError(path, "the two meta pages name different databases")
        gen, slot, meta = max(found, key=lambda t: t[0])
        return meta, slot, "; ".join(errors)

    def _load_page_table(self) -> None:
        meta = self.meta
        nlids = meta.nlids
        self._slot = _u32_table(nlids)
        self._crc = _u32_table(nlids)
        self._nslots = max(meta.nslots, self._file.size() // self.page_size, _META_SLOTS)
        self._pt_pages = [dict() for _ in range(meta.pt_depth)]
        used = self._durable_slots
        if meta.pt_depth:
            self._load_pt_level(meta.pt_depth - 1, 0, meta.pt_root, meta.pt_root_crc)
        # SlotBitmap.add inlined: this pass is most of an open's time
        nslots, table = self._nslots, self._slot
        bits = used._bits
        if len(bits) < nslots:
            bits.extend(bytes(nslots - len(bits)))
        free_lids = []
        added = 0
        for lid in range(1, nlids):
            s = table[lid]
            if s:
                if s >= nslots or s < _META_SLOTS or bits[s]:
                    raise CorruptionError(f"{self.path} page table", f"page {lid} maps to slot {s}, which is out of range or used twice")
                bits[s] = 1
                added += 1
            else:
                free_lids.append(lid)
        used._count += added
        self._free_lids.update(free_lids)
        self._free_slots = SlotBitmap.complement(used, _META_SLOTS, nslots)

    def _load_pt_level(self, level: int, index: int, slot: int, crc: int) -> None:
        where = f"{self.path} page-table page (level {level}, index {index}) at slot {slot}"
        if slot < _META_SLOTS or slot >= self._nslots or slot in self._durable_slots:
            raise CorruptionError(where, "slot out of range or used twice")
        ptype, _lsn, body = decode_page(self._read_slot(slot), self._pt_lid(level, index), crc, where)
        if ptype != PageType.PAGE_TABLE:
            raise CorruptionError(where, f"expected a page-table page, found type {ptype}")
        self._durable_slots.add(slot)
        self._pt_pages[level][index] = (slot, crc)
        n = len(body) // PT_ENTRY.size
        span = self._fanout**level
        for i in range(n):
            s, c = PT_ENTRY.unpack_from(body, i * PT_ENTRY.size)
            child = index * self._fanout + i
            if level == 0:
                if child < len(self._slot):
                    self._slot[child], self._crc[child] = s, c
            elif s and child * span < len(self._slot):
                self._load_pt_level(level - 1, child, s, c)

    @staticmethod
    def _pt_lid(level: int, index: int) -> int:
        """The id page-table pages carry in their header (never a page's id:
        page ids are < 2**48)."""
        return (1 << 60) | (level << 52) | index

    # --- pages -------------------------------------------------------------

    @property
    def nlids(self) -> int:
        return len(self._slot)

    def allocate(self) -> int:
        """A free logical id (the lowest one), now allocated."""
        if self._free_lids:
            lid: int = self._free_lids.pop(0)
        else:
            lid = len(self._slot)
            self._slot.append(0)
            self._crc.append(0)
        self._allocated.add(lid)
        if not lid & _TABLE_STEP and self.on_table_change is not None:
            self.on_table_change()
        return lid

    def is_allocated(self, lid: int) -> bool:
        return 0 < lid < len(self._slot) and (self._slot[lid] != 0 or lid in self._allocated)

    def has_image(self, lid: int) -> bool:
        """Whether page ``lid`` has a written image to read."""
        return 0 < lid < len(self._slot) and self._slot[lid] != 0

    def ensure_allocated(self, lid: int) -> None:
        """Allocate the given id (redo of an allocation the log recorded)."""
        while len(self._slot) <= lid:
            self._free_lids.add(len(self._slot))
            self._slot.append(0)
            self._crc.append(0)
        if not self.is_allocated(lid):
            self._free_lids.discard(lid)
            self._allocated.add(lid)

    def release_unwritten(self, lid: int) -> None:
        """Return an id that ``allocate`` gave out and nothing wrote or
        logged (its operation failed first)."""
        if lid not in self._allocated or self._slot[lid]:
            raise ValueError(f"page {lid} is not an allocated, unwritten page")
        self._allocated.discard(lid)
        self._free_lids.add(lid)

    def free(self, lid: int) -> None:
        """Release page ``lid``; its slot is reusable once that is safe (P4)."""
        if not self.is_allocated(lid):
            raise ValueError(f"page {lid} is not allocated")
        self._release_slot(self._slot[lid])
        self._slot[lid] = 0
        self._crc[lid] = 0
        self._allocated.discard(lid)
        self._free_lids.add(lid)
        self._pt_dirty.add(lid // self._fanout)

    def _release_slot(self, slot: int) -> None:
        if not slot:
            return
        if slot in self._durable_slots or (self._flip is not None and slot in self._flip.image):
            self._pending_free.add(slot)  # P4: only after the next flip
        else:
            self._free_slots.add(slot)  # written since the flip, referenced by nothing durable

    def _take_slot(self) -> int:
        slot = self._free_slots.pop_lowest()
        if slot >= 0:
            return slot
        slot = self._nslots
        self._nslots += 1
        if not slot & _TABLE_STEP and self.on_table_change is not None:
            self.on_table_change()
        return slot

    def read_page(self, lid: int) -> tuple[int, int, bytes]:
        """(type, page LSN, body) of page ``lid`` as last written.

        Raises CorruptionError naming the page and slot if the bytes fail the
        validity rule of ``pages.format``, or if the page has no written
        image (a structure refers to a page that was freed or never written).
        """
        slot = self._slot[lid] if 0 < lid < len(self._slot) else 0
        if not slot:
            raise CorruptionError(f"{self.path} page {lid}", "referenced, but the page has no written image (freed or never written)")
        self.pages_read += 1
        return decode_page(self._read_slot(slot), lid, self._crc[lid], f"{self.path} page {lid} (slot {slot})")

    def _read_slot(self, slot: int) -> bytes:
        data: bytes = self._file.pread(slot * self.page_size, self.page_size)
        return data

    def _pwrite_slot(self, slot: int, data: bytes) -> None:
        """Write a page image to ``slot``, just taken from the free slots
        (never a durable one: P2); if the write fails, the slot is free again."""
        assert slot not in self._durable_slots, "P2"
        try:
            self._file.pwrite(slot * self.page_size, data)
        except OSError:
            self._free_slots.add(slot)
            raise

    def write_page(self, lid: int, ptype: int, page_lsn: int, body: bytes) -> None:
        """Write page ``lid`` to a free slot (never a durable one: P2) and point
        the current page table at it.  The caller has flushed the log to
        ``page_lsn`` (P1)."""
        if self._poison is not None:
            raise self._poison
        if not self.is_allocated(lid):
            raise ValueError(f"page {lid} is not allocated")
        data, crc = encode_page(self.page_size, ptype, page_lsn, lid, body)
        slot = self._take_slot()
        self._pwrite_slot(slot, data)
        self.pages_written += 1
        old = self._slot[lid]
        self._slot[lid] = slot
        self._crc[lid] = crc
        self._allocated.discard(lid)
        self._release_slot(old)
        self._pt_dirty.add(lid // self._fanout)

    # --- the flip ------------------------------------------------------------

    def flip(self, checkpoint_lsn: int, app: bytes) -> dict[str, int]:
        """Make the current image durable (P3, P4); return what it wrote.

        The caller has written every dirty page first (``write_page``).  Pages
        allocated but never written are not part of the image.  On an I/O
        error the durable image is the previous one; the error propagates and
        the page file is poisoned if an fsync failed.

        This runs the three phases of a flip back to back; a fuzzy checkpoint
        runs them with the engine latch held only around the first and last.
        """
        state = self.begin_flip()
        try:
            self.flip_io(state, checkpoint_lsn, app)
        except BaseException:
            self.abort_flip(state)
            raise
        return self.complete_flip(state)

    def begin_flip(self) -> FlipState:
        """Phase 1 (caller holds the latch): write the changed page-table pages
        for the current image and reserve every slot the image references, so
        nothing overwrites them while the flip is in flight (P2)."""
        if self._poison is not None:
            raise self._poison
        if self._flip is not None:
            raise RuntimeError("a flip is already in progress")
        fanout = self._fanout
        nlids = len(self._slot)
        depth = self._pt_depth_for(nlids)
        dirty = set(self._pt_dirty)
        same_shape = depth == self.meta.pt_depth
        if not same_shape:
            dirty = set(range((nlids + fanout - 1) // fanout))
        new_pt: list[dict[int, tuple[int, int]]] = [
            dict(self._pt_pages[lvl]) if same_shape else {} for lvl in range(depth)
        ]
        state = FlipState(new_pt, depth, nlids, self._nslots, set(self._pt_dirty))
        try:
            level_dirty = dirty
            for level in range(depth):
                parents: set[int] = set()
                for index in sorted(level_dirty):
                    if level == 0:  # (slot, crc) pairs, packed in one call
                        lo, hi = index * fanout, min(index * fanout + fanout, nlids)
                        flat = [0] * (2 * (hi - lo))
                        flat[0::2] = self._slot[lo:hi]
                        flat[1::2] = self._crc[lo:hi]
                        body = struct.pack(f"<{len(flat)}I", *flat)
                    else:
                        entries = [new_pt[level - 1].get(index * fanout + i, (0, 0)) for i in range(fanout)]
                        while entries and entries[-1] == (0, 0):
                            entries.pop()
                        body = b"".join(PT_ENTRY.pack(s, c) for s, c in entries)
                    data, crc = encode_page(self.page_size, PageType.PAGE_TABLE, 0, self._pt_lid(level, index), body)
                    slot = self._take_slot()
                    state.written.append(slot)
                    self._file.pwrite(slot * self.page_size, data)
                    new_pt[level][index] = (slot, crc)
                    parents.add(index // fanout)
                level_dirty = parents
        except BaseException:
            self._free_slots.update(state.written)
            raise
        image = SlotBitmap()
        bits = image._bits = bytearray(self._nslots)
        for slot in self._slot:
            bits[slot] = 1
        bits[0] = 0
        image._count = len(bits) - bits.count(0)
        for pt_level in new_pt:
            for slot, _ in pt_level.values():
                image.add(slot)
        state.image = image
        # The meta records how far its image reaches, not how long the file
        # happens to be: after the flip cuts the free tail (P5), or a
        # compaction moved pages down, a reopen must not count slots beyond
        # the end of the file as free.  (Open takes the file's length when
        # that is larger: pages written since the flip live there.)
        state.nslots = image.highest() + 1
        self._pt_dirty.clear()
        self._flip = state
        return state

    def flip_io(self, state: FlipState, checkpoint_lsn: int, app: bytes) -> None:
        """Phase 2 (no latch needed): fsync, the meta, fsync (P3)."""
        root_slot, root_crc = state.new_pt[state.depth - 1][0]
        failpoint("pages.before_flip_fsync")
        if not canary.meta_before_pages:
            self._fsync()  # P3: pages and page-table pages are durable before the meta
        meta = Meta(
            self.page_size,
            self.meta.generation + 1,
            self.db_id,
            checkpoint_lsn,
            root_slot,
            root_crc,
            state.depth,
            state.nslots,
            state.nlids,
            app,
        )
        target = 1 - self._meta_slot
        failpoint("pages.before_meta_write")
        self._file.pwrite(target * self.page_size, meta.encode())
        failpoint("pages.before_meta_fsync")
        self._fsync()
        failpoint("pages.after_meta_fsync")
        state.meta, state.target = meta, target

    def abort_flip(self, state: FlipState) -> None:
        """After a failed phase 2 (caller holds the latch): the durable image
        is still the old one; release what the flip reserved."""
        if self._flip is state:
            self._flip = None
        self._pt_dirty |= state.pt_dirty
        self._free_slots.update(s for s in state.written if s not in self._durable_slots)
        # slots released while the flip was in flight are free unless durable
        self._free_slots.add_difference([self._pending_free], self._durable_slots)
        self._pending_free.keep_only(self._durable_slots)

    def complete_flip(self, state: FlipState) -> dict[str, int]:
        """Phase 3 (caller holds the latch): the new image is durable; free
        what only the old image used (P4)."""
        assert state.meta is not None
        self.meta = state.meta
        self._meta_slot = state.target
        self._pt_pages = state.new_pt
        self._flip = None
        durable = state.image
        # What the old image or a superseded copy used is free unless the
        # new image references it: slots the new image references stay
        # reserved as durable even if the current table has moved on (they
        # are freed by the next flip: P4).
        released = self._free_slots.add_difference([self._durable_slots, self._pending_free], durable)
        self._durable_slots = durable
        self._pending_free.clear()
        shrunk = self._shrink()
        if self.on_table_change is not None:
            self.on_table_change()
        return {"pt_pages_written": len(state.written), "slots_freed": released, "slots_truncated": shrunk}

    def _shrink(self) -> int:
        """Cut free slots off the end of the file (P5: free slots only).  The
        cut is durable with the next fsync (``sync_cut``, or the next flip's);
        until then a crash may keep the tail, which open finds free."""
        top = self._free_slots.take_tail(self._nslots)  # the metas are never free
        assert top >= _META_SLOTS, "a meta slot was free"
        cut = self._nslots - top
        if cut:
            self._nslots = top
            try:
                self._file.truncate(top * self.page_size)
                self._cut_unsynced = True
            except OSError as e:  # harmless: the tail is free either way
                log.warning("page file: could not shrink %s: %s", self.path, e)
        return cut

    def sync_cut(self) -> bool:
        """fsync the page file if a cut (``_shrink``) is not durable yet, so
        the space is given back for good; return whether it did.  A failure
        poisons the page file (S3: never retried)."""
        if not self._cut_unsynced:
            return False
        if self._poison is not None:
            raise self._poison
        self._fsync()
        return True

    def _fsync(self) -> None:
        try:
            fsync_failure.fsync(self._fs, self._file, self.path)
        except OSError as e:
            self._poison = PoisonedError(f"fsync of {self.path} failed; the page file is read-only until reopened: {e}", e)
            raise self._poison from e
        self._cut_unsynced = False

    # --- compaction ----------------------------------------------------------------

    @property
    def nslots(self) -> int:
        """Slots in the file, the two meta slots included."""
        return self._nslots

    def _pt_depth_for(self, nlids: int) -> int:
        """Levels of page-table pages a table of ``nlids`` ids needs."""
        depth = 1
        while self._fanout**depth < nlids:
            depth += 1
        return depth

    def _pt_pages_at_most(self) -> int:
        """How many page-table pages a flip of the current table can write
        (all of them: every level of the radix tree, full)."""
        count, total = len(self._slot), 0
        for _level in range(self._pt_depth_for(len(self._slot))):
            count = -(-count // self._fanout)
            total += count
        return total

    def reclaimable_at_most(self) -> int:
        """An upper bound on what ``compaction_plan`` can give back, in O(1):
        the slots beyond the metas, the pages and the page-table pages a flip
        may write (the plan's end is never below their sum)."""
        pages = len(self._slot) - 1 - len(self._free_lids) - len(self._allocated)  # ids with a slot
        return max(0, self._nslots - _META_SLOTS - pages - self._pt_pages_at_most())

    def compaction_plan(self) -> tuple[int, list[int]]:
        """Where the file could end, and which pages must move for that.

        Returns ``(end, lids)``: ``end`` is the smallest slot count such that
        the pages now living in slots at or beyond it (``lids``, farthest
        first) and every page-table page a flip may write fit into the free
        slots below it.  ``end == nslots`` and no lids when nothing can be
        given back (or a flip is in flight, or the file is poisoned).  What
        ends up cut may be a few slots short of ``end`` (a page-table page
        the flip frees below it leaves a hole).  O(pages + slots), plus
        sorting the pages that must move; a byte of memory a slot.  Caller
        holds the latch.
        """
        if self._poison is not None or self._flip is not None:
            return self._nslots, []
        # the slots pages live in, a byte a slot (a sorted list of (slot, id)
        # pairs cost about 130 bytes a page: 64 MiB at 500,000 pages, at
        # every close of a large store)
        used = bytearray(self._nslots)
        for slot in self._slot:
            if slot:
                used[slot] = 1
        extra = self._pt_pages_at_most()
        free = self._free_slots

        def fits(end: int) -> bool:
            # (free below end) >= (pages at or beyond end) + page-table pages;
            # the left side grows with end and the right side shrinks
            return free.count_below(end) >= used.count(1, end) + extra

        lo, hi = _META_SLOTS, self._nslots
        if not fits(hi):
            return self._nslots, []
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        beyond = sorted(((slot, lid) for lid, slot in enumerate(self._slot) if slot >= lo), reverse=True)
        return lo, [lid for _slot, lid in beyond]

    def relocate(self, lid: int, end: int) -> bool:
        """Move page ``lid`` from its slot at or beyond ``end`` to the lowest
        free slot, if that lies below ``end``; return whether it moved.

        The page's bytes are copied as they are, after the validity rule of
        ``pages.format`` passes (CorruptionError naming page and slot if it
        does not: damage is reported, never copied).  The copy goes to a free
        slot (P2); the old slot is released like any superseded copy, so if
        the durable image uses it, it is free only after the next flip (P4).
        OSError from the write leaves the page where it was.  Caller holds
        the latch.
        """
        if self._poison is not None:
            raise self._poison
        old = self._slot[lid] if 0 < lid < len(self._slot) else 0
        lowest = self._free_slots.lowest()
        if old < end or lowest < 0 or lowest >= end:
            return False
        data = self._read_slot(old)
        decode_page(data, lid, self._crc[lid], f"{self.path} page {lid} (slot {old}), being relocated")
        slot = self._free_slots.pop_lowest()
        self._pwrite_slot(slot, data)
        self.pages_relocated += 1
        self._slot[lid] = slot
        self._release_slot(old)
        self._pt_dirty.add(lid // self._fanout)
        return True

    def mark_tail_page_table(self, end: int) -> int:
        """Have the next flip rewrite every page-table page of the durable
        image that lives at or beyond ``end`` (its copy goes to the lowest
        free slot; its parents are rewritten with it).  Returns how many were
        marked.  Caller holds the latch."""
        marked = 0
        for level, pages in enumerate(self._pt_pages):
            span = self._fanout**level
            for index, (slot, _crc) in pages.items():
                if slot >= end:
                    self._pt_dirty.add(index * span)  # its first level-0 descendant
                    marked += 1
        return marked

    # --- inspection ------------------------------------------------------------

    def allocated(self) -> int:
        """How many logical pages are allocated (written or not)."""
        return len(self._slot) - 1 - len(self._free_lids)

    def memory_bytes(self) -> int:
        """Bytes of memory the page table and the slot sets hold: the
        table's two arrays and the slot bitmaps as allocated (a flip's new
        image too, while one is in flight), and the free and the allocated
        but unwritten page ids at 40 bytes each (ints in a sorted list or a
        set).  O(1)."""
        n = sys.getsizeof(self._slot) + sys.getsizeof(self._crc) + 40 * (len(self._free_lids) + len(self._allocated))
        for bitmap in (self._durable_slots, self._free_slots, self._pending_free):
            n += sys.getsizeof(bitmap._bits)
        if self._flip is not None:
            n += sys.getsizeof(self._flip.image._bits)
        return n

    def stats(self) -> dict[str, int]:
        used = sum(1 for s in self._slot if s)
        return {
            "page_size": self.page_size,
            "slots": self._nslots,
            "pages": used,
            "free_slots": len(self._free_slots),
            "pending_free_slots": len(self._pending_free),
            "generation": self.meta.generation,
            "pages_written": self.pages_written,
            "pages_read": self.pages_read,
            "pages_relocated": self.pages_relocated,
        }

    def _check(self) -> None:
        """Raise AssertionError if the in-memory structures break an invariant:
        no slot both used and free, none used twice, no leak."""
        current = [s for s in self._slot if s]
        assert len(current) == len(set(current)), "a slot is used by two pages"
        cur = set(current)
        free = set(self._free_slots)
        assert not (cur & free), "a slot is both used and free"
        durable = set(self._durable_slots)
        assert not (durable & free), "a durable slot is free (P2)"
        pending = set(self._pending_free)
        assert not (pending & free), "a slot is both pending and free"
        assert len(free) == len(self._free_slots) and len(pending) == len(self._pending_free), "a slot bitmap miscounts"
        pt = {s for level in self._pt_pages for s, _ in level.values()}
        known = cur | free | durable | pending | pt
        leaked = set(range(_META_SLOTS, self._nslots)) - known
        assert not leaked, f"slots leaked: {sorted(leaked)[:10]}"
        assert all(s < self._nslots for s in known), "a slot beyond the end of the file"

    def close(self) -> None:
        self._file.close()


class FlipState:
    """What phase 1 of a flip decided, carried to phases 2 and 3."""

    def __init__(self, new_pt: list[dict[int, tuple[int, int]]], depth: int, nlids: int, nslots: int, pt_dirty: set[int]) -> None:
        self.new_pt = new_pt
        self.depth = depth
        self.nlids = nlids
        self.nslots = nslots
        self.pt_dirty = pt_dirty  # restored if the flip fails
        self.written: list[int] = []  # page-table slots written
        self.image = SlotBitmap()  # every slot the new image references
        self.meta: Meta | None = None
        self.target = 0


def page_file_path(directory: str) -> str:
    return os.path.join(directory, PAGE_FILE_NAME)


__all__ = ["PageFile", "PAGE_FILE_NAME", "TMP_SUFFIX", "page_file_path", "PAGE_HEADER_SIZE"]
