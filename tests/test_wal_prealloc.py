"""Preallocated log segments and fdatasync (issue 8: durable commits).

Under ``sync="full"`` the writer extends the segment it writes with zeros
ahead of its records, fsynced, so that a commit's sync is an ``fdatasync``
of an overwrite (``wal/writer.py``, L7); a roll cuts the old segment to its
records (L2), and the segment a store's closing checkpoint writes is lean
(L8).  The reader takes zeros after the last record for the end of the log,
and still tells a torn tail from damage (``wal/reader.py``).  The tests, by
the brief's letters:

(a) the segment being written is preallocated and commits overwrite it: the
    file's size does not change from one commit to the next;
(b) the commit's sync is an fdatasync, never an fsync -- on FaultFS, on the
    real file system, and an fsync where the platform has no fdatasync;
    FaultFS models fdatasync with fsync's power-cut semantics, and a failed
    one leaves the ``.fsync-failed`` marker like a failed fsync;
(c) a power cut at every I/O point, under every kind of crash plan, loses no
    acknowledged record, for the log alone and for the whole store;
(d) zeros after the last record are the clean end; a torn record followed by
    zeros is a torn tail, cut; a damaged record followed by valid ones (and
    zeros) raises CorruptionError and changes nothing, as before;
(e) a store's close leaves a log as small as its records, and reopens; a
    poisoned store's close writes nothing.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections import Counter

import pytest
from crashkit import Limits, Run, Workload, enumerate_crashes, report
from pagehelpers import fs_with

import kvstore
import wal.writer
from pages import fs as fs_module
from pages.faultfs import DropAll, FaultFS, PowerCut, Torn
from pages.fs import OsFileSystem
from wal import NO_LSN, CorruptionError, PoisonedError, RecordType, WriteAheadLog
from wal.format import SEGMENT_HEADER_SIZE, decode_record, parse_segment_name, segment_name
from wal.fsync_failure import MARKER_SUFFIX

DB_ID = bytes.fromhex("6b7673746f72652d77616c2d74657374")
D = "/db"
SOAK = bool(os.environ.get("KVSTORE_SOAK"))


# -- helpers ----------------------------------------------------------------------


def open_log(fs, directory: str = D, **kw) -> WriteAheadLog:
    return WriteAheadLog.open(fs, directory, DB_ID, **kw)


def key(rec) -> tuple:
    return (rec.lsn, rec.type, rec.txid, rec.prev_lsn, rec.payload)


def used_bytes(log: WriteAheadLog) -> int:
    """File bytes of the last segment that hold the header and records."""
    seg = log.segments()[-1]
    return SEGMENT_HEADER_SIZE + seg.end_lsn - seg.first_lsn


def commit(log: WriteAheadLog, txid: int, payload: bytes) -> int:
    lsn = log.append(RecordType.COMMIT, txid, payload)
    log.commit_wait(lsn)
    return lsn


def state(fs: FaultFS) -> tuple:
    return fs.snapshot(), fs.durable_snapshot(), fs.pending(), fs.io_points


@pytest.fixture
def small_steps(monkeypatch):
    """Steps of 512 .. 2048 bytes, so that short workloads extend the
    segment many times (the real ones are 64 KiB .. 1 MiB)."""
    monkeypatch.setattr(wal.writer, "PREALLOC_MIN", 512)
    monkeypatch.setattr(wal.writer, "PREALLOC_MAX", 2048)


# -- (a) the segment is preallocated; commits overwrite it ---------------------------


def test_first_commit_preallocates_a_step_and_later_commits_overwrite_it():
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=4 * 2**20)
    path = log.segments()[-1].path
    assert len(fs.visible_bytes(path)) == SEGMENT_HEADER_SIZE  # a new segment is a header only (L3)
    commit(log, 1, b"first")
    size = len(fs.visible_bytes(path))
    assert size >= used_bytes(log) + wal.writer.PREALLOC_MIN, "the first write did not preallocate a step"
    assert fs.durable_bytes(path)[used_bytes(log):] == bytes(size - used_bytes(log))  # zeros, durable
    grew = []
    fs.add_hook(lambda ev: grew.append(ev) if ev.kind in ("write", "truncate") and ev.path == path
                and (ev.kind == "truncate" or ev.offset + ev.length > len(fs.visible_bytes(path))) else None)
    sizes = set()
    for i in range(200):
        commit(log, 2, b"commit %d " % i * 3)
        sizes.add(len(fs.visible_bytes(path)))
        assert len(fs.durable_bytes(path)) == size
    assert sizes == {size}, "a commit changed the size of the preallocated segment"
    assert grew == [], "a commit's write grew the file instead of overwriting zeros"
    assert log.preallocated_bytes == size - used_bytes(log) > 0
    log.close()


def test_steps_grow_with_the_segment_up_to_the_maximum_and_stop_at_segment_size():
    fs = FaultFS(dirs=[D])
    segment_size = 3 * 2**20 + 12345
    log = open_log(fs, segment_size=segment_size)
    extensions = []  # (file size before, zeros written)
    fs.add_hook(lambda ev: extensions.append((len(fs.visible_bytes(ev.path)), ev.length))
                if ev.kind == "write" and ev.data == bytes(ev.length) else None)
    payload = random.Random(1).randbytes(3000)
    while len(log.segments()) == 1:
        commit(log, 1, payload)
    steps = [n for size, n in extensions if size >= SEGMENT_HEADER_SIZE]
    assert len(steps) >= 4
    assert all(n <= wal.writer.PREALLOC_MAX + len(payload) + 64 for n in steps)
    assert steps[0] < steps[1] < steps[2], f"steps do not grow: {steps[:5]}"
    assert max(steps) >= wal.writer.PREALLOC_MAX
    # the zeros never reached past the segment's size (the last record may)
    assert max(size + n for size, n in extensions) <= SEGMENT_HEADER_SIZE + segment_size
    log.close()


def test_roll_cuts_the_old_segment_to_its_records():
    """A roll on size finds the segment full (the zeros stop at its size); a
    roll asked for by ``start_segment`` (the close of a store) finds zeros
    after the records, and cuts them before the next segment exists (L2)."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=128 * 1024)
    for i in range(300):
        commit(log, 1, random.Random(i).randbytes(900))
    assert len(log.segments()) >= 3
    old = log.segments()[-1].path
    assert len(fs.visible_bytes(old)) > used_bytes(log)  # zeros after the records
    log.start_segment()
    commit(log, 2, b"in the next segment")
    segs = log.segments()
    assert segs[-2].path == old
    for seg in segs[:-1]:  # L2: cut to its records, durably
        assert len(fs.durable_bytes(seg.path)) == SEGMENT_HEADER_SIZE + seg.end_lsn - seg.first_lsn
    log.close()


