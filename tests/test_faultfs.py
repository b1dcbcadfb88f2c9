"""Tests of pages.faultfs: the fault-injecting file system the crash tests trust.

If FaultFS lies (keeps bytes a real power cut would lose, or loses bytes a real
one would keep) every crash test above it proves nothing, so each promise of
the module docstring (F1-F3, E1-E5, the plan kinds) is checked here on real
byte contents.
"""

from __future__ import annotations

import doctest
import errno
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pages.faultfs as faultfs
from pages.faultfs import (
    SECTOR,
    DropAll,
    Event,
    FaultFS,
    GrownNotWritten,
    KeepAll,
    OmitOne,
    PowerCut,
    Prefix,
    Subset,
    Torn,
    all_subsets,
)

OLD = b"o" * (3 * SECTOR)
NEW = b"n" * (3 * SECTOR)


def make_fs(seed: int = 0) -> FaultFS:
    return FaultFS(seed=seed, dirs=["/db"])


def durable_file(fs: FaultFS, path: str, data: bytes):
    """Create ``path`` holding ``data``, name and bytes durable; return it open."""
    f = fs.create(path)
    if data:
        f.pwrite(0, data)
    f.fsync()
    return f


def test_module_doctests_run():
    result = doctest.testmod(faultfs)
    assert result.attempted > 0 and result.failed == 0


# -- the two images (F1-F3) ---------------------------------------------------


def test_write_is_visible_at_once_but_not_durable():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    f.pwrite(0, b"abc")
    assert f.pread(0, 10) == b"abc" and f.size() == 3
    assert fs.visible_bytes("/db/a") == b"abc"
    assert fs.durable_bytes("/db/a") == b""


def test_unsynced_write_is_lost_on_drop_all():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"first")
    f.pwrite(0, b"FIRST and more")
    after = fs.crash(DropAll())
    assert after.visible_bytes("/db/a") == b"first"
    assert after.pending() == []


def test_fsynced_write_survives_drop_all():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    f.pwrite(0, b"kept")
    f.fsync()
    assert fs.crash(DropAll()).open("/db/a").pread(0, 100) == b"kept"


def test_keep_all_preserves_the_visible_image():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"x" * 10)
    f.pwrite(5, b"yyyyyyy")
    fs.skip_dir_fsync = True
    fs.create("/db/b").pwrite(0, b"b")
    fs.mkdir("/db/sub")
    after = fs.crash(KeepAll())
    assert after.snapshot() == {"/db/a": b"xxxxxyyyyyyy", "/db/b": b"b"}
    assert after.is_dir("/db/sub")
    assert after.durable_snapshot() == after.snapshot()


def test_created_file_without_dir_fsync_vanishes():
    fs = make_fs()
    fs.skip_dir_fsync = True  # the canary switch: create no longer fsyncs /db
    f = fs.create("/db/new")
    f.pwrite(0, b"data")
    f.fsync()  # F3: the data is durable, the name is not
    assert fs.durable_bytes("/db/new") is None
    assert not fs.crash(DropAll()).exists("/db/new")


def test_create_through_the_seam_makes_the_name_durable():
    fs = make_fs()
    fs.create("/db/new")
    assert fs.durable_bytes("/db/new") == b""
    assert fs.crash(DropAll()).listdir("/db") == ["new"]


def test_fsync_dir_makes_only_that_directorys_names_durable():
    fs = FaultFS(dirs=["/a", "/b"])
    fs.skip_dir_fsync = True
    fs.create("/a/x")
    fs.create("/b/y")
    fs.fsync_dir("/a")
    assert fs.durable_bytes("/a/x") == b""
    assert fs.durable_bytes("/b/y") is None
    assert fs.pending() == ["0: create /b/y"]


def test_file_in_directory_whose_name_is_not_durable_vanishes():
    fs = make_fs()
    fs.skip_dir_fsync = True
    fs.mkdir("/db/sub")
    durable_file(fs, "/db/sub/f", b"data")
    fs.fsync_dir("/db/sub")  # the entry in sub is durable, sub itself is not
    after = fs.crash(DropAll())
    assert not after.exists("/db/sub")
    fs2 = make_fs()
    fs2.mkdir("/db/sub")  # through the seam: /db is fsynced
    durable_file(fs2, "/db/sub/f", b"data")
    assert fs2.crash(DropAll()).snapshot() == {"/db/sub/f": b"data"}


def test_fsync_of_one_file_leaves_other_files_pending():
    fs = make_fs()
    a = durable_file(fs, "/db/a", b"")
    b = durable_file(fs, "/db/b", b"")
    a.pwrite(0, b"A")
    b.pwrite(0, b"B")
    a.fsync()
    assert fs.pending() == ["0: write /db/b [0, 1) grows 0->1"]
    assert fs.crash(DropAll()).snapshot() == {"/db/a": b"A", "/db/b": b""}


