"""SPEC "Opening": kvstore.open, its arguments, the directory, the lock,
closing, use after close, fork, reopen and durability of commits.

Real file system under tmp_path unless a test needs a power cut (FaultFS).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kvstore
from kvstore import ClosedError, DatabaseLockedError, TransactionError
from pages.faultfs import DropAll, FaultFS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(path) -> dict[str, tuple[int, float]]:
    """Every file under ``path`` with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the directory ---------------------------------------------------------------------


def test_create_makes_the_directory(tmp_path):
    path = tmp_path / "db"
    assert not path.exists()
    with kvstore.open(path, sync="off") as db:
        assert path.is_dir()
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"


def test_create_makes_missing_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "db"
    with kvstore.open(str(path), sync="off") as db:
        db.put(b"k", b"v")
    assert path.is_dir()


def test_open_accepts_str_and_pathlike(tmp_path):
    with kvstore.open(str(tmp_path / "s"), sync="off") as db:
        db.put(b"k", b"v")
    with kvstore.open(tmp_path / "s", sync="off") as db:
        assert db.get(b"k") == b"v"


def test_open_existing_empty_directory_creates_a_database(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    with kvstore.open(path, sync="off") as db:
        db.put(b"k", b"v")
    with kvstore.open(path, create=False, sync="off") as db:
        assert db.get(b"k") == b"v"


def test_create_false_on_missing_path_raises_file_not_found(tmp_path):
    path = tmp_path / "missing"
    with pytest.raises(FileNotFoundError):
        kvstore.open(path, create=False)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_create_false_opens_an_existing_database(tmp_path):
    path = tmp_path / "db"
    with kvstore.open(path, sync="off") as db:
        db.put(b"k", b"v")
    with kvstore.open(path, create=False, sync="off") as db:
        assert db.get(b"k") == b"v"


@pytest.mark.parametrize(
    "names",
    [
        ["notes.txt"],
        ["data.sqlite", "README"],
        ["pages.db.bak"],
        ["LOCK", "other"],  # looks a little like ours, but is not
    ],
)
def test_non_empty_non_database_directory_raises_value_error_and_writes_nothing(tmp_path, names):
    path = tmp_path / "foreign"
    path.mkdir()
    for i, name in enumerate(names):
        (path / name).write_bytes(b"user data %d\n" % i)
    (path / "sub").mkdir()
    before = tree(path)
    contents = {n: (path / n).read_bytes() for n in names}
    with pytest.raises(ValueError):
        kvstore.open(path)
    assert tree(path) == before
    assert {n: (path / n).read_bytes() for n in names} == contents
    with pytest.raises(ValueError):
        kvstore.open(path, create=False)
    assert tree(path) == before


def test_directory_with_only_a_foreign_wal_named_file_is_not_a_database(tmp_path):
    path = tmp_path / "foreign"
    path.mkdir()
    (path / "wal-0000000000000000.log").write_bytes(b"somebody else's log\n")
    before = tree(path)
    try:
        with pytest.raises(ValueError):
            kvstore.open(path, sync="off").close()
    finally:
        after = tree(path)
    assert after == before


def test_only_a_subdirectory_makes_a_directory_foreign(tmp_path):
    path = tmp_path / "foreign"
    (path / "nested").mkdir(parents=True)
    before = tree(path)
    with pytest.raises(ValueError):
        kvstore.open(path)
    assert tree(path) == before


def test_a_regular_file_as_path_raises_value_error_and_is_untouched(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"not a directory")
    with pytest.raises(ValueError):
        kvstore.open(path)
    assert path.read_bytes() == b"not a directory"


def test_directory_holds_page_file_wal_segments_and_lock_only(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="off", checkpoint_wal_bytes=4096)
    try:
        for i in range(200):
            db.put(b"key%05d" % i, b"v" * 100)
        for names in (os.listdir(path), os.listdir(path)):
            assert all(os.path.isfile(path / n) for n in names), names
            wal = [n for n in names if "wal" in n]
            others = sorted(n for n in names if "wal" not in n)
            assert wal, names
            # besides the WAL segments: one page file and one lock file, nothing else
            assert len(others) == 2 and any("lock" in n.lower() for n in others), names
    finally:
        db.close()
    names = os.listdir(path)
    assert len([n for n in names if "wal" not in n]) == 2, names


def test_wal_segments_are_named_wal_while_they_hold_uncheckpointed_commits(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="full")
    try:
        before = {n: (path / n).read_bytes() for n in os.listdir(path)}
        db.put(b"k", b"v" * 1000)
        # (a commit may overwrite preallocated zeros rather than grow the file)
        changed = [n for n in os.listdir(path) if (path / n).read_bytes() != before.get(n)]
        assert changed and all("wal" in n for n in changed), changed  # a commit writes to the log only
    finally:
        db.close()


# --- argument validation -----------------------------------------------------------------

BAD_ARGS = [
    ("sync", "fast", ValueError),
    ("sync", "FULL", ValueError),
    ("sync", None, (ValueError, TypeError)),
    ("sync", 1, (ValueError, TypeError)),
    ("isolation", "repeatable read", ValueError),
    ("isolation", "Serializable", ValueError),
    ("isolation", None, (ValueError, TypeError)),
    ("page_size", 1000, ValueError),
    ("page_size", 4097, ValueError),
    ("page_size", 2048, ValueError),
    ("page_size", 0, ValueError),
    ("page_size", -4096, ValueError),
    ("page_size", 1 << 20, ValueError),
    ("page_size", "4096", (TypeError, ValueError)),
    ("page_size", 4096.0, (TypeError, ValueError)),
    ("page_size", True, (TypeError, ValueError)),
    ("cache_size", -1, ValueError),
    ("cache_size", "big", TypeError),
    ("cache_size", 1.5, TypeError),
    ("cache_size", None, TypeError),
    ("checkpoint_interval", 0, ValueError),
    ("checkpoint_interval", -1.0, ValueError),
    ("checkpoint_interval", float("nan"), ValueError),
    ("checkpoint_interval", "60", TypeError),
    ("checkpoint_interval", None, TypeError),
    ("checkpoint_wal_bytes", 0, ValueError),
    ("checkpoint_wal_bytes", -5, ValueError),
    ("checkpoint_wal_bytes", 1.5, TypeError),
    ("checkpoint_wal_bytes", "64M", TypeError),
]


@pytest.mark.parametrize("name,value,exc", BAD_ARGS, ids=[f"{n}={v!r}" for n, v, _ in BAD_ARGS])
def test_bad_argument_raises_naming_it_and_writes_nothing(tmp_path, name, value, exc):
    path = tmp_path / "db"
    with pytest.raises(exc) as info:
        kvstore.open(path, **{name: value})
    assert name in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize("name,value,exc", BAD_ARGS[:8], ids=[f"{n}={v!r}" for n, v, _ in BAD_ARGS[:8]])
def test_bad_argument_on_an_existing_database_changes_nothing(tmp_path, name, value, exc):
    path = tmp_path / "db"
    with kvstore.open(path, sync="off") as db:
        db.put(b"k", b"v")
    before = tree(path)
    with pytest.raises(exc):
        kvstore.open(path, **{name: value})
    assert tree(path) == before
    with kvstore.open(path, sync="off") as db:  # and the lock was not left held
        assert db.get(b"k") == b"v"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sync": "full"},
        {"sync": "normal"},
        {"sync": "off"},
        {"isolation": "snapshot"},
        {"isolation": "serializable"},
        {"page_size": 4096},
        {"page_size": 8192},
        {"page_size": 65536},
        {"cache_size": 0},
        {"cache_size": 1 << 20},
        {"checkpoint_interval": 0.5},
        {"checkpoint_interval": 3600},
        {"checkpoint_wal_bytes": 1 << 20},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_good_arguments_are_accepted(tmp_path, kwargs):
    kwargs.setdefault("sync", "off")
    with kvstore.open(tmp_path / "db", **kwargs) as db:
        db.put(b"k", b"v" * 5000)
        assert db.get(b"k") == b"v" * 5000
    with kvstore.open(tmp_path / "db", **kwargs) as db:
        assert db.get(b"k") == b"v" * 5000


def test_arguments_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        kvstore.open(tmp_path / "db", True)  # type: ignore[misc]
    assert not (tmp_path / "db").exists()


def test_bad_isolation_in_begin_raises_value_error(tmp_path):
    with kvstore.open(tmp_path / "db", sync="off") as db:
        with pytest.raises(ValueError, match="isolation"):
            db.begin(isolation="read committed")
        with pytest.raises(ValueError, match="isolation"):
            db.transaction(isolation="chaos")
        assert db.stats()["active_transactions"] == 0


# --- the lock -------------------------------------------------------------------------------


def _assert_locked_at_once(path) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseLockedError):
        kvstore.open(path, sync="off")
    assert time.monotonic() - started < 2.0


