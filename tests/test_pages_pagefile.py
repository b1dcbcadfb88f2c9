"""Tests of the page file (pages.pagefile), its invariants P1-P4, and the
buffer pool (pages.buffer_pool).

Each is checked for the plain flip and for the fuzzy checkpoint's three-phase
flip with changes and steals while it is in flight.  The invariants are
checked from outside: a FaultFS hook sees every write and
fsync before it happens and compares it with the page file's *bytes* --
the durable image decoded by ``pagehelpers.image_from`` from nothing but the
layout in ``pages.format`` -- and with the WAL's durable bytes, so the tests
do not trust the page file's own bookkeeping.

P1. A page reaches the page file only after the log is durable up to its page LSN.
P2. No write ever goes to a slot the durable meta references.
P3. A meta page is written only after every page it references is durable.
P4. A slot freed by a flip is reused only after that flip's meta is durable.
"""

from __future__ import annotations

import random

import pytest
from pagehelpers import (
    DB_ID,
    PAGES,
    D,
    Workload,
    check_store,
    contents,
    image_from,
    new_fs,
    new_store,
    newest_image,
    open_image,
    page_header,
    state_of,
    value_bytes,
)

from pages.buffer_pool import BufferPool
from pages.faultfs import DropAll
from pages.format import MAX_PAGE_SIZE, Meta, PageType
from pages.node import unpack_ops
from pages.pagefile import PageFile
from pages.redo import decode_any
from pages.store import PageStore
from wal import failpoints
from wal.errors import PoisonedError
from wal.format import SEGMENT_HEADER_SIZE, RecordType, decode_record
from wal.log import WriteAheadLog

# --- bad page sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [5000, 4097, 2048, 512, 131072, 0, -4096, True, 4096.0, "4096"])
def test_bad_page_size_raises_value_error_naming_the_range_and_creates_nothing(page_size):
    fs = new_fs()
    wal = WriteAheadLog.open(fs, D, DB_ID)
    with pytest.raises(ValueError, match="power of two from 4096 to 65536"):
        PageStore.create(fs, D, DB_ID, wal, page_size=page_size)
    assert fs.visible_bytes(PAGES) is None


def test_tiny_page_size_below_the_test_minimum_raises_value_error():
    fs = new_fs()
    wal = WriteAheadLog.open(fs, D, DB_ID)
    with pytest.raises(ValueError, match="power of two from 512 to 65536"):
        PageStore.create(fs, D, DB_ID, wal, page_size=256, min_page_size=512)
    with pytest.raises(ValueError, match="power of two from 512 to 65536"):
        PageFile.create(fs, PAGES, 768, DB_ID, min_page_size=512)
    assert fs.visible_bytes(PAGES) is None


@pytest.mark.parametrize("page_size", [4096, 8192, MAX_PAGE_SIZE])
def test_every_production_page_size_round_trips_through_flip_and_reopen(page_size):
    fs, wal, store = new_store(page_size=page_size, cache_pages=8)
    values = {b"%04d" % i: value_bytes(i * 37 % 3000, i % 3, i) for i in range(300)}
    for k, v in values.items():
        store.tree.put(k, v)
    store.flip(wal.end_lsn)
    reopened = PageStore.open(fs, D, wal, cache_size=8 * page_size)
    assert reopened.pagefile.page_size == page_size
    assert contents(reopened) == values
    check_store(reopened)


def test_create_refuses_an_existing_page_file():
    fs, wal, store = new_store()
    with pytest.raises(FileExistsError):
        PageStore.create(fs, D, DB_ID, wal, page_size=512, min_page_size=512)


# --- P1: the WAL rule ---------------------------------------------------------------------


def durable_record(fs, wal, lsn):
    """The log record at ``lsn`` as the *durable* bytes of the WAL hold it, or None."""
    for seg in wal.segments():
        data = fs.durable_bytes(seg.path) or b""
        if seg.first_lsn <= lsn < seg.first_lsn + len(data) - SEGMENT_HEADER_SIZE:
            return decode_record(data, SEGMENT_HEADER_SIZE + lsn - seg.first_lsn, lsn)
    return None


