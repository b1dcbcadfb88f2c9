"""Damage to the page file is detected, never returned as data (TESTING.md 5).

Start from a small flipped store, inject one fault into the page file, open
it, read everything (every key, every value through its overflow chain,
every undo record, every page) and check it.  Each outcome is either
*detected* -- CorruptionError naming the page and slot -- or *harmless* --
everything equals the model, which is only allowed for a slot the image does
not use.  Silently wrong is never allowed, and a refused open changes no file.

Faults: a flipped bit in every non-meta slot, a zeroed slot, a page's bytes
copied over another page's slot (misdirected write), an older valid image of
a page put back in its slot (lost write), a truncated file, both meta pages
damaged.  (One damaged meta falls back to the other: test_pages_powercut.py.)

Every fault's outcome goes to the reliability report (TESTING.md 9):
``corruption_detected`` / ``corruption_harmless`` (``corruption_silent`` stays
zero: a silent outcome fails the test first), and a refused open that changed
a file to ``refused_open_changed_files``.  The whole store's matrix is
tests/test_reliability_corruption.py.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from pagehelpers import (
    PAGES,
    Workload,
    check_store,
    flip_bit,
    fs_with,
    new_store,
    newest_image,
    open_image,
    replace_at,
)

from kvstore import reliability
from pages.format import Meta
from wal.errors import CorruptionError

PS = 512


def build(seed=31, steps=140):
    """A small store flipped twice: (files at the first flip, files at the
    second, the model at the second)."""
    fs, wal, store = new_store(page_size=PS, cache_pages=8)
    snaps = []

    def after(state):
        snaps.append((fs.durable_snapshot(), state))

    Workload(seed=seed, steps=steps, flip_every=steps // 2, big=1500).run(store, wal, after_flip=after)
    (files1, _), (files2, state2) = snaps
    return files1, files2, state2


@pytest.fixture(scope="module")
def store_files():
    files1, files2, state = build()
    img = newest_image(files2[PAGES], PS, verify_pages=True)
    assert len(img.pages) > 15 and any(len(v) > 1000 for v in state[0].values()) and state[1]
    return files1, files2, state, img


def read_everything(files, state):
    """Open the page file in ``files`` without redo and read all of it,
    comparing every value with the model *as it is read* (so a wrong value is
    caught even if an error comes later).  Returns "harmless", or raises."""
    model, undo = state
    fs = fs_with(files)
    before = fs.snapshot()
    opened = False
    try:
        store = open_image(fs)
        opened = True
        seen = 0
        for key, cell in store.tree.scan():
            assert key in model, f"a key the model does not have: {key!r}"
            assert store.tree.read_value(cell) == model[key], f"wrong value for {key!r}"
            seen += 1
        for key, cell in store.tree.scan(reverse=True):
            assert store.tree.read_value(cell) == model[key]
        assert seen == len(model)
        got_undo = []
        for lid in store.undo.pages():
            got_undo.extend(tuple(r) for r in store.pool.get(lid).records(lid))
        assert got_undo == undo, "wrong undo records"
        for u in undo:
            assert tuple(store.undo.read(u[0])) == u
        check_store(store)
        return "harmless"
    finally:
        changed = fs.snapshot() != before
        if changed and not opened:
            reliability.add("refused_open_changed_files")
        assert not changed, "reading a damaged page file changed a file"


def expect_detected(files, state, slot):
    with pytest.raises(CorruptionError) as info:
        read_everything(files, state)
    msg = str(info.value)
    assert re.search(rf"slot {slot}\b", msg), f"the error does not name slot {slot}: {msg}"
    assert re.search(r"page \d+|page-table page", msg)
    reliability.add("corruption_detected")
    return msg


def test_flipped_bit_in_any_page_is_detected_or_harmless_never_wrong(store_files):
    """Flip bits in every non-meta slot (in the header, the body and the
    padding): a slot the image uses is always detected, naming the page."""
    _files1, files, state, img = store_files
    data = files[PAGES]
    nslots = len(data) // PS
    used = img.slots
    rng = random.Random(5)
    outcomes: Counter = Counter()
    for slot in range(2, nslots):
        header = [rng.randrange(0, 32 * 8) for _ in range(3)]  # crc, type, page LSN, id, length
        body = [rng.randrange(32 * 8, PS * 8) for _ in range(4)]
        for bit in header + body + [(PS - 1) * 8 + rng.randrange(8)]:  # ... and the last byte's padding
            damaged = {**files, PAGES: flip_bit(data, slot * PS * 8 + bit)}
            if slot in used:
                expect_detected(damaged, state, slot)  # (counts it in the report)
                outcomes["detected"] += 1
            else:
                assert read_everything(damaged, state) == "harmless"
                reliability.add("corruption_harmless")
                outcomes["harmless (free slot)"] += 1
    print(f"\nbit flips: {dict(outcomes)} over {nslots - 2} slots")
    assert outcomes["detected"] >= 8 * len(img.pages)


def test_zeroed_page_is_detected(store_files):
    _files1, files, state, img = store_files
    for slot in sorted(img.slots - {0, 1}):
        expect_detected({**files, PAGES: replace_at(files[PAGES], slot * PS, bytes(PS))}, state, slot)


def test_misdirected_write_is_detected(store_files):
    """A page's bytes copied over another page's slot (including page-table
    pages over data pages whose id has the same low 32 bits)."""
    _files1, files, state, img = store_files
    data = files[PAGES]
    slots = sorted(img.slots - {0, 1})
    rng = random.Random(7)
    pairs = [(a, b) for a in slots for b in slots if a != b]
    for src, dst in rng.sample(pairs, min(150, len(pairs))) + [(min(img.pt_slots), img.pages[1][0])]:
        damaged = replace_at(data, dst * PS, data[src * PS : (src + 1) * PS])
        msg = expect_detected({**files, PAGES: damaged}, state, dst)
        assert "checksum" in msg or "misdirected" in msg or "page-table" in msg


def test_lost_write_an_older_valid_image_of_a_page_is_detected(store_files):
    """Put back, in a page's current slot, the valid image the page had at the
    previous flip: its crc and id are right, but the page table's crc is not."""
    files1, files2, state, img2 = store_files
    img1 = newest_image(files1[PAGES], PS, verify_pages=True)
    old_data = files1[PAGES]
    changed = [lid for lid, (s, c) in img2.pages.items() if lid in img1.pages and img1.pages[lid][1] != c]
    assert len(changed) > 5
    for lid in changed:
        old_slot = img1.pages[lid][0]
        new_slot = img2.pages[lid][0]
        stale = old_data[old_slot * PS : (old_slot + 1) * PS]
        msg = expect_detected({**files2, PAGES: replace_at(files2[PAGES], new_slot * PS, stale)}, state, new_slot)
        assert "lost write" in msg