def test_second_open_same_path_in_process_is_locked(tmp_path):
    path = tmp_path / "db"
    with kvstore.open(path, sync="off") as db:
        db.put(b"k", b"v")
        before = tree(path)
        _assert_locked_at_once(path)
        _assert_locked_at_once(str(path))
        _assert_locked_at_once(str(path) + "/")
        assert {n: s for n, (s, _) in tree(path).items()} == {n: s for n, (s, _) in before.items()}
        assert db.get(b"k") == b"v"  # the first handle is unharmed
        db.put(b"k2", b"v2")
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"k2") == b"v2"


def test_second_open_via_dot_and_relative_paths_is_locked(tmp_path, monkeypatch):
    path = tmp_path / "db"
    with kvstore.open(path, sync="off"):
        _assert_locked_at_once(os.path.join(str(path), "."))
        _assert_locked_at_once(os.path.join(str(path), "..", "db"))
        monkeypatch.chdir(tmp_path)
        _assert_locked_at_once("db")
        _assert_locked_at_once("./db/.")


def test_second_open_via_symlink_is_locked(tmp_path):
    path = tmp_path / "db"
    link = tmp_path / "link"
    with kvstore.open(path, sync="off"):
        os.symlink(path, link)
        _assert_locked_at_once(link)
        _assert_locked_at_once(str(link) + "/.")
    # and the other way round: open through the symlink first
    with kvstore.open(link, sync="off"):
        _assert_locked_at_once(path)