def test_p1_every_page_written_has_its_log_record_durable():
    """P1: with a hook on page-file writes, the page LSN in the header of every
    page written is below the WAL's durable LSN at that moment, and the
    record at that LSN is in the WAL's durable bytes and changes that page."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    ps = 512
    checked = {"pages": 0}

    def hook(ev):
        if ev.kind != "write" or ev.path != PAGES or ev.offset < 2 * ps:
            return
        _crc, ptype, lsn, lid, _len = page_header(ev.data)
        if ptype == PageType.PAGE_TABLE:
            assert lsn == 0  # page-table pages are not logged (the flip writes them)
            return
        assert lsn < wal.durable_lsn, f"page {lid} written with page LSN {lsn}, log durable to {wal.durable_lsn}"
        rec = durable_record(fs, wal, lsn)
        assert rec is not None, f"page {lid}: no durable log record at its page LSN {lsn}"
        assert rec.type == RecordType.PAGE_REDO
        assert lid in {op_lid for op_lid, _op, _data in unpack_ops(rec.payload)}
        checked["pages"] += 1

    fs.add_hook(hook)
    Workload(seed=11, steps=400, flip_every=90).run(store, wal)
    assert store.pool.steals > 50 and checked["pages"] > 200


# --- P2, P3, P4: hooks against the bytes ----------------------------------------------------


class ImageWatcher:
    """A FaultFS hook on the page file that decodes its newest durable image
    (and the newest image written, whose meta may not be fsynced yet) from
    the bytes whenever they may have changed, and hands every write to
    ``check_write``.  ``flipped(old, new)`` runs at the fsync that makes a
    new meta durable."""

    def __init__(self, fs, page_size):
        self.fs, self.ps = fs, page_size
        self.durable = self.visible = None
        self.stale = True
        self.writes = self.metas = self.truncates = self.flips = 0
        self.unsynced_pages: set[int] = set()

    def refresh(self):
        if self.stale:
            self.durable = newest_image(self.fs.durable_bytes(PAGES) or b"", self.ps)
            self.visible = newest_image(self.fs.visible_bytes(PAGES) or b"", self.ps)
            self.stale = False

    def __call__(self, ev):
        if ev.path != PAGES:
            return
        self.refresh()
        if ev.kind == "fsync":
            self.unsynced_pages.clear()
            if any(op.kind == "write" and op.offset < 2 * self.ps for op in ev.ops):
                self.flips += 1
                self.flipped(self.durable, self.visible)  # visible newest = the meta this fsync makes durable
            self.stale = True
        elif ev.kind == "truncate":
            self.truncates += 1
            top = max(self.durable.slots) + 1
            assert ev.length >= top * self.ps, f"P2: truncate to {ev.length} cuts slot {top - 1} of the durable image"
            self.stale = True
        elif ev.kind == "write":
            slot = ev.offset // self.ps
            assert ev.offset % self.ps == 0 and len(ev.data) <= self.ps, "a write that is not within one slot"
            self.writes += 1
            self.check_write(slot, ev)
            if slot >= 2:
                self.unsynced_pages.add(slot)
            else:
                self.stale = True  # a new meta: the newest visible image changes

    def check_write(self, slot, ev):
        pass

    def flipped(self, old, new):
        pass


def run_watched(watcher_cls, fuzzy=0, seed=3, steps=400, flip_every=70, page_size=512):
    """Run a workload under the watcher; ``fuzzy``: flip in three phases with
    that many changes twice while each flip is in flight."""
    fs, wal, store = new_store(page_size=page_size, cache_pages=8)
    w = watcher_cls(fs, page_size)
    fs.add_hook(w)
    work = Workload(seed=seed, steps=steps, flip_every=flip_every, fuzzy=fuzzy)
    flipped = []
    work.run(store, wal, after_flip=flipped.append)
    work.last_flipped = flipped[-1]
    return fs, wal, store, w, work


@pytest.mark.parametrize("fuzzy", [0, 6])
def test_p2_no_write_touches_a_slot_the_durable_meta_references(fuzzy):
    """P2: every page-file write (steals, dirty pages at a flip, page-table
    pages, the meta) and every truncate misses the slots of the durable
    image decoded from the durable bytes, the durable meta's own slot included."""

    class P2(ImageWatcher):
        def check_write(self, slot, ev):
            assert slot not in self.durable.slots, f"P2: write to slot {slot}, which durable generation {self.durable.meta.generation} references"

    fs, wal, store, w, work = run_watched(P2, fuzzy)
    assert work.flips >= 5 and w.flips == work.flips and w.writes > 300 and store.pool.steals > 50
    assert w.truncates > 0 or fuzzy  # shrinking after deletes was checked too
    assert state_of(open_image(fs)) == work.last_flipped