def test_truncate_is_pending_until_fsync():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"0123456789")
    f.truncate(4)
    assert f.size() == 4 and fs.durable_bytes("/db/a") == b"0123456789"
    f.truncate(6)  # extending truncate reads as zeros
    assert f.pread(0, 10) == b"0123\0\0"
    assert fs.crash(DropAll()).visible_bytes("/db/a") == b"0123456789"
    fs2 = make_fs()
    g = durable_file(fs2, "/db/a", b"0123456789")
    g.truncate(4)
    g.fsync()
    assert fs2.crash(DropAll()).visible_bytes("/db/a") == b"0123"


def test_rename_is_durable_only_after_destination_dir_fsync():
    fs = make_fs()
    durable_file(fs, "/db/tmp", b"new")
    durable_file(fs, "/db/cur", b"old")
    fs.skip_dir_fsync = True
    fs.rename("/db/tmp", "/db/cur")
    assert fs.visible_bytes("/db/cur") == b"new" and not fs.exists("/db/tmp")
    assert fs.crash(DropAll()).snapshot() == {"/db/cur": b"old", "/db/tmp": b"new"}
    assert fs.crash(KeepAll()).snapshot() == {"/db/cur": b"new"}
    fs2 = make_fs()
    durable_file(fs2, "/db/tmp", b"new")
    durable_file(fs2, "/db/cur", b"old")
    fs2.rename("/db/tmp", "/db/cur")  # the seam fsyncs /db
    assert fs2.pending() == []
    assert fs2.crash(DropAll()).snapshot() == {"/db/cur": b"new"}


def test_cross_directory_rename_becomes_durable_with_the_destination_fsync():
    fs = FaultFS(dirs=["/a", "/b"])
    durable_file(fs, "/a/f", b"f")
    fs.skip_dir_fsync = True
    fs.rename("/a/f", "/b/f")
    fs.fsync_dir("/a")  # the source alone is not enough (F2)
    assert fs.durable_snapshot() == {"/a/f": b"f"}
    fs.fsync_dir("/b")
    assert fs.durable_snapshot() == {"/b/f": b"f"}
    assert fs.crash(DropAll()).snapshot() == {"/b/f": b"f"}


def test_remove_without_dir_fsync_comes_back_after_power_cut():
    fs = make_fs()
    durable_file(fs, "/db/a", b"a")
    fs.skip_dir_fsync = True
    fs.remove("/db/a")
    assert not fs.exists("/db/a")
    assert fs.crash(DropAll()).snapshot() == {"/db/a": b"a"}
    fs2 = make_fs()
    durable_file(fs2, "/db/a", b"a")
    fs2.remove("/db/a")
    assert fs2.crash(DropAll()).snapshot() == {}


def test_removed_file_stays_usable_through_an_open_handle():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"a")
    fs.remove("/db/a")
    f.pwrite(1, b"b")
    f.fsync()
    assert f.pread(0, 2) == b"ab"
    assert fs.crash(KeepAll()).snapshot() == {}


def test_snapshots_list_every_file_of_each_image():
    fs = make_fs()
    durable_file(fs, "/db/a", b"a")
    fs.mkdir("/db/sub")
    fs.create("/db/sub/b").pwrite(0, b"b")
    assert fs.snapshot() == {"/db/a": b"a", "/db/sub/b": b"b"}
    assert fs.durable_snapshot() == {"/db/a": b"a", "/db/sub/b": b""}
    assert fs.crash(DropAll()).snapshot() == fs.durable_snapshot()


# -- crash plans --------------------------------------------------------------


def three_pending_writes():
    """/db/a durable empty; pending: write A, write B, write C at 0, 1, 2."""
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    for i, c in enumerate(b"ABC"):
        f.pwrite(i, bytes([c]))
    return fs


def test_pending_lists_ops_in_order_with_numbers():
    fs = three_pending_writes()
    assert fs.pending() == [
        "0: write /db/a [0, 1) grows 0->1",
        "1: write /db/a [1, 2) grows 1->2",
        "2: write /db/a [2, 3) grows 2->3",
    ]


@pytest.mark.parametrize("k, expected", [(0, b""), (1, b"A"), (2, b"AB"), (3, b"ABC")])
def test_prefix_keeps_exactly_the_first_k_ops(k, expected):
    assert three_pending_writes().crash(Prefix(k)).visible_bytes("/db/a") == expected


@pytest.mark.parametrize("i, expected", [(0, b"\0BC"), (1, b"A\0C"), (2, b"AB")])
def test_omit_one_drops_only_that_op(i, expected):
    assert three_pending_writes().crash(OmitOne(i)).visible_bytes("/db/a") == expected


@pytest.mark.parametrize("indices, expected", [((), b""), ((2,), b"\0\0C"), ((0, 2), b"A\0C"), ((0, 1, 2), b"ABC")])
def test_subset_keeps_exactly_the_chosen_ops(indices, expected):
    assert three_pending_writes().crash(Subset(indices)).visible_bytes("/db/a") == expected


