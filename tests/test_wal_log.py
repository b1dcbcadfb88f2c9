"""Tests of the write-ahead log as a whole: wal.log, wal.writer, wal.reader.

Records round-trip through append/flush/reopen; group commit batches fsyncs
(L1); a torn tail is cut and damage raises without writing (SPEC guarantee 4,
the two branches of wal.reader); missing, swapped, stale and foreign segments
are refused; truncation removes whole segments (L6); the sync modes keep
their promises.  Power cuts at every I/O point are test_wal_powercut.py's job,
I/O errors test_wal_errors.py's.

Most tests run on ``pages.faultfs.FaultFS`` (in memory, with a durable image
to check against); a few repeat the key cases on the real file system.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pagehelpers import fs_with, new_fs

from pages.faultfs import DropAll, FaultFS
from pages.fs import OsFileSystem
from wal import NO_LSN, CorruptionError, RecordType, WriteAheadLog
from wal.format import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    decode_record,
    decode_segment_header,
    encode_segment_header,
    parse_segment_name,
    segment_name,
)

DB_ID = bytes.fromhex("6b7673746f72652d77616c2d74657374")
OTHER_DB_ID = bytes.fromhex("0123456789abcdef0123456789abcdef")
D = "/db"


# -- helpers ----------------------------------------------------------------------


def open_log(fs, directory: str = D, db_id: bytes = DB_ID, **kw) -> WriteAheadLog:
    return WriteAheadLog.open(fs, directory, db_id, **kw)


def key(rec) -> tuple:
    """What a record must round-trip (its durable_lsn is the writer's business)."""
    return (rec.lsn, rec.type, rec.txid, rec.prev_lsn, rec.payload)


def read_all(log) -> list[tuple]:
    return [key(r) for r in log.records()]


def durable_records(fs: FaultFS, directory: str = D) -> list:
    """Records in the durable image, parsed with wal.format alone (independent
    of wal.reader, so a broken reader cannot hide a broken writer)."""
    segs = []
    for path, data in fs.durable_snapshot().items():
        lsn = parse_segment_name(os.path.basename(path))
        if os.path.dirname(path) == directory and lsn is not None:
            segs.append((lsn, data))
    out = []
    for first, data in sorted(segs):
        try:
            decode_segment_header(data, "durable image")
        except CorruptionError:
            break
        pos, lsn = SEGMENT_HEADER_SIZE, first
        while (rec := decode_record(data, pos, lsn)) is not None:
            out.append(rec)
            pos += rec.size
            lsn += rec.size
    return out


def write_log(fs, records, *, segment_size=4096, flush_every=1, **kw) -> tuple[WriteAheadLog, list[tuple]]:
    """Append ``records`` (rtype, txid, payload) flushing every ``flush_every``;
    return the open log and the keys appended."""
    log = open_log(fs, segment_size=segment_size, **kw)
    keys = []
    for i, (rtype, txid, payload) in enumerate(records):
        lsn = log.append(rtype, txid, payload)
        keys.append((lsn, rtype, txid, NO_LSN, payload))
        if (i + 1) % flush_every == 0:
            log.flush()
    log.flush()
    return log, keys


def noops(n: int, size: int = 100, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    return [(RecordType.NOOP, i + 1, rng.randbytes(size)) for i in range(n)]


def segment_paths(fs) -> list[str]:
    return sorted(p for p in fs.snapshot() if parse_segment_name(os.path.basename(p)) is not None)


def state(fs: FaultFS) -> tuple:
    """Everything a refused open must leave unchanged: both images, what is
    pending, and the count of mutating calls (no write, fsync, truncate...)."""
    return fs.snapshot(), fs.durable_snapshot(), fs.pending(), fs.io_points


def assert_refused_unchanged(fs: FaultFS, match: str | None = None, **kw) -> CorruptionError:
    before = state(fs)
    with pytest.raises(CorruptionError, match=match) as info:
        open_log(fs, **kw)
    assert state(fs) == before, "a refused open changed something on disk"
    return info.value


def tree_hash(directory) -> dict[str, str]:
    return {
        name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


# -- round trips ------------------------------------------------------------------


@st.composite
def payloads(draw) -> bytes:
    kind = draw(st.sampled_from(["small", "random", "repetitive"]))
    if kind == "small":
        return draw(st.binary(max_size=600))
    size = draw(st.integers(0, 200_000))
    if kind == "random":
        return random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    unit = draw(st.binary(min_size=1, max_size=16))
    return (unit * (size // len(unit) + 1))[:size]


record_specs = st.lists(
    st.tuples(
        st.sampled_from(list(RecordType)),
        st.integers(0, 2**64 - 1),
        st.one_of(st.just(NO_LSN), st.integers(0, 2**64 - 1)),
        payloads(),
        st.booleans(),  # flush after this record
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=50)
@given(specs=record_specs, segment_size=st.sampled_from([4096, 20_000, 16 * 2**20]))
def test_records_round_trip_through_append_flush_reopen(specs, segment_size):
    fs = new_fs()
    log = open_log(fs, segment_size=segment_size)
    appended = []
    for rtype, txid, prev, payload, flush in specs:
        lsn = log.append(rtype, txid, payload, prev_lsn=prev)
        appended.append((lsn, rtype, txid, prev, payload))
        if flush:
            log.flush(lsn)
            assert log.durable_lsn > lsn  # L1
    assert read_all(log) == appended  # the open log reads its own records
    log.close()
    log = open_log(fs.crash(DropAll()), segment_size=segment_size)  # close made it all durable
    assert read_all(log) == appended
    for k in appended:
        assert key(log.read(k[0])) == k
    mid = appended[len(appended) // 2][0]
    assert [key(r) for r in log.records(mid)] == [k for k in appended if k[0] >= mid]
    assert log.end_lsn == log.durable_lsn == appended[-1][0] + log.read(appended[-1][0]).size
    segs = log.segments()
    assert segs[0].first_lsn == 0 and segs[-1].end_lsn == log.end_lsn
    assert all(a.end_lsn == b.first_lsn for a, b in pairwise(segs))  # contiguous
    log.close()


def test_records_round_trip_on_the_real_file_system(tmp_path):
    fs = OsFileSystem()
    specs = [
        (RecordType.PREPARE, 1, b""),
        (RecordType.PAGE_REDO, 1, random.Random(3).randbytes(200_000)),
        (RecordType.PAGE_REDO, 1, b"z" * 150_000),
        (RecordType.COMMIT, 1, b"c"),
    ]
    log, keys = write_log(fs, specs, segment_size=65536, directory=str(tmp_path))
    log.close()
    log = open_log(fs, str(tmp_path))
    assert read_all(log) == keys
    assert len(log.segments()) == 2  # the 200 KB record filled the first segment alone
    log.close()


def test_lsns_are_byte_positions_and_records_never_span_segments():
    fs = new_fs()
    log, keys = write_log(fs, noops(60, 300), segment_size=4096, flush_every=7)
    recs = list(log.records())
    assert all(a.end == b.lsn for a, b in pairwise(recs))
    segs = log.segments()
    for seg in segs:
        inside = [r for r in recs if seg.first_lsn <= r.lsn < seg.end_lsn]
        assert inside and inside[0].lsn == seg.first_lsn and inside[-1].end == seg.end_lsn
        data = fs.visible_bytes(seg.path)
        used = SEGMENT_HEADER_SIZE + seg.end_lsn - seg.first_lsn
        if seg is segs[-1]:  # the segment being written: preallocated zeros after the records (L7)
            assert len(data) >= used and not data[used:].strip(b"\0")
        else:  # cut to its records before the next one was created (L2)
            assert len(data) == used
        assert seg.end_lsn - seg.first_lsn < 4096 + 400  # rolls once past segment_size
        assert os.path.basename(seg.path) == segment_name(seg.first_lsn)
    log.close()


def test_transaction_records_follow_prev_lsn_newest_first():
    log = open_log(new_fs())
    last = {1: NO_LSN, 2: NO_LSN}
    chains: dict[int, list[int]] = {1: [], 2: []}
    for i, txid in enumerate([1, 2, 1, 1, 2, 1]):
        lsn = log.append(RecordType.PAGE_REDO, txid, f"{txid}:{i}".encode(), prev_lsn=last[txid])
        last[txid] = lsn
        chains[txid].append(lsn)
    for txid in (1, 2):  # read() flushes to the OS what it needs, no explicit flush
        got = list(log.transaction_records(last[txid]))
        assert [r.lsn for r in got] == chains[txid][::-1]
        assert all(r.txid == txid for r in got)
    log.close()


def test_read_of_unflushed_record_writes_it_but_does_not_make_it_durable():
    fs = new_fs()
    log = open_log(fs)
    lsn = log.append(RecordType.COMMIT, 9, b"not yet durable")
    assert log.read(lsn).payload == b"not yet durable"
    assert log.durable_lsn <= lsn and durable_records(fs) == []
    log.close()


def test_open_of_an_empty_directory_creates_the_first_segment_at_durable_lsn():
    fs = new_fs()
    log = open_log(fs, durable_lsn=12345)
    assert [os.path.basename(s.path) for s in log.segments()] == [segment_name(12345)]
    assert log.end_lsn == log.durable_lsn == 12345
    lsn = log.append(RecordType.NOOP, 0, b"x")
    assert lsn == 12345
    log.close()
    # the header and the name are durable (L3): a power cut keeps both
    assert [key(r) for r in durable_records(fs)] == [(12345, RecordType.NOOP, 0, NO_LSN, b"x")]


def test_records_written_across_many_reopens_stay_contiguous():
    fs = new_fs()
    expected = []
    for round_ in range(5):
        log = open_log(fs, segment_size=4096)
        assert read_all(log) == expected
        for txid, payload in enumerate([b"a" * 700, b"b" * 10, random.Random(round_).randbytes(900)]):
            expected.append((log.append(RecordType.NOOP, txid, payload), RecordType.NOOP, txid, NO_LSN, payload))
        log.close()
        fs = fs.crash(DropAll())
    assert read_all(open_log(fs)) == expected


# -- group commit (L1) ------------------------------------------------------------


def run_concurrent_commits(log, durable_end=None, threads=8, per_thread=100):
    """Each thread appends and flushes ``per_thread`` records; after every
    flush its record must be durable (L1): ``durable_end()``, when given,
    says how far the segment file is durable."""
    errors = []

    def work(t):
        try:
            for i in range(per_thread):
                payload = f"thread {t} record {i}".encode()
                lsn = log.append(RecordType.COMMIT, t + 1, payload)
                log.flush(lsn)
                assert log.durable_lsn > lsn, "flush returned before durable_lsn covered its record"
                if durable_end is not None:
                    end = SEGMENT_HEADER_SIZE + lsn + RECORD_HEADER_SIZE + len(payload)
                    assert durable_end() >= end, "flush returned but its record is not durable"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "a committer hung"
    if errors:
        raise errors[0]


def test_group_commit_batches_fsyncs_on_faultfs():
    """8 threads x 100 commits share fsyncs: one leader fsyncs for all (L1).
    FaultFS fsyncs take 1 ms here, like a fast disk, so commits queue up.
    The hook follows the durable image as fsyncs make writes durable, so the
    committers can check it without taking the file system's lock."""
    fs = new_fs()
    durable = [0]

    def slow_fsync(ev):
        if ev.kind == "fsync":
            time.sleep(0.001)
            durable[0] = max([durable[0]] + [op.end for op in ev.ops if op.kind == "write"])

    fs.add_hook(slow_fsync)
    log = open_log(fs)
    fsyncs_before = fs.counts["fsync"]
    run_concurrent_commits(log, lambda: durable[0])
    fsyncs = fs.counts["fsync"] - fsyncs_before
    print(f"group commit on FaultFS: 800 commits, {fsyncs} fsyncs (log.fsyncs={log.fsyncs})")
    assert 0 < fsyncs < 400
    assert log.fsyncs == fsyncs
    assert durable[0] == len(fs.durable_bytes(log.segments()[-1].path))  # the hook followed the image
    log.close()
    recs = durable_records(fs)
    assert len(recs) == 800
    for t in range(8):  # each thread's records are all there, in its order
        mine = [r.payload for r in recs if r.txid == t + 1]
        assert mine == [f"thread {t} record {i}".encode() for i in range(100)]


def test_group_commit_batches_fsyncs_on_the_real_file_system(tmp_path):
    log = open_log(OsFileSystem(), str(tmp_path))
    run_concurrent_commits(log)
    print(f"group commit on the real file system: 800 commits, {log.fsyncs} fsyncs")
    assert 0 < log.fsyncs < 400
    log.close()
    log = open_log(OsFileSystem(), str(tmp_path))
    assert len(list(log.records())) == 800
    log.close()


# -- torn tails are cut (reader branch 2) -----------------------------------------


def built_log(n=5, size=150, segment_size=16 * 2**20, flush_every=1, seed=0):
    """A closed log on a FaultFS, its last segment ending at its last record
    (as a store's clean close leaves it, L8 of wal.writer: no preallocated
    zeros); returns (files, keys)."""
    fs = new_fs()
    log, keys = write_log(fs, noops(n, size, seed), segment_size=segment_size, flush_every=flush_every)
    log.close()
    return without_zeros(fs.durable_snapshot(), log), keys


def without_zeros(files: dict[str, bytes], log) -> dict[str, bytes]:
    """``files`` with the preallocated zeros after the last record cut off."""
    last = log.segments()[-1]
    return {**files, last.path: files[last.path][: SEGMENT_HEADER_SIZE + last.end_lsn - last.first_lsn]}


@pytest.mark.parametrize("segments", [1, 3], ids=["one-segment", "three-segments"])
def test_truncated_trailing_record_is_cut(segments):
    """A cut at every byte inside the last record is a clean torn tail: open
    keeps every earlier record, truncates the file to the last good one and
    makes that durable; a second open finds nothing to cut."""
    files, keys = built_log(n=12 if segments == 3 else 5, size=1200 if segments == 3 else 150, segment_size=4096)
    last_path = max(files)
    assert len(files) == segments
    data = files[last_path]
    first = parse_segment_name(os.path.basename(last_path))
    last_lsn = keys[-1][0]
    start = SEGMENT_HEADER_SIZE + last_lsn - first  # file offset of the last record
    assert start > SEGMENT_HEADER_SIZE and len(data) > start
    for cut in range(start + 1, len(data)):
        fs = fs_with({**files, last_path: data[:cut]})
        log = open_log(fs)
        assert read_all(log) == keys[:-1], f"cut at {cut}"
        assert log.opened_state.torn_lsn == last_lsn
        assert log.end_lsn == last_lsn
        assert fs.durable_bytes(last_path) == data[:start]  # cut to the last good record, fsynced
        log.close()
        again = open_log(fs)
        assert again.opened_state.cut == [] and read_all(again) == keys[:-1]
        again.close()


def test_truncated_trailing_record_is_cut_on_the_real_file_system(tmp_path):
    fs = OsFileSystem()
    log, keys = write_log(fs, noops(4, 40), directory=str(tmp_path))
    log.close()
    (name,) = os.listdir(tmp_path)
    path = tmp_path / name
    data = path.read_bytes()[: SEGMENT_HEADER_SIZE + log.end_lsn]  # without the preallocated zeros
    start = SEGMENT_HEADER_SIZE + keys[-1][0]
    for cut in range(start + 1, len(data)):
        path.write_bytes(data[:cut])
        log = open_log(fs, str(tmp_path))
        assert read_all(log) == keys[:-1]
        log.close()
        assert path.read_bytes() == data[:start]


@pytest.mark.parametrize(
    "tail", [b"\x00" * 4096 + b"\x01", b"\xff" * 37, b"garbage" * 100], ids=["zeros-then-junk", "ones", "garbage"]
)
def test_junk_after_the_last_record_is_cut(tail):
    """(Zeros alone are the preallocated end and stay: test_wal_prealloc.py.)"""
    files, keys = built_log()
    (path,) = files
    fs = fs_with({path: files[path] + tail})
    log = open_log(fs)
    assert read_all(log) == keys
    assert fs.durable_bytes(path) == files[path]
    # the log goes on from the cut
    lsn = log.append(RecordType.NOOP, 99, b"after the cut")
    log.close()
    assert read_all(open_log(fs.crash(DropAll()))) == keys + [(lsn, RecordType.NOOP, 99, NO_LSN, b"after the cut")]


def test_bad_last_record_that_nothing_proves_durable_is_cut():
    """Every record of the last batch (no later record states them durable) is
    a torn tail when damaged, by the validity rule of wal.format."""
    files, keys = built_log(n=4, flush_every=10)  # one batch: durable_lsn 0 in each record
    (path,) = files
    data = bytearray(files[path])
    data[SEGMENT_HEADER_SIZE + keys[1][0] + 40] ^= 0x10  # payload of the 2nd record
    log = open_log(fs_with({path: bytes(data)}))
    assert read_all(log) == keys[:1]
    log.close()


# -- damage raises and writes nothing (reader branch 1) ---------------------------


def damage_fixture():
    """Two flushed batches: the records of the second state the first durable."""
    fs = new_fs()
    log = open_log(fs)
    first = [log.append(RecordType.PAGE_REDO, 1, f"batch one {i}".encode() * 3) for i in range(3)]
    log.flush()
    second = [log.append(RecordType.COMMIT, 2, f"batch two {i}".encode()) for i in range(2)]
    log.flush()
    log.close()
    recs = durable_records(fs)
    assert all(r.durable_lsn > first[-1] for r in recs if r.lsn in second)  # the proof is there
    return fs.durable_snapshot(), recs


@pytest.mark.parametrize("victim", [0, 1, 2], ids=["first", "middle", "last-of-batch"])
def test_checksum_mismatch_mid_log_raises(victim):
    """Every single-bit flip in a record that a later record proves durable
    raises CorruptionError on open and leaves every file byte-identical."""
    files, recs = damage_fixture()
    (path,) = files
    rec = recs[victim]
    data = files[path]
    off = SEGMENT_HEADER_SIZE + rec.lsn
    for bit in range(rec.size * 8):
        damaged = bytearray(data)
        damaged[off + bit // 8] ^= 1 << (bit % 8)
        fs = fs_with({path: bytes(damaged)})
        err = assert_refused_unchanged(fs)
        assert path in err.where and str(rec.lsn) in err.where


def test_damage_in_a_non_last_segment_raises():
    """The last record of a segment has no later record in its segment, but
    the next segment proves it durable (L2)."""
    files, keys = built_log(n=12, size=1200, segment_size=4096)
    paths = sorted(files)
    assert len(paths) == 3
    first_seg = paths[0]
    last_in_first = [k for k in keys if k[0] < parse_segment_name(os.path.basename(paths[1]))][-1]
    for where in (SEGMENT_HEADER_SIZE + 5, SEGMENT_HEADER_SIZE + last_in_first[0] + 50, len(files[first_seg]) - 1):
        damaged = bytearray(files[first_seg])
        damaged[where] ^= 0x01
        err = assert_refused_unchanged(fs_with({**files, first_seg: bytes(damaged)}), match="synced before")
        assert first_seg in err.where
    # a short non-last segment (its tail lost) is damage too
    assert_refused_unchanged(fs_with({**files, first_seg: files[first_seg][:-10]}))


def test_bad_record_below_known_durable_lsn_raises():
    """The caller's durable LSN (the checkpoint) is proof too."""
    files, keys = built_log(n=4, flush_every=10)
    (path,) = files
    damaged = bytearray(files[path])
    damaged[-1] ^= 0x80  # the last record: a torn tail, unless known durable
    fs = fs_with({path: bytes(damaged)})
    assert_refused_unchanged(fs, durable_lsn=keys[-1][0] + 1, match="checkpoint")
    log = open_log(fs)  # without that knowledge it is a torn tail
    assert read_all(log) == keys[:-1]
    log.close()


def test_log_shorter_than_known_durable_lsn_raises():
    files, keys = built_log(n=3)
    assert_refused_unchanged(fs_with(files), durable_lsn=keys[-1][0] + 10_000, match="before the durable LSN")


@pytest.mark.parametrize("flip", [3, 20, 35, 63], ids=["magic", "db-id", "first-lsn", "crc"])
def test_damaged_header_of_a_segment_with_records_raises(flip):
    files, _ = built_log(n=12, size=1200, segment_size=4096)
    for path in sorted(files):  # first, middle and last segment
        damaged = bytearray(files[path])
        damaged[flip] ^= 0x04
        assert_refused_unchanged(fs_with({**files, path: bytes(damaged)}))


def test_checksum_mismatch_mid_log_raises_on_the_real_file_system(tmp_path):
    fs = OsFileSystem()
    log = open_log(fs, str(tmp_path))
    a = log.append(RecordType.PAGE_REDO, 1, b"a" * 80)
    log.flush()
    log.append(RecordType.COMMIT, 1, b"proof")
    log.close()
    (name,) = os.listdir(tmp_path)
    path = tmp_path / name
    good = path.read_bytes()
    for off in (0, 4, 20, 40, 100):
        damaged = bytearray(good)
        damaged[SEGMENT_HEADER_SIZE + a + off] ^= 0x02
        path.write_bytes(bytes(damaged))
        before, mtime = tree_hash(tmp_path), path.stat().st_mtime_ns
        with pytest.raises(CorruptionError):
            open_log(fs, str(tmp_path))
        assert tree_hash(tmp_path) == before and path.stat().st_mtime_ns == mtime
    path.write_bytes(good)
    assert len(list(open_log(fs, str(tmp_path)).records())) == 2


# -- segments missing, swapped, stale, foreign ------------------------------------


def four_segments():
    """A closed 4-segment log, plus an early copy of the 2nd segment."""
    fs = new_fs()
    log = open_log(fs, segment_size=4096)
    keys, stale = [], None
    for rtype, txid, payload in noops(16, 1200, seed=7):
        keys.append((log.append(rtype, txid, payload), rtype, txid, NO_LSN, payload))
        log.flush()
        if len(log.segments()) == 2 and stale is None and log.end_lsn > log.segments()[1].first_lsn:
            stale = fs.visible_bytes(log.segments()[1].path)  # the 2nd segment, partly filled
    log.close()
    files = fs.durable_snapshot()
    assert len(files) == 4 and stale is not None
    return files, keys, stale


def test_deleted_middle_segment_raises():
    files, _, _ = four_segments()
    paths = sorted(files)
    for gone in paths[1:3]:
        rest = {p: d for p, d in files.items() if p != gone}
        assert_refused_unchanged(fs_with(rest), match="gap")


def test_deleted_first_segment_raises():
    files, _, _ = four_segments()
    rest = {p: d for p, d in files.items() if p != min(files)}
    assert_refused_unchanged(fs_with(rest), match="missing")


def test_swapped_segments_raise():
    files, _, _ = four_segments()
    paths = sorted(files)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        swapped = {**files, paths[a]: files[paths[b]], paths[b]: files[paths[a]]}
        assert_refused_unchanged(fs_with(swapped), match="swapped")


def test_renamed_segment_raises():
    files, _, _ = four_segments()
    paths = sorted(files)
    renamed = {p: d for p, d in files.items() if p != paths[3]}
    renamed[os.path.join(D, segment_name(parse_segment_name(os.path.basename(paths[3])) + 1))] = files[paths[3]]
    assert_refused_unchanged(fs_with(renamed))


def test_stale_segment_put_back_raises():
    """An old copy of a middle segment (a lost write of the file) leaves a
    gap before the next segment -- or, taken while the segment was being
    written, ends in preallocated zeros, which a segment with a successor
    never has (L2)."""
    files, _, stale = four_segments()
    second = sorted(files)[1]
    assert stale != files[second]
    assert_refused_unchanged(fs_with({**files, second: stale}), match="gap|synced before")
    shorter = stale.rstrip(b"\0")  # the same copy without its zeros: the gap
    assert len(shorter) < len(files[second])
    assert_refused_unchanged(fs_with({**files, second: shorter}), match="gap")


def test_overlapping_stale_segment_raises():
    """A segment whose name and header say it starts inside the previous one."""
    files, keys, _ = four_segments()
    second = sorted(files)[1]
    inside = parse_segment_name(os.path.basename(second)) - 100
    extra = os.path.join(D, segment_name(inside))
    fake = encode_segment_header(DB_ID, inside)
    assert_refused_unchanged(fs_with({**files, extra: fake + b"\x00" * 200}), match="stale")


def test_segment_of_another_database_raises():
    files, _, _ = four_segments()
    fs = new_fs()
    other, _ = write_log(fs, noops(16, 1200, seed=7), segment_size=4096, db_id=OTHER_DB_ID)
    other.close()
    foreign = fs.durable_snapshot()
    assert sorted(foreign) == sorted(files)  # same layout, other id
    for path in sorted(files):
        err = assert_refused_unchanged(fs_with({**files, path: foreign[path]}), match="another database")
        assert path in err.where
    assert_refused_unchanged(fs_with(foreign), match="another database")


@pytest.mark.parametrize("torn", [b"", b"kvsWAL", b"\x00" * 64, b"\xa5" * 64, b"half"], ids=["empty", "part", "zeros", "garbage", "short"])
def test_last_segment_with_torn_header_is_removed(torn):
    """A last segment no longer than a header, with a bad header, is a torn
    creation (L3: no record was written before the header was durable)."""
    files, keys, _ = four_segments()
    end = keys[-1][0] + RECORD_HEADER_SIZE + len(keys[-1][4])
    new_seg = os.path.join(D, segment_name(end))
    fs = fs_with({**files, new_seg: torn})
    log = open_log(fs, segment_size=4096)
    assert not fs.exists(new_seg) and new_seg not in fs.durable_snapshot()
    assert read_all(log) == keys
    lsn = log.append(RecordType.NOOP, 1, b"goes on")
    log.close()
    assert read_all(open_log(fs.crash(DropAll()))) == keys + [(lsn, RecordType.NOOP, 1, NO_LSN, b"goes on")]


def test_torn_header_on_a_segment_that_is_not_last_raises():
    files, _, _ = four_segments()
    second = sorted(files)[1]
    assert_refused_unchanged(fs_with({**files, second: b"\x00" * 64}))


def test_torn_header_with_records_after_it_raises():
    files, _, _ = four_segments()
    last = max(files)
    damaged = bytearray(files[last])
    damaged[0:8] = b"\x00" * 8
    assert_refused_unchanged(fs_with({**files, last: bytes(damaged)}))


def test_other_files_in_the_directory_are_ignored():
    files, keys, _ = four_segments()
    fs = fs_with({**files, "/db/pages.db": b"not a log", "/db/wal-notes.txt": b"hello"})
    log = open_log(fs)
    assert read_all(log) == keys
    log.close()
    assert fs.visible_bytes("/db/pages.db") == b"not a log"


def test_segment_faults_raise_on_the_real_file_system(tmp_path):
    fs = OsFileSystem()
    log, _ = write_log(fs, noops(12, 1200), segment_size=4096, directory=str(tmp_path))
    log.close()
    names = sorted(os.listdir(tmp_path))
    assert len(names) >= 3
    a, b = tmp_path / names[1], tmp_path / names[2]
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    before = tree_hash(tmp_path)
    with pytest.raises(CorruptionError, match="swapped"):
        open_log(fs, str(tmp_path))
    assert tree_hash(tmp_path) == before
    a.write_bytes(da)
    b.write_bytes(db)
    a.unlink()  # a middle segment: names[2] follows it
    before = tree_hash(tmp_path)
    with pytest.raises(CorruptionError, match="gap"):
        open_log(fs, str(tmp_path))
    assert tree_hash(tmp_path) == before


# -- truncation (L6) --------------------------------------------------------------


def test_truncate_before_removes_whole_segments_below_the_lsn():
    fs = new_fs()
    log, keys = write_log(fs, noops(20, 1000), segment_size=4096)
    segs = log.segments()
    assert len(segs) >= 4
    cut = segs[2].first_lsn + 10  # inside the third segment
    removed = log.truncate_before(cut)
    assert removed == segs[2].first_lsn - segs[0].first_lsn
    assert [s.path for s in log.segments()] == [s.path for s in segs[2:]]
    assert all(not fs.exists(s.path) and s.path not in fs.durable_snapshot() for s in segs[:2])  # durable removal
    assert read_all(log) == [k for k in keys if k[0] >= segs[2].first_lsn]
    assert log.truncate_before(cut) == 0  # nothing more to do
    lsn = log.append(RecordType.NOOP, 1, b"after truncation")
    log.close()
    log = open_log(fs.crash(DropAll()), durable_lsn=cut)
    assert read_all(log)[-1] == (lsn, RecordType.NOOP, 1, NO_LSN, b"after truncation")
    assert read_all(log)[0][0] == segs[2].first_lsn
    log.close()


def test_truncate_before_keeps_the_current_segment():
    fs = new_fs()
    log, keys = write_log(fs, noops(20, 1000), segment_size=4096)
    last = log.segments()[-1]
    log.truncate_before(log.end_lsn + 10**9)
    assert [s.path for s in log.segments()] == [last.path]
    assert read_all(log) == [k for k in keys if k[0] >= last.first_lsn]
    log.close()


def test_truncate_before_the_first_segment_end_removes_nothing():
    fs = new_fs()
    log, keys = write_log(fs, noops(20, 1000), segment_size=4096)
    segs = log.segments()
    assert log.truncate_before(segs[1].first_lsn - 1) == 0
    assert log.truncate_before(0) == 0
    assert len(log.segments()) == len(segs) and read_all(log) == keys
    log.close()


def test_open_after_truncation_without_the_durable_lsn_raises():
    """A log that starts after the caller's durable LSN is missing segments."""
    fs = new_fs()
    log, _ = write_log(fs, noops(20, 1000), segment_size=4096)
    log.truncate_before(log.segments()[2].first_lsn)
    log.close()
    assert_refused_unchanged(fs, match="segments are missing")


# -- sync modes -------------------------------------------------------------------


def fsync_threads(fs) -> list[str]:
    names: list[str] = []
    fs.add_hook(lambda ev: names.append(threading.current_thread().name) if ev.kind == "fsync" else None)
    return names


def test_sync_full_commit_wait_makes_the_record_durable():
    fs = new_fs()
    log = open_log(fs, sync="full")
    lsn = log.append(RecordType.COMMIT, 1, b"full")
    log.commit_wait(lsn)
    assert [r.payload for r in durable_records(fs)] == [b"full"]
    log.close()


def test_sync_normal_commit_wait_writes_and_the_syncer_fsyncs_soon():
    fs = new_fs()
    log = open_log(fs, sync="normal")
    threads = fsync_threads(fs)
    lsn = log.append(RecordType.COMMIT, 1, b"normal")
    start = time.monotonic()
    log.commit_wait(lsn)
    me = threading.current_thread().name
    assert me not in threads, "commit_wait fsynced under sync='normal'"
    path = log.segments()[-1].path
    assert fs.visible_bytes(path).endswith(b"normal")  # the OS has it
    while not durable_records(fs):
        assert time.monotonic() - start < 0.5, "the background syncer did not fsync within 0.5 s"
        time.sleep(0.01)
    assert [r.payload for r in durable_records(fs)] == [b"normal"]
    assert threads and me not in threads  # the syncer did it
    assert log.durable_lsn > lsn
    log.close()


def test_sync_off_commit_wait_never_fsyncs():
    fs = new_fs()
    log = open_log(fs, sync="off")
    threads = fsync_threads(fs)
    lsns = [log.append(RecordType.COMMIT, i, b"off %d" % i) for i in range(5)]
    for lsn in lsns:
        log.commit_wait(lsn)
    time.sleep(0.25)  # no background syncer either
    assert threads == [] and log.fsyncs == 0 and durable_records(fs) == []
    assert fs.visible_bytes(log.segments()[-1].path).endswith(b"off 4")
    log.close()  # close flushes in every mode
    assert len(durable_records(fs)) == 5


def test_explicit_flush_is_durable_in_every_sync_mode():
    for mode in ("full", "normal", "off"):
        fs = new_fs()
        log = open_log(fs, sync=mode)
        lsn = log.append(RecordType.CHECKPOINT_END, 0, mode.encode())
        log.flush(lsn)
        assert [r.payload for r in durable_records(fs)] == [mode.encode()]
        log.close()


def test_an_io_end_wakes_only_the_flushes_it_lets_go_on():
    """``LogWriter._wake``: at an I/O's end, the gates of the sleeping
    flushes whose record is written (durable, for a sync flush) open, and
    so does the first one needing each idle stage (it leads it); the rest
    sleep on.  With one condition and ``notify_all``, every committer woke
    at every I/O's end."""
    log = open_log(new_fs())
    saved = log._written_lsn, log._durable_lsn
    try:
        with log._cond:
            log._written_lsn, log._durable_lsn = 200, 100
            cases = [
                ("durable", 90, True), ("written", 150, False), ("no target (close)", 0, False),
                ("first to need an fsync", 150, True), ("second to need an fsync", 180, True),
                ("first to need a write", 250, False), ("second to need a write", 300, True),
            ]
            gates = {}
            for name, target, sync in cases:
                gates[name] = gate = threading.Lock()
                gate.acquire()
                log._sleepers.append((target, sync, gate))
            log._wake()
            woken = {name for name, gate in gates.items() if gate.acquire(blocking=False)}
            assert woken == {"durable", "written", "no target (close)", "first to need an fsync", "first to need a write"}
            assert [(t, s) for t, s, _ in log._sleepers] == [(180, True), (300, True)]
            # while both stages run, only the satisfied go on
            log._io_busy = log._syncing = True
            log._written_lsn = 300
            log._wake()
            assert not gates["second to need an fsync"].acquire(blocking=False)
            assert not gates["second to need a write"].acquire(blocking=False)
            log._durable_lsn = 300
            log._wake()
            assert gates["second to need an fsync"].acquire(blocking=False) and gates["second to need a write"].acquire(blocking=False)
            assert log._sleepers == []
            log._io_busy = log._syncing = False
    finally:
        log._written_lsn, log._durable_lsn = saved
    log.close()


def test_eight_threads_flushing_at_once_all_return():
    """No flush is left asleep: eight threads appending and flushing, half
    of them durably, all finish."""
    log = open_log(new_fs(3))
    done = []

    def work(i: int) -> None:
        for n in range(200):
            lsn = log.append(RecordType.NOOP, i + 1, b"%d-%d" % (i, n))
            log.flush(lsn, sync=i % 2 == 0)
        done.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(done) == list(range(8))
    log.close()


def test_a_flush_woken_to_lead_that_meets_the_poison_wakes_the_others():
    """A sleeper released to lead the next write that finds the log poisoned
    (say a segment removal failed meanwhile) raises without leading; the
    sleepers kept waiting for that write are woken to raise too, not left
    asleep for good."""
    from wal.errors import PoisonedError

    log = open_log(new_fs(4))
    lsns = [log.append(RecordType.NOOP, 1, b"a"), log.append(RecordType.NOOP, 1, b"b")]
    raised = []

    def flush(lsn: int) -> None:
        try:
            log.flush(lsn)
        except PoisonedError:
            raised.append(lsn)

    with log._cond:
        log._io_busy = True  # a write in flight: both flushes sleep
    threads = [threading.Thread(target=flush, args=(lsn,)) for lsn in lsns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(log._sleepers) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(log._sleepers) == 2
    with log._cond:
        log._io_busy = False
        log._wake()  # the write ended: the first is released to lead, the second kept
        assert len(log._sleepers) == 1
        log._poison = PoisonedError("removing a segment failed (injected)", OSError(5, "EIO"))
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a flush was left asleep"
    assert sorted(raised) == lsns
    log.close()