def test_truncated_page_file_is_detected(store_files):
    _files1, files, state, img = store_files
    top = max(img.slots)
    for cut in (top * PS + 100, top * PS):  # mid-slot, and the whole last slot gone
        expect_detected({**files, PAGES: files[PAGES][:cut]}, state, top)


def test_both_metas_damaged_raise_corruption_error_on_open_and_change_nothing(store_files):
    _files1, files, state, img = store_files
    for damage in (lambda d: flip_bit(flip_bit(d, 8 * 10), (PS + 10) * 8), lambda d: replace_at(d, 0, bytes(2 * PS))):
        fs = fs_with({**files, PAGES: damage(files[PAGES])})
        before = fs.snapshot()
        with pytest.raises(CorruptionError, match="both meta pages are damaged"):
            open_image(fs)
        reliability.add("corruption_detected")
        if fs.snapshot() != before:
            reliability.add("refused_open_changed_files")
        assert fs.snapshot() == before


def test_metas_of_two_different_databases_raise_corruption_error(store_files):
    _files1, files, state, img = store_files
    slot = 1 - img.meta_slot  # the older meta, rewritten (valid crc) naming another database
    meta = Meta.decode(files[PAGES][slot * PS : slot * PS + 256], "older meta")
    meta.db_id = b"another-database"
    data = replace_at(files[PAGES], slot * PS, meta.encode())
    fs = fs_with({**files, PAGES: data})
    before = fs.snapshot()
    with pytest.raises(CorruptionError, match="different databases"):
        open_image(fs)
    reliability.add("corruption_detected")
    if fs.snapshot() != before:
        reliability.add("refused_open_changed_files")
    assert fs.snapshot() == before