def test_subset_of_name_ops_keeps_a_rename_without_its_create():
    fs = make_fs()
    fs.skip_dir_fsync = True
    f = fs.create("/db/tmp")  # op 0
    f.pwrite(0, b"x")  # op 1
    fs.rename("/db/tmp", "/db/final")  # op 2
    assert fs.crash(Subset([2])).snapshot() == {"/db/final": b""}
    assert fs.crash(Subset([0])).snapshot() == {"/db/tmp": b""}
    assert fs.crash(Subset([0, 1])).snapshot() == {"/db/tmp": b"x"}


def test_replayed_remove_or_rename_only_unlinks_the_inode_it_named():
    fs = make_fs()
    durable_file(fs, "/db/a", b"first").close()
    durable_file(fs, "/db/b", b"oldb").close()
    fs.skip_dir_fsync = True
    fs.remove("/db/a")  # op 0
    fs.create("/db/a").pwrite(0, b"second")  # ops 1, 2
    fs.remove("/db/a")  # op 3 names the second /db/a, not the durable first one
    fs.remove("/db/b")  # op 4
    fs.create("/db/b")  # op 5
    fs.rename("/db/b", "/db/a")  # op 6 moves the second /db/b, not the durable one
    assert fs.crash(Subset([3])).snapshot() == {"/db/a": b"first", "/db/b": b"oldb"}
    assert fs.crash(Subset([6])).snapshot() == {"/db/a": b"", "/db/b": b"oldb"}
    assert fs.crash(Subset([4, 6])).snapshot() == {"/db/a": b""}
    assert fs.crash(KeepAll()).snapshot() == {"/db/a": b""}


@pytest.mark.parametrize("n", range(11))
def test_all_subsets_enumerates_two_to_the_n_distinct_subsets(n):
    subsets = all_subsets(n)
    assert len(subsets) == 2**n
    assert len({s.indices for s in subsets}) == 2**n


def test_all_subsets_of_more_than_ten_is_a_seeded_sample():
    sample = all_subsets(12, seed=3)
    assert len(sample) == 64 and len({s.indices for s in sample}) == 64
    assert sample == all_subsets(12, seed=3)
    assert sample != all_subsets(12, seed=4)
    assert all(all(0 <= i < 12 for i in s.indices) for s in sample)


def torn_fs():
    """/db/a durable = OLD (3 sectors); pending op 0 = NEW over all of it;
    pending op 1 = a write to /db/b (dropped by every Torn(0, ...))."""
    fs = make_fs()
    f = durable_file(fs, "/db/a", OLD)
    g = durable_file(fs, "/db/b", b"")
    f.pwrite(0, NEW)
    g.pwrite(0, b"later")
    return fs


def test_torn_write_with_old_fill_keeps_the_first_sectors_new_and_the_rest_old():
    after = torn_fs().crash(Torn(0, 1, "old"))
    assert after.visible_bytes("/db/a") == b"n" * 512 + b"o" * 1024
    assert after.visible_bytes("/db/b") == b""  # ops after i are dropped


def test_torn_write_with_zero_fill_zeroes_the_unkept_sectors():
    after = torn_fs().crash(Torn(0, 1, "zero"))
    assert after.visible_bytes("/db/a") == b"n" * 512 + bytes(1024)


def test_torn_write_with_garbage_fill_is_neither_old_nor_new_and_seeded():
    data = torn_fs().crash(Torn(0, 2, "garbage")).visible_bytes("/db/a")
    assert data[:1024] == b"n" * 1024 and len(data) == 1536
    tail = data[1024:]
    assert tail != b"o" * 512 and tail != b"n" * 512 and tail != bytes(512)
    assert torn_fs().crash(Torn(0, 2, "garbage")).visible_bytes("/db/a") == data
    other = FaultFS(seed=1, dirs=["/db"])
    f = durable_file(other, "/db/a", OLD)
    f.pwrite(0, NEW)
    assert other.crash(Torn(0, 2, "garbage")).visible_bytes("/db/a") != data


def test_torn_write_keeping_every_sector_is_the_whole_write():
    assert torn_fs().crash(Torn(0, 3, "zero")).visible_bytes("/db/a") == NEW


def test_torn_unaligned_write_tears_whole_sectors():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"o" * 2048)
    f.pwrite(100, b"n" * 600)  # sectors 0 and 1
    assert fs.pending_ops()[0].sectors == 2
    expect_old = b"o" * 100 + b"n" * 412 + b"o" * 1536
    assert fs.crash(Torn(0, 1, "old")).visible_bytes("/db/a") == expect_old
    expect_zero = b"o" * 100 + b"n" * 412 + bytes(512) + b"o" * 1024
    assert fs.crash(Torn(0, 1, "zero")).visible_bytes("/db/a") == expect_zero
    assert fs.crash(Torn(0, 0, "old")).visible_bytes("/db/a") == b"o" * 2048


