"""I/O errors, bad arguments and failpoints of the write-ahead log.

I/O errors (TESTING.md section 3): for N = 1, 2, ... the Nth write, fsync,
directory fsync, create or remove fails (once, or every time; EIO and
ENOSPC) until the workload runs untouched.  Each time the error must surface to the caller
(never a returned ``flush`` whose record is not durable, checked on the
durable image), a failed write or fsync poisons the log (L4: every later
append, flush and truncate raises PoisonedError, and no fsync is retried, S3),
and after a power cut a reopen finds every acknowledged record (SPEC 5).
Short writes are continued by the seam (S1) and the bytes come out right.

Then bad arguments (TypeError/ValueError saying what was expected), the
failpoints of ``wal.failpoints``, and the bugs found, as strict xfails.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap

import pytest

from kvstore import reliability
from pages.faultfs import DropAll, FaultFS, Torn
from pages.fs import OsFileSystem
from wal import NO_LSN, ClosedError, CorruptionError, PoisonedError, RecordType, WriteAheadLog, failpoints
from wal.format import MAX_PAYLOAD, SEGMENT_HEADER_SIZE, decode_record, decode_segment_header, parse_segment_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DB_ID = bytes.fromhex("6b7673746f72652d77616c2d74657374")
D = "/db"

figures: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _disarm_failpoints():
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if figures:
        print("\nWAL I/O-error figures: " + ", ".join(f"{k} {v}" for k, v in sorted(figures.items())))


def key(rec) -> tuple:
    return (rec.lsn, rec.type, rec.txid, rec.prev_lsn, rec.payload)


def open_log(fs, directory=D, db_id=DB_ID, **kw) -> WriteAheadLog:
    return WriteAheadLog.open(fs, directory, db_id, **kw)


def durable_records(fs: FaultFS) -> list:
    """Records of the durable image, parsed with wal.format alone."""
    out = []
    segs = sorted(
        (parse_segment_name(os.path.basename(p)), data)
        for p, data in fs.durable_snapshot().items()
        if parse_segment_name(os.path.basename(p)) is not None
    )
    for first, data in segs:
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


# -- I/O errors ----------------------------------------------------------------------


class Workload:
    """Appends 14 records of ~700 bytes (segment_size 4096: it rolls), flushes
    every second one (acknowledged), once writes without fsync, and
    truncates the oldest segment.  After each flush that returns, every
    acknowledged record must be in the durable image (L1)."""

    def __init__(self, fs: FaultFS) -> None:
        self.fs = fs
        self.appended: list[tuple] = []
        self.acked = 0
        self.known_durable = 0  # the caller's checkpoint LSN, once it truncates
        self.log: WriteAheadLog | None = None

    def run(self) -> None:
        rng = random.Random(5)
        self.log = log = open_log(self.fs, segment_size=4096)
        for i in range(14):
            payload = rng.randbytes(rng.randint(500, 900))
            lsn = log.append(RecordType.PAGE_REDO, 1, payload)
            self.appended.append((lsn, RecordType.PAGE_REDO, 1, NO_LSN, payload))
            if i == 6:
                log.flush(sync=False)
            elif i % 2:
                log.flush(lsn)
                self.acked = len(self.appended)
                self.check_acked_durable()
        self.known_durable = log.segments()[1].first_lsn  # flushed above: durable
        log.truncate_before(self.known_durable)
        log.close()
        self.acked = len(self.appended)

    def check_acked_durable(self) -> None:
        durable = [key(r) for r in durable_records(self.fs)]
        missing = [k[0] for k in self.appended[: self.acked] if k not in durable]
        assert not missing, f"flush returned but records at LSNs {missing} are not durable"


def check_poisoned(w: Workload, err: BaseException, code: int) -> None:
    """L4 and S3: the error surfaced as PoisonedError carrying the OSError,
    and every later write raises without touching the disk again."""
    log = w.log
    assert isinstance(err, PoisonedError) and isinstance(err, ClosedError), repr(err)
    assert isinstance(err.cause, OSError) and err.cause.errno == code
    assert log.poisoned is not None
    io_before = w.fs.io_points
    with pytest.raises(PoisonedError):
        log.append(RecordType.NOOP, 0, b"after the error")
    if log.durable_lsn < log.end_lsn:  # (a flush with nothing left to do may return)
        with pytest.raises(PoisonedError):
            log.flush()
    with pytest.raises(PoisonedError):
        log.truncate_before(log.end_lsn)
    assert w.fs.io_points == io_before, "a poisoned log wrote, fsynced or removed again"
    log.close()  # closing a poisoned log writes nothing and does not raise
    assert w.fs.io_points == io_before


def check_recovery_after_power_cut(w: Workload, what: str) -> None:
    for plan in w.fs.plans(limit=12):
        log = open_log(w.fs.crash(plan), segment_size=4096, durable_lsn=w.known_durable)
        got = [key(r) for r in log.records()]
        log.close()
        start = next((i for i, k in enumerate(w.appended) if got and k == got[0]), 0)
        assert got == w.appended[start : start + len(got)], f"{what}, {plan!r}: not a run of appended records"
        assert not got or got[0][0] <= w.known_durable, f"{what}, {plan!r}: the log starts too late"
        missing = [k[0] for k in w.appended[: w.acked] if k[0] >= w.known_durable and k not in got]
        assert not missing, f"{what}, {plan!r}: acknowledged records lost at LSNs {missing}"
        figures["crash states after an I/O error"] = figures.get("crash states after an I/O error", 0) + 1


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("op", ["write", "fsync", "fsync_dir", "create", "remove"])
@pytest.mark.parametrize("every", [False, True], ids=["once", "every"])
def test_nth_io_error_surfaces_poisons_and_loses_no_acked_record(op, code, every):
    nth = 1
    while True:
        fs = FaultFS(seed=nth, dirs=[D])
        fault = fs.fail(op, nth=nth, every=every, errno_=code)
        w = Workload(fs)
        try:
            w.run()
        except OSError as e:  # PoisonedError is not an OSError: this came from open
            assert w.log is None and e.errno == code, f"{op} #{nth}: {e!r}"
        except PoisonedError as e:
            check_poisoned(w, e, code)
        else:
            assert fault.fired == 0, f"{op} #{nth} failed but nobody was told"
            figures[f"{op} error points"] = nth - 1
            assert nth > 1, f"the workload never calls {op}"
            return
        assert fault.fired >= 1
        reliability.add("io_error_points")  # one per (op, N, once/every, errno) run that failed
        check_recovery_after_power_cut(w, f"{op} #{nth} failed with {errno.errorcode[code]}")
        if every:  # that call and every later one fail (SQLite's persistent error), for each N
            figures[f"{op} every-time error runs"] = figures.get(f"{op} every-time error runs", 0) + 1
        nth += 1


def test_failed_fsync_is_never_retried():
    """S3/L4: after an fsync error the data may be gone from the durable
    path for good (FaultFS drops it, like Linux); the log must not fsync again
    and report success."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    lsn = log.append(RecordType.COMMIT, 1, b"lost to EIO")
    fs.fail("fsync", errno_=errno.EIO)
    with pytest.raises(PoisonedError) as info:
        log.flush(lsn)
    assert info.value.cause.errno == errno.EIO
    fsyncs = fs.counts["fsync"]
    for _ in range(3):
        with pytest.raises(PoisonedError):
            log.flush(lsn)
        with pytest.raises(PoisonedError):
            log.commit_wait(lsn)
    assert fs.counts["fsync"] == fsyncs
    assert log.durable_lsn <= lsn
    assert durable_records(fs) == []  # the record really is not durable
    log.close()
    assert [key(r) for r in open_log(fs.crash(DropAll())).records()] == []


