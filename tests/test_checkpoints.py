"""Checkpoints (SPEC "Checkpoints, backup, inspection", guarantees 1, 5, 6):
WAL truncation, the time trigger, db.checkpoint()'s report, failing
checkpoints (a failed page write leaves the previous image and the log intact
and the store working; a failed fsync poisons it), and how recovery is
reported.  FaultFS (pages.faultfs) where a test needs an I/O error or a crash.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time

import pytest

import kvstore
from kvstore import ClosedError, ConflictError
from pages.faultfs import DropAll, FaultFS, KeepAll
from wal.errors import PoisonedError

DB = "/db"
MiB = 2**20


def wal_dir_bytes(path: str) -> int:
    """The size of every file in ``path`` whose name contains "wal"
    (a segment removed while we look counts as gone)."""
    total = 0
    for name in os.listdir(path):
        if "wal" in name:
            try:
                total += os.path.getsize(os.path.join(path, name))
            except FileNotFoundError:
                pass
    return total


def read_all(fs: FaultFS) -> dict[bytes, bytes]:
    db = kvstore.open(DB, _fs=fs, create=False)
    try:
        data = dict(db.scan())
        db._check_structures()
        assert db.prepared() == []
    finally:
        db.close()
    return data


# --- WAL truncation ---------------------------------------------------------------------------


def truncation_workload(path: str, sync: str, limit: int, threads: int = 1) -> dict:
    """Write 20x ``limit`` of log with a read-only snapshot open throughout
    (it pins undo, not log); return the figures.  Checks that the reader
    still sees its snapshot at the end and a fresh reader the last writes."""
    db = kvstore.open(path, sync=sync, checkpoint_wal_bytes=limit, checkpoint_interval=3600)
    keys = [b"k%03d" % i for i in range(64)]
    with db.transaction() as tx:
        for k in keys:
            tx.put(k, b"initial " + k)
    reader = db.begin(readonly=True)
    start = db._wal.end_lsn
    target = start + 20 * limit
    biggest = [wal_dir_bytes(path)]
    latest: dict[bytes, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while db._wal.end_lsn < target:
                vals = {rng.choice(keys) + b"/%d" % seed: rng.randbytes(1000) for _ in range(4)}  # incompressible
                with db.transaction() as tx:  # each thread writes its own keys: no conflicts
                    for k, v in vals.items():
                        tx.put(k, v)
                with lock:
                    latest.update(vals)
                    biggest[0] = max(biggest[0], wal_dir_bytes(path))
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=writer, args=(s,)) for s in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    st = db.stats()
    written = db._wal.end_lsn - start
    assert written >= 20 * limit
    assert st["checkpoint_errors"] == 0, st["last_checkpoint_error"]
    # The reader's snapshot is intact: the initial values, none of the new keys.
    assert dict(reader.scan()) == {k: b"initial " + k for k in keys}
    reader.commit()
    tx = db.begin(readonly=True)
    assert all(tx.get(k) == v for k, v in latest.items())
    tx.commit()
    db._check_structures()
    final = wal_dir_bytes(path)
    db.close()
    return {"written": written, "biggest": biggest[0], "final": final, "checkpoints": st["checkpoints"], "wal_bytes": st["wal_bytes"]}


def test_wal_stays_under_twice_checkpoint_wal_bytes_with_a_reader_open(tmp_path):
    """sync="full", one writer.  (A slow checkpoint under sync="off": the
    write stall, tested below.)"""
    limit, sync = 1 * MiB, "full"
    f = truncation_workload(str(tmp_path / "db"), sync, limit)
    print(f"\nWAL truncation ({sync}): {f['written'] / MiB:.1f} MiB of log, {f['checkpoints']} checkpoints, "
          f"WAL files at most {f['biggest'] / MiB:.2f} MiB (limit {2 * limit / MiB:.0f} MiB)")
    assert f["checkpoints"] >= 10
    assert f["biggest"] < 2 * limit, f"WAL files reached {f['biggest']} bytes with checkpoint_wal_bytes={limit}"
    assert f["final"] < 2 * limit and f["wal_bytes"] < 2 * limit


def test_wal_stays_bounded_while_a_checkpoint_is_slow(tmp_path):
    from wal.failpoints import arm, disarm

    arm("recovery.checkpoint_before_flip", lambda: time.sleep(1.0), after=2, times=1)
    try:
        f = truncation_workload(str(tmp_path / "db"), "off", 1 * MiB)
    finally:
        disarm("recovery.checkpoint_before_flip")
    assert f["biggest"] < 2 * MiB, f"WAL files reached {f['biggest'] / MiB:.1f} MiB with checkpoint_wal_bytes=1 MiB"


# --- the time trigger -------------------------------------------------------------------------


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_checkpoint_interval_triggers_a_checkpoint_by_time(tmp_path):
    db = kvstore.open(tmp_path / "db", checkpoint_interval=0.2, checkpoint_wal_bytes=1 << 40)
    base = db.stats()
    db.put(b"k", b"v")
    assert wait_for(lambda: db.stats()["checkpoints"] > base["checkpoints"], 5), "no checkpoint within 5 s at a 0.2 s interval"
    st = db.stats()
    assert st["last_checkpoint_lsn"] > base["last_checkpoint_lsn"]
    assert st["last_checkpoint_time"] >= base["last_checkpoint_time"]
    db.put(b"k2", b"v")
    n = db.stats()["checkpoints"]
    assert wait_for(lambda: db.stats()["checkpoints"] > n, 5), "the trigger fired only once"
    db.close()


def test_no_time_checkpoint_before_the_interval(tmp_path):
    db = kvstore.open(tmp_path / "db", checkpoint_interval=30.0, checkpoint_wal_bytes=1 << 40)
    n = db.stats()["checkpoints"]
    db.put(b"k", b"v")
    time.sleep(0.5)
    assert db.stats()["checkpoints"] == n
    db.close()


def test_an_idle_database_stops_checkpointing(tmp_path):
    db = kvstore.open(tmp_path / "db", checkpoint_interval=0.1, checkpoint_wal_bytes=1 << 40)
    base = db.stats()["checkpoints"]
    db.put(b"k", b"v")
    assert wait_for(lambda: db.stats()["checkpoints"] > base, 5)
    time.sleep(0.3)  # let a checkpoint in flight finish
    n = db.stats()["checkpoints"]
    time.sleep(1.0)  # ten intervals with nothing written
    idle = db.stats()["checkpoints"] - n
    db.close()
    assert idle == 0, f"{idle} checkpoints in 1 s of idleness"


# --- db.checkpoint() ----------------------------------------------------------------------------


def test_checkpoint_returns_the_spec_fields_with_sane_values(tmp_path):
    path = str(tmp_path / "db")
    limit = 1 * MiB  # segments of 256 KiB; no WAL-size trigger below 1 MiB of log
    db = kvstore.open(path, sync="off", checkpoint_wal_bytes=limit, checkpoint_interval=3600)
    before = db.stats()
    rng = random.Random(5)
    n = 0
    while db.stats()["wal_segments"] < 3:  # two whole segments below the end
        db.put(b"key%05d" % n, rng.randbytes(1000))
        n += 1
    assert db._wal.end_lsn - before["last_checkpoint_lsn"] < 0.9 * limit, "the test needs no automatic checkpoint here"
    mid = db.stats()
    assert mid["checkpoints"] == before["checkpoints"]
    files_before = wal_dir_bytes(path)
    t0 = time.monotonic()
    r = db.checkpoint()
    took = time.monotonic() - t0
    assert {"lsn", "pages_written", "seconds", "wal_bytes_truncated"} <= set(r)
    assert isinstance(r["lsn"], int) and isinstance(r["pages_written"], int) and isinstance(r["wal_bytes_truncated"], int)
    assert isinstance(r["seconds"], float)
    st = db.stats()
    assert before["last_checkpoint_lsn"] < r["lsn"] < db._wal.end_lsn
    assert st["last_checkpoint_lsn"] == r["lsn"]
    assert st["checkpoints"] == mid["checkpoints"] + 1
    assert 0 < r["seconds"] <= took
    assert st["last_checkpoint_seconds"] == r["seconds"]
    # n keys of ~1000 bytes fill at least n/4 leaves, plus internal and undo pages.
    assert n // 4 <= r["pages_written"] <= st["pages"]
    # The whole segments below the checkpoint were removed.
    assert r["wal_bytes_truncated"] >= 2 * (limit // 4)
    assert r["wal_bytes_truncated"] <= mid["wal_bytes"]
    assert st["wal_bytes"] <= mid["wal_bytes"] - r["wal_bytes_truncated"] + 4096
    assert wal_dir_bytes(path) <= files_before - r["wal_bytes_truncated"] + 4096
    assert st["wal_segments"] == 1
    # Nothing changed since: nothing to write or truncate.
    again = db.checkpoint()
    assert again["lsn"] > r["lsn"]
    assert again["pages_written"] == 0
    assert again["wal_bytes_truncated"] == 0
    db.close()
    with kvstore.open(path) as db:
        assert len(dict(db.scan())) == n


# --- failing checkpoints ----------------------------------------------------------------------


def loaded_store(seed: int = 1) -> tuple[FaultFS, kvstore.Database, dict[bytes, bytes]]:
    """A store on FaultFS with dirty pages (no automatic checkpoints)."""
    fs = FaultFS(seed=seed)
    db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
    rng = random.Random(seed)
    model = {}
    for _ in range(40):
        with db.transaction() as tx:
            for _ in range(5):
                k, v = b"k%03d" % rng.randrange(120), rng.randbytes(rng.choice([10, 300]))
                tx.put(k, v)
                model[k] = v
    return fs, db, model


def page_file_writes_of_a_checkpoint() -> int:
    """How many writes of pages.db a checkpoint of ``loaded_store()`` makes."""
    fs, db, _ = loaded_store()
    count = [0]

    def hook(event) -> None:
        if event.kind == "write" and "pages.db" in event.path:
            count[0] += 1

    fs.add_hook(hook)
    db.checkpoint()
    fs.remove_hook(hook)
    db.close()
    return count[0]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("which", ["first-page", "page-table", "meta"])
@pytest.mark.parametrize("then", ["crash", "continue"])
def test_failed_page_write_during_checkpoint(err, which, then):
    writes = page_file_writes_of_a_checkpoint()
    assert writes >= 3
    nth = {"first-page": 1, "page-table": writes - 1, "meta": writes}[which]
    fs, db, model = loaded_store()
    before = db.stats()
    fault = fs.fail("write", nth=nth, errno_=err, path_contains="pages.db")
    with pytest.raises(OSError) as info:
        db.checkpoint()
    assert info.value.errno == err
    assert fault.fired == 1
    fs.clear_faults()
    st = db.stats()
    assert st["checkpoint_errors"] == before["checkpoint_errors"] + 1
    assert st["last_checkpoint_error"] and os.strerror(err) in st["last_checkpoint_error"]
    assert st["checkpoints"] == before["checkpoints"]
    assert st["last_checkpoint_lsn"] == before["last_checkpoint_lsn"]
    assert dict(db.scan()) == model  # reads are fine
    if then == "crash":
        # The previous durable image and the WAL are intact: a power cut now loses nothing.
        assert read_all(fs.crash(DropAll())) == model
        return
    # The store keeps working: commits, then a checkpoint that succeeds.
    for i in range(10):
        db.put(b"after%02d" % i, b"x" * 100)
        model[b"after%02d" % i] = b"x" * 100
    r = db.checkpoint()
    assert r["pages_written"] > 0
    assert db.stats()["checkpoints"] == before["checkpoints"] + 1
    db.put(b"last", b"1")
    model[b"last"] = b"1"
    db._check_structures()
    assert db.check()["ok"]
    assert read_all(fs.crash(DropAll())) == model




@pytest.mark.parametrize(
    "target,then",
    [
        ("pages.db", "crash"),
        ("pages.db", "reopen"),
        ("wal", "crash"),
        ("wal", "reopen"),  # the reopen rewrites the segment the failed fsync marked (wal.fsync_failure)
    ],
)
def test_failed_fsync_during_checkpoint_poisons(target, then):
    """SPEC guarantee 5: never retry an fsync; writes raise until reopened,
    reads still work, and reopening recovers from what is durable."""
    fs, db, model = loaded_store(seed=2)
    fault = fs.fail("fsync", nth=1, errno_=errno.EIO, path_contains=target)
    with pytest.raises((OSError, PoisonedError)):
        db.checkpoint()
    assert fault.fired == 1
    fs.clear_faults()
    st = db.stats()  # inspection still works
    assert st["checkpoint_errors"] == 1 and "Input/output error" in st["last_checkpoint_error"]
    # Every write raises PoisonedError (a ClosedError)...
    with pytest.raises(PoisonedError):
        db.put(b"new", b"1")
    with pytest.raises(ClosedError):
        with db.transaction() as tx:
            tx.put(b"new", b"2")
    with pytest.raises(PoisonedError):
        db.checkpoint()
    # ...and reads still work.
    assert dict(db.scan()) == model
    key = next(iter(model))
    assert db.get(key) == model[key]
    with db.transaction(readonly=True) as tx:
        assert dict(tx.scan()) == model
    if then == "crash":
        assert read_all(fs.crash(DropAll())) == model
        return
    # Reopen (no power cut: the OS page cache is as the failed fsync left it),
    # keep working, then lose power: everything committed must be there.
    db.close()
    with kvstore.open(DB, _fs=fs) as db2:
        assert dict(db2.scan()) == model
        db2.put(b"new", b"3")  # writable again
        db2._check_structures()
    assert read_all(fs.crash(DropAll())) == {**model, b"new": b"3"}


def test_failed_commit_fsync_then_reopen_and_power_cut():
    """The same adoption of a never-durable tail, from a commit's fsync."""
    fs = FaultFS(seed=1)
    db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
    db.put(b"a", b"1")
    fs.fail("fsync", nth=1, errno_=errno.EIO, path_contains="wal")
    with pytest.raises(PoisonedError):
        db.put(b"b", b"2")  # not acknowledged: may be lost, may survive
    fs.clear_faults()
    db.close()
    with kvstore.open(DB, _fs=fs) as db:
        db.put(b"c", b"3")
    data = read_all(fs.crash(DropAll()))
    assert data in ({b"a": b"1", b"c": b"3"}, {b"a": b"1", b"b": b"2", b"c": b"3"})