def test_torn_extending_write_with_old_fill_grows_only_as_far_as_kept_sectors():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    f.pwrite(0, NEW)
    assert fs.crash(Torn(0, 1, "old")).visible_bytes("/db/a") == b"n" * 512
    assert fs.crash(Torn(0, 0, "old")).visible_bytes("/db/a") == b""
    assert fs.crash(Torn(0, 1, "zero")).visible_bytes("/db/a") == b"n" * 512 + bytes(1024)


def test_torn_write_past_end_of_file_with_old_fill_leaves_no_hole_when_nothing_kept():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    f.pwrite(1000, b"n" * 600)  # sectors 1, 2 and 3 of the file
    assert fs.pending_ops()[0].sectors == 3
    assert fs.crash(Torn(0, 0, "old")).visible_bytes("/db/a") == b""
    assert fs.crash(Torn(0, 1, "old")).visible_bytes("/db/a") == bytes(1000) + b"n" * 24


def grown_fs():
    """/db/a durable = 100 x "o"; pending op 0 writes 200 x "n" at 50."""
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"o" * 100)
    f.pwrite(50, b"n" * 200)
    return fs


def test_grown_not_written_with_zero_fill_keeps_size_but_zeroes_the_extension():
    data = grown_fs().crash(GrownNotWritten(0, "zero")).visible_bytes("/db/a")
    assert data == b"o" * 50 + b"n" * 50 + bytes(150)


def test_grown_not_written_with_garbage_fill_is_seeded_garbage():
    data = grown_fs().crash(GrownNotWritten(0, "garbage")).visible_bytes("/db/a")
    assert len(data) == 250 and data[:100] == b"o" * 50 + b"n" * 50
    assert data[100:] not in (bytes(150), b"n" * 150)
    assert grown_fs().crash(GrownNotWritten(0, "garbage")).visible_bytes("/db/a") == data


def test_grown_not_written_drops_later_ops():
    fs = grown_fs()
    fs.open("/db/a").pwrite(0, b"X")
    assert fs.crash(GrownNotWritten(0)).visible_bytes("/db/a")[:1] == b"o"


@pytest.mark.parametrize("plan", [Torn(1, 1), GrownNotWritten(1), Torn(5, 1), Prefix(4), OmitOne(-1), Subset([9])])
def test_plans_naming_a_wrong_op_raise_value_error(plan):
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    f.pwrite(0, b"x" * 1024)
    f.truncate(10)  # op 1 is not a write
    with pytest.raises(ValueError):
        fs.crash(plan)


def test_plan_with_unknown_fill_is_refused():
    with pytest.raises(ValueError):
        Torn(0, 1, "ones")
    with pytest.raises(ValueError):
        GrownNotWritten(0, "old")


def plans_fs():
    """Pending: 0 write of 3 sectors growing /db/a, 1 truncate, 2 write inside."""
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    f.pwrite(0, NEW)
    f.truncate(1000)
    f.pwrite(10, b"x")
    return fs


def test_plans_cover_every_kind_for_the_pending_list():
    fs = plans_fs()
    plans = fs.plans()
    by_kind: dict[str, list] = {}
    for p in plans:
        by_kind.setdefault(type(p).__name__, []).append(p)
    assert by_kind["DropAll"] == [DropAll()] and by_kind["KeepAll"] == [KeepAll()]
    assert by_kind["Prefix"] == [Prefix(1), Prefix(2)]
    assert by_kind["OmitOne"] == [OmitOne(0), OmitOne(1), OmitOne(2)]
    assert set(by_kind["Torn"]) == {Torn(0, k, fill) for k in (1, 2) for fill in ("old", "zero", "garbage")}
    assert by_kind["GrownNotWritten"] == [GrownNotWritten(0, "zero"), GrownNotWritten(0, "garbage")]
    assert len(by_kind["Subset"]) == 8
    assert plans == fs.plans()  # deterministic
    for p in plans:  # and every one of them can be applied
        assert fs.crash(p).exists("/db/a")


def test_plans_filter_by_kind_and_limit_round_robin():
    fs = plans_fs()
    assert fs.plans(kinds=["Torn"]) == fs.plans(kinds=[Torn])
    assert {type(p) for p in fs.plans(kinds=[Prefix, "OmitOne"])} == {Prefix, OmitOne}
    limited = fs.plans(limit=7)
    assert len(limited) == 7 and len({type(p) for p in limited}) == 7
    with pytest.raises(ValueError):
        fs.plans(kinds=["Nonsense"])


def test_plan_repr_is_readable():
    assert repr(Torn(3, 1, "zero")) == "Torn(i=3, sectors_kept=1, fill='zero')"
    assert repr(Subset([2, 0, 2])) == "Subset(indices=(0, 2))"


# -- power cuts and dead file systems -----------------------------------------