@pytest.mark.parametrize("sync", ["normal", "off"])
def test_sync_normal_and_off_append_without_preallocating(sync):
    """Their log is synced at most every 100 ms: preallocating would only put
    an fsync on their commit path."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs, sync=sync)
    path = log.segments()[-1].path
    for _ in range(20):
        commit(log, 1, b"x" * 300)
        assert len(fs.visible_bytes(path)) == used_bytes(log)
    log.close()


def test_a_write_larger_than_a_step_appends():
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=16 * 2**20)
    path = log.segments()[-1].path
    commit(log, 1, random.Random(2).randbytes(wal.writer.PREALLOC_MIN * 3))
    assert len(fs.visible_bytes(path)) == used_bytes(log), "zeros were written for a write larger than a step"
    commit(log, 1, b"small")  # the next write past the end preallocates again
    assert len(fs.visible_bytes(path)) > used_bytes(log)
    log.close()


def test_database_wal_file_keeps_its_size_across_durable_commits(tmp_path):
    db = kvstore.open(tmp_path / "db", sync="full")
    try:
        db.put(b"k" * 16, b"v" * 100)
        path = db._wal.segments()[-1].path
        size = os.path.getsize(path)
        assert size > used_bytes(db._wal)
        for i in range(100):
            with db.transaction() as tx:
                tx.put(b"key-%012d" % i, b"v" * 100)
            assert os.path.getsize(path) == size, f"commit {i} changed the WAL file's size"
    finally:
        db.close()


# -- (b) the commit's sync is an fdatasync ------------------------------------------


def test_commit_sync_is_an_fdatasync_not_an_fsync():
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=4 * 2**20)
    commit(log, 1, b"first: preallocates")
    syncs = []
    fs.add_hook(lambda ev: syncs.append(ev) if ev.kind == "fsync" else None)
    before, log_syncs = Counter(fs.counts), log.fsyncs
    for i in range(50):
        commit(log, 1, b"commit %d" % i)
    assert len(syncs) == 50 and all(ev.datasync and "wal" in ev.path for ev in syncs), [
        (ev.path, ev.datasync) for ev in syncs if not ev.datasync
    ]
    assert fs.counts["fdatasync"] - before["fdatasync"] == 50
    assert fs.counts["fsync"] - before["fsync"] == 50  # (an fdatasync counts as an fsync too: F1)
    assert log.fsyncs - log_syncs == 50
    log.close()


def test_commit_path_calls_os_fdatasync_on_the_real_file_system(tmp_path, monkeypatch):
    calls: list[tuple[str, int]] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def recording(name, real):
        def call(fd):
            calls.append((name, os.fstat(fd).st_ino))
            real(fd)

        return call

    monkeypatch.setattr(os, "fsync", recording("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", recording("fdatasync", real_fdatasync))
    db = kvstore.open(tmp_path / "db", sync="full")
    try:
        db.put(b"warm", b"up")  # the first write preallocates (an fsync)
        wal_ino = os.stat(db._wal.segments()[-1].path).st_ino
        calls.clear()
        for i in range(30):
            db.put(b"key-%d" % i, b"v" * 100)
        on_wal = [name for name, ino in calls if ino == wal_ino]
        assert on_wal == ["fdatasync"] * 30, on_wal
    finally:
        db.close()


def test_fdatasync_falls_back_to_fsync_in_portable_mode_and_without_os_fdatasync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    for fs, expected in [
        (OsFileSystem(portable=False), "fdatasync"),
        (OsFileSystem(portable=True), "fsync"),
    ]:
        assert fs.datasync_call == expected
        with fs.create(str(tmp_path / f"f-{expected}")) as f:
            calls.clear()
            f.fdatasync()
            assert calls == [expected]
            calls.clear()
            f.fsync()
            assert calls == ["fsync"]
    monkeypatch.setattr(fs_module, "HAS_FDATASYNC", False)  # macOS, Windows
    fs = OsFileSystem(portable=False)
    assert fs.datasync_call == "fsync"
    with fs.open(str(tmp_path / "f-fsync")) as f:
        calls.clear()
        f.fdatasync()
        assert calls == ["fsync"]


def test_faultfs_fdatasync_has_the_power_cut_semantics_of_fsync():
    """F1: data and size (grown or cut) durable; the name not (F3)."""
    fs = FaultFS(dirs=[D])
    f = fs.create("/db/a")
    f.pwrite(0, b"hello world")
    f.fdatasync()
    f.truncate(5)
    f.pwrite(100, b"!")  # grows the file past its size
    before = fs.counts["fsync"]
    f.fdatasync()
    assert fs.counts["fdatasync"] == 2 and fs.counts["fsync"] == before + 1
    assert fs.pending() == []
    expected = b"hello" + bytes(95) + b"!"
    assert fs.crash(DropAll()).visible_bytes("/db/a") == expected
    g = FaultFS(dirs=[D])
    h = g._open("/db/b", create=True)  # no directory fsync: the name is not durable
    h.pwrite(0, b"data")
    h.fdatasync()
    assert g.crash(DropAll()).visible_bytes("/db/b") is None


def test_faultfs_failed_fdatasync_drops_the_pending_data_like_fsync():
    """E2 for fdatasync: ``fail("fsync")`` fails it, its data never becomes
    durable, and the next sync reports success."""
    fs = FaultFS(dirs=[D])
    f = fs.create("/db/a")
    f.pwrite(0, b"lost")
    fs.fail("fsync")
    with pytest.raises(OSError):
        f.fdatasync()
    assert fs.pending() == []
    f.fdatasync()
    assert fs.durable_bytes("/db/a") == b""
    assert fs.visible_bytes("/db/a") == b"lost"


def test_failed_commit_fdatasync_poisons_and_leaves_the_marker():
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    commit(log, 1, b"preallocates")
    path = log.segments()[-1].path
    fs.fail("fsync", errno_=errno.EIO)
    with pytest.raises(PoisonedError):
        commit(log, 2, b"its fdatasync fails")
    assert fs.exists(path + MARKER_SUFFIX), "a failed fdatasync left no marker"
    log.close()
    fs.clear_faults()
    log = open_log(fs)  # the marker makes open rewrite the segment first
    assert not fs.exists(path + MARKER_SUFFIX)
    assert [r.payload for r in log.records()] == [b"preallocates", b"its fdatasync fails"]
    log.close()


# -- (c) power cuts at every I/O point lose no acknowledged record ----------------


class LogRun:
    def __init__(self) -> None:
        self.appended: list[tuple] = []
        self.acked = 0
        self.finished = False


def log_workload(fs: FaultFS, run: LogRun, seed: int) -> None:
    """Commits (acknowledged), writes to the OS only, and writes larger than
    a step, over several preallocation steps, a roll on size and rolls asked
    for (which cut zeros, L2, and begin lean segments, L8); then close."""
    rng = random.Random(seed)
    log = open_log(fs, segment_size=8192)
    for i in range(24):
        if i in (9, 18):
            log.start_segment()
        payload = rng.randbytes(rng.choice((40, 300, 700, 2500)))
        lsn = log.end_lsn
        run.appended.append((lsn, RecordType.COMMIT, 1, NO_LSN, payload))
        log.append(RecordType.COMMIT, 1, payload)
        if rng.random() < 0.6:
            log.commit_wait(lsn)
            run.acked = len(run.appended)
        elif rng.random() < 0.5:
            log.flush(sync=False)
    log.close()
    run.acked = len(run.appended)
    run.finished = True


def check_log_image(image: FaultFS, run: LogRun, what: str) -> None:
    try:
        log = open_log(image, segment_size=8192)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{what}: open raised {e!r} after a power cut")
    got = [key(r) for r in log.records()]
    assert got == run.appended[: len(got)], f"{what}: not a prefix of the appended records"
    assert len(got) >= run.acked, f"{what}: acknowledged records lost ({len(got)} of {run.acked} acked)"
    lsn = log.append(RecordType.NOOP, 9, b"after recovery")
    log.commit_wait(lsn)
    log.close()
    again = open_log(image.crash(DropAll()), segment_size=8192)
    assert again.opened_state.cut == []
    assert [key(r) for r in again.records()] == got + [(lsn, RecordType.NOOP, 9, NO_LSN, b"after recovery")]
    again.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_cut_at_every_io_point_of_a_preallocating_log_loses_no_acked_record(seed, small_steps):
    tally = Counter()
    k = 0
    while True:
        fs = FaultFS(seed=seed, dirs=[D])
        fs.crash_after(k)
        run = LogRun()
        try:
            log_workload(fs, run, seed)
        except PowerCut:
            pass
        if run.finished:
            break
        for plan in fs.plans(limit=None if SOAK else 40):
            tally[type(plan).__name__] += 1
            check_log_image(fs.crash(plan), run, f"seed {seed}, cut before I/O point {k}, plan {plan!r}")
        k += 1
    assert k > 40
    assert {"Torn", "GrownNotWritten", "OmitOne", "Subset"} <= set(tally), tally


def test_the_log_workload_preallocates_rolls_and_overwrites(small_steps):
    """Guard against a vacuous enumeration."""
    fs = FaultFS(seed=1, dirs=[D])
    zeros, overwrites, truncates = [], [], []

    def hook(ev):
        if ev.kind == "write" and ev.data == bytes(ev.length):
            zeros.append(ev)
        elif ev.kind == "write" and ev.offset + ev.length <= len(fs.visible_bytes(ev.path)):
            overwrites.append(ev)
        elif ev.kind == "truncate":
            truncates.append(ev)

    fs.add_hook(hook)
    run = LogRun()
    log_workload(fs, run, 1)
    assert len(zeros) >= 4 and len(overwrites) >= 8 and len(truncates) >= 2, (len(zeros), len(overwrites), len(truncates))
    assert len([p for p in fs.snapshot() if parse_segment_name(os.path.basename(p)) is not None]) >= 2


def commits_over_steps(run: Run) -> None:
    """Durable commits over several preallocation steps, a checkpoint that
    rolls and truncates, more commits, a clean close."""
    db = run.open()
    for i in range(6):
        run.commit(lambda i=i: db.put(b"k%d" % i, b"v%d" % i * 40), {b"k%d" % i: b"v%d" % i * 40})
    db._wal.start_segment()
    run.checkpoint(db)
    for i in range(6, 9):
        run.commit(lambda i=i: db.put(b"k%d" % i, b"w%d" % i * 60), {b"k%d" % i: b"w%d" % i * 60})
    run.close(db)


def test_power_cut_at_every_io_point_of_a_store_with_preallocated_segments(small_steps):
    tally = Counter()
    workload = Workload("commits_over_steps", commits_over_steps, initial={b"base": b"x" * 50})
    limits = Limits(plans=None if SOAK else 24, nested_every=25)
    kinds = enumerate_crashes(workload, "full", limits, 7, tally)
    report(tally)
    assert tally["acked_lost"] == 0 and tally["crash_states"] > 100
    assert {"Torn", "GrownNotWritten", "OmitOne"} <= set(kinds), kinds


# -- (d) the reader: zeros are the end, torn tails are cut, damage raises -----------


def closed_log(n: int = 5, size: int = 150, flush_every: int = 1) -> tuple[dict[str, bytes], list[tuple]]:
    """A closed one-segment log, cut to its last record (as a store's clean
    close leaves it, L8): its files and records."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    keys = []
    rng = random.Random(0)
    for i in range(n):
        payload = rng.randbytes(size)
        keys.append((log.append(RecordType.NOOP, i + 1, payload), RecordType.NOOP, i + 1, NO_LSN, payload))
        if (i + 1) % flush_every == 0:
            log.flush()
    log.close()
    ((path, data),) = fs.durable_snapshot().items()
    return {path: data[: SEGMENT_HEADER_SIZE + log.end_lsn]}, keys


