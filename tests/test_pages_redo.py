"""Redo (pages.redo, PageStore.redo): replaying the log over an older image
repeats history exactly.

Every page change is a PAGE_REDO record.  Opening the durable image of any
earlier flip and replaying the log from its checkpoint LSN must give pages
equal to the live ones -- B+tree nodes, overflow chains, undo pages and the
rollback-segment header -- across steals, splits, merges, root collapses,
overflow values, undo appends and frees.  Replay is idempotent (ARIES' rule:
apply only where page LSN < record LSN), so replaying again, or from an LSN
older than the image, changes nothing.  After a power cut, redo brings the
last flipped image up to the last durable log record (P1 makes that safe
even though stolen pages reached the page file before the flip).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pagehelpers import (
    DB_ID,
    PAGES,
    D,
    Workload,
    check_store,
    fs_with,
    new_fs,
    new_store,
    state_of,
)

from pages.faultfs import DropAll, KeepAll
from pages.node import Op, unpack_ops
from pages.store import PageStore
from wal.format import RecordType
from wal.log import WriteAheadLog

CACHE = 8 * 512


def open_and_redo(fs, from_lsn=None):
    wal = WriteAheadLog.open(fs, D, DB_ID)
    store = PageStore.open(fs, D, wal, cache_size=CACHE)
    result = store.redo(from_lsn)
    return wal, store, result


def logged_ops(wal) -> Counter:
    return Counter(
        Op(op).name for rec in wal.records() if rec.type == RecordType.PAGE_REDO for _lid, op, _d in unpack_ops(rec.payload)
    )


@pytest.fixture(scope="module", params=[0, 5], ids=["flip", "fuzzy-flip"])
def history(request):
    """A workload with a flip every 100 steps and 60 steps after the last:
    the durable page-file bytes and checkpoint LSN at each flip, the files at
    the end, and the live pages and state.  Plain flips, or three-phase ones
    with changes while each is in flight (they are after its checkpoint LSN,
    so redo must bring them back)."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    images = [(fs.durable_bytes(PAGES), store.pagefile.meta.checkpoint_lsn)]

    def after(_state):
        images.append((fs.durable_bytes(PAGES), store.pagefile.meta.checkpoint_lsn))

    work = Workload(seed=21, steps=560, flip_every=100, grow=0.1, fuzzy=request.param)
    work.run(store, wal, after_flip=after)
    wal.flush()
    live = store.pages()
    assert state_of(store) == work.state()
    return dict(files=fs.snapshot(), images=images, live=live, state=work.state(), steals=store.pool.steals, ops=logged_ops(wal))


def test_history_covers_steals_splits_merges_overflow_and_the_rollback_segment(history):
    ops = history["ops"]
    for name in ("IMAGE", "LEAF_PUT", "LEAF_DEL", "INT_INSERT", "INT_REMOVE", "FREE", "UNDO_APPEND", "UNDO_SETNEXT"):
        assert ops[name] > 0, f"the workload never logged {name}"
    assert history["steals"] > 100 and len(history["images"]) == 6


@pytest.mark.parametrize("flip", range(6))
def test_redo_from_each_flipped_image_gives_the_live_pages(history, flip):
    image, ckpt = history["images"][flip]
    fs = fs_with({**history["files"], PAGES: image})
    wal, store, result = open_and_redo(fs)
    assert store.pagefile.meta.checkpoint_lsn == ckpt
    assert result["ops_applied"] > 0
    assert store.pages() == history["live"]
    assert state_of(store) == history["state"]
    check_store(store)


@pytest.mark.parametrize("flip", [0, 3])
def test_redo_twice_gives_the_same_pages(history, flip):
    image, _ckpt = history["images"][flip]
    fs = fs_with({**history["files"], PAGES: image})
    wal, store, _ = open_and_redo(fs)
    store.redo()
    assert store.pages() == history["live"]
    check_store(store)
    # and once more after the redone image was flipped and reopened
    store.flip(wal.end_lsn)
    again = PageStore.open(fs, D, wal, cache_size=CACHE)
    assert again.pages() == history["live"]
    again.redo(store.pagefile.meta.checkpoint_lsn)
    again.redo(history["images"][0][1])
    assert again.pages() == history["live"]
    assert state_of(again) == history["state"]
    check_store(again)