def test_failed_second_open_does_not_release_the_first_lock(tmp_path):
    path = tmp_path / "db"
    with kvstore.open(path, sync="off"):
        for _ in range(3):
            _assert_locked_at_once(path)


def test_lock_is_released_by_close(tmp_path):
    path = tmp_path / "db"
    for i in range(3):
        db = kvstore.open(path, sync="off")
        db.put(b"k%d" % i, b"v")
        db.close()
    with kvstore.open(path, sync="off") as db:
        assert [k for k, _ in db.scan()] == [b"k0", b"k1", b"k2"]


def test_second_open_from_another_process_is_locked(tmp_path):
    path = tmp_path / "db"
    code = f"""
        import sys, time, kvstore
        started = time.monotonic()
        try:
            kvstore.open({str(path)!r}, sync="off")
        except kvstore.DatabaseLockedError:
            sys.exit(10 if time.monotonic() - started < 5 else 11)
        sys.exit(12)
    """
    with kvstore.open(path, sync="off") as db:
        db.put(b"k", b"v")
        res = run_python(code)
        assert res.returncode == 10, res.stderr
        # through a symlink too
        link = tmp_path / "link"
        os.symlink(path, link)
        res = run_python(code.replace(repr(str(path)), repr(str(link) + "/.")))
        assert res.returncode == 10, res.stderr
        assert db.get(b"k") == b"v"
    # once closed, the other process may open it
    res = run_python(
        f"""
        import kvstore
        with kvstore.open({str(path)!r}, sync="off") as db:
            assert db.get(b"k") == b"v"
            db.put(b"from-child", b"1")
        """
    )
    assert res.returncode == 0, res.stderr
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"from-child") == b"1"


