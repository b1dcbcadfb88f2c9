"""Compaction: the page file gives its free tail back (pages.pagefile,
"Compaction"; recovery/checkpointer.py, "Compaction").

Shadow paging writes every changed page to a free slot and frees the old copy
once the flip is durable, so free slots end up anywhere in the file, and a
file can only shrink by a free tail.  Compaction moves the pages that live in
the tail into free slots lower down, flips, cuts the tail and fsyncs.  The
tests here show that:

* it gives the space back: a store whose pages were all rewritten after a
  checkpoint ends, after a clean close, with no free tail and at most a
  page-table page's worth of holes, and everything reads back and checks
  clean (page file alone, and through ``kvstore``);
* it never touches the durable image (P2), reuses a freed slot only after
  its flip is durable (P4) and cuts only free slots (P5), seen from the bytes
  by a FaultFS hook;
* a power cut before any of its I/O points, under every kind of crash plan,
  leaves the old image or the new one, the same data in both (page file,
  and through the whole store with ``crashkit``);
* an I/O error anywhere in close's checkpoint and compaction leaves a store
  that reopens with everything;
* damage in a page it would move is reported, not copied;
* a store with nothing worth giving back is not rewritten: no flip, no I/O.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from crashkit import Limits, Workload, enumerate_crashes, report
from pagehelpers import (
    PAGES,
    check_store,
    new_fs,
    new_store,
    newest_image,
    open_image,
    state_of,
)

import kvstore
from kvstore import reliability
from pages.faultfs import DropAll, FaultFS, KeepAll
from pages.pagefile import PAGE_FILE_NAME
from pages.store import PageStore
from wal import failpoints
from wal.errors import CorruptionError, PoisonedError

PS = 512  # page-file tests: tiny pages, so a few hundred keys make a deep tree


# --- the page file alone ---------------------------------------------------------------


def fragmented(seed: int = 0, keys: int = 300, fs: FaultFS | None = None):
    """(fs, wal, store): every page written twice, with a flip after each
    round, so the first round's slots are free and lie below the second's."""
    fs, wal, store = new_store(fs if fs is not None else new_fs(seed), page_size=PS, cache_pages=64)
    rng = random.Random(seed)
    for i in range(keys):
        store.tree.put(b"%05d" % i, rng.randbytes(rng.choice([10, 40, 90])))
    store.flip(wal.end_lsn)
    for i in range(keys):
        store.tree.put(b"%05d" % i, rng.randbytes(rng.choice([10, 40, 90])))
    store.flip(wal.end_lsn)
    return fs, wal, store


def pt_pages(store: PageStore) -> int:
    return sum(len(level) for level in store.pagefile._pt_pages)


def test_compaction_moves_the_tail_down_and_cuts_it():
    fs, wal, store = fragmented()
    pf = store.pagefile
    before = pf.stats()
    expected = state_of(store)
    assert before["free_slots"] > before["slots"] // 3  # the first round's copies, all below the second's
    result = store.compact()
    after = pf.stats()
    live = after["pages"] + pt_pages(store) + 2
    assert result["pages_relocated"] > 0 and result["slots_truncated"] == before["slots"] - after["slots"]
    # no free tail; at most the old page-table pages left as holes below the end
    assert live <= after["slots"] <= live + pt_pages(store)
    assert len(fs.visible_bytes(PAGES) or b"") == after["slots"] * PS
    assert state_of(store) == expected
    check_store(store)
    reopened = open_image(fs.crash(DropAll()))  # the durable bytes alone, no redo
    assert reopened.pagefile.stats()["slots"] == after["slots"]
    assert len(reopened.pagefile._free_slots) <= pt_pages(store)
    assert state_of(reopened) == expected
    check_store(reopened)


def test_the_meta_records_how_far_its_image_reaches_so_a_cut_file_reopens_without_phantom_slots():
    """The meta's slot count is one past the highest slot its image uses, not
    the file's length when the flip began: after the tail is cut, a reopen
    counts no free slots beyond the end of the file."""
    fs, wal, store = fragmented()
    store.compact()
    meta = store.pagefile.meta
    image = newest_image(fs.durable_bytes(PAGES) or b"", PS)
    assert image is not None and meta.nslots == max(image.slots) + 1
    reopened = open_image(fs.crash(DropAll()))
    free = list(reopened.pagefile._free_slots)
    assert not free or free[-1] < len(fs.durable_bytes(PAGES) or b"") // PS


def test_compaction_keeps_p2_p4_p5_seen_from_the_bytes():
    """Every page-file write of a compaction misses the slots of the durable
    image and of the newest image written (P2, P4); the truncate cuts no slot
    of the durable image (P5) and comes after the meta that frees them is
    durable; the meta write comes after an fsync of every page it names."""
    fs, wal, store = fragmented()
    seen: Counter = Counter()
    unsynced: set[int] = set()

    def hook(ev):
        if ev.path != PAGES:
            return
        durable = newest_image(fs.durable_bytes(PAGES) or b"", PS)
        visible = newest_image(fs.visible_bytes(PAGES) or b"", PS)
        assert durable is not None and visible is not None
        if ev.kind == "write":
            slot = ev.offset // PS
            for img in (durable, visible):
                assert slot not in img.slots, f"write to slot {slot} of generation {img.meta.generation}"
            if slot >= 2:
                unsynced.add(slot)
            else:
                assert not (unsynced & visible.slots), "P3: the meta before its pages"
                seen["meta"] += 1
            seen["write"] += 1
        elif ev.kind == "truncate":
            assert visible.meta.generation == durable.meta.generation, "cut before the freeing meta is durable"
            assert ev.length >= (max(durable.slots) + 1) * PS, "P5: the cut takes a slot of the durable image"
            seen["truncate"] += 1
        elif ev.kind == "fsync":
            unsynced.clear()

    fs.add_hook(hook)
    result = store.compact()
    assert result["pages_relocated"] > 20 and seen["truncate"] == 1 and seen["meta"] == 1


def test_relocated_pages_old_slots_wait_for_the_flip():
    """P4 for relocation: the slot a page moved out of is durable, so it is
    pending until the flip, not free; before the flip, the durable bytes are
    still the old image, whole."""
    fs, wal, store = fragmented()
    pf = store.pagefile
    expected = state_of(store)
    end, lids = pf.compaction_plan()
    old = {pf._slot[lid] for lid in lids}
    moved = sum(pf.relocate(lid, end) for lid in lids)
    assert moved == len(lids) > 20
    assert old <= set(pf._pending_free) and not (old & set(pf._free_slots))
    pf._check()
    assert state_of(store) == expected
    assert state_of(open_image(fs.crash(KeepAll()))) == expected  # every write kept, no meta: the old image


def compaction_run(cut: int | None):
    """A fragmented store, then ``compact()`` with the power cut ``cut`` I/O
    points into it.  Returns (fs, expected state, generation before, I/O
    points the compaction used)."""
    fs, wal, store = fragmented(seed=3, keys=160)
    expected = state_of(store)
    generation = store.pagefile.meta.generation
    start = fs.io_points
    fs.crash_after(cut)
    try:
        store.compact()
    except BaseException:
        if not fs.dead:
            raise
    return fs, expected, generation, fs.io_points - start


def test_power_cut_at_every_io_point_of_a_compaction_leaves_the_old_or_the_new_image_with_the_same_data():
    _fs, expected, generation, total = compaction_run(None)
    assert total > 40
    tally: Counter = Counter()
    for k in range(total):
        fs, _expected, _gen, _used = compaction_run(k)
        assert fs.dead
        seen = set()
        for plan in fs.plans(limit=40):
            image = fs.crash(plan)
            key = image.durable_bytes(PAGES)
            if key in seen:
                continue
            seen.add(key)
            store = open_image(image)  # no redo: the image alone must hold everything
            assert store.pagefile.meta.generation in (generation, generation + 1), f"I/O point {k}, {plan!r}"
            assert state_of(store) == expected, f"I/O point {k}, {plan!r}: the data changed"
            check_store(store)
            tally[store.pagefile.meta.generation - generation] += 1
    assert tally[0] and tally[1]  # cuts before the meta and after it were both tried
    reliability.add("crash_points", total)
    reliability.add("crash_states", sum(tally.values()))


def test_damage_in_a_page_to_move_raises_and_nothing_durable_changes():
    fs, wal, store = fragmented()
    pf = store.pagefile
    end, lids = pf.compaction_plan()
    victim = lids[len(lids) // 2]
    slot = pf._slot[victim]
    data = bytearray(pf._file.pread(slot * PS, PS))
    data[100] ^= 0x10
    pf._file.pwrite(slot * PS, bytes(data))
    pf._file.fsync()
    durable = fs.durable_bytes(PAGES)
    generation = pf.meta.generation
    with pytest.raises(CorruptionError, match=f"page {victim} .*relocated"):
        store.compact()
    assert pf.meta.generation == generation
    assert fs.durable_bytes(PAGES) == durable  # copies went to free slots, none fsynced, no meta
    pf._check()


def test_nothing_to_give_back_means_no_flip_and_no_io():
    fs, wal, store = new_store(page_size=PS, cache_pages=64)
    for i in range(300):
        store.tree.put(b"%05d" % i, b"x" * 40)
    store.flip(wal.end_lsn)  # written once, in order: no free slots worth moving pages for
    pf = store.pagefile
    generation, points = pf.meta.generation, fs.io_points
    end, _lids = pf.compaction_plan()
    assert pf.nslots - end < 8
    assert store.compact(min_gain=8) == {"pages_relocated": 0, "slots_truncated": 0}
    assert (pf.meta.generation, fs.io_points) == (generation, points)


def test_the_plan_is_the_smallest_end_the_pages_fit_below():
    fs, wal, store = fragmented(seed=5)
    pf = store.pagefile
    end, lids = pf.compaction_plan()
    free = sorted(pf._free_slots)
    pages = sorted(s for s in pf._slot if s)
    need = lambda e: len([s for s in pages if s >= e]) + pf._pt_pages_at_most()  # noqa: E731
    have = lambda e: len([s for s in free if s < e])  # noqa: E731
    assert have(end) >= need(end) and have(end - 1) < need(end - 1)
    assert len(pages) == len(pf._slot) - 1 - len(pf._free_lids) - len(pf._allocated)
    assert 0 < pf.nslots - end <= pf.reclaimable_at_most()  # the O(1) bound bounds
    assert sorted(lids) == sorted(lid for lid, s in enumerate(pf._slot) if s and s >= end)


# --- through the store ----------------------------------------------------------------


def load(db: kvstore.Database, n: int, seed: int = 1, checkpoint_at: int | None = None) -> dict[bytes, bytes]:
    rnd = random.Random(seed)
    data = {}
    with db.transaction() as tx:
        for i in range(n):
            k, v = rnd.randbytes(16), rnd.randbytes(100)
            tx.put(k, v)
            data[k] = v
            if i == checkpoint_at:
                db.checkpoint()  # the pages written so far become durable: close writes them again, higher up
    return data


def test_clean_close_after_a_load_gives_the_free_tail_back(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, checkpoint_interval=float("inf"))
    data = load(db, 12_000, checkpoint_at=8_000)
    ckpt = db._checkpointer
    db.close()
    assert ckpt.compactions == 1 and ckpt.slots_given_back > 300
    size = os.path.getsize(path / PAGE_FILE_NAME)
    db = kvstore.open(path)
    try:
        st = db._store.pagefile.stats()
        pt = sum(len(level) for level in db._store.pagefile._pt_pages)
        assert size == st["slots"] * 4096
        assert st["free_slots"] <= pt  # no free tail, at most page-table holes
        assert st["slots"] <= st["pages"] + 2 * pt + 2
        assert all(db.get(k) == v for k, v in data.items())
        assert db.check()["ok"]
    finally:
        db.close()


def test_a_checkpoint_compacts_when_half_the_file_is_free(tmp_path):
    """Not only at close: after a checkpoint that leaves at least half the
    file free (here: most keys deleted and purged), the tail is given back."""
    db = kvstore.open(tmp_path / "db", checkpoint_interval=float("inf"))
    try:
        data = load(db, 6_000)
        db.checkpoint()
        slots = db._store.pagefile.nslots
        with db.transaction() as tx:
            for k in list(data)[: len(data) * 9 // 10]:
                tx.delete(k)
                del data[k]
        db.purge()
        first = db.checkpoint()  # frees the deleted keys' pages and the undo pages
        second = db.checkpoint()  # what the first freed is free now (P4): one of the two compacts
        assert first["slots_truncated"] + second["slots_truncated"] > slots // 3
        assert first["pages_relocated"] + second["pages_relocated"] > 0
        assert db._store.pagefile.nslots < slots // 2
        assert all(db.get(k) == v for k, v in data.items())
        assert db.check()["ok"]
    finally:
        db.close()


def shrunken_store(fs: FaultFS) -> tuple[kvstore.Database, dict[bytes, bytes]]:
    """A store on ``fs`` that had 6,000 keys, checkpointed, now 600, the rest
    purged: the next checkpoint frees more than half the file, and compacts."""
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    data = load(db, 6_000)
    db.checkpoint()
    with db.transaction() as tx:
        for k in list(data)[600:]:
            tx.delete(k)
            del data[k]
    db.purge()
    return db, data


def test_a_commit_during_a_compaction_survives_a_power_cut_right_after_it():
    """The compaction's meta names the checkpoint LSN of the image before it,
    so restart still redoes a commit that landed while it ran (its pages
    dirty in the cache, in no image)."""
    fs = FaultFS(seed=5)
    db, data = shrunken_store(fs)
    failpoints.arm("recovery.compact_before_flip", lambda: db.put(b"during", b"the compaction"), times=1)
    try:
        result = db.checkpoint()
    finally:
        failpoints.disarm_all()
    assert result["slots_truncated"] > 0 and db.get(b"during") == b"the compaction"
    data[b"during"] = b"the compaction"
    after = fs.crash(DropAll())
    db2 = kvstore.open("/db", _fs=after, checkpoint_interval=float("inf"))
    try:
        assert dict(db2.scan()) == data
        assert db2.check()["ok"]
    finally:
        db2.close()


def test_a_failed_fsync_in_a_compaction_poisons_the_store():
    """S3 and SPEC guarantee 5 hold in a compaction too: its fsync failing
    makes the checkpoint raise PoisonedError and every later write refuse;
    the data is intact after a power cut."""
    fs = FaultFS(seed=6)
    db, data = shrunken_store(fs)
    failpoints.arm("recovery.compact_before_flip", lambda: fs.fail("fsync", path_contains="pages.db"), times=1)
    try:
        with pytest.raises(PoisonedError):
            db.checkpoint()
    finally:
        failpoints.disarm_all()
    with pytest.raises(PoisonedError):
        db.put(b"after", b"the failed fsync")
    db.close()
    db2 = kvstore.open("/db", _fs=fs.crash(DropAll()), checkpoint_interval=float("inf"))
    try:
        assert dict(db2.scan()) == data
        assert db2.check()["ok"]
    finally:
        db2.close()


def test_a_store_with_no_free_tail_is_not_rewritten_at_close():
    fs = FaultFS(seed=1)
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    load(db, 3_000)
    db.close()  # one checkpoint, pages written in order: nothing to give back
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    db.put(b"one more", b"key")
    generation = db._store.pagefile.meta.generation
    ckpt = db._checkpointer
    slots = db._store.pagefile.nslots
    db.close()
    assert ckpt.compactions == 0
    pages = "/db/" + PAGE_FILE_NAME
    assert len(fs.visible_bytes(pages) or b"") < slots * 4096  # its flip cut the old page-table pages off the end ...
    assert len(fs.durable_bytes(pages) or b"") == len(fs.visible_bytes(pages) or b"")  # ... and close made that durable
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    try:
        assert db._store.pagefile.meta.generation == generation + 1  # close's checkpoint only
        points = fs.io_points
        assert db._checkpointer.compact() == {"pages_relocated": 0, "slots_truncated": 0}
        assert fs.io_points == points  # not one write, truncate or fsync
    finally:
        db.close()


def test_the_cut_is_durable_when_close_returns():
    fs = FaultFS(seed=2)
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    data = load(db, 6_000, checkpoint_at=4_000)
    db.close()
    visible = len(fs.visible_bytes("/db/" + PAGE_FILE_NAME) or b"")
    after = fs.crash(DropAll())
    assert len(after.durable_bytes("/db/" + PAGE_FILE_NAME) or b"") == visible
    db = kvstore.open("/db", _fs=after)
    try:
        assert db._store.pagefile.nslots * 4096 == visible
        assert all(db.get(k) == v for k, v in data.items())
    finally:
        db.close()


def test_close_right_after_an_explicit_checkpoint_still_compacts():
    fs = FaultFS(seed=3)
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    load(db, 6_000, checkpoint_at=4_000)
    db.checkpoint()  # the free slots are below a quarter of the file: no compaction here
    ckpt = db._checkpointer
    db.close()  # nothing logged since: close skips its checkpoint
    assert ckpt.compactions == 1


# --- power cuts and I/O errors through the store ------------------------------------------

#: Keys of the crash workload: enough that rewriting them all leaves more
#: than a sixteenth of the file free at close.
INITIAL = {b"key%04d" % i: bytes([i % 251]) * 100 for i in range(500)}


def rewrite_all_then_close(run):
    """Every key rewritten in one transaction, then close: its checkpoint
    writes every page again above the old copies, which it frees, and the
    compaction moves the pages down into them and cuts the tail."""
    db = run.open()
    new = {k: b"n" + v[1:] for k, v in INITIAL.items()}

    def commit() -> None:
        with db.transaction() as tx:
            for k, v in new.items():
                tx.put(k, v)

    run.commit(commit, new)
    ckpt = db._checkpointer
    run.close(db)
    run.note("compaction", (ckpt.compactions, ckpt.slots_given_back))


COMPACT_WORKLOAD = Workload("rewrite_all_then_close", rewrite_all_then_close, INITIAL)


def test_the_crash_workload_compacts_at_close():
    run = COMPACT_WORKLOAD.run(COMPACT_WORKLOAD.base("full", 1), "full", 1, None)
    assert run.finished
    compactions, given_back = run.notes["compaction"]
    assert compactions == 1 and given_back >= 16


def test_power_cut_at_every_io_point_of_close_and_its_compaction_loses_nothing():
    """crashkit's checks at every I/O point of the workload (the commit, close's
    checkpoint, the compaction's moves, flip, cut and fsync): open succeeds,
    the state is the model's after every acknowledged commit, check() is
    clean, the store works on, and a power cut during recovery changes
    nothing."""
    tally: Counter = Counter()
    kinds = enumerate_crashes(COMPACT_WORKLOAD, "full", Limits(plans=6, nested_every=50, nested_points=6), 1, tally)
    report(tally)
    assert tally["crash_points"] > 60 and kinds["nested"] > 0 and tally["acked_lost"] == 0
    assert {"DropAll", "KeepAll", "Prefix", "OmitOne"} <= set(kinds)


def closed_store_image(keys: int) -> FaultFS:
    """A dead FaultFS (copy it with ``crash(KeepAll())``) holding a closed
    store of ``keys`` keys, as ``load`` makes them."""
    fs = FaultFS(seed=4)
    db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
    load(db, keys)
    db.close()
    fs.crash(KeepAll())
    return fs


@pytest.mark.parametrize("mode", ["once", "every"])
def test_an_io_error_anywhere_in_close_leaves_a_store_that_reopens_with_everything(mode):
    """Every key rewritten, then for N = 1, 2, ...: fail the Nth file-system
    call of close (its checkpoint, then the compaction) with EIO, once or from
    then on, until close runs untouched.  Close either succeeds (the
    compaction logs a non-fsync I/O error and gives up) or raises a clean
    error; then the durable image, and the page cache as the error left it,
    open with every key and check clean."""
    base = closed_store_image(600)
    n, fired, swallowed = 1, 0, 0
    while True:
        fs = base.crash(KeepAll())
        db = kvstore.open("/db", _fs=fs, checkpoint_interval=float("inf"))
        data = {k: v[::-1] for k, v in db.scan()}
        with db.transaction() as tx:
            for k, v in data.items():
                tx.put(k, v)
        ckpt = db._checkpointer
        fault = fs.fail("any", nth=n, every=mode == "every")
        try:
            db.close()
        except (OSError, kvstore.ClosedError):
            pass
        fs.clear_faults()
        if not fault.fired:
            assert ckpt.compactions == 1  # the untouched close compacted
            break
        fired += 1
        swallowed += ckpt.compaction_errors
        for plan in (DropAll(), KeepAll()):
            image = fs.crash(plan)
            reopened = kvstore.open("/db", _fs=image, checkpoint_interval=float("inf"))
            try:
                assert dict(reopened.scan()) == data, f"call {n} of close failed ({mode}), {plan!r}"
                assert reopened.check()["ok"]
            finally:
                reopened.close()
        n += 1
    assert fired > 40 and swallowed > 0  # errors inside the compaction were among them