@pytest.mark.parametrize("flip, older", [(5, 0), (3, 1), (2, 0)])
def test_redo_from_an_lsn_older_than_the_image_skips_changes_the_pages_have(history, flip, older):
    """Replaying records the image already holds (from an older checkpoint)
    must skip every page whose page LSN shows the change: re-inserting a
    separator or re-appending an undo record would corrupt the page."""
    image, _ = history["images"][flip]
    fs = fs_with({**history["files"], PAGES: image})
    wal, store, _ = open_and_redo(fs, from_lsn=history["images"][older][1])
    assert store.pages() == history["live"]
    assert state_of(store) == history["state"]
    check_store(store)


def test_redo_over_a_process_crash_clone_after_steals_gives_the_live_pages():
    """KeepAll (the page cache survives): the page file holds pages stolen
    after the last flip in free slots; the durable meta ignores them, redo
    rebuilds them from the log."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    work = Workload(seed=22, steps=300, flip_every=120)
    work.run(store, wal)
    steals_after_flip = store.pool.steals
    assert steals_after_flip > 50
    wal.flush()
    live = store.pages()
    after = fs.crash(KeepAll())
    wal2, store2, result = open_and_redo(after)
    assert result["ops_applied"] > 0
    assert store2.pages() == live
    assert state_of(store2) == work.state()
    check_store(store2)


def test_redo_after_power_cuts_restores_the_state_of_the_last_durable_record():
    """Cut the power at I/O points through a workload with steals and flips;
    reopen (the WAL cuts its torn tail), redo from the last flipped image:
    the store equals the model after the last step whose log record is
    durable.  (Every step of the workload but a bulk delete is one record.)"""
    seed, steps = 23, 200
    probe = new_fs(seed)
    probe, wal, store = new_store(probe, page_size=512, cache_pages=8)
    start = probe.io_points
    ends = {}

    def recorder(work, wal):
        def after_step(i):
            ends[wal.end_lsn] = work.state()

        return after_step

    w = Workload(seed=seed, steps=steps, flip_every=70)
    ends[wal.end_lsn] = w.state()
    w.run(store, wal, after_step=recorder(w, wal))
    total = probe.io_points - start
    rng = random.Random(seed)
    checked = matched = 0
    for k in range(total + 1):
        fs = new_fs(seed)
        fs, wal, store = new_store(fs, page_size=512, cache_pages=8)
        fs.crash_after(k)
        try:
            Workload(seed=seed, steps=steps, flip_every=70).run(store, wal)
        except BaseException:  # PowerCut, or an error the engine made of it (a poisoned log)
            if not fs.dead:
                raise
        plans = [DropAll(), KeepAll(), *rng.sample(fs.plans(), 2)]
        for plan in plans:
            wal2, store2, _ = open_and_redo(fs.crash(plan))
            check_store(store2)
            checked += 1
            if wal2.end_lsn in ends:
                assert state_of(store2) == ends[wal2.end_lsn], f"cut at {k}, {plan!r}"
                matched += 1
    print(f"\nredo after power cuts: {checked} crash states, {matched} compared with the model")
    assert matched > checked * 3 // 4


def test_crash_during_redo_or_the_flip_after_it_then_redo_again_ends_the_same():
    """Recovery is restartable: cut the power at every I/O point of (redo, then
    a flip of the redone image), reopen and redo again: always the same pages."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    work = Workload(seed=24, steps=250, flip_every=100)
    work.run(store, wal)
    wal.flush()
    live, expected = store.pages(), work.state()
    files = fs.crash(DropAll()).snapshot()

    def recover(fs):
        wal, store, _ = open_and_redo(fs)
        store.flip(wal.end_lsn)
        return store

    probe = fs_with(files)
    start = probe.io_points
    recover(probe)
    total = probe.io_points - start
    checked = 0
    for k in range(total + 1):
        fs = fs_with(files)
        fs.crash_after(k)
        try:
            recover(fs)
        except BaseException:  # PowerCut, or an error the engine made of it (a poisoned log)
            if not fs.dead:
                raise
        for plan in (DropAll(), KeepAll(), *fs.plans(["Torn", "OmitOne"], limit=2)):
            wal2, store2, _ = open_and_redo(fs.crash(plan))
            assert store2.pages() == live, f"cut at {k}, {plan!r}"
            assert state_of(store2) == expected
            checked += 1
    check_store(store2)
    print(f"\ncrashes during recovery: {total} I/O points, {checked} crash states")
    assert total > 20
