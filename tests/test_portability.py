"""The portable fallbacks of the file-system seam (``pages/fs.py``, "Portability").

Where ``os.pread``/``os.pwrite``, ``fcntl`` or directory fsyncs are missing
(Windows), ``OsFileSystem`` positions its reads and writes with ``os.lseek``
under a per-file mutex, locks the ``LOCK`` file with ``msvcrt.locking``, and
skips directory fsyncs.  ``OsFileSystem(portable=True)`` -- or
``KVSTORE_PORTABLE=1`` in the environment -- selects those paths on Linux, so
they are tested here:

1. The switch: what each setting selects, and that a platform that lacks the
   POSIX calls gets the fallbacks without it.
2. Real workloads through ``kvstore.open`` on a "Windows-like" process: the
   POSIX calls are *taken away* (``os.pread`` and ``os.pwrite`` deleted,
   ``fcntl`` unimportable, ``os.open`` of a directory raising PermissionError
   as on Windows) and ``msvcrt`` is a stand-in, so any path that still used
   a POSIX call fails instead of quietly passing.
3. The msvcrt lock: the calls it makes, and a second open refused with
   ``DatabaseLockedError`` (SPEC "Opening").
4. A child process in portable mode (through ``KVSTORE_PORTABLE=1``)
   SIGKILLed mid-stream, also at failpoints inside checkpoints, while the
   parent's own open is refused by the lock; reopened, every acknowledged
   commit is there and ``db.check()`` passes.

The stand-in ``msvcrt`` (``FAKE_MSVCRT`` below) has the real module's
constants and ``locking(fd, mode, nbytes)`` semantics for the modes kvstore
uses: ``LK_NBLCK`` raises ``OSError(EACCES)`` when another handle -- in this
process or another -- holds the region, ``LK_UNLCK`` raises it for a region
that is not locked.  It keeps the lock with ``flock`` underneath, so that it
excludes other processes and dies with a SIGKILLed one, as Windows' does, and
it records every call (in ``calls``, and in ``$FAKE_MSVCRT_LOG`` if set).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import kvstore
import pages.fs as fs_module
from kvstore import DatabaseLockedError
from pages.fs import OsFileSystem, _OsFile, _SeekingFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_MSVCRT = '''\
"""A stand-in for Windows' msvcrt (locking only), written by tests/test_portability.py."""
import errno
import fcntl as _fcntl
import os

LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4
calls = []  # (mode, nbytes, file offset, outcome)
_locked = set()  # descriptors holding their region


def _record(fd, mode, nbytes, pos, outcome):
    calls.append((mode, nbytes, pos, outcome))
    log = os.environ.get("FAKE_MSVCRT_LOG")
    if log:
        line = "%d %d %d %s %d\\n" % (mode, nbytes, pos, outcome, os.getpid())
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(log_fd, line.encode())
        finally:
            os.close(log_fd)


def locking(fd, mode, nbytes):
    pos = os.lseek(fd, 0, os.SEEK_CUR)  # the region starts at the file offset
    if pos != 0 or nbytes != 1 or mode not in (LK_NBLCK, LK_UNLCK):
        _record(fd, mode, nbytes, pos, "unexpected")
        raise OSError(errno.EINVAL, "the stand-in only knows byte 0 with LK_NBLCK/LK_UNLCK")
    if mode == LK_NBLCK:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            _record(fd, mode, nbytes, pos, "refused")
            raise OSError(errno.EACCES, "Permission denied") from None
        _locked.add(fd)
        _record(fd, mode, nbytes, pos, "locked")
    else:
        if fd not in _locked:
            _record(fd, mode, nbytes, pos, "refused")
            raise OSError(errno.EACCES, "Permission denied")
        _locked.discard(fd)
        _fcntl.flock(fd, _fcntl.LOCK_UN)
        _record(fd, mode, nbytes, pos, "unlocked")