@pytest.mark.parametrize("fuzzy", [0, 6])
def test_p3_meta_is_written_only_after_every_page_it_references_is_durable(fuzzy):
    """P3: at each meta write, the meta being written (decoded from the write
    itself) names a page table whose pages, and every page they map, are
    valid in the page file's *durable* bytes, none with a write not fsynced."""

    class P3(ImageWatcher):
        def check_write(self, slot, ev):
            if slot >= 2:
                return
            meta = Meta.decode(ev.data, "meta being written")
            image = image_from(self.fs.durable_bytes(PAGES), self.ps, meta, slot, verify_pages=True)
            unsynced = self.unsynced_pages & image.slots  # (steals in flight may write other slots)
            assert not unsynced, f"P3: meta written before its pages were fsynced: {sorted(unsynced)[:5]}"
            assert meta.generation == self.durable.meta.generation + 1
            assert slot != self.durable.meta_slot
            self.metas += 1

    fs, wal, store, w, work = run_watched(P3, fuzzy)
    assert w.metas == work.flips >= 5


@pytest.mark.parametrize("fuzzy", [0, 6])
def test_p4_slots_freed_by_a_flip_are_not_written_before_its_meta_is_durable(fuzzy):
    """P4: no write goes to a slot that the durable newest image or the newest
    image written (its meta not yet fsynced) references; the slots a flip
    frees are written again only after its meta's fsync -- and they are
    (reused, not leaked)."""

    class P4(ImageWatcher):
        freed: set[int] = set()
        reused = 0

        def check_write(self, slot, ev):
            for img in (self.durable, self.visible):
                assert slot not in img.slots, f"P4: write to slot {slot} of generation {img.meta.generation}"
            if slot in self.freed:
                self.reused += 1
                self.freed.discard(slot)

        def flipped(self, old, new):
            self.freed = self.freed | (old.slots - new.slots - {0, 1})

    fs, wal, store, w, work = run_watched(P4, fuzzy)
    assert work.flips >= 5 and w.reused > 50


def test_failed_meta_fsync_poisons_the_page_file_and_keeps_the_old_image():
    """A failed fsync after the meta write: the flip raises PoisonedError, the
    page file refuses every later write (S3: no fsync retry), and after a
    power cut the previous image opens (the failed fsync dropped the meta)."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    work = Workload(seed=5, steps=150, flip_every=1000)
    work.run(store, wal)
    store.flip(wal.end_lsn)
    before = work.state()
    for i in range(40):
        store.tree.put(b"late-%02d" % i, b"x" * 50)
    fs.fail("fsync", nth=2, path_contains="pages.db")  # the flip's second fsync: after the meta write
    with pytest.raises(PoisonedError):
        store.flip(wal.end_lsn)
    with pytest.raises(PoisonedError):
        store.pagefile.write_page(store.tree.root, PageType.LEAF, 0, b"\0\0")
    with pytest.raises(PoisonedError):
        store.flip(wal.end_lsn)
    after = fs.crash(DropAll())
    reopened = open_image(after)
    assert state_of(reopened) == before
    check_store(reopened)


def test_error_before_the_meta_write_leaves_a_usable_page_file():
    """An error inside a flip before the meta is written (failpoint) leaves the
    durable image as it was; the page-table slots the failed flip wrote are
    free again, and the next flip makes a correct image."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    work = Workload(seed=6, steps=120, flip_every=1000)
    work.run(store, wal)
    gen = store.pagefile.meta.generation

    def boom():
        raise RuntimeError("injected before the meta write")

    failpoints.arm("pages.before_meta_write", boom, times=1)
    try:
        with pytest.raises(RuntimeError):
            store.flip(wal.end_lsn)
    finally:
        failpoints.disarm_all()
    assert store.pagefile.meta.generation == gen
    store.pagefile._check()
    store.tree.put(b"after", b"the failed flip")
    store.flip(wal.end_lsn)
    expected = work.state()
    expected[0][b"after"] = b"the failed flip"
    assert state_of(open_image(fs.crash(DropAll()))) == expected


# --- the flip and free space -------------------------------------------------------------