def test_failed_segment_remove_poisons_the_log():
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=4096)
    for i in range(8):
        log.append(RecordType.NOOP, i, random.Random(i).randbytes(900))
    log.flush()
    fs.fail("remove", errno_=errno.EIO)
    with pytest.raises(PoisonedError):
        log.truncate_before(log.segments()[-1].first_lsn)
    with pytest.raises(PoisonedError):
        log.append(RecordType.NOOP, 1, b"x")
    log.close()
    assert len(list(open_log(fs.crash(DropAll())).records())) == 8


def test_failed_tail_cut_raises_from_open_and_a_later_open_cuts_it():
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    lsn = log.append(RecordType.NOOP, 1, b"good")
    log.close()
    path = log.segments()[0].path
    f = fs.open(path)
    f.pwrite(f.size(), b"\x5a" * 100)  # a torn tail to cut (zeros alone would be the preallocated end)
    f.fsync()
    f.close()
    fs.fail("truncate", errno_=errno.EIO)
    with pytest.raises(OSError):
        open_log(fs)
    fs.clear_faults()
    log = open_log(fs)
    assert [r.lsn for r in log.records()] == [lsn] and log.opened_state.cut
    log.close()


@pytest.mark.parametrize("nbytes", [1, 7, 511, 513])
def test_short_writes_are_continued_and_the_bytes_come_out_right(nbytes):
    """S1: a short pwrite is continued, never mistaken for success."""
    clean = FaultFS(dirs=[D])
    Workload(clean).run()
    expected = clean.durable_snapshot()
    writes = clean.counts["write"]
    for nth in range(1, writes + 1):
        fs = FaultFS(dirs=[D])
        sw = fs.short_write(nth, nbytes)
        w = Workload(fs)
        w.run()
        assert sw.fired == 1
        reliability.add("io_error_points")  # one per (write N, short size) run
        assert fs.durable_snapshot() == expected, f"short write #{nth} of {nbytes} bytes changed the bytes"
        log = open_log(fs.crash(DropAll()), durable_lsn=w.known_durable)
        assert [key(r) for r in log.records()] == [k for k in w.appended if k[0] >= w.known_durable]
        log.close()