def replace_workload(fs: FaultFS, fsync_before_rename: bool = True) -> None:
    """The atomic-replace pattern: write a temp file, fsync it, rename it over."""
    f = fs.create("/db/tmp")
    f.pwrite(0, b"new contents" * 100)
    if fsync_before_rename:
        f.fsync()
    f.close()
    fs.rename("/db/tmp", "/db/data")


def replace_fs() -> FaultFS:
    fs = make_fs()
    durable_file(fs, "/db/data", b"old contents").close()
    fs.counts.clear()
    return fs


def test_io_points_count_mutating_calls_only():
    fs = replace_fs()
    before = fs.io_points
    replace_workload(fs)
    # create + its dir fsync, write, fsync, rename + its dir fsync (reads do not count)
    assert fs.io_points - before == 6


def test_crash_after_every_point_of_a_workload_leaves_old_or_new_never_a_mix():
    fs = replace_fs()
    start = fs.io_points
    replace_workload(fs)
    total = fs.io_points - start
    states = 0
    for k in range(total + 1):
        fs = replace_fs()
        fs.crash_after(k)
        if k < total:
            with pytest.raises(PowerCut):
                replace_workload(fs)
            assert fs.io_points == start + k and fs.dead
        else:
            replace_workload(fs)
            assert not fs.dead
        for plan in fs.plans():
            data = fs.crash(plan).visible_bytes("/db/data")
            assert data in (b"old contents", b"new contents" * 100), (k, plan, fs.pending())
            states += 1
    assert states > total
    assert fs.crash(DropAll()).visible_bytes("/db/data") == b"new contents" * 100


def test_rename_without_fsync_is_caught_by_some_plan():
    fs = replace_fs()
    replace_workload(fs, fsync_before_rename=False)
    bad = [p for p in fs.plans() if fs.crash(p).visible_bytes("/db/data") not in
           (b"old contents", b"new contents" * 100)]
    assert DropAll() in bad  # the renamed file exists, its data never reached the disk


def test_crash_after_zero_cuts_before_the_next_io_point():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    fs.crash_after(0)
    assert f.pread(0, 1) == b""  # reads are not I/O points
    with pytest.raises(PowerCut):
        f.pwrite(0, b"x")
    assert fs.visible_bytes("/db/a") == b""  # the cut op did not happen


def test_power_cut_hits_every_thread():
    fs = make_fs()
    files = [durable_file(fs, f"/db/t{i}", b"") for i in range(3)]
    fs.crash_after(50)
    outcomes: list[str] = []

    def writer(f):
        try:
            for i in range(10_000):
                f.pwrite(i, b"x")
            outcomes.append("finished")
        except PowerCut:
            outcomes.append("cut")

    threads = [threading.Thread(target=writer, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert outcomes == ["cut"] * 3
    with pytest.raises(PowerCut):
        fs.exists("/db")
    assert sum(len(v) for v in fs.snapshot().values()) == 50


def test_power_cut_is_not_an_exception():
    assert issubclass(PowerCut, BaseException) and not issubclass(PowerCut, Exception)


def test_dead_file_system_raises_power_cut_on_every_call():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"abc")
    fs.crash(KeepAll())
    calls = [
        lambda: fs.open("/db/a"), lambda: fs.create("/db/b"), lambda: fs.exists("/db/a"),
        lambda: fs.is_dir("/db"), lambda: fs.listdir("/db"), lambda: fs.mkdir("/db/d"),
        lambda: fs.rename("/db/a", "/db/c"), lambda: fs.remove("/db/a"),
        lambda: fs.fsync_dir("/db"), lambda: fs.lock("/db/LOCK"),
        lambda: f.pread(0, 1), lambda: f.pwrite(0, b"x"), lambda: f.size(),
        lambda: f.fsync(), lambda: f.truncate(0), lambda: f.close(),
    ]
    for call in calls:
        with pytest.raises(PowerCut):
            call()


def test_dead_file_system_can_still_be_inspected_and_crashed_again():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"abc")
    f.pwrite(0, b"X")
    fs.crash(DropAll())
    assert fs.dead and fs.pending() == ["0: write /db/a [0, 1)"]
    assert fs.crash(KeepAll()).visible_bytes("/db/a") == b"Xbc"
    assert fs.crash(DropAll()).visible_bytes("/db/a") == b"abc"


def test_crashed_file_system_is_fresh_and_fully_usable():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"abc")
    fs.fail("write", every=True)
    fs.lock("/db/LOCK")
    after = fs.crash(KeepAll())
    assert after.pending() == [] and after.io_points == 0 and not after.counts
    g = after.open("/db/a")
    g.pwrite(3, b"d")  # no fault carried over
    g.fsync()
    after.lock("/db/LOCK").release()  # the old process's lock died with it
    assert after.durable_bytes("/db/a") == b"abcd"
    del f


# -- errors (E1-E5) -------------------------------------------------------------