# --- a checkpoint inside a commit window ------------------------------------------------------


def test_checkpoint_while_commit_prepared_waits_for_its_fsync():
    """A checkpoint taken while commit_prepared waits for its COMMIT record to
    be flushed must not list the transaction as in doubt or unfinished: after
    a crash it is committed, wholly (the regular-commit case is in
    tests/test_crash_db.py; the SIGKILL loop exercises both at random)."""
    fs = FaultFS(seed=9)
    db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
    db.put(b"a", b"0")
    db.put(b"b", b"0")
    tx = db.begin()
    tx.put(b"a", b"1")
    tx.put(b"b", b"1")
    tx.prepare(b"g1")
    waiting, release = threading.Event(), threading.Event()
    real_flush = db._wal.flush
    committer: list[threading.Thread] = []

    def slow_flush(*args, **kwargs):
        if committer and threading.current_thread() is committer[0]:
            waiting.set()
            assert release.wait(10)
        return real_flush(*args, **kwargs)

    db._wal.flush = slow_flush  # type: ignore[method-assign]  # test hook: hold the committer inside its flush
    t = threading.Thread(target=db.commit_prepared, args=(b"g1",))
    committer.append(t)
    t.start()
    assert waiting.wait(10)
    db.checkpoint()  # inside the commit window
    release.set()
    t.join(10)
    del db._wal.flush
    db.put(b"a", b"2")  # a later transaction overwrites one of its keys
    assert read_all(fs.crash(KeepAll())) == {b"a": b"2", b"b": b"1"}