# -- bad arguments ----------------------------------------------------------------


@pytest.mark.parametrize("db_id", ["0123456789abcdef", b"short", bytes(17), None, 12345], ids=repr)
def test_db_id_that_is_not_16_bytes_raises_type_error(db_id):
    fs = FaultFS(dirs=[D])
    with pytest.raises(TypeError, match="db_id must be 16 bytes"):
        open_log(fs, db_id=db_id)
    assert fs.snapshot() == {}


def test_bad_sync_mode_raises_value_error_naming_the_modes():
    with pytest.raises(ValueError, match="sync must be one of full, normal, off, not 'fsync'"):
        open_log(FaultFS(dirs=[D]), sync="fsync")


@pytest.mark.parametrize("size", [0, 4095, -1])
def test_tiny_segment_size_raises_value_error(size):
    with pytest.raises(ValueError, match="segment_size must be an int >= 4096"):
        open_log(FaultFS(dirs=[D]), segment_size=size)


def test_negative_durable_lsn_raises_value_error():
    fs = FaultFS(dirs=[D])
    with pytest.raises(ValueError, match="durable_lsn must be an int >= 0"):
        open_log(fs, durable_lsn=-1)
    assert fs.snapshot() == {}


def test_too_large_payload_raises_value_error_and_queues_nothing():
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    end = log.end_lsn
    with pytest.raises(ValueError, match=f"the limit is {MAX_PAYLOAD}"):
        log.append(RecordType.PAGE_REDO, 1, bytes(MAX_PAYLOAD + 1))
    assert log.end_lsn == end
    lsn = log.append(RecordType.PAGE_REDO, 1, b"still works")
    log.close()
    assert [r.lsn for r in open_log(fs.crash(DropAll())).records()] == [lsn]


@pytest.mark.parametrize("payload", ["text", 5, None], ids=repr)
def test_payload_that_is_not_bytes_raises_type_error(payload):
    log = open_log(FaultFS(dirs=[D]))
    with pytest.raises(TypeError):
        log.append(RecordType.NOOP, 1, payload)
    assert log.end_lsn == 0
    log.close()


def test_read_of_an_lsn_before_the_log_raises_value_error():
    fs = FaultFS(dirs=[D])
    log = open_log(fs, durable_lsn=1000)
    log.append(RecordType.NOOP, 1, b"x")
    with pytest.raises(ValueError, match="not in the log"):
        log.read(10)
    log.close()


def test_read_of_an_lsn_inside_a_record_raises_corruption_error():
    log = open_log(FaultFS(dirs=[D]))
    lsn = log.append(RecordType.NOOP, 1, b"x" * 50)
    log.flush()
    with pytest.raises(CorruptionError):
        log.read(lsn + 3)
    log.close()


def test_closed_log_refuses_appends_and_close_is_idempotent():
    log = open_log(FaultFS(dirs=[D]))
    log.append(RecordType.NOOP, 1, b"x")
    log.close()
    log.close()
    with pytest.raises(ClosedError, match="closed"):
        log.append(RecordType.NOOP, 1, b"y")


# -- failpoints -------------------------------------------------------------------