def test_process_holding_the_lock_blocks_this_process(tmp_path):
    path = tmp_path / "db"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, kvstore; db = kvstore.open({str(path)!r}, sync='off'); print('open', flush=True); sys.stdin.read()",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "open"
        _assert_locked_at_once(path)
    finally:
        child.kill()
        child.wait(timeout=30)
    # the lock dies with the process (it was killed, not closed): recovery runs
    with kvstore.open(path, sync="off") as db:
        assert list(db.scan()) == []


def test_lock_on_faultfs(tmp_path):
    fs = FaultFS(seed=1, dirs=["/d"])
    db = kvstore.open("/d/db", sync="off", _fs=fs)
    try:
        with pytest.raises(DatabaseLockedError):
            kvstore.open("/d/db", sync="off", _fs=fs)
        with pytest.raises(DatabaseLockedError):
            kvstore.open("/d/db/.", sync="off", _fs=fs)
    finally:
        db.close()
    kvstore.open("/d/db", sync="off", _fs=fs).close()


# --- closing ---------------------------------------------------------------------------------


def test_database_is_a_context_manager(tmp_path):
    path = tmp_path / "db"
    with kvstore.open(path, sync="off") as db:
        assert isinstance(db, kvstore.Database)
        db.put(b"k", b"v")
    with pytest.raises(ClosedError):
        db.get(b"k")
    with kvstore.open(path, sync="off") as db2:  # lock released
        assert db2.get(b"k") == b"v"


def test_context_manager_closes_on_exception_and_propagates(tmp_path):
    path = tmp_path / "db"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with kvstore.open(path, sync="off") as db:
            db.put(b"k", b"v")
            raise Boom
    with pytest.raises(ClosedError):
        db.get(b"k")
    with kvstore.open(path, sync="off") as db2:
        assert db2.get(b"k") == b"v"


def test_entering_a_closed_database_raises_closed_error(tmp_path):
    db = kvstore.open(tmp_path / "db", sync="off")
    db.close()
    with pytest.raises(ClosedError):
        with db:
            pass


def test_close_is_idempotent(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="off")
    db.put(b"k", b"v")
    db.close()
    db.close()
    db.close()
    with kvstore.open(path, sync="off") as db2:
        assert db2.get(b"k") == b"v"
    db.close()  # still harmless once another handle has come and gone


def test_close_then_reopen_many_times_keeps_data(tmp_path):
    path = tmp_path / "db"
    expected = {}
    for round_ in range(5):
        with kvstore.open(path, sync="off") as db:
            assert dict(db.scan()) == expected
            for i in range(20):
                key = b"r%d-%02d" % (round_, i)
                db.put(key, key * 3)
                expected[key] = key * 3
            if round_:
                assert db.delete(b"r%d-00" % (round_ - 1))
                del expected[b"r%d-00" % (round_ - 1)]
    with kvstore.open(path, create=False, sync="off") as db:
        assert dict(db.scan()) == expected


def test_close_rolls_back_unfinished_transactions(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="off")
    db.put(b"a", b"committed")
    tx = db.begin()
    tx.put(b"a", b"uncommitted")
    tx.put(b"b", b"uncommitted")
    db.close()
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"a") == b"committed"
        assert db.get(b"b") is None


def test_using_a_closed_database_raises_closed_error(tmp_path):
    db = kvstore.open(tmp_path / "db", sync="off")
    db.put(b"k", b"v")
    db.close()
    calls = [
        lambda: db.get(b"k"),
        lambda: db.get(b"k", b"d"),
        lambda: db.put(b"k", b"v"),
        lambda: db.delete(b"k"),
        lambda: list(db.scan()),
        lambda: list(db.scan(None, None, reverse=True)),
        lambda: db.begin(),
        lambda: db.begin(readonly=True),
        lambda: db.transaction(),
        lambda: db.run(lambda tx: tx.get(b"k")),
        lambda: db.prepared(),
        lambda: db.commit_prepared(b"g"),
        lambda: db.rollback_prepared(b"g"),
        lambda: db.checkpoint(),
        lambda: db.stats(),
    ]
    for call in calls:
        with pytest.raises(ClosedError):
            call()