def test_prepared_transaction_stays_in_doubt_across_checkpoint_and_crash():
    fs = FaultFS(seed=10)
    db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
    db.put(b"a", b"0")
    tx = db.begin()
    tx.put(b"a", b"1")
    tx.put(b"c", b"1")
    tx.prepare(b"g2")
    db.checkpoint()
    db.put(b"other", b"x")
    fs = fs.crash(KeepAll())
    db = kvstore.open(DB, _fs=fs)
    assert db.prepared() == [b"g2"]
    assert db.get(b"a") == b"0" and db.get(b"c") is None
    with pytest.raises(ConflictError):
        db.put(b"a", b"9")
    db.checkpoint()
    fs = fs.crash(DropAll())
    db = kvstore.open(DB, _fs=fs)
    assert db.prepared() == [b"g2"]
    db.rollback_prepared(b"g2")
    db.close()
    assert read_all(fs) == {b"a": b"0", b"other": b"x"}


# --- recovery is reported ------------------------------------------------------------------------


def test_recovery_after_an_unclean_shutdown_is_reported(caplog):
    fs = FaultFS(seed=3)
    db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
    for i in range(50):
        db.put(b"k%02d" % i, b"v%d" % i)
    loser = db.begin()
    for i in range(20):
        loser.put(b"loser%02d" % i, b"x")
    db._wal.flush()
    fs = fs.crash(KeepAll())  # a process crash: what the OS had survives
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvstore"):
        db = kvstore.open(DB, _fs=fs)
    st = db.stats()
    assert st["recovery_seconds"] > 0
    assert st["recovery_records_scanned"] >= 50 + 20
    assert st["recovery_transactions_undone"] == 1
    assert st["recovery_ops_redone"] > 0
    assert 0 < st["recovery_pages_redone"] <= st["recovery_ops_redone"]  # each page read once, however many ops
    lines = [r for r in caplog.records if r.name == "kvstore" and r.levelno == logging.INFO and "recover" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    msg = lines[-1].getMessage()
    assert DB in msg and str(st["recovery_records_scanned"]) in msg
    assert dict(db.scan()) == {b"k%02d" % i: b"v%d" % i for i in range(50)}
    db.close()


def test_a_clean_reopen_reports_no_recovery(caplog):
    """A clean close leaves nothing to recover: no records scanned, no
    'recovered' line (regression: the CHECKPOINT_END that close's checkpoint
    appends used to count as a scanned record; fixed in 8a074dc)."""
    fs = FaultFS(seed=4)
    db = kvstore.open(DB, _fs=fs)
    db.put(b"k", b"v")
    db.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvstore"):
        db = kvstore.open(DB, _fs=fs)
    st = db.stats()
    db.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "kvstore" and "recover" in r.getMessage()]
    assert st["recovery_records_scanned"] == 0 and not lines, (st["recovery_records_scanned"], lines)