def test_failpoint_fires_after_skipping_and_at_most_times():
    calls = []
    failpoints.arm("t.point", lambda: calls.append(1), after=2, times=2)
    assert failpoints.armed() == ["t.point"]
    for _ in range(6):
        failpoints.failpoint("t.point")
    assert len(calls) == 2 and failpoints.hits("t.point") == 6
    failpoints.disarm("t.point")
    failpoints.failpoint("t.point")
    assert len(calls) == 2 and failpoints.armed() == []
    failpoints.disarm("never.armed")  # no error


def test_unarmed_failpoint_does_nothing():
    failpoints.failpoint("wal.after_append")
    assert failpoints.hits("wal.after_append") == 0


def test_disarm_all_forgets_points_and_hits():
    failpoints.arm("a", lambda: None)
    failpoints.arm("b", lambda: None)
    failpoints.failpoint("a")
    failpoints.disarm_all()
    assert failpoints.armed() == [] and failpoints.hits("a") == 0


def test_arm_rejects_bad_arguments():
    with pytest.raises(TypeError, match="non-empty str"):
        failpoints.arm("", lambda: None)
    with pytest.raises(TypeError, match="non-empty str"):
        failpoints.arm(None, lambda: None)
    with pytest.raises(ValueError, match="after must be >= 0"):
        failpoints.arm("x", lambda: None, after=-1)


@pytest.mark.parametrize(
    "value",
    ["x=kill@0", "x", "x=kill", "x=kill@", "x=boom@1", "x=kill@-1", "x=kill@1.5", "a=kill@1,b"],
)
def test_malformed_failpoint_environment_raises_value_error(value):
    with pytest.raises(ValueError, match="expected name=kill@N with N >= 1"):
        failpoints.load_from_environment(value)


def test_failpoint_environment_with_an_empty_name_raises_value_error():
    with pytest.raises(ValueError, match="expected name=kill@N"):
        failpoints.load_from_environment("=kill@1")


def test_failpoint_environment_arms_kill_at_the_nth_hit():
    failpoints.load_from_environment(" wal.after_append=kill@3 , pages.before_meta_fsync=kill@1,")
    assert failpoints.armed() == ["pages.before_meta_fsync", "wal.after_append"]
    failpoints.disarm_all()  # the action is SIGKILL: never let it fire here
    failpoints.load_from_environment("")
    assert failpoints.armed() == []


def test_wal_reaches_its_named_failpoints():
    names = [
        "wal.after_append", "wal.after_write", "wal.before_fsync", "wal.after_fsync",
        "wal.before_roll_fsync", "wal.before_segment_header_fsync", "wal.before_segment_remove",
        "wal.before_tail_cut_fsync", "wal.before_preallocate_fsync",
    ]
    for name in names:
        failpoints.arm(name, lambda: None)
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=4096)
    for i in range(10):
        log.append(RecordType.NOOP, i, random.Random(i).randbytes(800))
        log.flush()
    checkpoint = log.end_lsn
    log.truncate_before(checkpoint)
    log.append(RecordType.NOOP, 0, random.Random(99).randbytes(1500))
    log.flush(sync=False)
    torn = Torn(len(fs.pending()) - 1, 1, "zero")  # the unsynced record, over preallocated zeros: a torn tail to cut
    log = open_log(fs.crash(torn), durable_lsn=checkpoint)
    log.append(RecordType.NOOP, 0, b"y")  # (into the zeros the cut left none of)
    log.close()
    assert {n: failpoints.hits(n) for n in names if failpoints.hits(n) == 0} == {}