def test_flip_frees_the_old_image_slots_only_after_it_and_reuses_them():
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    pf = store.pagefile
    for i in range(300):
        store.tree.put(b"%05d" % i, b"v" * 30)
    store.flip(wal.end_lsn)
    for i in range(300):
        store.tree.put(b"%05d" % i, b"w" * 30)  # every leaf rewritten
    st = pf.stats()
    assert st["pending_free_slots"] > 20  # the durable copies wait for the flip (P4)
    result = store.flip(wal.end_lsn)
    assert result["slots_freed"] >= st["pending_free_slots"]
    assert pf.stats()["pending_free_slots"] == 0 and pf.stats()["free_slots"] >= st["pending_free_slots"] - result["slots_truncated"]
    slots = pf.stats()["slots"]
    for i in range(300):
        store.tree.put(b"%05d" % i, b"x" * 30)
    store.flip(wal.end_lsn)
    assert pf.stats()["slots"] <= slots + 10  # the freed slots were reused
    pf._check()


def test_reopen_derives_free_space_from_the_durable_page_table():
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    Workload(seed=8, steps=300, flip_every=100).run(store, wal)
    store.flip(wal.end_lsn)
    live = store.pagefile.stats()
    reopened = open_image(fs)
    st = reopened.pagefile.stats()
    assert st["pages"] == live["pages"] and st["generation"] == live["generation"]
    assert st["free_slots"] + st["pages"] + 2 <= st["slots"]  # + page-table pages
    reopened.pagefile._check()


# --- the buffer pool ----------------------------------------------------------------------


def test_buffer_pool_counts_hits_and_misses():
    fs, wal, store = new_store(page_size=512, cache_pages=64)
    for i in range(400):
        store.tree.put(b"%05d" % i, b"v" * 20)
    store.flip(wal.end_lsn)
    reopened = open_image(fs, cache_pages=64)
    pool, tree = reopened.pool, reopened.tree
    depth = tree.depth()
    assert depth >= 3
    h0, m0 = pool.hits, pool.misses
    tree.get(b"00390")  # the root was read by depth() (leftmost path); the rest of the path is new
    assert (pool.hits - h0, pool.misses - m0) == (1, depth - 1)
    tree.get(b"00390")
    assert (pool.hits - h0, pool.misses - m0) == (1 + depth, depth - 1)
    assert pool.stats()["cache_hits"] == pool.hits and pool.stats()["cache_misses"] == pool.misses


def test_buffer_pool_stays_within_capacity_after_every_operation():
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    pool = store.pool
    assert pool.capacity == 8
    seen = []

    def after(_i):
        assert len(pool) <= pool.capacity
        seen.append(len(pool))

    Workload(seed=9, steps=300, flip_every=75).run(store, wal, after_step=after)
    assert max(seen) == pool.capacity and pool.evictions > 100
    contents(store)
    assert len(pool) <= pool.capacity + store.tree.depth()  # a scan holds no pins between leaves


def test_buffer_pool_capacity_is_at_least_8_pages_and_cache_size_is_checked():
    fs, wal, store = new_store(page_size=512, cache_pages=1)
    assert store.pool.capacity == 8
    with pytest.raises(ValueError, match="cache_size"):
        BufferPool(store.pagefile, -1, lambda lsn: None, decode_any)
    with pytest.raises(ValueError, match="cache_size"):
        BufferPool(store.pagefile, "big", lambda lsn: None, decode_any)