def test_errors_derive_from_kvstore_error():
    for cls in (kvstore.ConflictError, kvstore.TransactionError, kvstore.CorruptionError, DatabaseLockedError, ClosedError):
        assert issubclass(cls, kvstore.Error)
    assert issubclass(kvstore.Error, Exception)


def _tx_calls(tx):
    return [
        lambda: tx.get(b"k"),
        lambda: tx.put(b"k", b"v"),
        lambda: tx.delete(b"k"),
        lambda: list(tx.scan()),
        lambda: tx.savepoint(),
        lambda: tx.commit(),
        lambda: tx.rollback(),
        lambda: tx.prepare(b"gid"),
    ]


def test_transaction_of_a_closed_database_is_unusable(tmp_path):
    db = kvstore.open(tmp_path / "db", sync="off")
    tx = db.begin()
    tx.put(b"k", b"v")
    ro = db.begin(readonly=True)
    db.close()
    for t in (tx, ro):
        for call in _tx_calls(t):
            with pytest.raises((ClosedError, TransactionError)):
                call()


def test_transaction_of_a_closed_database_raises_closed_error(tmp_path):
    db = kvstore.open(tmp_path / "db", sync="off")
    tx = db.begin()
    tx.put(b"k", b"v")
    db.close()
    for call in _tx_calls(tx):
        with pytest.raises(ClosedError):
            call()


# --- fork ----------------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _child_exit_code(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)


@needs_fork
def test_forked_child_gets_closed_error_and_parent_keeps_working(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="full")
    db.put(b"a", b"1")
    tx = db.begin()
    tx.put(b"b", b"parent-uncommitted")
    ro = db.begin(readonly=True)
    files_before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            calls = [
                lambda: db.get(b"a"),
                lambda: db.put(b"c", b"child"),
                lambda: db.delete(b"a"),
                lambda: list(db.scan()),
                lambda: db.begin(),
                lambda: db.transaction(readonly=True),
                lambda: db.run(lambda t: t.put(b"c", b"child")),
                lambda: db.prepared(),
                lambda: db.checkpoint(),
                lambda: db.stats(),
                lambda: tx.get(b"a"),
                lambda: tx.put(b"c", b"child"),
                lambda: tx.delete(b"a"),
                lambda: list(tx.scan()),
                lambda: tx.savepoint(),
                lambda: tx.commit(),
                lambda: tx.rollback(),
                lambda: tx.prepare(b"child-gid"),
                lambda: ro.get(b"a"),
                lambda: ro.commit(),
            ]
            for i, call in enumerate(calls):
                try:
                    call()
                except ClosedError:
                    continue
                except BaseException:
                    code = 20 + i
                    break
                else:
                    code = 20 + i
                    break
            try:  # SPEC: any call raises ClosedError in the child, close() included,
                db.close()  # and it must not touch the parent's files
                code = 98
            except ClosedError:
                pass
        except BaseException:
            code = 99
        os._exit(code)
    assert _child_exit_code(pid) == 0
    # the parent is unaffected: its open transactions and its files
    for n, data in files_before.items():
        if "wal" not in n:
            assert (path / n).read_bytes() == data, n
    assert ro.get(b"a") == b"1"
    ro.commit()
    assert tx.get(b"b") == b"parent-uncommitted"
    tx.put(b"c", b"parent")
    tx.commit()
    db.put(b"d", b"4")
    assert dict(db.scan()) == {b"a": b"1", b"b": b"parent-uncommitted", b"c": b"parent", b"d": b"4"}
    _assert_locked_at_once(path)  # the parent still holds the lock
    db.close()
    with kvstore.open(path, sync="off") as db:
        assert dict(db.scan()) == {b"a": b"1", b"b": b"parent-uncommitted", b"c": b"parent", b"d": b"4"}