@pytest.mark.parametrize("zeros", [1, 35, 4096, 100_000])
def test_zeros_after_the_last_record_are_the_clean_end_and_are_kept(zeros):
    files, keys = closed_log()
    (path,) = files
    fs = fs_with({path: files[path] + bytes(zeros)})
    log = open_log(fs)
    assert [key(r) for r in log.records()] == keys
    assert log.opened_state.cut == [] and log.opened_state.torn_lsn is None
    assert log.opened_state.zero_tail == zeros
    assert fs.durable_bytes(path) == files[path] + bytes(zeros), "open cut the preallocated zeros"
    lsn = log.append(RecordType.NOOP, 99, b"over the zeros")
    assert lsn == keys[-1][0] + len(files[path]) - SEGMENT_HEADER_SIZE - keys[-1][0]  # where the zeros begin
    log.commit_wait(lsn)
    log.close()
    assert [key(r) for r in open_log(fs.crash(DropAll())).records()] == keys + [(lsn, RecordType.NOOP, 99, NO_LSN, b"over the zeros")]


def test_a_torn_last_record_followed_by_zeros_is_a_torn_tail_and_is_cut():
    files, keys = closed_log()
    (path,) = files
    data = files[path]
    start = SEGMENT_HEADER_SIZE + keys[-1][0]
    for cut in range(start + 1, len(data)):
        if not data[start:cut].strip(b"\0"):
            continue  # nothing of the record reached the disk but zeros: that is the clean end
        fs = fs_with({path: data[:cut] + bytes(4096)})
        log = open_log(fs)
        assert [key(r) for r in log.records()] == keys[:-1], f"cut at {cut}"
        assert log.opened_state.torn_lsn == keys[-1][0] and log.opened_state.zero_tail == 0
        assert fs.durable_bytes(path) == data[:start], f"cut at {cut}: not cut to the last good record"
        log.close()
        again = open_log(fs)
        assert again.opened_state.cut == [] and [key(r) for r in again.records()] == keys[:-1]
        again.close()