def test_stolen_pages_are_read_back_with_their_content_and_page_lsn():
    """Steal: dirty pages evicted from a tiny cache go to free slots before any
    flip and come back unchanged -- the bytes last written and the page LSN
    in their header -- when read again."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    written = {}

    def hook(ev):
        if ev.kind == "write" and ev.path == PAGES and ev.offset >= 2 * 512:
            _crc, ptype, lsn, lid, length = page_header(ev.data)
            if ptype != PageType.PAGE_TABLE:
                written[lid] = (lsn, ev.data[32 : 32 + length])

    fs.add_hook(hook)
    work = Workload(seed=10, steps=300, flip_every=10**6)
    work.run(store, wal)
    assert store.pool.steals > 50 and store.pagefile.meta.generation == 2  # no flip since create
    assert state_of(store) == work.state()
    evicted = [lid for lid in written if store.pagefile.is_allocated(lid) and store.pool.cached(lid) is None]
    assert len(evicted) > 20
    for lid in evicted:
        node = store.pool.get(lid)
        assert (node.page_lsn, node.encode()) == written[lid]


def test_open_without_redo_reads_only_and_writes_nothing():
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    Workload(seed=12, steps=200, flip_every=50).run(store, wal)
    store.flip(wal.end_lsn)
    snap = fs.snapshot()
    writes = fs.counts["write"]
    reopened = open_image(fs, cache_pages=8)
    check_store(reopened)
    assert fs.counts["write"] == writes and fs.snapshot() == snap


@pytest.mark.parametrize("chunk", [7, 64, 1 << 16])
def test_slot_bitmap_behaves_as_a_set_of_slots(monkeypatch, chunk):
    """``SlotBitmap`` (the durable image's slots, the pending and the free
    slots; a byte a slot) against a set, over random sequences of every
    operation: membership, adding, taking the lowest, the count below a
    slot, cutting the tail, the bulk union-minus and intersection (run in
    chunks of ``_CHUNK`` bytes: a few sizes, so runs cross chunk edges),
    and the complement open builds."""
    import pages.pagefile as pagefile
    from pages.pagefile import SlotBitmap

    monkeypatch.setattr(pagefile, "_CHUNK", chunk)
    rng = random.Random(11)

    def same(bm: SlotBitmap, model: set[int]) -> None:
        assert list(bm) == sorted(model) and len(bm) == len(model)
        assert bm.highest() == max(model, default=-1) and bm.lowest() == min(model, default=-1)

    for _ in range(150):
        span = rng.choice([5, 100, 700, 5000])
        a_set = {rng.randrange(0, span) for _ in range(rng.randint(0, 300))}
        a = SlotBitmap(a_set)
        same(a, a_set)
        for s in range(-2, span + 10, 7):
            assert (s in a) == (s in a_set)
        assert "3" not in a and 3.0 not in a
        for _ in range(40):
            op = rng.randrange(7)
            if op == 0:
                s = rng.randrange(0, span)
                a.add(s)
                a.add(s)  # twice: counted once
                a_set.add(s)
            elif op == 1:
                assert a.pop_lowest() == (min(a_set) if a_set else -1)
                a_set.discard(min(a_set, default=-1))
            elif op == 2:
                end = rng.randrange(-1, span + 2)
                assert a.count_below(end) == sum(1 for s in a_set if s < end)
            elif op == 3:
                top = max(a_set, default=-1) + 1 + rng.choice([0, 0, 1])
                start = top
                while start - 1 in a_set:
                    start -= 1
                assert a.take_tail(top) == start
                a_set -= set(range(start, top))
            elif op == 4:
                srcs = [{rng.randrange(0, span) for _ in range(rng.randint(0, 200))} for _ in range(rng.randint(1, 2))]
                minus = {rng.randrange(0, span) for _ in range(rng.randint(0, 200))}
                want = set().union(*srcs) - minus
                assert a.add_difference([SlotBitmap(x) for x in srcs], SlotBitmap(minus)) == len(want - a_set)
                a_set |= want
            elif op == 5:
                other = {rng.randrange(0, span) for _ in range(rng.randint(0, 300))} | set(rng.sample(sorted(a_set), len(a_set) // 2))
                a.keep_only(SlotBitmap(other))
                a_set &= other
            else:
                lo, hi = rng.randrange(0, 4), rng.randrange(0, span + 3)
                c = SlotBitmap.complement(a, lo, hi)
                same(c, set(range(lo, hi)) - a_set)
            same(a, a_set)
        a.clear()
        same(a, set())


@pytest.mark.parametrize("damage", ["two pages in one slot", "a slot past the end", "a meta slot"])
def test_open_refuses_a_page_table_that_maps_pages_to_impossible_slots(monkeypatch, damage):
    """Open checks every entry of the page table it loads: two pages in one
    slot, a slot beyond the end of the file, or a meta slot raise
    CorruptionError naming the page table (its pages' checksums cannot
    catch a table that was written wrong)."""
    from wal.errors import CorruptionError

    fs, wal, store = new_store(page_size=512, cache_pages=16)
    for i in range(300):
        store.tree.put(b"key-%04d" % i, b"v" * 40)
    store.flip(wal.end_lsn)
    load = PageFile._load_pt_level

    def damaged_load(self, level, index, slot, crc):
        load(self, level, index, slot, crc)
        if level == 0 and index == 0:
            first, second = [lid for lid in range(1, len(self._slot)) if self._slot[lid]][:2]
            self._slot[second] = {"two pages in one slot": self._slot[first], "a slot past the end": self._nslots + 3, "a meta slot": 1}[damage]

    monkeypatch.setattr(PageFile, "_load_pt_level", damaged_load)
    with pytest.raises(CorruptionError, match="out of range or used twice"):
        open_image(fs)
