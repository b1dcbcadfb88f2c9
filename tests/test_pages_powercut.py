"""Power cuts against the page file: a flip is the only moment the durable
image changes, and it changes whole (pages.pagefile P2, P3, P4).

For every I/O point of a seeded workload of changes, steals and flips on a
FaultFS (``crash_after(k)``), and for a sample of the crash plans at that
point (every plan kind over the run), the page file is reopened *without*
redo and must hold exactly the image of the last completed flip -- or, for a
cut inside a flip, that flip's new image -- with every page valid and every
structure check clean.  That holds too for the fuzzy checkpoint's three-phase
flip with changes and steals while it is in flight (P2, P4).  A damaged newest meta falls back to the previous
generation; a damaged older meta is harmless (both damaged:
test_pages_corruption.py).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pagehelpers import (
    PAGES,
    Workload,
    check_store,
    contents,
    flip_bit,
    fs_with,
    new_fs,
    new_store,
    open_image,
    replace_at,
    state_of,
)

from kvstore import reliability

CACHE_PAGES = 8


def run_until_cut(seed: int, page_size: int, work_args: dict, cut_after: int | None):
    """Run the workload on a fresh store, cutting the power ``cut_after`` I/O
    points after the store was created.  Returns (fs, last completed flip's
    state, state of the flip in progress or None, I/O points used)."""
    fs = new_fs(seed)
    fs, wal, store = new_store(fs, page_size=page_size, cache_pages=CACHE_PAGES)
    completed = [({}, [])]  # the image PageStore.create flipped
    in_progress: list = [None]

    def before(state):
        in_progress[0] = state

    def after(state):
        completed.append(state)
        in_progress[0] = None

    start = fs.io_points
    fs.crash_after(cut_after)
    try:
        Workload(seed=seed, **work_args).run(store, wal, before, after)
    except BaseException:  # PowerCut, or an error the engine made of it (a poisoned log)
        if not fs.dead:
            raise
    else:
        assert cut_after is None or fs.io_points - start <= cut_after
    return fs, completed[-1], in_progress[0], fs.io_points - start


def sample_plans(fs, rng: random.Random, per_kind: int):
    """Up to ``per_kind`` plans of each kind that applies at this point."""
    by_kind: dict[str, list] = {}
    for plan in fs.plans():
        by_kind.setdefault(type(plan).__name__, []).append(plan)
    chosen = []
    for plans in by_kind.values():
        chosen.extend(rng.sample(plans, min(per_kind, len(plans))))
    return chosen


def check_crash_states(seed: int, page_size: int, work_args: dict, per_kind: int) -> Counter:
    """The loop of the module docstring; returns counts of what it checked."""
    _fs, last, _, total = run_until_cut(seed, page_size, work_args, None)
    stats: Counter = Counter()
    rng = random.Random(seed)
    for k in range(total + 1):
        fs, completed, in_progress, _ = run_until_cut(seed, page_size, work_args, k)
        allowed = [completed] if in_progress is None else [completed, in_progress]
        for plan in sample_plans(fs, rng, per_kind):
            after = fs.crash(plan)
            store = open_image(after, cache_pages=CACHE_PAGES, page_size=page_size)
            got = state_of(store)
            assert got in allowed, f"cut at I/O point {k}, plan {plan!r}: the page file is neither the old nor the new image"
            check_store(store)
            stats["states"] += 1
            stats[type(plan).__name__] += 1
            if in_progress is not None:
                stats["in flip: new image" if got == in_progress and got != completed else "in flip: old image"] += 1
        stats["points"] += 1
    assert last is not None
    return stats


#: (seed, page size, workload): 1024-byte pages span two sectors, so Torn
#: plans tear pages too; 512-byte pages give deeper trees and more steals;
#: ``fuzzy`` flips through the page file's three phases with changes in flight.
CRASH_RUNS = [
    (1, 1024, dict(steps=300, flip_every=60)),
    (4, 512, dict(steps=240, flip_every=60, grow=0.25)),
    (5, 512, dict(steps=200, flip_every=50, grow=0.2, fuzzy=4)),  # changes and steals while each flip is in flight
]


@pytest.mark.parametrize("seed, page_size, work_args", CRASH_RUNS)
def test_power_cut_at_every_io_point_leaves_exactly_the_last_flipped_image(seed, page_size, work_args):
    """P2-P4 under power cuts: every I/O point, a sample of every kind of plan."""
    stats = check_crash_states(seed, page_size, work_args, per_kind=2)
    reliability.add("crash_points", stats["points"])
    reliability.add("crash_states", stats["states"])
    print(
        f"\npage-file power cuts (seed {seed}, {page_size}-byte pages): {stats['points']} I/O points, "
        f"{stats['states']} crash states checked; {dict(stats)}"
    )
    for kind in ("DropAll", "KeepAll", "Prefix", "OmitOne", "Subset", "Torn", "GrownNotWritten"):
        assert stats[kind] > 0, f"no {kind} plan was checked"
    assert stats["in flip: new image"] > 0 and stats["in flip: old image"] > 0
    assert stats["states"] > 1000


@pytest.mark.parametrize("seed, page_size, work_args", CRASH_RUNS)
def test_workload_of_the_power_cut_test_splits_merges_steals_and_shrinks(seed, page_size, work_args):
    """The crash loop is not vacuous: its workload flips several times, steals
    pages, frees undo pages, uses overflow chains, merges and truncates."""
    fs = new_fs(seed)
    fs, wal, store = new_store(fs, page_size=page_size, cache_pages=CACHE_PAGES)
    work = Workload(seed=seed, **work_args)
    work.run(store, wal)
    assert work.flips >= 4 and store.pool.steals > 50
    assert fs.counts["truncate"] > 0
    counts = check_store(store)
    assert counts["depth"] >= 2 and counts["overflow_pages"] > 0 and counts["undo_pages"] >= 1
    if page_size == 512:
        assert counts["depth"] >= 3


# --- damaged meta pages: fall back to the other --------------------------------------------


def generations(flips: int):
    """A store flipped ``flips`` times after create, inserts only (so the
    older images' slots are all still intact): (files, [state at each flip],
    newest generation, newest meta slot)."""
    fs, wal, store = new_store(page_size=512, cache_pages=8)
    states = []
    for g in range(flips):
        for i in range(120):
            store.tree.put(b"g%d-%04d" % (g, i), bytes([g]) * (i % 200))
        store.flip(wal.end_lsn)
        states.append(contents(store))
    return fs.snapshot(), states, store.pagefile.meta.generation, store.pagefile._meta_slot


@pytest.mark.parametrize("damage", ["bit", "zero-sector", "garbage", "torn-half"])
@pytest.mark.parametrize("flips", [2, 3])
def test_damaged_newest_meta_falls_back_to_the_previous_generation(damage, flips):
    files, states, gen, slot = generations(flips)
    assert slot == (0 if flips == 3 else 1)  # both meta slots get their turn
    data = files[PAGES]
    off = slot * 512
    if damage == "bit":
        data = flip_bit(data, (off + 20) * 8 + 3)  # in the generation number
    elif damage == "zero-sector":
        data = replace_at(data, off, bytes(512))
    elif damage == "garbage":
        data = replace_at(data, off, random.Random(1).randbytes(512))
    else:  # a torn meta: from the generation on it still holds the older meta's bytes
        other = (1 - slot) * 512
        assert data[off + 16 : off + 72] != data[other + 16 : other + 72]
        data = replace_at(data, off + 16, data[other + 16 : other + 72])
    fs = fs_with({**files, PAGES: data})
    store = open_image(fs)
    assert store.pagefile.meta.generation == gen - 1
    assert contents(store) == states[-2]
    check_store(store)


def test_damaged_older_meta_is_harmless():
    files, states, gen, slot = generations(2)
    data = flip_bit(files[PAGES], (1 - slot) * 512 * 8 + 100)
    store = open_image(fs_with({**files, PAGES: data}))
    assert store.pagefile.meta.generation == gen
    assert contents(store) == states[-1]
    check_store(store)