@pytest.mark.parametrize("junk_at", [0, 36, 4095])
def test_zeros_followed_by_anything_else_are_a_torn_tail_and_are_cut(junk_at):
    """Only zeros up to the end of the file are the preallocated end: a write
    that reached the disk past some zeros (its earlier sectors lost) is torn."""
    files, keys = closed_log()
    (path,) = files
    tail = bytearray(4096)
    tail[junk_at] = 0x5A
    fs = fs_with({path: files[path] + bytes(tail)})
    log = open_log(fs)
    assert [key(r) for r in log.records()] == keys
    assert log.opened_state.torn_lsn == log.end_lsn and log.opened_state.zero_tail == 0
    assert fs.durable_bytes(path) == files[path]
    log.close()


def test_a_record_whose_bytes_are_zeroed_after_its_header_is_torn_not_the_end():
    """A record torn after its first sector, the rest of it zeros: not the
    preallocated end, since it does not start with zeros."""
    files, keys = closed_log(n=3, size=2000)
    (path,) = files
    data = bytearray(files[path])
    start = SEGMENT_HEADER_SIZE + keys[-1][0]
    data[start + 600 :] = bytes(len(data) - start - 600)
    fs = fs_with({path: bytes(data) + bytes(8192)})
    log = open_log(fs)
    assert log.opened_state.torn_lsn == keys[-1][0]
    assert [key(r) for r in log.records()] == keys[:-1]
    log.close()