def test_kill_at_a_failpoint_in_a_child_loses_no_acknowledged_record(tmp_path):
    """KVSTORE_FAILPOINTS kills a child at the 4th fsync; every record it
    reported acknowledged is there after reopen (a process crash)."""
    child = textwrap.dedent(
        f"""
        import sys
        from pages.fs import OsFileSystem
        from wal import RecordType, WriteAheadLog
        log = WriteAheadLog.open(OsFileSystem(), {str(tmp_path)!r}, {DB_ID!r}, segment_size=4096)
        for i in range(100):
            lsn = log.append(RecordType.COMMIT, i, b"record %d" % i * 30)
            log.flush(lsn)
            print(lsn, flush=True)
        """
    )
    env = dict(os.environ, KVSTORE_FAILPOINTS="wal.after_fsync=kill@4", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=60, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr.decode()
    acked = [int(x) for x in proc.stdout.split()]
    assert len(acked) >= 2  # open's fsync and the roll's fsyncs count too
    log = open_log(OsFileSystem(), str(tmp_path))
    got = [r.lsn for r in log.records()]
    log.close()
    assert set(acked) <= set(got) and got[: len(acked)] == acked


# -- regressions of bugs found and fixed ---


def test_unknown_record_type_is_refused_at_append():
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    good = log.append(RecordType.NOOP, 1, b"good")
    try:
        with pytest.raises(ValueError):
            log.append(99, 1, b"unknown type")
        with pytest.raises(ValueError):
            log.append(300, 1, b"not a u8")
        with pytest.raises(ValueError):
            log.append(RecordType.NOOP, -1, b"negative txid")
    finally:
        log.flush()  # what was accepted is acknowledged now...
        log.close()
    log = open_log(fs.crash(DropAll()))  # ...and must all come back
    assert log.opened_state.cut == [], "an acknowledged record was cut as a torn tail"
    assert [r.lsn for r in log.records()] == [good]


def test_bad_arguments_to_open_write_nothing():
    fs = FaultFS(dirs=[D])
    for kw in (dict(sync="bogus"), dict(segment_size=100)):
        with pytest.raises(ValueError):
            open_log(fs, **kw)
        assert fs.snapshot() == {} and fs.io_points == 0, f"open({kw}) wrote before refusing its arguments"


def run_child(code: str, timeout: float = 2.5) -> subprocess.CompletedProcess | None:
    """Run ``code`` in a child; None if it hung past ``timeout`` (it is killed)."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                              timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))
    except subprocess.TimeoutExpired:
        return None


HANG_PRELUDE = """
    from pages.faultfs import FaultFS
    from wal import RecordType, WriteAheadLog
    log = WriteAheadLog.open(FaultFS(dirs=["/db"]), "/db", bytes(16))
    log.append(RecordType.NOOP, 1, b"x")
"""


def test_flush_of_an_lsn_past_the_end_does_not_hang():
    proc = run_child(HANG_PRELUDE + """
    try:
        log.flush(log.end_lsn + 100)
    except ValueError:
        print("ValueError")
    else:
        print("returned")
    """)
    assert proc is not None, "flush(end_lsn + 100) hung"
    assert proc.returncode == 0, proc.stderr.decode()


def test_read_of_an_lsn_past_the_end_raises_value_error():
    proc = run_child(HANG_PRELUDE + """
    try:
        log.read(log.end_lsn)
    except ValueError as e:
        print("ValueError", e)
    """)
    assert proc is not None, "read(end_lsn) hung"
    assert proc.returncode == 0 and b"ValueError" in proc.stdout, proc.stderr.decode()


def test_exception_in_the_leader_never_acknowledges_unwritten_records():
    fs = FaultFS(dirs=[D])
    log = open_log(fs, segment_size=4096)

    def interrupt():
        raise KeyboardInterrupt

    failpoints.arm("wal.before_roll_fsync", interrupt, times=1)
    lsns = [log.append(RecordType.COMMIT, i, random.Random(i).randbytes(1000)) for i in range(6)]  # rolls after 5
    with pytest.raises(KeyboardInterrupt):
        log.flush()
    try:
        log.flush()
    except ClosedError:  # poisoned: refusing is a correct answer
        return
    # flush returned: every record must be durable and readable
    assert [r.lsn for r in durable_records(fs)] == lsns
    assert [r.lsn for r in log.records()] == lsns
    log.close()


def test_reopen_after_failed_fsync_then_power_cut_keeps_acked_records():
    """After an fsync error, a reopen without a power cut sees the record the
    kernel dropped from the disk's path in the page cache.  It must make it
    durable (rewrite the segment, as the failed fsync's marker asks) before
    appending after it; otherwise a power cut leaves a hole below an
    acknowledged record, and open raises CorruptionError."""
    fs = FaultFS(dirs=[D])
    log = open_log(fs)
    log.append(RecordType.PAGE_REDO, 1, b"u" * 200)
    fs.fail("fsync")
    with pytest.raises(PoisonedError):
        log.flush()
    log.close()
    fs.clear_faults()
    log = open_log(fs)  # the process restarts; the page cache still shows the record
    acked = log.append(RecordType.COMMIT, 2, b"acknowledged")
    log.flush(acked)
    log.close()
    for plan in fs.plans():
        got = [r.lsn for r in open_log(fs.crash(plan)).records()]
        assert acked in got, f"{plan!r}: acknowledged record lost"