def test_nth_write_fails_with_eio_and_changes_nothing():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    fault = fs.fail("write", nth=2)
    f.pwrite(0, b"one")
    with pytest.raises(OSError) as e:
        f.pwrite(3, b"two")
    assert e.value.errno == errno.EIO and fault.fired == 1
    assert f.pread(0, 10) == b"one" and len(fs.pending()) == 1
    f.pwrite(3, b"two")  # the third succeeds: only the nth fails
    assert f.pread(0, 10) == b"onetwo"


def test_every_fsync_fails_with_enospc_until_cleared():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    fault = fs.fail("fsync", every=True, errno_=errno.ENOSPC)
    for _ in range(3):
        with pytest.raises(OSError) as e:
            f.fsync()
        assert e.value.errno == errno.ENOSPC
    assert fault.fired == 3
    fs.clear_faults()
    f.fsync()


def test_persistent_fault_fails_the_nth_call_and_every_one_after():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    fault = fs.fail("any", nth=3, every=True, errno_=errno.ENOSPC)
    f.pwrite(0, b"1")  # call 1
    f.pread(0, 1)  # call 2
    for call in (lambda: f.pwrite(1, b"2"), f.fsync, lambda: fs.open("/db/a")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOSPC
    assert fault.fired == 3 and fs.visible_bytes("/db/a") == b"1"


@pytest.mark.parametrize("op, call", [
    ("create", lambda fs: fs.create("/db/new")),
    ("open", lambda fs: fs.open("/db/a")),
    ("read", lambda fs: fs.open("/db/a").pread(0, 1)),
    ("truncate", lambda fs: fs.open("/db/a").truncate(0)),
    ("rename", lambda fs: fs.rename("/db/a", "/db/b")),
    ("remove", lambda fs: fs.remove("/db/a")),
    ("mkdir", lambda fs: fs.mkdir("/db/d")),
    ("fsync_dir", lambda fs: fs.fsync_dir("/db")),
    ("any", lambda fs: fs.open("/db/a")),
])
def test_each_kind_of_call_can_be_failed_and_changes_nothing(op, call):
    fs = make_fs()
    durable_file(fs, "/db/a", b"abc").close()
    before, pending = fs.snapshot(), fs.pending()
    fs.fail(op)
    with pytest.raises(OSError) as e:
        call(fs)
    assert e.value.errno == errno.EIO
    assert fs.snapshot() == before and fs.pending() == pending
    assert not fs.exists("/db/new") and not fs.exists("/db/d")


def test_fault_restricted_by_path_hits_only_that_path():
    fs = make_fs()
    wal = durable_file(fs, "/db/wal", b"")
    pages = durable_file(fs, "/db/pages", b"")
    fs.fail("write", every=True, path_contains="wal")
    pages.pwrite(0, b"ok")
    with pytest.raises(OSError):
        wal.pwrite(0, b"no")


def test_fsync_error_drops_pending_data_for_good_and_next_fsync_succeeds():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"old")
    f.pwrite(0, b"NEW")
    fs.fail("fsync", nth=1)
    with pytest.raises(OSError):
        f.fsync()
    assert f.pread(0, 3) == b"NEW"  # reads still see it ...
    assert fs.pending() == []  # ... but it left the durable path
    f.fsync()  # and the next fsync reports success,
    assert fs.durable_bytes("/db/a") == b"old"  # though the data is not durable
    for plan in (DropAll(), KeepAll()):
        assert fs.crash(plan).exists("/db/a")
    assert fs.crash(DropAll()).visible_bytes("/db/a") == b"old"


def test_fsync_error_leaves_other_files_pending_data_alone():
    fs = make_fs()
    a = durable_file(fs, "/db/a", b"")
    b = durable_file(fs, "/db/b", b"")
    a.pwrite(0, b"a")
    b.pwrite(0, b"b")
    fs.fail("fsync", path_contains="/db/a")
    with pytest.raises(OSError):
        a.fsync()
    b.fsync()
    assert fs.durable_snapshot() == {"/db/a": b"", "/db/b": b"b"}


def test_fsync_dir_error_leaves_name_ops_pending():
    fs = make_fs()
    fs.fail("fsync_dir")
    with pytest.raises(OSError):
        fs.create("/db/a")  # the seam's dir fsync fails, the create happened
    assert fs.exists("/db/a") and fs.pending() == ["0: create /db/a"]
    fs.fsync_dir("/db")
    assert fs.durable_bytes("/db/a") == b""


def test_short_write_is_continued_by_base_pwrite():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    fs.counts.clear()
    sw = fs.short_write(1, 3)
    f.pwrite(0, b"abcdefgh")
    assert f.pread(0, 100) == b"abcdefgh"
    assert fs.counts["write"] == 2 and sw.fired == 1
    assert fs.pending() == ["0: write /db/a [0, 3) grows 0->3", "1: write /db/a [3, 8) grows 3->8"]
    assert fs.crash(Prefix(1)).visible_bytes("/db/a") == b"abc"