'''

WINDOWS_CALLS = {"positioned_io": "lseek+read/write", "lock": "msvcrt", "dir_fsync": "skipped"}


@pytest.fixture
def fake_msvcrt(tmp_path, monkeypatch):
    """The stand-in msvcrt, importable as ``msvcrt`` in this process."""
    d = tmp_path / "fake-msvcrt"
    d.mkdir()
    (d / "msvcrt.py").write_text(FAKE_MSVCRT)
    spec = importlib.util.spec_from_file_location("msvcrt", d / "msvcrt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "msvcrt", module)
    module.directory = str(d)
    return module


def take_away_posix(monkeypatch):
    """Make this process look like Windows to pages.fs: no os.pread/os.pwrite,
    no fcntl, and directories that cannot be opened."""
    monkeypatch.delattr(os, "pread")
    monkeypatch.delattr(os, "pwrite")
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    real_open = os.open

    def open_no_directories(path, flags, mode=0o777, *, dir_fd=None):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied (a directory, as on Windows)", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_no_directories)


@pytest.fixture
def windows_like(fake_msvcrt, monkeypatch):
    """A portable OsFileSystem in a process without the POSIX calls."""
    take_away_posix(monkeypatch)
    fs = OsFileSystem(portable=True)
    assert fs.calls == WINDOWS_CALLS
    return fs


def lock_calls(fake, outcome=None):
    return [c for c in fake.calls if outcome is None or c[3] == outcome]


# --- 1. the switch -------------------------------------------------------------------------


def test_portable_true_selects_every_fallback_where_msvcrt_exists(fake_msvcrt):
    fs = OsFileSystem(portable=True)
    assert fs.portable is True
    assert fs.calls == WINDOWS_CALLS


def test_portable_true_keeps_flock_where_there_is_no_msvcrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    assert OsFileSystem(portable=True).calls == {"positioned_io": "lseek+read/write", "lock": "flock", "dir_fsync": "skipped"}


def test_portable_false_uses_the_posix_calls_even_where_msvcrt_exists(fake_msvcrt, tmp_path):
    fs = OsFileSystem(portable=False)
    assert fs.calls == {"positioned_io": "pread/pwrite", "lock": "flock", "dir_fsync": "fsync"}
    with fs.create(str(tmp_path / "f")) as f:
        assert type(f) is _OsFile
    fs.lock(str(tmp_path / "LOCK")).release()
    assert fake_msvcrt.calls == []


@pytest.mark.parametrize(
    "value, portable",
    [("1", True), ("yes", True), ("0", False), ("", False), (None, False)],
)
def test_environment_variable_is_the_default_switch(monkeypatch, fake_msvcrt, value, portable):
    if value is None:
        monkeypatch.delenv("KVSTORE_PORTABLE", raising=False)
    else:
        monkeypatch.setenv("KVSTORE_PORTABLE", value)
    fs = OsFileSystem()
    assert fs.portable is portable
    assert (fs.calls == WINDOWS_CALLS) is portable
    assert fs_module.PORTABLE_ENV == "KVSTORE_PORTABLE"


def test_kvstore_open_follows_the_environment_variable(tmp_path, monkeypatch, fake_msvcrt):
    monkeypatch.setenv("KVSTORE_PORTABLE", "1")
    with kvstore.open(tmp_path / "db") as db:
        db.put(b"k", b"v")
        assert db._fs.calls == WINDOWS_CALLS
    assert [c[3] for c in fake_msvcrt.calls] == ["locked", "unlocked"]


def test_a_platform_without_the_posix_calls_gets_the_fallbacks_unasked(fake_msvcrt, monkeypatch):
    take_away_posix(monkeypatch)
    monkeypatch.setattr(fs_module, "CAN_FSYNC_DIRECTORIES", False)  # what os.name == "nt" sets
    fs = OsFileSystem(portable=False)
    assert fs.calls == WINDOWS_CALLS


def test_a_platform_with_no_lock_at_all_refuses_to_open(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    fs = OsFileSystem(portable=False)
    assert fs.calls["lock"] == "none"
    with pytest.raises(OSError) as e:
        kvstore.open(tmp_path / "db", _fs=fs)
    assert e.value.errno == errno.ENOSYS


def test_files_are_opened_binary_where_the_platform_has_o_binary(tmp_path, monkeypatch):
    seen = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *, dir_fd=None):
        seen.append((os.path.basename(path), flags))
        return real_open(path, flags & ~0x40000000, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "O_BINARY", 0x40000000, raising=False)  # not a Linux flag: stripped above
    monkeypatch.setattr(os, "open", recording_open)
    with kvstore.open(tmp_path / "db", _fs=OsFileSystem(portable=True)) as db:
        db.put(b"k", b"v")
    files = [(name, flags) for name, flags in seen if not os.path.isdir(tmp_path / "db" / name) and name != "db"]
    assert {name for name, _ in files} >= {"LOCK", "pages.db.tmp"}
    assert all(flags & 0x40000000 for _, flags in files), files


# --- 2. real workloads on the fallbacks ----------------------------------------------------


def test_seeking_file_reads_and_writes_at_their_offsets(windows_like, tmp_path):
    f = windows_like.create(str(tmp_path / "f"))
    assert isinstance(f, _SeekingFile)
    f.pwrite(10, b"world")
    f.pwrite(0, b"hello")
    assert f.pread(0, 5) == b"hello"
    assert f.pread(5, 5) == b"\0" * 5  # the hole reads as zeros
    assert f.pread(10, 100) == b"world"  # short only at the end of the file
    assert f.size() == 15
    f.fsync()
    f.truncate(7)
    assert f.pread(0, 100) == b"hello\0\0"
    f.close()


def test_seeking_file_keeps_concurrent_reads_and_writes_apart(windows_like, tmp_path, monkeypatch):
    """The mutex: between one thread's lseek and its read another thread's
    lseek must not move the shared offset.  The seek is slowed down so that,
    without the mutex, threads interleave there on almost every call."""
    real_lseek = os.lseek

    def slow_lseek(fd, pos, how):
        result = real_lseek(fd, pos, how)
        time.sleep(0.0002)
        return result

    monkeypatch.setattr(os, "lseek", slow_lseek)
    block = 64
    f = windows_like.create(str(tmp_path / "f"))
    f.pwrite(0, bytes(block * 8))
    errors = []

    def worker(n):
        rng = random.Random(n)
        for round_ in range(40):
            mine = bytes([n * 16 + round_ % 16]) * block
            f.pwrite(n * block, mine)
            got = f.pread(n * block, block)
            if got != mine:
                errors.append((n, round_, got[:4]))
            other = rng.randrange(8)
            data = f.pread(other * block, block)
            if len(set(data)) > 1:
                errors.append((n, "torn block", other))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    assert not errors, errors[:5]


def _write_workload(db, model, rng, n, big_every=50):
    """``n`` transactions of puts and deletes, mirrored into ``model``."""
    for i in range(n):
        with db.transaction() as tx:
            for _ in range(rng.randrange(1, 6)):
                key = b"key/%05d" % rng.randrange(400)
                if model and rng.random() < 0.15:
                    tx.delete(key)
                    model.pop(key, None)
                else:
                    size = 9000 if i % big_every == 0 else rng.randrange(0, 300)  # some overflow values
                    value = rng.randbytes(size)
                    tx.put(key, value)
                    model[key] = value


def test_workload_through_kvstore_open_on_the_fallbacks(windows_like, fake_msvcrt, tmp_path, monkeypatch):
    """Puts, deletes, concurrent db.run and scans, checkpoints, log
    truncation, a backup, close and reopen -- all on the fallbacks, with
    the POSIX calls gone.  Then the same files open with the POSIX calls:
    the fallbacks write the same format."""
    path, copy = tmp_path / "db", tmp_path / "copy"
    rng = random.Random(9)
    model: dict[bytes, bytes] = {}
    opts = dict(checkpoint_wal_bytes=64 * 1024, cache_size=256 * 1024)  # segment rolls, truncation, evictions
    db = kvstore.open(path, _fs=windows_like, **opts)
    _write_workload(db, model, rng, 150)
    first = db.checkpoint()
    assert first["pages_written"] > 0

    # threads: counters through db.run while readers scan
    stop = threading.Event()
    problems: list[str] = []

    def bump(n):
        for _ in range(30):
            db.run(lambda tx: tx.put(b"counter/%d" % n, b"%d" % (int(tx.get(b"counter/%d" % n, b"0")) + 1)))

    def reader():
        while not stop.is_set():
            pairs = list(db.scan(b"key/", b"key0"))
            if [k for k, _ in pairs] != sorted(k for k, _ in pairs):
                problems.append("scan out of order")

    writers = [threading.Thread(target=bump, args=(n,)) for n in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not problems
    for n in range(4):
        model[b"counter/%d" % n] = b"30"

    _write_workload(db, model, rng, 150)
    report = db.backup(copy)
    assert report
    at_backup = dict(model)
    _write_workload(db, model, rng, 50)
    assert db.stats()["checkpoints"] >= 1
    db.check()
    db.close()

    for where, expected in ((path, model), (copy, at_backup)):
        with kvstore.open(where, _fs=OsFileSystem(portable=True), **opts) as db:
            assert dict(db.scan()) == expected
            db.check()
    # each open took the lock with LK_NBLCK and each close gave it back
    outcomes = [c[3] for c in fake_msvcrt.calls]
    assert outcomes == ["locked", "unlocked"] * 3, outcomes

    monkeypatch.undo()  # the POSIX calls are back
    native = OsFileSystem(portable=False)
    assert native.calls["positioned_io"] == "pread/pwrite"
    with kvstore.open(path, _fs=native, **opts) as db:
        assert dict(db.scan()) == model
        db.put(b"native", b"1")
        model[b"native"] = b"1"
    with kvstore.open(path, _fs=OsFileSystem(portable=True), **opts) as db:
        assert dict(db.scan()) == model


def test_directory_fsyncs_are_skipped_only_on_the_fallback(tmp_path, monkeypatch, fake_msvcrt):
    """Portable: no directory is ever opened (Windows cannot).  Native: the
    same work fsyncs the database directory (S2), so the skip is the switch's."""
    opened_dirs = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *, dir_fd=None):
        if os.path.isdir(path):
            opened_dirs.append(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", recording_open)
    with kvstore.open(tmp_path / "p", _fs=OsFileSystem(portable=True)) as db:
        db.put(b"k", b"v")
        db.checkpoint()
    assert opened_dirs == []
    with kvstore.open(tmp_path / "n", _fs=OsFileSystem(portable=False)) as db:
        db.put(b"k", b"v")
    assert str(tmp_path / "n") in opened_dirs


# --- 3. the msvcrt lock --------------------------------------------------------------------


def test_msvcrt_lock_takes_one_byte_at_offset_zero_and_gives_it_back(windows_like, fake_msvcrt, tmp_path):
    db = kvstore.open(tmp_path / "db", _fs=windows_like)
    assert fake_msvcrt.calls == [(fake_msvcrt.LK_NBLCK, 1, 0, "locked")]
    db.close()
    assert fake_msvcrt.calls[1:] == [(fake_msvcrt.LK_UNLCK, 1, 0, "unlocked")]


def test_msvcrt_lock_refuses_a_second_open_with_database_locked_error(windows_like, fake_msvcrt, tmp_path, monkeypatch):
    """The OS lock, not the in-process set, must refuse it: the set is
    emptied first, as it is in another process."""
    path = tmp_path / "db"
    db = kvstore.open(path, _fs=windows_like)
    db.put(b"k", b"v")
    monkeypatch.setattr(OsFileSystem, "_held", set())
    before = os.listdir(path)
    with pytest.raises(DatabaseLockedError):
        kvstore.open(path, _fs=OsFileSystem(portable=True))
    assert [c[3] for c in fake_msvcrt.calls] == ["locked", "refused"]
    assert os.listdir(path) == before
    assert db.get(b"k") == b"v"  # the refused open did not disturb the holder
    db.close()
    with kvstore.open(path, _fs=OsFileSystem(portable=True)) as again:
        assert again.get(b"k") == b"v"
    assert [c[3] for c in fake_msvcrt.calls] == ["locked", "refused", "unlocked", "locked", "unlocked"]


def test_msvcrt_lock_is_exclusive_within_one_process(windows_like, tmp_path):
    path = str(tmp_path / "LOCK")
    held = windows_like.lock(path)
    with pytest.raises(BlockingIOError):
        OsFileSystem(portable=True).lock(path)
    held.release()
    held.release()  # idempotent
    OsFileSystem(portable=True).lock(path).release()


def test_msvcrt_errors_other_than_a_held_region_are_not_called_locked(windows_like, fake_msvcrt, tmp_path, monkeypatch):
    def broken(fd, mode, nbytes):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fake_msvcrt, "locking", broken)
    with pytest.raises(OSError) as e:
        kvstore.open(tmp_path / "db", _fs=windows_like)
    assert e.value.errno == errno.EBADF and not isinstance(e.value, BlockingIOError)


# --- 4. SIGKILL in portable mode ------------------------------------------------------------

CHILD = """
import json, os, sys, threading, time
sys.path[:0] = [{fake_dir!r}, {root!r}]
import msvcrt  # the stand-in, which keeps its own reference to fcntl
del os.pread, os.pwrite
sys.modules["fcntl"] = None
import kvstore

start = int(sys.argv[2])
db = kvstore.open(sys.argv[1], checkpoint_wal_bytes=32 * 1024, cache_size=128 * 1024)
print(json.dumps(db._fs.calls), flush=True)

def checkpoints():
    while True:
        time.sleep(0.01)
        db.checkpoint()

threading.Thread(target=checkpoints, daemon=True).start()
i = start
while True:
    with db.transaction() as tx:
        tx.put(b"k%06d" % i, b"v%d" % i * 20)
        tx.put(b"last", b"%d" % i)
    print(i, flush=True)  # acknowledged: the commit returned (sync="full")
    i += 1
"""


def _expected(i: int) -> bytes:
    return b"v%d" % i * 20


@pytest.mark.parametrize("failpoint", [None, "pages.before_meta_fsync=kill@4", "wal.before_roll_fsync=kill@3"])
def test_sigkilled_portable_child_loses_no_acknowledged_commit(fake_msvcrt, tmp_path, monkeypatch, failpoint):
    """A child on the fallbacks (KVSTORE_PORTABLE=1, the POSIX calls gone)
    commits and checkpoints until it is SIGKILLed -- by the parent, or at a
    failpoint inside a checkpoint or a segment roll.  While it runs, the
    parent's own open is refused by the msvcrt lock.  Three rounds, each
    reopened (and recovered) by the next child and checked by the parent."""
    take_away_posix(monkeypatch)
    path = str(tmp_path / "db")
    log = str(tmp_path / "msvcrt.log")
    env = dict(os.environ, KVSTORE_PORTABLE="1", FAKE_MSVCRT_LOG=log)
    env.pop("KVSTORE_FAILPOINTS", None)
    if failpoint:
        env["KVSTORE_FAILPOINTS"] = failpoint
    code = textwrap.dedent(CHILD.format(fake_dir=fake_msvcrt.directory, root=ROOT))
    acked = -1  # the last acknowledged commit so far
    started = locked_out = 0
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", code, path, str(acked + 1)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = child.stdout.readline()
            if first:  # else a failpoint killed it while it opened
                started += 1
                assert json.loads(first) == WINDOWS_CALLS
                target = acked + 60
                for line in child.stdout:
                    acked = int(line)
                    if acked >= target:
                        break
                if child.poll() is None:
                    try:
                        kvstore.open(path, _fs=OsFileSystem(portable=True)).close()
                    except DatabaseLockedError:
                        locked_out += 1
                    else:  # only if a failpoint killed the child meanwhile
                        assert child.wait(timeout=30) == -signal.SIGKILL, "opened while the child held the lock"
                    if child.poll() is None:
                        child.send_signal(signal.SIGKILL)
                for line in child.stdout.read().split():  # acknowledged before the kill landed
                    acked = int(line)
            child.wait(timeout=30)
            err = child.stderr.read()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err
        with kvstore.open(path, _fs=OsFileSystem(portable=True)) as db:
            present = dict(db.scan(b"k", b"l"))
            for i in range(acked + 1):
                assert present.get(b"k%06d" % i) == _expected(i), f"round {round_}: acknowledged commit {i} lost"
            last = int(db.get(b"last", b"-1"))
            assert last in (acked, acked + 1)  # besides the acknowledged, at most the one in flight
            assert set(present) == {b"k%06d" % i for i in range(last + 1)}
            db.check()
        acked = last
    if failpoint is None:
        assert started == 3 and locked_out == 3 and acked >= 170, (started, locked_out, acked)
    else:  # the failpoint usually kills the child before the parent does
        assert started >= 2 and acked > 0, (started, acked)
    with open(log) as f:
        child_calls = [line.split() for line in f]
    # every child locked through msvcrt; none unlocked (all were killed)
    assert sum(1 for c in child_calls if c[3] == "locked") >= started
    assert not any(c[3] == "unlocked" for c in child_calls)