def test_a_clean_close_leaves_one_small_log_segment_for_the_next_open():
    """Close starts a new segment for its checkpoint, which then removes all
    the older ones: the next open validates a log of a few hundred bytes,
    not the megabytes the last segment had grown to (issue 8's reopen of
    100,000 keys: 141 ms before, 6 ms after)."""
    fs = FaultFS(seed=5)
    db = kvstore.open(DB, _fs=fs, checkpoint_wal_bytes=1 << 22, checkpoint_interval=3600)  # 1 MiB segments
    with db.transaction() as tx:
        for i in range(3000):
            tx.put(b"k%05d" % i, b"v" * 100)
    assert db._wal.end_lsn - db._wal.segments()[-1].first_lsn > 100_000, "setup: the open segment holds the load"
    db.close()
    segments = [n for n in fs.listdir(DB) if n.startswith("wal-")]
    assert len(segments) == 1, segments
    assert len(fs.visible_bytes(f"{DB}/{segments[0]}")) < 1000
    with kvstore.open(DB, _fs=fs) as db:
        assert db.stats()["recovery_records_scanned"] == 0
        assert db.get(b"k02999") == b"v" * 100


def test_checkpoints_purge_and_poisoning_are_logged_to_the_kvstore_logger(caplog):
    """Issue 9's logging: a checkpoint and a purge that freed pages at DEBUG,
    the store turning read-only at ERROR, all on the ``kvstore`` logger and
    naming the database; nothing is printed."""
    fs = FaultFS(seed=4)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kvstore"):
        db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
        for i in range(300):
            db.put(b"k%03d" % (i % 20), b"v" * 300)  # rewrites: undo pages to purge
        db.checkpoint()
        db.purge()
        fs.fail("fsync", errno_=errno.EIO, path_contains="wal")
        with pytest.raises(PoisonedError):
            db.put(b"x", b"1")
        db.close()
    ours = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "kvstore"]
    assert any(level == logging.DEBUG and "checkpoint at LSN" in m for level, m in ours), ours
    assert any(level == logging.DEBUG and "purge freed" in m and DB in m for level, m in ours), ours
    assert any(level == logging.ERROR and "read-only until reopened" in m and DB in m for level, m in ours), ours