def test_short_write_of_zero_bytes_makes_pwrite_raise_eio():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")
    fs.short_write(1, 0)
    with pytest.raises(OSError) as e:
        f.pwrite(0, b"abc")
    assert e.value.errno == errno.EIO and f.size() == 0


def test_fail_rejects_unknown_op():
    with pytest.raises(ValueError):
        make_fs().fail("frobnicate")


@pytest.mark.parametrize("call, error", [
    (lambda fs: fs.open("/db/missing"), FileNotFoundError),
    (lambda fs: fs.open("/nodir/x"), FileNotFoundError),
    (lambda fs: fs.create("/db/a"), FileExistsError),
    (lambda fs: fs.create("/nodir/x"), FileNotFoundError),
    (lambda fs: fs.create("/db/a/x"), NotADirectoryError),
    (lambda fs: fs.open("/db"), IsADirectoryError),
    (lambda fs: fs.remove("/db/missing"), FileNotFoundError),
    (lambda fs: fs.remove("/db"), IsADirectoryError),
    (lambda fs: fs.rename("/db/missing", "/db/b"), FileNotFoundError),
    (lambda fs: fs.rename("/db/a", "/db/sub"), IsADirectoryError),
    (lambda fs: fs.rename("/db", "/db/sub/x"), OSError),  # EINVAL: into itself
    (lambda fs: fs.mkdir("/db"), FileExistsError),
    (lambda fs: fs.mkdir("/x/y"), FileNotFoundError),
    (lambda fs: fs.listdir("/db/missing"), FileNotFoundError),
    (lambda fs: fs.listdir("/db/a"), NotADirectoryError),
    (lambda fs: fs.fsync_dir("/db/missing"), FileNotFoundError),
])
def test_bad_paths_raise_like_os(call, error):
    fs = make_fs()
    durable_file(fs, "/db/a", b"a").close()
    fs.mkdir("/db/sub")
    with pytest.raises(error):
        call(fs)


def test_exists_is_dir_and_listdir_see_the_visible_image():
    fs = make_fs()
    durable_file(fs, "/db/b", b"")
    fs.mkdir("/db/a")
    assert fs.listdir("/db") == ["a", "b"] and fs.listdir("/") == ["db"]
    assert fs.exists("/db/a") and fs.is_dir("/db/a") and not fs.is_dir("/db/b")
    assert not fs.exists("/db/b/x") and not fs.exists("/nope")
    assert fs.exists("/db/./a/../b")  # paths are normalised


def test_closed_file_raises_ebadf():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"abc")
    f.close()
    f.close()  # closing twice is harmless
    for call in (lambda: f.pread(0, 1), lambda: f.pwrite(0, b"x"), f.size, f.fsync):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF


# -- hooks, counters, locks -----------------------------------------------------


def test_hook_sees_each_mutation_with_its_details():
    fs = make_fs()
    events: list[Event] = []
    fs.add_hook(events.append)
    f = fs.create("/db/a")
    f.pwrite(4, b"data")
    f.truncate(2)
    f.fsync()
    fs.rename("/db/a", "/db/b")
    fs.remove("/db/b")
    assert [e.kind for e in events] == [
        "create", "fsync_dir", "write", "truncate", "fsync", "rename", "fsync_dir", "remove", "fsync_dir"]
    write, truncate, fsync = events[2], events[3], events[4]
    assert (write.path, write.offset, write.data, write.length) == ("/db/a", 4, b"data", 4)
    assert truncate.length == 2
    assert [op.kind for op in fsync.ops] == ["write", "truncate"]
    assert [op.describe() for op in events[1].ops] == ["create /db/a"]
    assert (events[5].path, events[5].dst) == ("/db/a", "/db/b")


def test_hook_that_raises_vetoes_the_operation():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")

    def no_writes(event):
        if event.kind == "write":
            raise RuntimeError("write vetoed")

    fs.add_hook(no_writes)
    with pytest.raises(RuntimeError):
        f.pwrite(0, b"x")
    assert f.size() == 0 and fs.pending() == []
    fs.remove_hook(no_writes)
    f.pwrite(0, b"x")
    assert f.size() == 1


def test_hook_can_enforce_log_before_page_ordering():
    """The W1-style invariant: no page write before the log is durable."""
    fs = make_fs()
    log = durable_file(fs, "/db/log", b"")
    page = durable_file(fs, "/db/pages", b"")

    def log_first(event):
        if event.kind == "write" and event.path == "/db/pages":
            assert fs.durable_bytes("/db/log") == fs.visible_bytes("/db/log"), "page before log"

    fs.add_hook(log_first)
    log.pwrite(0, b"record")
    with pytest.raises(AssertionError, match="page before log"):
        page.pwrite(0, b"page")
    log.fsync()
    page.pwrite(0, b"page")