def two_batches_with_zeros() -> tuple[dict[str, bytes], list]:
    """A log written under sync="full" and abandoned (a crash): two batches,
    the second's records stating the first durable, then preallocated zeros."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    for i in range(3):
        log.append(RecordType.PAGE_REDO, 1, b"batch one %d" % i * 3)
    log.flush()
    for i in range(2):
        log.append(RecordType.COMMIT, 2, b"batch two %d" % i)
    log.flush()
    files = fs.durable_snapshot()  # no close: the zeros stay
    (path,) = files
    recs = []
    pos, lsn = SEGMENT_HEADER_SIZE, 0
    while (rec := decode_record(files[path], pos, lsn)) is not None:
        recs.append(rec)
        pos += rec.size
        lsn += rec.size
    assert len(recs) == 5 and not files[path][pos:].strip(b"\0") and len(files[path]) - pos >= 4096
    assert recs[3].durable_lsn > recs[2].lsn  # the proof is there
    return files, recs


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_a_damaged_record_followed_by_valid_records_and_zeros_raises(victim):
    files, recs = two_batches_with_zeros()
    (path,) = files
    rec = recs[victim]
    off = SEGMENT_HEADER_SIZE + rec.lsn
    for bit in range(0, rec.size * 8, 7):
        damaged = bytearray(files[path])
        damaged[off + bit // 8] ^= 1 << (bit % 8)
        fs = fs_with({path: bytes(damaged)})
        before = state(fs)
        with pytest.raises(CorruptionError) as info:
            open_log(fs)
        assert state(fs) == before, "a refused open changed something"
        assert str(rec.lsn) in info.value.where


def test_zeroed_records_followed_by_a_record_that_proves_them_durable_raise():
    """Zeros where durable records were (a lost or zeroed write) are damage,
    not the end of the log, when a later record proves them durable."""
    files, recs = two_batches_with_zeros()
    (path,) = files
    damaged = bytearray(files[path])
    start, end = SEGMENT_HEADER_SIZE + recs[1].lsn, SEGMENT_HEADER_SIZE + recs[2].end
    damaged[start:end] = bytes(end - start)
    fs = fs_with({path: bytes(damaged)})
    before = state(fs)
    with pytest.raises(CorruptionError, match="was durable"):
        open_log(fs)
    assert state(fs) == before


def test_zeros_below_the_checkpoint_lsn_are_damage():
    files, recs = two_batches_with_zeros()
    (path,) = files
    damaged = bytearray(files[path])
    start = SEGMENT_HEADER_SIZE + recs[3].lsn
    damaged[start:] = bytes(len(damaged) - start)  # the second batch zeroed: looks like the end
    fs = fs_with({path: bytes(damaged)})
    log = open_log(fs)  # nothing proves it was there: the end of the log
    assert log.end_lsn == recs[3].lsn and log.opened_state.cut == []
    log.close(flush=False)
    before = state(fs)
    with pytest.raises(CorruptionError, match="checkpoint"):
        open_log(fs, durable_lsn=recs[4].lsn)
    assert state(fs) == before


def test_zeros_at_the_end_of_a_segment_that_is_not_the_last_are_damage():
    """A segment is cut to its records before the next is created (L2): zeros
    after them mean lost records."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=4096)
    for i in range(12):
        commit(log, 1, random.Random(i).randbytes(1200))
    log.close()
    files = fs.durable_snapshot()
    first = min(files)
    fs = fs_with({**files, first: files[first] + bytes(512)})
    before = state(fs)
    with pytest.raises(CorruptionError, match="synced before"):
        open_log(fs, segment_size=4096)
    assert state(fs) == before