def test_checkpoint_meta_waits_for_the_log_it_reflects():
    """The page table a checkpoint's meta names is the one of the moment its
    flip begins, and may reflect log records appended after the checkpoint
    last flushed the log -- here a purge that freed undo pages.  If the meta
    were durable before that record, a crash (SIGKILL: the record never left
    the process) would leave the rollback segment's header, as the
    checkpoint wrote it, pointing at pages the page table calls free (found
    by the long-tier torture: "page N: referenced, but the page has no
    written image").  So the checkpoint flushes the log before the meta."""
    from wal.failpoints import arm, disarm_all

    fs = FaultFS(seed=8)
    db = kvstore.open(DB, _fs=fs, sync="full", checkpoint_wal_bytes=1 << 40, checkpoint_interval=3600)
    model = {}
    reader = db.begin()  # holds the purge back meanwhile
    reader.get(b"k00")
    for i in range(400):  # rewrites: undo pages for purge to free
        k, v = b"k%02d" % (i % 20), b"%d" % i * 40
        db.put(k, v)
        model[k] = v
    paused, resume = threading.Event(), threading.Event()

    def pause() -> None:
        paused.set()
        resume.wait(10)

    arm("recovery.checkpoint_before_flip", pause)
    errors: list[BaseException] = []

    def checkpoint() -> None:
        try:
            db.checkpoint()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ckpt = threading.Thread(target=checkpoint)
    try:
        ckpt.start()
        assert paused.wait(10), "the checkpoint never reached its flip"
        before = db.stats()["purged_undo_pages"]
        reader.commit()
        db.purge()  # frees undo pages in a log record nobody flushes
        assert db.stats()["purged_undo_pages"] > before, "setup: purge freed nothing"
        resume.set()
        ckpt.join(10)
    finally:
        resume.set()
        disarm_all()
    assert not errors, errors
    crashed = fs.crash(KeepAll())  # a process crash: what the OS got survives, the log's queue does not
    assert read_all(crashed) == model  # opens, recovers, structures whole


def test_a_checkpoint_or_compaction_clears_running_when_it_ends_however_it_ends(tmp_path, monkeypatch):
    """``Checkpointer.running`` holds back commits that find the log past
    1.5 times ``checkpoint_wal_bytes`` (the write stall); it is cleared when
    a checkpoint or a compaction ends, by an error too, or every such
    commit would wait out the stall's timeout."""
    db = kvstore.open(str(tmp_path / "db"), checkpoint_interval=3600.0)
    cp = db._checkpointer
    with db.transaction() as tx:
        tx.put(b"k", b"v")
    db.checkpoint()
    assert cp.running is False
    cp.compact()
    assert cp.running is False

    def fail(*args, **kwargs):
        assert cp.running is True  # set while the work runs
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(cp, "_run", fail)
    monkeypatch.setattr(cp, "_compact_quietly", fail)
    with pytest.raises(OSError):
        cp.checkpoint()
    assert cp.running is False
    with pytest.raises(OSError):
        cp.compact()
    assert cp.running is False
    monkeypatch.undo()
    db.close()