def test_hook_raising_power_cut_cuts_the_power_there():
    fs = make_fs()
    f = durable_file(fs, "/db/a", b"")

    def cut_on_fsync(event):
        if event.kind == "fsync":
            raise PowerCut("cut at fsync")

    fs.add_hook(cut_on_fsync)
    f.pwrite(0, b"x")
    with pytest.raises(PowerCut):
        f.fsync()
    assert fs.dead
    assert fs.crash(DropAll()).visible_bytes("/db/a") == b""


def test_counts_raw_calls_by_kind():
    fs = make_fs()
    f = fs.create("/db/a")
    f.pwrite(0, b"abc")
    f.pread(0, 3)
    f.fsync()
    f.fsync()
    fs.rename("/db/a", "/db/b")
    assert fs.counts["create"] == 1 and fs.counts["write"] == 1 and fs.counts["read"] >= 1
    assert fs.counts["fsync"] == 2 and fs.counts["fsync_dir"] == 2 and fs.counts["rename"] == 1


def test_lock_is_exclusive_until_released():
    fs = make_fs()
    lock = fs.lock("/db/LOCK")
    assert fs.exists("/db/LOCK")  # created if missing
    with pytest.raises(BlockingIOError):
        fs.lock("/db/LOCK")
    lock.release()
    lock.release()  # releasing twice is harmless
    fs.lock("/db/LOCK").release()
    assert not make_fs().exists("/db/LOCK")  # per instance


# -- determinism, threads -------------------------------------------------------


def test_same_seed_gives_same_plans_and_garbage():
    def run(seed):
        fs = FaultFS(seed=seed, dirs=["/db"])
        f = durable_file(fs, "/db/a", b"")
        for i in range(12):  # 12 pending ops: subsets are sampled
            f.pwrite(i * 300, bytes([65 + i]) * 700)
        plans = fs.plans()
        garbage = [fs.crash(p).visible_bytes("/db/a") for p in plans if getattr(p, "fill", "") == "garbage"]
        return plans, garbage

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_concurrent_writers_keep_every_byte():
    fs = make_fs()
    files = [durable_file(fs, f"/db/t{i}", b"") for i in range(4)]

    def work(n, f):
        for i in range(200):
            f.pwrite(i * 2, bytes([n, i]))
            if i % 50 == 0:
                f.fsync()
        f.fsync()

    threads = [threading.Thread(target=work, args=(n, f)) for n, f in enumerate(files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fs._check()
    after = fs.crash(DropAll())
    for n in range(4):
        assert after.visible_bytes(f"/db/t{n}") == b"".join(bytes([n, i]) for i in range(200))


# -- a property: the images match a simple model --------------------------------

FILES = ("/db/f0", "/db/f1")
actions = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 1), st.integers(0, 1500),
                  st.binary(min_size=1, max_size=700)),
        st.tuples(st.just("truncate"), st.integers(0, 1), st.integers(0, 2000)),
        st.tuples(st.just("fsync"), st.integers(0, 1)),
        st.tuples(st.just("fsync_fails"), st.integers(0, 1)),
    ),
    max_size=25,
)


def model_apply(buf: bytearray, action) -> None:
    if action[0] == "write":
        _, _, off, data = action
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data
    else:
        size = action[2]
        del buf[size:]
        buf.extend(bytes(size - len(buf)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions)
def test_images_after_power_cut_match_a_model_of_what_was_fsynced(steps):
    fs = make_fs()
    handles = [durable_file(fs, p, b"") for p in FILES]
    visible = [bytearray(), bytearray()]
    durable = [bytearray(), bytearray()]
    pending: list[tuple] = []  # (file index, action), the model's pending list
    for step in steps:
        kind, i = step[0], step[1]
        if kind in ("write", "truncate"):
            (handles[i].pwrite(step[2], step[3]) if kind == "write" else handles[i].truncate(step[2]))
            model_apply(visible[i], step)
            pending.append((i, step))
        elif kind == "fsync":
            handles[i].fsync()
            for j, act in pending:
                if j == i:
                    model_apply(durable[i], act)
            pending = [(j, a) for j, a in pending if j != i]
        else:  # E2: a failed fsync drops the file's pending data for good
            fs.fail("fsync", nth=1, path_contains=FILES[i])
            with pytest.raises(OSError):
                handles[i].fsync()
            pending = [(j, a) for j, a in pending if j != i]
    assert len(fs.pending()) == len(pending)
    assert fs.durable_snapshot() == dict(zip(FILES, map(bytes, durable), strict=True))
    assert fs.crash(DropAll()).snapshot() == dict(zip(FILES, map(bytes, durable), strict=True))
    assert fs.crash(KeepAll()).snapshot() == dict(zip(FILES, map(bytes, visible), strict=True))
    for k in range(len(pending) + 1):  # every prefix of the model's pending list
        images = [bytearray(d) for d in durable]
        for j, act in pending[:k]:
            model_apply(images[j], act)
        assert fs.crash(Prefix(k)).snapshot() == dict(zip(FILES, map(bytes, images), strict=True))