@needs_fork
def test_forked_child_closing_and_collecting_the_database_does_not_harm_the_parent(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="full")
    db.put(b"a", b"1")
    tx = db.begin()
    tx.put(b"t", b"parent")
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            import gc

            with pytest.raises(ClosedError):
                with db:
                    pass
            with pytest.raises(ClosedError):
                db.close()
            gc.collect()
        except BaseException:
            code = 1
        os._exit(code)
    assert _child_exit_code(pid) == 0
    tx.commit()
    db.put(b"b", b"2")
    db.close()
    with kvstore.open(path, sync="off") as db:
        assert dict(db.scan()) == {b"a": b"1", b"b": b"2", b"t": b"parent"}


@needs_fork
def test_forked_child_while_parent_keeps_the_database_cannot_open_it(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="off")
    db.put(b"a", b"1")
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            kvstore.open(path, sync="off")
        except DatabaseLockedError:
            code = 0
        except BaseException:
            code = 4
        os._exit(code)
    try:
        assert _child_exit_code(pid) == 0
        assert db.get(b"a") == b"1"
    finally:
        db.close()


@needs_fork
def test_forked_child_opens_the_path_itself_once_the_parent_closed_it(tmp_path):
    path = tmp_path / "db"
    db = kvstore.open(path, sync="off")
    db.put(b"a", b"1")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(w)
            os.read(r, 1)  # wait until the parent has closed
            with kvstore.open(path, sync="off") as db2:
                code = 0 if db2.get(b"a") == b"1" else 2
                db2.put(b"child", b"yes")
        except DatabaseLockedError:
            code = 3
        except BaseException:
            code = 4
        os._exit(code)
    os.close(r)
    db.close()
    os.write(w, b"x")
    os.close(w)
    code = _child_exit_code(pid)
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"a") == b"1"
        if code == 0:
            assert db.get(b"child") == b"yes"
    assert code == 0


# --- reopen and durability -------------------------------------------------------------------


def test_commits_under_sync_full_survive_reopen(tmp_path):
    path = tmp_path / "db"
    with kvstore.open(path, sync="full") as db:
        with db.transaction() as tx:
            for i in range(50):
                tx.put(b"k%03d" % i, b"v%d" % i)
        db.delete(b"k007")
    with kvstore.open(path, sync="full") as db:
        expected = {b"k%03d" % i: b"v%d" % i for i in range(50)}
        del expected[b"k007"]
        assert dict(db.scan()) == expected


def test_commits_under_sync_full_survive_a_killed_process(tmp_path):
    path = tmp_path / "db"
    res = run_python(
        f"""
        import os, kvstore
        db = kvstore.open({str(path)!r}, sync="full")
        for i in range(30):
            with db.transaction() as tx:
                tx.put(b"k%03d" % i, b"v%d" % i)
        tx = db.begin()
        tx.put(b"uncommitted", b"x")
        tx.put(b"k000", b"overwritten-uncommitted")
        os.kill(os.getpid(), 9)
        """
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    with kvstore.open(path, sync="full") as db:
        assert dict(db.scan()) == {b"k%03d" % i: b"v%d" % i for i in range(30)}


def test_commits_under_sync_full_survive_a_power_cut():
    fs = FaultFS(seed=3, dirs=["/d"])
    db = kvstore.open("/d/db", sync="full", _fs=fs)
    db.put(b"a", b"1")
    with db.transaction() as tx:
        tx.put(b"b", b"2")
        tx.put(b"c", b"3" * 10000)
    tx = db.begin()
    tx.put(b"d", b"uncommitted")
    fs = fs.crash(DropAll())  # everything not fsynced is lost
    with kvstore.open("/d/db", sync="full", _fs=fs) as db:
        assert dict(db.scan()) == {b"a": b"1", b"b": b"2", b"c": b"3" * 10000}


def test_reopen_with_another_isolation_level_and_sync_mode(tmp_path):
    path = tmp_path / "db"
    with kvstore.open(path, sync="full", isolation="snapshot") as db:
        db.put(b"k", b"1")
    with kvstore.open(path, sync="normal", isolation="serializable") as db:
        assert db.begin().isolation == "serializable"
        assert db.get(b"k") == b"1"
        db.put(b"k", b"2")
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"k") == b"2"
