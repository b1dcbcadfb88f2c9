"""SPEC "Transactions" and "Two-phase commit": the public transaction API.

Keys and values, ordering, get/put/delete/scan, savepoints, commit and
rollback, the with statement, snapshot semantics, readers and writers not
blocking each other, first-updater-wins, db.run, autocommit helpers, many
threads, 2PC (also across reopen and power cuts), overflow values, and the
liveness promises of serializable isolation.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

import kvstore
from kvstore import ConflictError, TransactionError
from pages.faultfs import DropAll, FaultFS, KeepAll

MiB = 1 << 20


@pytest.fixture
def path(tmp_path):
    return tmp_path / "db"


@pytest.fixture
def db(path):
    d = kvstore.open(path, sync="off")
    yield d
    d.close()


@pytest.fixture(params=["snapshot", "serializable"])
def anydb(request, path):
    d = kvstore.open(path, sync="off", isolation=request.param)
    yield d
    d.close()


@pytest.fixture
def sdb(path):
    d = kvstore.open(path, sync="off", isolation="serializable")
    yield d
    d.close()


def contents(db) -> dict[bytes, bytes]:
    return dict(db.scan())


def run_thread(fn, timeout: float = 10.0):
    """Run ``fn`` in a thread; fail if it does not finish within ``timeout``
    (so a blocked reader or writer shows up as a failure, not a hang)."""
    box: dict = {}

    def body():
        try:
            box["result"] = fn()
        except BaseException as e:  # pragma: no cover - reported below
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the thread was blocked for more than {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("result"), time.monotonic() - started


# --- keys and values ----------------------------------------------------------------------


def test_bytes_like_keys_and_values_are_accepted_and_returned_as_bytes(db):
    with db.transaction() as tx:
        tx.put(b"k1", b"v1")
        tx.put(bytearray(b"k2"), bytearray(b"v2"))
        tx.put(memoryview(b"k3"), memoryview(b"v3"))
        tx.put(memoryview(b"xxk4xx")[2:4], memoryview(bytearray(b"--v4--"))[2:4])
        for k, v in [(b"k1", b"v1"), (bytearray(b"k2"), b"v2"), (memoryview(b"k3"), b"v3"), (b"k4", b"v4")]:
            got = tx.get(k)
            assert got == v and type(got) is bytes
    for k in (b"k1", bytearray(b"k2"), memoryview(b"k3"), b"k4"):
        assert type(db.get(k)) is bytes
    items = list(db.scan(bytearray(b"k"), memoryview(b"l")))
    assert items == [(b"k1", b"v1"), (b"k2", b"v2"), (b"k3", b"v3"), (b"k4", b"v4")]
    assert all(type(k) is bytes and type(v) is bytes for k, v in items)
    assert db.delete(bytearray(b"k2")) is True
    assert db.delete(memoryview(b"k3")) is True
    assert contents(db) == {b"k1": b"v1", b"k4": b"v4"}


def test_a_mutated_bytearray_does_not_change_the_stored_value(db):
    key, value = bytearray(b"key"), bytearray(b"value")
    with db.transaction() as tx:
        tx.put(key, value)
        key[0:3] = b"KEY"
        value[0:5] = b"VALUE"
        assert tx.get(b"key") == b"value"
    assert contents(db) == {b"key": b"value"}


BAD_TYPES = ["str", 1, 1.0, None, [1], (b"a",), object(), {b"a": 1}]


@pytest.mark.parametrize("bad", BAD_TYPES, ids=repr)
def test_non_bytes_keys_and_values_raise_type_error(db, bad):
    tx = db.begin()
    with pytest.raises(TypeError):
        tx.put(bad, b"v")
    with pytest.raises(TypeError):
        tx.put(b"k", bad)
    with pytest.raises(TypeError):
        tx.get(bad)
    with pytest.raises(TypeError):
        tx.delete(bad)
    if bad is not None:  # None is an open bound
        with pytest.raises(TypeError):
            list(tx.scan(bad, None))
        with pytest.raises(TypeError):
            list(tx.scan(None, bad))
    assert tx.state == "active"  # a bad argument does not end the transaction
    tx.put(b"k", b"v")
    tx.commit()
    with pytest.raises(TypeError):
        db.put(bad, b"v")
    with pytest.raises(TypeError):
        db.put(b"k", bad)
    with pytest.raises(TypeError):
        db.get(bad)
    with pytest.raises(TypeError):
        db.delete(bad)
    assert contents(db) == {b"k": b"v"}


def test_key_length_limits(db):
    with db.transaction() as tx:
        tx.put(b"\x00", b"one byte")
        tx.put(b"k" * 1024, b"max")
        for bad in (b"", b"k" * 1025, bytearray(1025), memoryview(b"")):
            with pytest.raises(ValueError):
                tx.put(bad, b"v")
            with pytest.raises(ValueError):
                tx.get(bad)
            with pytest.raises(ValueError):
                tx.delete(bad)
        assert tx.get(b"k" * 1024) == b"max"
    assert contents(db) == {b"\x00": b"one byte", b"k" * 1024: b"max"}
    with pytest.raises(ValueError):
        db.put(b"", b"v")
    with pytest.raises(ValueError):
        db.put(b"x" * 1025, b"v")


def test_empty_value_is_a_value_not_a_missing_key(db):
    db.put(b"k", b"")
    assert db.get(b"k", b"default") == b""
    assert contents(db) == {b"k": b""}
    assert db.delete(b"k") is True


def test_value_over_64_mib_raises_value_error(db):
    big = bytearray(64 * MiB + 1)
    tx = db.begin()
    with pytest.raises(ValueError):
        tx.put(b"k", big)
    with pytest.raises(ValueError):
        tx.put(b"k", memoryview(big))
    assert tx.state == "active"
    tx.rollback()
    with pytest.raises(ValueError):
        db.put(b"k", big)
    assert db.get(b"k") is None


def test_value_of_exactly_64_mib_is_accepted(db):
    value = bytes(range(256)) * (64 * MiB // 256)
    assert len(value) == 64 * MiB
    db.put(b"k", value)
    assert db.get(b"k") == value


def test_keys_order_bytewise(db):
    keys = [b"\xff", b"a", b"\x00", b"ab", b"b", b"\x7f", b"\x80", b"a\x00", b"A", b"\x00\x00", b"aa", b"\xff\xff"]
    with db.transaction() as tx:
        for k in keys:
            tx.put(k, k)
        assert [k for k, _ in tx.scan()] == sorted(keys)
    assert [k for k, _ in db.scan()] == sorted(keys)
    assert [k for k, _ in db.scan(reverse=True)] == sorted(keys, reverse=True)


def test_keys_order_bytewise_across_many_pages(db):
    rng = random.Random(7)
    keys = {bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(3000)}
    with db.transaction() as tx:
        for k in keys:
            tx.put(k, k[::-1])
    assert [k for k, _ in db.scan()] == sorted(keys)
    assert [k for k, _ in db.scan(reverse=True)] == sorted(keys, reverse=True)


# --- get, put, delete ---------------------------------------------------------------------------


def test_get_default(db):
    db.put(b"k", b"v")
    with db.transaction() as tx:
        assert tx.get(b"missing") is None
        assert tx.get(b"missing", b"dflt") == b"dflt"
        sentinel = object()
        assert tx.get(b"missing", sentinel) is sentinel
        assert tx.get(b"k", b"dflt") == b"v"
        tx.delete(b"k")
        assert tx.get(b"k", b"gone") == b"gone"
    assert db.get(b"k") is None
    assert db.get(b"k", b"dflt") == b"dflt"


def test_put_overwrites(db):
    with db.transaction() as tx:
        tx.put(b"k", b"1")
        tx.put(b"k", b"2")
        assert tx.get(b"k") == b"2"
    db.put(b"k", b"3")
    assert db.get(b"k") == b"3"


def test_delete_returns_whether_the_key_existed_as_the_transaction_sees_it(db):
    db.put(b"committed", b"v")
    with db.transaction() as tx:
        assert tx.delete(b"missing") is False
        assert tx.delete(b"committed") is True
        assert tx.delete(b"committed") is False  # already deleted by this tx
        tx.put(b"committed", b"again")
        assert tx.delete(b"committed") is True
        tx.put(b"own", b"v")
        assert tx.delete(b"own") is True
        assert tx.delete(b"own") is False
    assert contents(db) == {}
    assert db.delete(b"committed") is False


def test_delete_as_seen_by_the_snapshot(db):
    db.put(b"old", b"v")
    t1 = db.begin()
    db.put(b"new", b"v")  # committed after t1 began: t1 does not see it
    assert t1.delete(b"new") is False
    other = db.begin()
    other.put(b"uncommitted", b"v")
    assert t1.delete(b"uncommitted") is False  # invisible to t1
    assert t1.delete(b"old") is True
    t1.commit()
    other.commit()
    assert contents(db) == {b"new": b"v", b"uncommitted": b"v"}


# --- scan -------------------------------------------------------------------------------------

LETTERS = [bytes([c]) for c in b"abcdefghij"]


@pytest.fixture
def lettered(db):
    with db.transaction() as tx:
        for k in LETTERS:
            tx.put(k, k.upper())
    return db


@pytest.mark.parametrize(
    "start,stop,expected",
    [
        (None, None, "abcdefghij"),
        (b"c", b"f", "cde"),
        (b"c", None, "cdefghij"),
        (None, b"c", "ab"),
        (b"a", b"j", "abcdefghi"),
        (b"bb", b"dd", "cd"),
        (b"c", b"c", ""),
        (b"f", b"c", ""),
        (b"", b"b", "a"),
        (b"j", None, "j"),
        (b"j\x00", None, ""),
        (b"k", b"z", ""),
        (b"\x00", b"\xff", "abcdefghij"),
    ],
)
def test_scan_bounds_are_half_open(lettered, start, stop, expected):
    want = [(c.encode(), c.upper().encode()) for c in expected]
    with lettered.transaction(readonly=True) as tx:
        assert list(tx.scan(start, stop)) == want
        assert list(tx.scan(start, stop, reverse=True)) == want[::-1]
        assert list(tx.scan(start=start, stop=stop, reverse=False)) == want
    assert list(lettered.scan(start, stop)) == want
    assert list(lettered.scan(start, stop, reverse=True)) == want[::-1]


def test_scan_defaults_cover_the_whole_store(lettered):
    with lettered.transaction() as tx:
        assert [k for k, _ in tx.scan()] == LETTERS
        assert [k for k, _ in tx.scan(None, None, reverse=True)] == LETTERS[::-1]


def test_scan_sees_own_writes_and_deletes(lettered):
    with lettered.transaction() as tx:
        tx.put(b"bb", b"new")
        tx.delete(b"c")
        tx.put(b"d", b"changed")
        assert list(tx.scan(b"b", b"e")) == [(b"b", b"B"), (b"bb", b"new"), (b"d", b"changed")]
        assert list(tx.scan(b"b", b"e", reverse=True)) == [(b"d", b"changed"), (b"bb", b"new"), (b"b", b"B")]


def test_scan_matches_a_model_with_random_bounds(db):
    rng = random.Random(1234)
    model: dict[bytes, bytes] = {}
    keys = [b"%04d" % i for i in range(1500)]
    with db.transaction() as tx:
        for k in keys:
            if rng.random() < 0.7:
                v = b"v" * rng.randrange(0, 60) + k
                tx.put(k, v)
                model[k] = v
    tx = db.begin()
    for _ in range(600):  # own writes and deletes on top of the committed state
        k = rng.choice(keys)
        if rng.random() < 0.5:
            tx.put(k, b"own" + k)
            model[k] = b"own" + k
        else:
            assert tx.delete(k) is (k in model)
            model.pop(k, None)
    for _ in range(60):
        a, b = rng.choice(keys + [None]), rng.choice(keys + [None])
        want = sorted((k, v) for k, v in model.items() if (a is None or k >= a) and (b is None or k < b))
        assert list(tx.scan(a, b)) == want
        assert list(tx.scan(a, b, reverse=True)) == want[::-1]
    tx.commit()
    assert contents(db) == model


def test_scan_is_lazy_and_survives_writes_of_the_same_transaction(db):
    with db.transaction() as tx:
        for i in range(500):
            tx.put(b"%04d" % i, b"x" * 50)
    with db.transaction() as tx:
        seen = []
        for k, _ in tx.scan(b"0000", b"0500"):
            seen.append(k)
            tx.put(k + b"-copy", b"y" * 50)  # splits leaves under the running scan
        originals = [k for k in seen if not k.endswith(b"-copy")]
        assert originals == [b"%04d" % i for i in range(500)]  # none missed, none twice


def test_scan_with_bad_reverse_type_is_still_a_bool(lettered):
    assert [k for k, _ in lettered.scan(None, None, 1)] == LETTERS[::-1]


# --- savepoints -----------------------------------------------------------------------------------


def test_savepoint_rollback_to_undoes_only_later_writes(db):
    db.put(b"committed", b"old")
    db.put(b"doomed", b"old")
    with db.transaction() as tx:
        tx.put(b"before", b"1")
        sp = tx.savepoint()
        tx.put(b"tmp", b"1")
        tx.put(b"before", b"2")
        tx.put(b"committed", b"new")
        assert tx.delete(b"doomed") is True
        tx.rollback_to(sp)
        assert tx.get(b"tmp") is None
        assert tx.get(b"before") == b"1"
        assert tx.get(b"committed") == b"old"
        assert tx.get(b"doomed") == b"old"
        assert list(tx.scan()) == [(b"before", b"1"), (b"committed", b"old"), (b"doomed", b"old")]
        tx.put(b"after", b"1")
    assert contents(db) == {b"before": b"1", b"committed": b"old", b"doomed": b"old", b"after": b"1"}


def test_savepoint_stays_valid_after_rollback_to(db):
    with db.transaction() as tx:
        sp = tx.savepoint()
        for round_ in range(4):
            tx.put(b"k%d" % round_, b"v")
            tx.put(b"common", b"%d" % round_)
            tx.rollback_to(sp)
            assert list(tx.scan()) == []
        tx.rollback_to(sp)  # with nothing to undo
        tx.put(b"kept", b"v")
    assert contents(db) == {b"kept": b"v"}


def test_savepoint_before_any_write(db):
    db.put(b"a", b"1")
    tx = db.begin()
    sp = tx.savepoint()
    tx.put(b"a", b"2")
    tx.put(b"b", b"2")
    tx.rollback_to(sp)
    assert tx.get(b"a") == b"1" and tx.get(b"b") is None
    tx.commit()
    assert contents(db) == {b"a": b"1"}


def test_later_savepoints_are_gone_after_rollback_to_an_earlier_one(db):
    tx = db.begin()
    sp1 = tx.savepoint()
    tx.put(b"a", b"1")
    sp2 = tx.savepoint()
    tx.put(b"b", b"1")
    sp3 = tx.savepoint()
    tx.put(b"c", b"1")
    tx.rollback_to(sp2)
    assert tx.get(b"a") == b"1" and tx.get(b"b") is None and tx.get(b"c") is None
    with pytest.raises(ValueError):
        tx.rollback_to(sp3)
    tx.put(b"d", b"1")
    sp4 = tx.savepoint()  # a new savepoint is not confused with the gone sp3
    tx.put(b"e", b"1")
    with pytest.raises(ValueError):
        tx.rollback_to(sp3)
    tx.rollback_to(sp4)
    assert tx.get(b"e") is None and tx.get(b"d") == b"1"
    tx.rollback_to(sp1)
    for sp in (sp2, sp3, sp4):
        with pytest.raises(ValueError):
            tx.rollback_to(sp)
    assert list(tx.scan()) == []
    tx.rollback_to(sp1)
    assert tx.state == "active"
    tx.put(b"z", b"1")
    tx.commit()
    assert contents(db) == {b"z": b"1"}


def test_savepoint_of_another_transaction_raises_value_error(db):
    t1, t2 = db.begin(), db.begin()
    sp1 = t1.savepoint()
    t2.put(b"k", b"v")
    with pytest.raises(ValueError):
        t2.rollback_to(sp1)
    assert t2.get(b"k") == b"v" and t2.state == "active"
    t2.commit()
    t1.commit()
    t3 = db.begin()
    with pytest.raises(ValueError):  # nor of a finished one
        t3.rollback_to(sp1)
    t3.rollback()
    assert contents(db) == {b"k": b"v"}


def test_rollback_to_something_that_is_not_a_savepoint(db):
    tx = db.begin()
    with pytest.raises((TypeError, ValueError)):
        tx.rollback_to(None)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        tx.rollback_to(0)  # type: ignore[arg-type]
    tx.rollback()


def test_savepoint_methods_on_a_finished_transaction_raise_transaction_error(db):
    tx = db.begin()
    sp = tx.savepoint()
    tx.commit()
    with pytest.raises(TransactionError):
        tx.savepoint()
    with pytest.raises(TransactionError):
        tx.rollback_to(sp)


def test_rollback_after_rollback_to_undoes_the_rest(db):
    db.put(b"a", b"old")
    tx = db.begin()
    tx.put(b"a", b"1")
    sp = tx.savepoint()
    tx.put(b"a", b"2")
    tx.rollback_to(sp)
    tx.put(b"b", b"3")
    tx.rollback()
    assert contents(db) == {b"a": b"old"}


def test_savepoints_with_random_operations_match_a_model(db):
    rng = random.Random(99)
    committed = {b"k%02d" % i: b"c%d" % i for i in range(0, 40, 2)}
    with db.transaction() as tx:
        for k, v in committed.items():
            tx.put(k, v)
    tx = db.begin()
    model = dict(committed)
    stack: list[tuple] = []  # (savepoint, model copy)
    for step in range(400):
        r = rng.random()
        k = b"k%02d" % rng.randrange(40)
        if r < 0.4:
            v = b"s%d" % step
            tx.put(k, v)
            model[k] = v
        elif r < 0.6:
            assert tx.delete(k) is (k in model)
            model.pop(k, None)
        elif r < 0.75:
            stack.append((tx.savepoint(), dict(model)))
        elif r < 0.9 and stack:
            i = rng.randrange(len(stack))
            sp, snap = stack[i]
            tx.rollback_to(sp)
            del stack[i + 1 :]
            model = dict(snap)
        if step % 25 == 0:
            assert dict(tx.scan()) == model
    tx.commit()
    assert contents(db) == model


# --- commit, rollback, finished transactions -------------------------------------------------------


def test_commit_makes_writes_visible_and_rollback_discards_them(db):
    tx = db.begin()
    tx.put(b"a", b"1")
    assert db.get(b"a") is None
    tx.commit()
    assert db.get(b"a") == b"1"
    tx = db.begin()
    tx.put(b"a", b"2")
    tx.put(b"b", b"2")
    tx.delete(b"a")
    tx.rollback()
    assert contents(db) == {b"a": b"1"}


@pytest.mark.parametrize("end", ["commit", "rollback"])
@pytest.mark.parametrize("readonly", [False, True])
def test_any_use_of_a_finished_transaction_raises_transaction_error(anydb, end, readonly):
    anydb.put(b"k", b"v")
    tx = anydb.begin(readonly=readonly)
    tx.get(b"k")
    getattr(tx, end)()
    assert tx.state == ("committed" if end == "commit" else "aborted")
    sp_owner = anydb.begin()
    sp = sp_owner.savepoint()
    calls = [
        lambda: tx.commit(),
        lambda: tx.rollback(),
        lambda: tx.get(b"k"),
        lambda: tx.get(b"k", b"d"),
        lambda: tx.put(b"k", b"v2"),
        lambda: tx.delete(b"k"),
        lambda: list(tx.scan()),
        lambda: tx.scan(b"a", b"z", reverse=True),
        lambda: tx.savepoint(),
        lambda: tx.rollback_to(sp),
        lambda: tx.prepare(b"gid"),
    ]
    for call in calls:
        with pytest.raises(TransactionError):
            call()
    sp_owner.rollback()
    assert contents(anydb) == {b"k": b"v"}
    assert anydb.prepared() == []


def test_a_scan_iterator_does_not_outlive_its_transaction(db):
    with db.transaction() as tx:
        for i in range(2000):
            tx.put(b"%05d" % i, b"v" * 20)
    tx = db.begin()
    it = tx.scan()
    assert next(it)[0] == b"00000"
    tx.commit()
    with pytest.raises(TransactionError):
        for _ in it:
            pass


def test_write_in_a_readonly_transaction_raises_transaction_error(anydb):
    anydb.put(b"k", b"v")
    tx = anydb.begin(readonly=True)
    with pytest.raises(TransactionError):
        tx.put(b"k", b"x")
    with pytest.raises(TransactionError):
        tx.put(b"new", b"x")
    with pytest.raises(TransactionError):
        tx.delete(b"k")
    with pytest.raises(TransactionError):
        tx.delete(b"missing")
    assert tx.get(b"k") == b"v"  # still usable for reads
    tx.commit()
    with anydb.transaction(readonly=True) as tx:
        with pytest.raises(TransactionError):
            tx.put(b"k", b"y")
        assert list(tx.scan()) == [(b"k", b"v")]
    assert contents(anydb) == {b"k": b"v"}


def test_readonly_flag_is_reported(db):
    assert db.begin(readonly=True).readonly
    assert not db.begin().readonly


# --- the with statement -----------------------------------------------------------------------------


def test_with_commits_on_normal_exit(db):
    with db.transaction() as tx:
        tx.put(b"k", b"v")
    assert tx.state == "committed"
    assert db.get(b"k") == b"v"


def test_with_rolls_back_on_exception_and_propagates_it(db):
    db.put(b"k", b"old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with db.transaction() as tx:
            tx.put(b"k", b"new")
            tx.put(b"other", b"new")
            raise Boom
    assert tx.state == "aborted"
    assert contents(db) == {b"k": b"old"}


def test_with_rolls_back_on_base_exception(db):
    with pytest.raises(KeyboardInterrupt):
        with db.transaction() as tx:
            tx.put(b"k", b"new")
            raise KeyboardInterrupt
    assert tx.state == "aborted"
    assert db.get(b"k") is None


def test_explicit_commit_inside_with_ends_it(db):
    with db.transaction() as tx:
        tx.put(b"k", b"v")
        tx.commit()
        assert db.get(b"k") == b"v"
    assert tx.state == "committed"
    with pytest.raises(ValueError):  # an exception after the commit: nothing to undo
        with db.transaction() as tx:
            tx.put(b"k2", b"v")
            tx.commit()
            raise ValueError("after commit")
    assert contents(db) == {b"k": b"v", b"k2": b"v"}


def test_explicit_rollback_inside_with_ends_it(db):
    with db.transaction() as tx:
        tx.put(b"k", b"v")
        tx.rollback()
    assert tx.state == "aborted"
    assert db.get(b"k") is None
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            tx.put(b"k", b"v")
            tx.rollback()
            raise RuntimeError
    assert db.get(b"k") is None


def test_conflict_inside_with_propagates_and_the_transaction_is_aborted(db):
    holder = db.begin()
    holder.put(b"k", b"holder")
    with pytest.raises(ConflictError):
        with db.transaction() as tx:
            tx.put(b"mine", b"1")
            tx.put(b"k", b"loser")
    assert tx.state == "aborted"
    holder.commit()
    assert contents(db) == {b"k": b"holder"}


def test_readonly_with_block(db):
    db.put(b"k", b"v")
    with db.transaction(readonly=True) as tx:
        assert tx.get(b"k") == b"v"
    assert tx.state == "committed"


# --- snapshot semantics -------------------------------------------------------------------------------


def test_snapshot_sees_commits_finished_before_begin(anydb):
    anydb.put(b"a", b"1")
    with anydb.transaction() as tx:
        tx.put(b"b", b"2")
    t = anydb.begin(readonly=True)
    assert t.get(b"a") == b"1" and t.get(b"b") == b"2"
    assert list(t.scan()) == [(b"a", b"1"), (b"b", b"2")]
    t.commit()


def test_snapshot_does_not_see_uncommitted_writes_of_others(anydb):
    anydb.put(b"a", b"1")
    writer = anydb.begin()
    writer.put(b"a", b"2")
    writer.put(b"b", b"new")
    reader = anydb.begin(readonly=True)
    assert reader.get(b"a") == b"1" and reader.get(b"b") is None
    assert list(reader.scan()) == [(b"a", b"1")]
    # even a transaction that began before the write
    assert anydb.get(b"b") is None
    writer.rollback()
    assert reader.get(b"a") == b"1"
    reader.commit()


def test_snapshot_does_not_see_commits_after_begin(anydb):
    anydb.put(b"a", b"1")
    anydb.put(b"gone", b"x")
    reader = anydb.begin(readonly=True)
    rw = anydb.begin()  # a writing transaction that has not written yet
    with anydb.transaction() as w:
        w.put(b"a", b"2")
        w.put(b"b", b"new")
        w.delete(b"gone")
    for t in (reader, rw):
        assert t.get(b"a") == b"1"
        assert t.get(b"b") is None
        assert t.get(b"gone") == b"x"
        assert list(t.scan()) == [(b"a", b"1"), (b"gone", b"x")]
        assert list(t.scan(reverse=True)) == [(b"gone", b"x"), (b"a", b"1")]
    # rw takes its transaction id only now, after w committed: still w is invisible
    rw.put(b"c", b"rw")
    assert rw.get(b"a") == b"1" and rw.get(b"b") is None
    assert list(rw.scan()) == [(b"a", b"1"), (b"c", b"rw"), (b"gone", b"x")]
    reader.commit()
    rw.commit()  # under serializable: rw -> w only, an outgoing edge, so it commits
    assert anydb.get(b"c") == b"rw"
    fresh = anydb.begin(readonly=True)
    assert fresh.get(b"a") == b"2" and fresh.get(b"b") == b"new" and fresh.get(b"gone") is None
    fresh.commit()


def test_snapshot_sees_its_own_writes(anydb):
    anydb.put(b"a", b"1")
    tx = anydb.begin()
    tx.put(b"a", b"2")
    tx.put(b"b", b"3")
    assert tx.get(b"a") == b"2" and tx.get(b"b") == b"3"
    tx.delete(b"a")
    assert tx.get(b"a") is None
    assert list(tx.scan()) == [(b"b", b"3")]
    tx.commit()


def test_snapshot_is_stable_while_many_commits_happen(db):
    for i in range(50):
        db.put(b"k%02d" % i, b"v0")
    reader = db.begin(readonly=True)
    before = list(reader.scan())
    for round_ in range(1, 6):
        with db.transaction() as tx:
            for i in range(0, 50, round_):
                tx.put(b"k%02d" % i, b"v%d" % round_)
            tx.delete(b"k%02d" % round_)
            tx.put(b"new%d" % round_, b"x")
        assert list(reader.scan()) == before
    for _ in range(70):  # enough commits to trigger the automatic purge
        db.put(b"churn", os.urandom(8))
    db.purge()
    assert list(reader.scan()) == before
    assert list(reader.scan(reverse=True)) == before[::-1]
    reader.commit()


def test_a_rolled_back_writer_leaves_no_trace_for_older_snapshots(db):
    db.put(b"a", b"1")
    reader = db.begin(readonly=True)
    w = db.begin()
    w.put(b"a", b"2")
    w.put(b"b", b"2")
    w.rollback()
    assert reader.get(b"a") == b"1" and reader.get(b"b") is None
    t = db.begin()  # began after the rollback; may write the keys freely
    t.put(b"a", b"3")
    t.put(b"b", b"3")
    t.commit()
    assert reader.get(b"a") == b"1"
    reader.commit()
    assert contents(db) == {b"a": b"3", b"b": b"3"}


# --- readers never block writers, writers never block readers ------------------------------------------


def test_a_long_reader_does_not_block_writers(db):
    for i in range(20):
        db.put(b"k%02d" % i, b"0")
    reader = db.begin(readonly=True)
    assert reader.get(b"k00") == b"0"
    rw_reader = db.begin()  # a read-write transaction that has only read
    assert rw_reader.get(b"k01") == b"0"

    def writers():
        for n in range(1, 31):
            with db.transaction() as tx:
                for i in range(20):
                    tx.put(b"k%02d" % i, b"%d" % n)
        return db.get(b"k05")

    result, _ = run_thread(writers)
    assert result == b"30"
    assert reader.get(b"k05") == b"0"
    assert dict(reader.scan()) == {b"k%02d" % i: b"0" for i in range(20)}
    assert rw_reader.get(b"k07") == b"0"
    reader.commit()
    rw_reader.commit()


def test_an_uncommitted_writer_does_not_block_readers(db):
    db.put(b"k", b"old")
    writer = db.begin()
    writer.put(b"k", b"new")
    writer.put(b"k2", b"new")

    def readers():
        out = [db.get(b"k"), list(db.scan())]
        with db.transaction(readonly=True) as tx:
            out.append(tx.get(b"k"))
        with db.transaction() as tx:  # other writers on other keys are not blocked either
            tx.put(b"unrelated", b"1")
        return out

    (got_k, got_scan, got_tx), _ = run_thread(readers)
    assert got_k == b"old" and got_tx == b"old" and got_scan == [(b"k", b"old")]
    writer.commit()
    assert contents(db) == {b"k": b"new", b"k2": b"new", b"unrelated": b"1"}


def test_snapshot_reads_stay_consistent_under_concurrent_transfers(db):
    with db.transaction() as tx:
        for acct in range(5):
            tx.put(b"acct%d" % acct, b"100")
    stop = threading.Event()
    errors: list = []
    sums: list[int] = []

    def transfer():
        rng = random.Random(5)
        try:
            while not stop.is_set():
                a, b = rng.sample(range(5), 2)

                def move(tx, a=a, b=b):
                    va, vb = int(tx.get(b"acct%d" % a)), int(tx.get(b"acct%d" % b))
                    tx.put(b"acct%d" % a, b"%d" % (va - 1))
                    tx.put(b"acct%d" % b, b"%d" % (vb + 1))

                db.run(move, retries=1000)
        except BaseException as e:
            errors.append(e)

    def audit():
        try:
            for _ in range(150):
                with db.transaction(readonly=True) as tx:
                    sums.append(sum(int(v) for _, v in tx.scan(b"acct", b"acct~")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=transfer, daemon=True) for _ in range(2)]
    auditors = [threading.Thread(target=audit, daemon=True) for _ in range(2)]
    for t in threads + auditors:
        t.start()
    for t in auditors:
        t.join(20)
    stop.set()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads + auditors)
    assert not errors, errors
    assert sums and set(sums) == {500}
    assert sum(int(v) for _, v in db.scan()) == 500


# --- first updater wins -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["put", "delete"])
def test_conflict_on_a_key_written_by_an_unfinished_transaction(anydb, op):
    anydb.put(b"k", b"base")
    first = anydb.begin()
    first.put(b"k", b"first")
    second = anydb.begin()
    second.put(b"mine", b"second")
    sp = second.savepoint()
    with pytest.raises(ConflictError) as info:
        if op == "put":
            second.put(b"k", b"second")
        else:
            second.delete(b"k")
    err = info.value
    assert err.key == b"k"
    assert err.kind == "write-write"
    assert isinstance(err, kvstore.Error)
    # the loser was rolled back: aborted, its earlier writes gone, nothing usable
    assert second.state == "aborted"
    for call in (lambda: second.get(b"mine"), lambda: second.commit(), lambda: second.rollback(), lambda: second.rollback_to(sp)):
        with pytest.raises(TransactionError):
            call()
    assert anydb.get(b"mine") is None
    third = anydb.begin()
    third.put(b"mine", b"third")  # the loser's keys are free again
    third.commit()
    first.commit()
    assert contents(anydb) == {b"k": b"first", b"mine": b"third"}


@pytest.mark.parametrize("op", ["put", "delete"])
def test_conflict_on_a_key_committed_after_the_snapshot(anydb, op):
    anydb.put(b"k", b"base")
    late = anydb.begin()
    late.put(b"other", b"late")
    anydb.put(b"k", b"winner")
    with pytest.raises(ConflictError) as info:
        if op == "put":
            late.put(b"k", b"late")
        else:
            late.delete(b"k")
    assert info.value.key == b"k"
    assert info.value.kind == "write-write"
    assert late.state == "aborted"
    assert contents(anydb) == {b"k": b"winner"}


def test_conflict_on_a_key_deleted_after_the_snapshot(anydb):
    anydb.put(b"k", b"base")
    late = anydb.begin()
    assert anydb.delete(b"k") is True
    with pytest.raises(ConflictError) as info:
        late.put(b"k", b"late")
    assert info.value.key == b"k"
    assert contents(anydb) == {}


def test_conflict_on_a_key_inserted_after_the_snapshot(anydb):
    late = anydb.begin()
    anydb.put(b"k", b"winner")
    with pytest.raises(ConflictError) as info:
        late.put(b"k", b"late")
    assert info.value.key == b"k"
    holder = anydb.begin()
    holder.put(b"new", b"holder")
    t = anydb.begin()
    with pytest.raises(ConflictError):  # inserted by an unfinished transaction
        t.put(b"new", b"t")
    holder.commit()
    assert contents(anydb) == {b"k": b"winner", b"new": b"holder"}


def test_no_conflict_after_the_first_updater_rolls_back(anydb):
    anydb.put(b"k", b"base")
    first = anydb.begin()
    second = anydb.begin()
    first.put(b"k", b"first")
    first.rollback()
    second.put(b"k", b"second")
    second.commit()
    assert anydb.get(b"k") == b"second"


def test_no_conflict_with_a_commit_before_the_snapshot_or_own_writes(anydb):
    anydb.put(b"k", b"base")
    tx = anydb.begin()
    tx.put(b"k", b"1")
    tx.put(b"k", b"2")
    assert tx.delete(b"k") is True
    tx.put(b"k", b"3")
    tx.commit()
    assert anydb.get(b"k") == b"3"


def test_conflicts_are_counted(db):
    before = db.stats()["conflicts"]
    holder = db.begin()
    holder.put(b"k", b"1")
    t = db.begin()
    with pytest.raises(ConflictError):
        t.put(b"k", b"2")
    holder.commit()
    assert db.stats()["conflicts"] == before + 1


# --- db.run ---------------------------------------------------------------------------------------


def test_run_commits_and_returns_the_result(db):
    def fn(tx):
        tx.put(b"k", b"v")
        return "result", tx.get(b"k")

    assert db.run(fn) == ("result", b"v")
    assert db.get(b"k") == b"v"


def test_run_retries_on_conflict(db):
    db.put(b"counter", b"0")
    calls = []

    def fn(tx):
        calls.append(tx)
        n = int(tx.get(b"counter"))
        if len(calls) <= 3:
            db.put(b"counter", b"%d" % (n + 100))  # somebody else gets in first
        tx.put(b"counter", b"%d" % (int(tx.get(b"counter")) + 1))
        return len(calls)

    assert db.run(fn, retries=5) == 4
    assert len({id(t) for t in calls}) == 4  # a fresh transaction each time
    assert all(t.state == "aborted" for t in calls[:3]) and calls[3].state == "committed"
    assert db.get(b"counter") == b"301"


def test_run_reraises_when_retries_are_exhausted(db):
    calls = []

    def fn(tx):
        calls.append(1)
        tx.put(b"mine%d" % len(calls), b"x")
        db.put(b"k", b"%d" % len(calls))
        tx.put(b"k", b"never")

    with pytest.raises(ConflictError) as info:
        db.run(fn, retries=2)
    assert info.value.key == b"k"
    assert len(calls) == 3
    assert contents(db) == {b"k": b"3"}


def test_run_with_zero_retries_tries_once(db):
    holder = db.begin()
    holder.put(b"k", b"h")
    calls = []

    def fn(tx):
        calls.append(1)
        tx.put(b"k", b"x")

    with pytest.raises(ConflictError):
        db.run(fn, retries=0)
    assert calls == [1]
    holder.commit()


def test_run_does_not_retry_other_errors_and_rolls_back(db):
    calls = []

    def fn(tx):
        calls.append(1)
        tx.put(b"k", b"v")
        raise KeyError("no")

    with pytest.raises(KeyError):
        db.run(fn, retries=5)
    assert calls == [1]
    assert db.get(b"k") is None
    assert db.stats()["active_transactions"] == 0


def test_run_retries_a_serialization_failure_at_commit(sdb):
    sdb.put(b"alice", b"on")
    sdb.put(b"bob", b"on")
    calls = []

    def go_off_call(tx):
        calls.append(1)
        on = [k for k, v in tx.scan() if v == b"on"]
        if len(calls) == 1:  # a concurrent doctor goes off call first
            other = sdb.begin()
            assert len([k for k, v in other.scan() if v == b"on"]) == 2
            other.put(b"bob", b"off")
            other.commit()
        if len(on) >= 2:
            tx.put(b"alice", b"off")
            return "went off"
        return "stayed"

    assert sdb.run(go_off_call, retries=3) == "stayed"
    assert len(calls) == 2
    assert contents(sdb) == {b"alice": b"on", b"bob": b"off"}


def test_run_validates_its_arguments(db):
    with pytest.raises(TypeError):
        db.run("not callable")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        db.run(lambda tx: None, retries=-1)


# --- autocommit helpers -------------------------------------------------------------------------------


def test_autocommit_helpers(db):
    assert db.get(b"k") is None
    assert db.get(b"k", b"d") == b"d"
    assert db.put(b"k", b"v") is None
    assert db.get(b"k") == b"v"
    db.put(b"j", b"w")
    assert list(db.scan()) == [(b"j", b"w"), (b"k", b"v")]
    assert list(db.scan(b"k")) == [(b"k", b"v")]
    assert list(db.scan(None, b"k")) == [(b"j", b"w")]
    assert list(db.scan(reverse=True)) == [(b"k", b"v"), (b"j", b"w")]
    assert list(db.scan(start=b"a", stop=b"z", reverse=True)) == [(b"k", b"v"), (b"j", b"w")]
    assert db.delete(b"k") is True
    assert db.delete(b"k") is False
    assert db.get(b"k") is None
    assert db.stats()["active_transactions"] == 0


def test_autocommit_scan_reads_one_snapshot(db):
    with db.transaction() as tx:
        for i in range(3000):
            tx.put(b"%05d" % i, b"v" * 30)
    it = db.scan()
    first = next(it)
    db.put(b"99999", b"late")
    db.delete(b"02999")
    rest = list(it)
    keys = [first[0]] + [k for k, _ in rest]
    assert keys == [b"%05d" % i for i in range(3000)]
    assert db.stats()["active_transactions"] == 0


def test_autocommit_helpers_are_their_own_transactions(db):
    tx = db.begin()
    db.put(b"k", b"v")
    assert tx.get(b"k") is None  # committed after tx began
    tx.put(b"held", b"tx")
    with pytest.raises(ConflictError):  # the autocommit put conflicts rather than waiting
        db.put(b"held", b"auto")
    assert db.get(b"held") is None
    tx.commit()
    assert db.get(b"held") == b"tx"


# --- many threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["snapshot", "serializable"])
def test_many_threads_with_their_own_transactions(path, isolation):
    db = kvstore.open(path, sync="normal", isolation=isolation)
    n_threads, n_tx = 8, 25
    errors: list = []
    barrier = threading.Barrier(n_threads)

    def worker(t):
        try:
            barrier.wait(10)
            for i in range(n_tx):

                def incr(tx, i=i):
                    tx.put(b"own-%d-%03d" % (t, i), b"x")
                    own = int(tx.get(b"count-%d" % t, b"0"))
                    tx.put(b"count-%d" % t, b"%d" % (own + 1))
                    shared = int(tx.get(b"shared", b"0"))
                    tx.put(b"shared", b"%d" % (shared + 1))

                db.run(incr, retries=10_000)
                with db.transaction(readonly=True) as tx:
                    assert int(tx.get(b"count-%d" % t)) == i + 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert db.get(b"shared") == b"%d" % (n_threads * n_tx)  # no lost update
        for t in range(n_threads):
            assert db.get(b"count-%d" % t) == b"%d" % n_tx
            assert len(list(db.scan(b"own-%d-" % t, b"own-%d." % t))) == n_tx
        assert db.stats()["active_transactions"] == 0
    finally:
        db.close()
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"shared") == b"%d" % (n_threads * n_tx)


# --- two-phase commit ----------------------------------------------------------------------------------


def test_prepare_lists_it_and_keeps_writes_invisible_and_keys_protected(anydb):
    anydb.put(b"a", b"old")
    tx = anydb.begin()
    tx.put(b"a", b"new")
    tx.put(b"b", b"new")
    tx.prepare(b"gid-1")
    assert tx.state == "prepared"
    assert anydb.prepared() == [b"gid-1"]
    assert anydb.get(b"a") == b"old" and anydb.get(b"b") is None
    assert list(anydb.scan()) == [(b"a", b"old")]
    for key in (b"a", b"b"):
        other = anydb.begin()
        with pytest.raises(ConflictError) as info:
            other.put(key, b"other")
        assert info.value.key == key
    other = anydb.begin()
    with pytest.raises(ConflictError):
        other.delete(b"a")
    # the prepared transaction itself is no longer usable directly
    for call in (lambda: tx.commit(), lambda: tx.rollback(), lambda: tx.put(b"c", b"1"), lambda: tx.get(b"a")):
        with pytest.raises(TransactionError):
            call()
    before = anydb.begin(readonly=True)
    anydb.commit_prepared(b"gid-1")
    assert anydb.prepared() == []
    assert contents(anydb) == {b"a": b"new", b"b": b"new"}
    assert before.get(b"a") == b"old"  # began before the commit
    before.commit()
    anydb.put(b"a", b"after")  # the keys are free again
    assert anydb.get(b"a") == b"after"


def test_rollback_prepared_restores_the_old_values(anydb):
    anydb.put(b"a", b"old")
    tx = anydb.begin()
    tx.put(b"a", b"new")
    tx.put(b"b", b"new")
    assert tx.delete(b"a") is True
    tx.prepare(b"gid-2")
    anydb.rollback_prepared(b"gid-2")
    assert anydb.prepared() == []
    assert contents(anydb) == {b"a": b"old"}
    anydb.put(b"b", b"free")
    assert contents(anydb) == {b"a": b"old", b"b": b"free"}


def test_two_prepared_transactions_at_once(db):
    t1, t2 = db.begin(), db.begin()
    t1.put(b"x", b"1")
    t2.put(b"y", b"2")
    t2.prepare(b"g2")
    t1.prepare(b"g1")
    assert db.prepared() == [b"g1", b"g2"]
    db.rollback_prepared(b"g1")
    db.commit_prepared(b"g2")
    assert contents(db) == {b"y": b"2"}


def test_prepare_of_a_transaction_without_writes(db):
    tx = db.begin()
    tx.get(b"k")
    tx.prepare(b"empty")
    assert db.prepared() == [b"empty"]
    db.commit_prepared(b"empty")
    assert db.prepared() == [] and contents(db) == {}


def test_unknown_gid_raises_value_error(db):
    with pytest.raises(ValueError):
        db.commit_prepared(b"nope")
    with pytest.raises(ValueError):
        db.rollback_prepared(b"nope")
    tx = db.begin()
    tx.put(b"k", b"v")
    tx.prepare(b"g")
    db.commit_prepared(b"g")
    with pytest.raises(ValueError):  # already resolved
        db.commit_prepared(b"g")
    with pytest.raises(ValueError):
        db.rollback_prepared(b"g")
    assert db.get(b"k") == b"v"


def test_bad_gids(db):
    tx = db.begin()
    tx.put(b"k", b"v")
    with pytest.raises(TypeError):
        tx.prepare("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tx.prepare(b"")
    with pytest.raises(ValueError):
        tx.prepare(b"g" * 1025)
    assert tx.state == "active"
    tx.prepare(bytearray(b"g"))
    other = db.begin()
    other.put(b"j", b"v")
    with pytest.raises(ValueError):  # a gid in use
        other.prepare(b"g")
    other.rollback()
    with pytest.raises(TypeError):
        db.commit_prepared("g")  # type: ignore[arg-type]
    db.commit_prepared(memoryview(b"g"))
    assert contents(db) == {b"k": b"v"}


@pytest.mark.parametrize("decision", ["commit", "rollback"])
def test_prepared_transaction_survives_close_and_reopen(path, decision):
    db = kvstore.open(path, sync="full")
    db.put(b"a", b"old")
    db.put(b"big", b"B" * (2 * MiB))
    tx = db.begin()
    tx.put(b"a", b"new")
    tx.put(b"b", b"new")
    tx.put(b"big", b"N" * (3 * MiB))
    tx.prepare(b"survivor")
    active = db.begin()
    active.put(b"c", b"unfinished")
    db.close()  # rolls back `active`, keeps `survivor` in doubt
    for _ in range(2):  # any number of restarts
        db = kvstore.open(path, sync="full")
        try:
            assert db.prepared() == [b"survivor"]
            assert contents(db) == {b"a": b"old", b"big": b"B" * (2 * MiB)}
            other = db.begin()
            with pytest.raises(ConflictError):
                other.put(b"b", b"other")
            other = db.begin()
            with pytest.raises(ConflictError):
                other.put(b"a", b"other")
        finally:
            db.close()
    db = kvstore.open(path, sync="full")
    if decision == "commit":
        db.commit_prepared(b"survivor")
        expected = {b"a": b"new", b"b": b"new", b"big": b"N" * (3 * MiB)}
    else:
        db.rollback_prepared(b"survivor")
        expected = {b"a": b"old", b"big": b"B" * (2 * MiB)}
    assert db.prepared() == [] and contents(db) == expected
    db.close()
    with kvstore.open(path, sync="full") as db:
        assert db.prepared() == [] and contents(db) == expected
        db.put(b"a", b"free")  # no longer protected


@pytest.mark.parametrize("sync", ["full", "normal", "off"])
def test_prepare_is_durable_in_every_sync_mode(sync):
    fs = FaultFS(seed=4, dirs=["/d"])
    db = kvstore.open("/d/db", sync=sync, _fs=fs)
    db.put(b"a", b"old")
    db.checkpoint()
    tx = db.begin()
    tx.put(b"a", b"new")
    tx.prepare(b"g")
    fs = fs.crash(DropAll())
    db = kvstore.open("/d/db", sync=sync, _fs=fs)
    assert db.prepared() == [b"g"]
    assert db.get(b"a") == b"old"
    db.commit_prepared(b"g")
    if sync == "full":
        fs = fs.crash(DropAll())
    else:
        db.close()
        fs = fs.crash(KeepAll())
    with kvstore.open("/d/db", sync=sync, _fs=fs) as db:
        assert db.prepared() == [] and db.get(b"a") == b"new"


# --- overflow values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1 * MiB, 5 * MiB])
def test_overflow_values_round_trip(path, size):
    value = os.urandom(size)
    with kvstore.open(path, sync="off") as db:
        with db.transaction() as tx:
            tx.put(b"big", value)
            tx.put(b"small", b"s")
            assert tx.get(b"big") == value
        assert db.get(b"big") == value
        assert list(db.scan()) == [(b"big", value), (b"small", b"s")]
    with kvstore.open(path, sync="off") as db:
        assert db.get(b"big") == value


def test_rollback_restores_an_old_big_value(db):
    old = os.urandom(5 * MiB)
    db.put(b"big", old)
    for replacement in (os.urandom(MiB), b"tiny", None):
        tx = db.begin()
        if replacement is None:
            assert tx.delete(b"big") is True
            assert tx.get(b"big") is None
        else:
            tx.put(b"big", replacement)
            assert tx.get(b"big") == replacement
        tx.rollback()
        assert db.get(b"big") == old
    tx = db.begin()
    sp = tx.savepoint()
    tx.put(b"big", os.urandom(2 * MiB))
    tx.rollback_to(sp)
    assert tx.get(b"big") == old
    tx.commit()
    assert db.get(b"big") == old


def test_big_values_and_snapshots(db):
    v1, v2 = os.urandom(2 * MiB), os.urandom(3 * MiB)
    db.put(b"big", v1)
    reader = db.begin(readonly=True)
    db.put(b"big", v2)
    for i in range(70):  # the automatic purge runs every 64 commits
        db.put(b"n", b"%d" % i)
    db.purge()
    assert reader.get(b"big") == v1
    assert db.get(b"big") == v2
    reader.commit()
    db.purge()
    assert db.get(b"big") == v2
    assert db.delete(b"big") is True
    db.purge()
    assert db.get(b"big") is None


# --- serializable: liveness ---------------------------------------------------------------------------------


def test_serializable_read_only_transaction_commits(sdb):
    for k in (b"x", b"y", b"z"):
        sdb.put(k, b"0")
    for declared in (True, False):
        reader = sdb.begin(readonly=declared)
        assert reader.get(b"x") == b"0"
        with sdb.transaction() as w:  # overwrites what the reader read, and more
            w.put(b"x", b"1")
            w.put(b"y", b"1")
        assert reader.get(b"y") == b"0"
        assert list(reader.scan()) == [(b"x", b"0"), (b"y", b"0"), (b"z", b"0")]
        reader.commit()
        assert reader.state == "committed"
        sdb.put(b"x", b"0")
        sdb.put(b"y", b"0")


def test_serializable_transaction_with_only_outgoing_antidependencies_commits(sdb):
    sdb.put(b"x", b"0")
    t1 = sdb.begin()
    assert t1.get(b"x") == b"0"  # t1 -> t2 (t1 read x, t2 overwrites it)
    t2 = sdb.begin()
    t2.put(b"x", b"1")
    t2.commit()
    t1.put(b"y", b"t1")  # y: read by nobody
    t1.commit()
    assert contents(sdb) == {b"x": b"1", b"y": b"t1"}


def test_serializable_transaction_with_only_incoming_antidependencies_commits(sdb):
    sdb.put(b"x", b"0")
    sdb.put(b"y", b"0")
    pivot = sdb.begin()
    pivot.put(b"x", b"pivot")
    readers = []
    for i in range(3):  # readers of x (old version) -> pivot
        r = sdb.begin()
        assert r.get(b"x") == b"0"
        r.put(b"r%d" % i, b"1")
        readers.append(r)
    for r in readers[:2]:
        r.commit()
    pivot.put(b"y", b"pivot")
    pivot.commit()
    readers[2].commit()
    assert contents(sdb) == {b"x": b"pivot", b"y": b"pivot", b"r0": b"1", b"r1": b"1", b"r2": b"1"}


def test_serializable_long_reader_whose_keys_changed_commits(sdb):
    keys = [b"k%02d" % i for i in range(20)]
    with sdb.transaction() as tx:
        for k in keys:
            tx.put(k, b"0")
    long = sdb.begin()
    total = sum(int(long.get(k)) for k in keys)
    assert total == 0
    assert len(list(long.scan(b"k", b"l"))) == 20
    for n in range(1, 11):  # plain backward validation would abort `long`
        with sdb.transaction() as tx:
            for k in keys:
                tx.put(k, b"%d" % n)
    assert sum(int(long.get(k)) for k in keys) == 0
    long.put(b"report", b"%d" % total)
    long.commit()
    assert sdb.get(b"report") == b"0"
    assert sdb.get(b"k00") == b"10"


def test_serializable_reader_in_a_chain_of_writers_commits(sdb):
    # t1 -> t2 -> t3 where each reads what the next overwrites, committed in order
    # t1, t2, t3: no T_out commits before its pivot, so all commit
    for k in (b"a", b"b", b"c"):
        sdb.put(k, b"0")
    t1, t2, t3 = sdb.begin(), sdb.begin(), sdb.begin()
    t1.get(b"a")
    t2.get(b"b")
    t2.put(b"a", b"t2")
    t3.put(b"b", b"t3")
    t1.put(b"c", b"t1")
    t1.commit()
    t2.commit()
    t3.commit()
    assert contents(sdb) == {b"a": b"t2", b"b": b"t3", b"c": b"t1"}


def test_serializable_write_write_conflict_is_first_updater_wins(sdb):
    sdb.put(b"k", b"0")
    t1, t2 = sdb.begin(), sdb.begin()
    t1.put(b"k", b"1")
    with pytest.raises(ConflictError) as info:
        t2.put(b"k", b"2")
    assert info.value.key == b"k" and info.value.kind == "write-write"
    t1.commit()
    assert sdb.get(b"k") == b"1"


def test_begin_isolation_overrides_the_database_default(db):
    tx = db.begin(isolation="serializable")
    assert tx.isolation == "serializable"
    tx.rollback()
    assert db.begin().isolation == "snapshot"


# --- bugs ------------------------------------------------------------------------------------------------------


def test_serializable_write_skew_through_a_prepared_transaction_is_prevented(sdb):
    sdb.put(b"alice", b"on")
    sdb.put(b"bob", b"on")
    t1 = sdb.begin()
    assert [v for _, v in t1.scan()] == [b"on", b"on"]
    t1.put(b"alice", b"off")
    t1.prepare(b"g")
    t2 = sdb.begin()
    committed = {"t1"}
    try:
        assert [v for _, v in t2.scan()] == [b"on", b"on"]
        t2.put(b"bob", b"off")
        t2.commit()
        committed.add("t2")
    except ConflictError:
        pass
    try:
        sdb.commit_prepared(b"g")
    except ConflictError:  # a coordinator would see the failure
        committed.discard("t1")
    final = contents(sdb)
    assert b"on" in final.values(), f"write skew committed: {final} ({sorted(committed)})"


def test_serializable_begin_during_a_commit_wait_cannot_write_skew(sdb):
    sdb.put(b"x", b"on")
    sdb.put(b"y", b"on")
    wal = sdb._wal
    original = wal.commit_wait
    outcome = {}

    def commit_wait(lsn):  # the group-commit wait of `a`: another thread runs `b` now
        if not outcome:
            outcome["b"] = "started"
            b = sdb.begin()
            try:
                if b.get(b"x") == b"on" and b.get(b"y") == b"on":
                    b.put(b"x", b"off")
                b.commit()
                outcome["b"] = "committed"
            except ConflictError:
                outcome["b"] = "aborted"
        return original(lsn)

    wal.commit_wait = commit_wait
    try:
        a = sdb.begin()
        assert a.get(b"x") == b"on" and a.get(b"y") == b"on"
        a.put(b"y", b"off")
        a.commit()
    finally:
        wal.commit_wait = original
    assert outcome["b"] in ("committed", "aborted")
    final = contents(sdb)
    assert b"on" in final.values(), f"write skew committed: {final}"


def test_serializable_delete_of_a_key_seen_as_deleted_makes_no_antidependency(sdb):
    sdb.put(b"k", b"1")
    sdb.put(b"j", b"1")
    old = sdb.begin()
    old.get(b"zzz")  # an old reader keeps W's SSI state around
    w = sdb.begin()
    w.delete(b"k")
    w.commit()
    t = sdb.begin()
    assert t.delete(b"k") is False  # t sees w's delete: w -> t (wr), no t -> w
    r = sdb.begin()
    assert r.get(b"j") == b"1"  # r -> t once t writes j: t's only anti-dependency
    t.put(b"j", b"2")
    t.commit()
    r.commit()
    old.commit()
    assert contents(sdb) == {b"j": b"2"}


def test_serializable_read_only_optimisation_lets_the_pivot_commit(sdb):
    # ro -> pivot -> out, with `out` committing after ro's snapshot: a serial
    # order (ro, pivot, out) exists, and SSI's read-only rule lets all commit
    for k in (b"x", b"y"):
        sdb.put(k, b"0")
    ro = sdb.begin(readonly=True)
    assert ro.get(b"x") == b"0"
    pivot = sdb.begin()
    assert pivot.get(b"y") == b"0"
    pivot.put(b"x", b"pivot")
    out = sdb.begin()
    out.put(b"y", b"out")
    out.commit()
    pivot.commit()
    assert ro.get(b"y") == b"0"
    ro.commit()
    assert contents(sdb) == {b"x": b"pivot", b"y": b"out"}


def test_serializable_failure_at_the_end_of_a_with_block_propagates(sdb):
    sdb.put(b"alice", b"on")
    sdb.put(b"bob", b"on")
    t1 = sdb.begin()
    assert [v for _, v in t1.scan()] == [b"on", b"on"]
    with pytest.raises(ConflictError):
        with sdb.transaction() as t2:
            assert [v for _, v in t2.scan()] == [b"on", b"on"]
            t2.put(b"bob", b"off")
            t1.put(b"alice", b"off")
            t1.commit()
    assert t2.state == "aborted"
    assert contents(sdb) == {b"alice": b"off", b"bob": b"on"}


def test_serializable_failure_names_the_victims_role(tmp_path):
    """SSI aborts the pivot of a dangerous structure; when the pivot is
    already prepared it cannot, and aborts T_in instead.  The error says
    which: a T_in victim is not told it is the pivot."""
    with kvstore.open(tmp_path / "db", sync="off", isolation="serializable") as db:
        db.put(b"a", b"0")
        db.put(b"b", b"0")
        pivot = db.begin()
        assert pivot.get(b"a") == b"0"
        t_in = db.begin()
        db.put(b"a", b"1")  # T_out commits first: pivot -rw-> T_out
        pivot.put(b"b", b"1")
        pivot.prepare(b"gid-pivot")  # decided: it can no longer be the one aborted
        with pytest.raises(ConflictError) as caught:
            t_in.get(b"b")  # reads what the pivot overwrote: t_in -rw-> pivot
            t_in.put(b"c", b"1")
            t_in.commit()
        message = str(caught.value)
        assert "pivot has already committed or prepared" in message and "is the pivot" not in message, message
        db.commit_prepared(b"gid-pivot")


# --- the one-descent put (Database._put_in_leaf) ---------------------------------------


def _mixed_writes(db: kvstore.Database) -> None:
    """Puts (new keys, updates, rewrites of a transaction's own key, puts
    over delete marks, overflow values) and deletes, enough to split leaves
    and open undo pages."""
    rng = random.Random(3)
    keys = [b"k%03d" % i for i in range(150)]
    for _ in range(80):
        with db.transaction() as tx:
            for _ in range(rng.randint(1, 8)):
                if rng.random() < 0.2:
                    tx.delete(rng.choice(keys))
                else:
                    size = 3000 if rng.random() < 0.05 else rng.randint(0, 120)  # now and then an overflow value
                    tx.put(rng.choice(keys), rng.randbytes(size))


def _logged_writes(db: kvstore.Database) -> list[tuple[int, int, bytes]]:
    from wal.format import RecordType

    wal = db._wal
    wal.flush()
    return [(r.type, r.txid, r.payload) for r in wal.records(wal.segments()[0].first_lsn) if r.type in (RecordType.TXN_WRITE, RecordType.COMMIT)]


def test_the_one_descent_put_logs_what_the_general_path_logs(tmp_path, monkeypatch):
    """The fast path writes the very log records (undo ops, then the leaf
    put) and the same contents as _write_precheck + _write_version, record
    for record, over a history that takes both paths."""
    from kvstore.database import Database

    fast_path = Database._put_in_leaf
    taken = []

    def counting(self, tx, key, value):
        done = fast_path(self, tx, key, value)
        taken.append(done)
        return done

    monkeypatch.setattr(Database, "_put_in_leaf", counting)
    fast = kvstore.open(str(tmp_path / "fast"), checkpoint_interval=3600.0)
    _mixed_writes(fast)
    assert taken.count(True) > 200 and taken.count(False) > 5  # both paths ran
    monkeypatch.setattr(Database, "_put_in_leaf", lambda self, tx, key, value: False)
    slow = kvstore.open(str(tmp_path / "slow"), checkpoint_interval=3600.0)
    _mixed_writes(slow)
    assert _logged_writes(fast) == _logged_writes(slow)
    assert list(fast.scan()) == list(slow.scan())
    fast.close()
    slow.close()


def test_a_put_whose_log_append_fails_gives_back_the_undo_page_it_opened(path, monkeypatch):
    """A put whose undo record opens an undo page allocates the page before
    it logs; when the append fails (the log is poisoned) the page id is
    given back, not left allocated without content."""
    from pages.rollback_segment import encode_undo
    from wal.errors import PoisonedError

    db = kvstore.open(path, sync="off")
    store = db._store
    with db.transaction() as tx:
        tx.put(b"k", b"0123456789")
    tx = db.begin()
    length = len(encode_undo(1, 1, 1, 1, 0, b"k", b"0123456789"))
    while store.undo.tail_room(length) is not None:
        tx.put(b"k", b"0123456789")
    undo_pages = store.undo.pages()

    def fail(*args, **kwargs):
        raise PoisonedError("the log failed (injected)", OSError(5, "EIO"))

    monkeypatch.setattr(db._wal, "append", fail)
    with pytest.raises(PoisonedError):
        tx.put(b"k", b"0123456789")
    pf = store.pagefile
    assert [lid for lid in range(1, pf.nlids) if pf.is_allocated(lid) and not pf.has_image(lid) and store.pool.cached(lid) is None] == []
    assert store.undo.pages() == undo_pages
    monkeypatch.undo()
    db.close()