# -- (e) a store's close leaves a small log; reopen works ---------------------------


def test_a_segment_begun_by_start_segment_is_lean_until_it_holds_a_step():
    """L8: the segment a store's closing checkpoint writes gets no zeros."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    for i in range(10):
        commit(log, 1, b"record %d" % i)
    old = log.segments()[-1].path
    assert len(fs.visible_bytes(old)) > used_bytes(log)
    log.start_segment()
    commit(log, 2, b"checkpoint-sized" * 10)
    commit(log, 2, b"and another" * 10)
    path = log.segments()[-1].path
    assert path != old and len(fs.visible_bytes(old)) == SEGMENT_HEADER_SIZE + log.segments()[0].end_lsn  # L2
    assert len(fs.visible_bytes(path)) == used_bytes(log), "a lean segment got zeros"
    while used_bytes(log) - SEGMENT_HEADER_SIZE < wal.writer.PREALLOC_MIN:
        commit(log, 3, random.Random(used_bytes(log)).randbytes(3000))
    commit(log, 3, b"past a step")
    assert len(fs.visible_bytes(path)) > used_bytes(log), "a lean segment past a step is not preallocated"
    log.close()


def test_close_writes_nothing_but_what_is_queued_and_the_zeros_stay_as_the_end():
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    for i in range(5):
        commit(log, 1, b"acked %d" % i)
    log.append(RecordType.COMMIT, 2, b"queued")
    path = log.segments()[-1].path
    log.close()
    ops = [op.kind for op in fs.pending_ops()]
    assert ops == [], ops  # the queued record was written and synced, nothing else
    log = open_log(fs.crash(DropAll()))
    assert log.opened_state.zero_tail > 0 and log.opened_state.cut == []
    assert [r.payload for r in log.records()][-1] == b"queued"
    assert len(fs.visible_bytes(path)) == used_bytes(log) + log.opened_state.zero_tail
    log.close()


def test_close_without_flush_or_when_poisoned_writes_nothing():
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    commit(log, 1, b"acked")
    log.append(RecordType.COMMIT, 1, b"dropped")
    before = fs.io_points
    log.close(flush=False)  # a refused open must change nothing
    assert fs.io_points == before
    log = open_log(fs)
    commit(log, 1, b"more")
    fs.fail("write")
    with pytest.raises(PoisonedError):
        commit(log, 1, random.Random(3).randbytes(100))
    fs.clear_faults()
    before = fs.io_points
    log.close()
    assert fs.io_points == before


def test_closing_a_store_poisoned_by_its_page_file_writes_nothing():
    """The log is not poisoned when the page file's fsync fails, yet the
    store is: its close must write nothing (SPEC guarantee 5), zeros and
    all."""
    fs = FaultFS(seed=1)
    db = kvstore.open(D, _fs=fs, sync="full", checkpoint_interval=float("inf"))
    for i in range(20):
        db.put(b"key-%d" % i, b"v" * 100)
    assert db._wal.preallocated_bytes > 0
    fs.fail("fsync", path_contains="pages.db")
    with pytest.raises(PoisonedError):
        db.checkpoint()
    fs.clear_faults()
    before = fs.io_points
    db.close()
    assert fs.io_points == before, "closing the poisoned store wrote"
    db = kvstore.open(D, _fs=fs.crash(DropAll()))
    assert db.get(b"key-19") == b"v" * 100
    db.close()


def test_database_close_leaves_a_small_log_and_reopens(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="full")
    for i in range(300):
        with db.transaction() as tx:
            tx.put(b"key-%012d" % i, b"v" * 100)
    assert sum(os.path.getsize(path / n) for n in os.listdir(path) if "wal" in n) > 64 * 1024  # preallocated
    db.close()
    wal_files = {n: os.path.getsize(path / n) for n in os.listdir(path) if "wal" in n}
    assert len(wal_files) == 1 and sum(wal_files.values()) < 1024, wal_files
    start = time.perf_counter()
    db = kvstore.open(path)
    seconds = time.perf_counter() - start
    try:
        assert db._wal.opened_state.zero_tail == 0 and db._wal.opened_state.cut == []
        assert db.get(b"key-%012d" % 299) == b"v" * 100
        assert len(list(db.scan())) == 300
        db.put(b"after", b"reopen")  # the segment the close left is not lean: it preallocates
        assert db._wal.preallocated_bytes > 0
    finally:
        db.close()
    print(f"reopen after a clean close: {seconds * 1000:.1f} ms")


def test_zero_tail_after_a_process_crash_on_the_real_file_system(tmp_path):
    """A process crash (the log abandoned unclosed) leaves the zeros; open
    reads them as the end and the log goes on over them."""
    fs = OsFileSystem()
    log = open_log(fs, str(tmp_path))
    lsns = [commit(log, 1, b"record %d" % i) for i in range(5)]
    (name,) = os.listdir(tmp_path)
    assert name == segment_name(0)
    size = os.path.getsize(tmp_path / name)
    assert size > used_bytes(log)
    log._file.close()  # the process dies (no close)
    log = open_log(fs, str(tmp_path))
    assert [r.lsn for r in log.records()] == lsns and log.opened_state.zero_tail == size - used_bytes(log)
    assert os.path.getsize(tmp_path / name) == size
    after = commit(log, 1, b"after")
    log.close()
    assert os.path.getsize(tmp_path / name) == size
    log = open_log(fs, str(tmp_path))
    assert [r.lsn for r in log.records()] == lsns + [after]
    log.close()


def test_torn_plans_over_a_preallocated_segment_recover(small_steps):
    """A spot check of the plans that tear a commit's overwrite of zeros."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    acked = commit(log, 1, random.Random(5).randbytes(700))
    log.append(RecordType.COMMIT, 2, random.Random(6).randbytes(1500))
    log.flush(sync=False)
    (i,) = [n for n, op in enumerate(fs.pending_ops()) if op.kind == "write"]
    for plan in (Torn(i, 1, "old"), Torn(i, 1, "zero"), Torn(i, 1, "garbage"), Torn(i, 2, "zero")):
        got = open_log(fs.crash(plan))
        assert [r.lsn for r in got.records()] == [acked], plan
        got.close()
