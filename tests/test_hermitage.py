"""Hermitage (github.com/ept/hermitage) anomaly cases, as interleaved
transactions in one thread, for both isolation levels (SPEC "Guarantees" 3,
TESTING.md section 6).

"Prevented" accepts a ConflictError at any operation or at commit; the
transaction that got it must be rolled back, and what the committed
transactions observed plus the final committed state must be explained by
some serial order of the committed transactions (checked by brute force over
the permutations).  Under snapshot isolation G2-item (write skew), G2 (write
skew over a range read) and the read-only anomaly must actually occur, so
those tests are not vacuous; under serializable they are prevented.

Each transaction is also written as a *program* over a dict (the same logic
run serially), which is what the serial-order check replays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

import kvstore
from kvstore import ConflictError, reliability

LEVELS = ["snapshot", "serializable"]
ABORTED = object()  # what an operation of a rolled-back transaction returns here


@pytest.fixture(autouse=True)
def count_hermitage_case(request):
    """Each passing case (a test and level) adds 1 to the reliability
    report's "Hermitage cases" (TESTING.md section 9); the canary is not a
    case.  The call phase's report is logged before teardown runs, so a
    failure has already been counted in ``session.testsfailed`` here."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before and "canary" not in request.node.name:
        reliability.add("hermitage_cases", 1)


@pytest.fixture
def make_db(tmp_path):
    opened = []

    def make(level: str, init: dict[bytes, bytes] | None = None):
        db = kvstore.open(tmp_path / f"db-{len(opened)}", sync="off", isolation=level)
        opened.append(db)
        with db.transaction() as tx:
            for k, v in (init if init is not None else INIT).items():
                tx.put(k, v)
        return db

    yield make
    for db in opened:
        db.close()


INIT = {b"1": b"10", b"2": b"20"}


class Interleaving:
    """Named transactions driven step by step from one thread.

    ``h("T1", "put", k, v)`` runs one operation; after a ConflictError the
    transaction is dead, and its later operations are skipped (they return
    ABORTED).  ``h.observed[name]`` collects what each transaction read.
    """

    def __init__(self, db):
        self.db = db
        self.txs: dict[str, Any] = {}
        self.conflicts: dict[str, tuple[str, ConflictError]] = {}
        self.committed: list[str] = []
        self.rolled_back: list[str] = []
        self.observed: dict[str, list] = {}

    def begin(self, *names: str, readonly: bool = False) -> None:
        for name in names:
            self.txs[name] = self.db.begin(readonly=readonly)
            self.observed[name] = []

    def alive(self, name: str) -> bool:
        return name not in self.conflicts and self.txs[name].state == "active"

    def __call__(self, name: str, op: str, *args: Any) -> Any:
        if name in self.conflicts:
            return ABORTED
        tx = self.txs[name]
        try:
            result = getattr(tx, op)(*args)
            if op == "scan":
                result = list(result)
        except ConflictError as e:
            assert tx.state == "aborted", "a ConflictError must leave the transaction rolled back"
            assert e.kind, "a ConflictError says which kind of conflict it was"
            assert e.key is None or isinstance(e.key, bytes)
            self.conflicts[name] = (op, e)
            return ABORTED
        if op in ("get", "scan"):
            self.observed[name].append(result)
        elif op == "commit":
            self.committed.append(name)
        elif op == "rollback":
            self.rolled_back.append(name)
        return result

    def conflict_at(self, name: str) -> str | None:
        return self.conflicts[name][0] if name in self.conflicts else None


def final_state(db) -> dict[bytes, bytes]:
    return dict(db.scan())


class Sim:
    """The serial replay's view of a transaction: the same get/scan/put/delete
    calls against a dict, recording observations like Interleaving does."""

    def __init__(self, state: dict[bytes, bytes]):
        self.state = state
        self.observed: list = []

    def get(self, key: bytes, default: Any = None) -> Any:
        v = self.state.get(key, default)
        self.observed.append(v)
        return v

    def scan(self, start: bytes | None = None, stop: bytes | None = None, reverse: bool = False) -> list:
        items = sorted((k, v) for k, v in self.state.items() if (start is None or k >= start) and (stop is None or k < stop))
        if reverse:
            items.reverse()
        self.observed.append(items)
        return items

    def put(self, key: bytes, value: bytes) -> None:
        self.state[key] = value

    def delete(self, key: bytes) -> bool:
        return self.state.pop(key, None) is not None


Program = Callable[[Sim], None]


def serial_orders(init: dict, programs: dict[str, Program], h: Interleaving, final: dict) -> list[tuple[str, ...]]:
    """The orders of the committed transactions that reproduce what each
    committed transaction observed and the final state."""
    names = list(h.committed)
    found = []
    for order in itertools.permutations(names):
        state = dict(init)
        ok = True
        for name in order:
            sim = Sim(state)
            programs[name](sim)
            if sim.observed != h.observed[name]:
                ok = False
                break
        if ok and state == final:
            found.append(order)
    return found


def assert_serializable(db, init, programs, h: Interleaving) -> None:
    for name in h.conflicts:
        assert h.txs[name].state == "aborted"
    final = final_state(db)
    orders = serial_orders(init, programs, h, final)
    assert orders, (
        f"no serial order of {h.committed} explains the observations {h.observed} "
        f"and the final state {final} (conflicts: { {n: c[0] for n, c in h.conflicts.items()} })"
    )


def assert_not_serializable(db, init, programs, h: Interleaving) -> None:
    final = final_state(db)
    assert not serial_orders(init, programs, h, final), "the anomaly did not occur"


# --- G0: write cycles (dirty writes) ---------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_g0_write_cycles_are_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    h("T1", "put", b"1", b"11")
    h("T2", "put", b"1", b"12")
    h("T1", "put", b"2", b"21")
    h("T1", "commit")
    h("T2", "put", b"2", b"22")
    h("T2", "commit")

    def t1(s):
        s.put(b"1", b"11")
        s.put(b"2", b"21")

    def t2(s):
        s.put(b"1", b"12")
        s.put(b"2", b"22")

    assert h.committed == ["T1"]  # first updater wins
    assert h.conflict_at("T2") == "put"
    assert final_state(db) == {b"1": b"11", b"2": b"21"}
    assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


# --- G1a: aborted reads --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_g1a_aborted_reads_are_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    h("T1", "put", b"1", b"101")
    assert h("T2", "scan") == [(b"1", b"10"), (b"2", b"20")]
    h("T1", "rollback")
    assert h("T2", "scan") == [(b"1", b"10"), (b"2", b"20")]
    assert h("T2", "get", b"1") == b"10"
    h("T2", "commit")
    assert h.committed == ["T2"]
    assert final_state(db) == INIT

    def t2(s):
        s.scan()
        s.scan()
        s.get(b"1")

    assert_serializable(db, INIT, {"T2": t2}, h)


# --- G1b: intermediate reads -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_g1b_intermediate_reads_are_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    h("T1", "put", b"1", b"101")
    assert h("T2", "scan") == [(b"1", b"10"), (b"2", b"20")]
    h("T1", "put", b"1", b"11")
    h("T1", "commit")
    assert h("T2", "scan") == [(b"1", b"10"), (b"2", b"20")]  # never 101
    h("T2", "commit")
    assert h.committed == ["T1", "T2"]

    def t1(s):
        s.put(b"1", b"101")
        s.put(b"1", b"11")

    def t2(s):
        s.scan()
        s.scan()

    assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)
    # and a transaction that starts now sees only the final value
    assert db.get(b"1") == b"11"


# --- G1c: circular information flow ----------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_g1c_circular_information_flow_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    h("T1", "put", b"1", b"11")
    h("T2", "put", b"2", b"22")
    r1 = h("T1", "get", b"2")
    r2 = h("T2", "get", b"1")
    # neither sees the other's uncommitted write: no wr cycle
    assert r1 in (b"20", ABORTED) and r2 in (b"10", ABORTED)
    h("T1", "commit")
    h("T2", "commit")

    def t1(s):
        s.put(b"1", b"11")
        s.get(b"2")

    def t2(s):
        s.put(b"2", b"22")
        s.get(b"1")

    if level == "snapshot":
        # both commit; each read the other's old value (that is write skew,
        # G2-item, which snapshot isolation allows -- not G1c)
        assert h.committed == ["T1", "T2"]
        assert final_state(db) == {b"1": b"11", b"2": b"22"}
    else:
        assert len(h.committed) == 1
        assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


# --- OTV: observed transaction vanishes --------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_otv_observed_transaction_vanishes_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    h("T1", "put", b"1", b"11")
    h("T1", "put", b"2", b"19")
    h("T2", "put", b"1", b"12")
    h("T1", "commit")
    h.begin("T3")
    assert h("T3", "get", b"1") == b"11"
    h("T2", "put", b"2", b"18")
    assert h("T3", "get", b"2") == b"19"
    h("T2", "commit")
    assert h("T3", "get", b"2") == b"19"
    assert h("T3", "get", b"1") == b"11"
    h("T3", "commit")

    def t1(s):
        s.put(b"1", b"11")
        s.put(b"2", b"19")

    def t2(s):
        s.put(b"1", b"12")
        s.put(b"2", b"18")

    def t3(s):
        s.get(b"1")
        s.get(b"2")
        s.get(b"2")
        s.get(b"1")

    assert "T2" not in h.committed and h.conflict_at("T2") == "put"
    assert h.committed == ["T1", "T3"]
    assert_serializable(db, INIT, {"T1": t1, "T2": t2, "T3": t3}, h)


# --- PMP: predicate-many-preceders ---------------------------------------------------------------------------


def _where(items, pred):
    return [(k, v) for k, v in items if pred(int(v))]


@pytest.mark.parametrize("level", LEVELS)
def test_pmp_predicate_many_preceders_read_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert _where(h("T1", "scan"), lambda v: v == 30) == []
    h("T2", "put", b"3", b"30")
    h("T2", "commit")
    # the row T2 inserted is a phantom T1 must not see
    assert _where(h("T1", "scan"), lambda v: v % 3 == 0) == []
    assert h("T1", "scan", b"1", b"9") == [(b"1", b"10"), (b"2", b"20")]
    h("T1", "commit")
    assert h.committed == ["T2", "T1"]

    def t1(s):
        s.scan()
        s.scan()
        s.scan(b"1", b"9")

    def t2(s):
        s.put(b"3", b"30")

    assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


@pytest.mark.parametrize("level", LEVELS)
def test_pmp_predicate_many_preceders_write_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")

    def t1(s):  # update test set value = value + 10
        for k, v in s.scan():
            s.put(k, b"%d" % (int(v) + 10))

    def t2(s):  # delete from test where value = 20
        for k, v in s.scan():
            if int(v) == 20:
                s.delete(k)

    for k, v in h("T1", "scan"):
        h("T1", "put", k, b"%d" % (int(v) + 10))
    rows = h("T2", "scan")
    assert rows == [(b"1", b"10"), (b"2", b"20")]  # T1's update is not visible
    for k, v in rows:
        if int(v) == 20:
            h("T2", "delete", k)  # k was written by the unfinished T1
    h("T1", "commit")
    h("T2", "commit")
    assert h.conflict_at("T2") == "delete"
    assert h.committed == ["T1"]
    assert final_state(db) == {b"1": b"20", b"2": b"30"}
    assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


@pytest.mark.parametrize("level", LEVELS)
def test_pmp_predicate_many_preceders_write_after_commit_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")

    def t1(s):
        for k, v in s.scan():
            s.put(k, b"%d" % (int(v) + 10))

    def t2(s):
        for k, v in s.scan():
            if int(v) == 20:
                s.delete(k)

    for k, v in h("T1", "scan"):
        h("T1", "put", k, b"%d" % (int(v) + 10))
    h("T1", "commit")  # T1 commits before T2 acts on its stale snapshot
    rows = h("T2", "scan")
    assert rows == [(b"1", b"10"), (b"2", b"20")]
    for k, v in rows:
        if int(v) == 20:
            h("T2", "delete", k)
    h("T2", "commit")
    assert h.conflict_at("T2") == "delete"
    assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


# --- P4: lost update --------------------------------------------------------------------------------------------


def _incr(key):
    def program(s):
        s.put(key, b"%d" % (int(s.get(key)) + 1))

    return program


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("first_commits_before_second_writes", [False, True])
def test_p4_lost_update_is_prevented(make_db, level, first_commits_before_second_writes):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    v1 = h("T1", "get", b"1")
    v2 = h("T2", "get", b"1")
    assert v1 == v2 == b"10"
    h("T1", "put", b"1", b"%d" % (int(v1) + 1))
    if first_commits_before_second_writes:
        h("T1", "commit")
    h("T2", "put", b"1", b"%d" % (int(v2) + 1))
    if not first_commits_before_second_writes:
        h("T1", "commit")
    h("T2", "commit")
    assert h.committed == ["T1"]
    op, err = h.conflicts["T2"]
    assert op == "put"  # at that write, first updater wins
    assert err.key == b"1" and err.kind == "write-write"
    assert db.get(b"1") == b"11"
    assert_serializable(db, INIT, {"T1": _incr(b"1"), "T2": _incr(b"1")}, h)


@pytest.mark.parametrize("level", LEVELS)
def test_p4_lost_update_via_delete_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert h("T1", "get", b"1") == h("T2", "get", b"1") == b"10"
    h("T1", "put", b"1", b"11")
    h("T1", "commit")
    h("T2", "delete", b"1")
    h("T2", "commit")
    assert h.committed == ["T1"] and h.conflict_at("T2") == "delete"
    assert db.get(b"1") == b"11"


# --- G-single: read skew (single anti-dependency cycles) ------------------------------------------------------


def _transfer(s):  # T2: move 2 from row 2 to row 1 (10, 20 -> 12, 18)
    a, b = int(s.get(b"1")), int(s.get(b"2"))
    s.put(b"1", b"%d" % (a + 2))
    s.put(b"2", b"%d" % (b - 2))


@pytest.mark.parametrize("level", LEVELS)
def test_g_single_read_skew_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert h("T1", "get", b"1") == b"10"
    a, b = h("T2", "get", b"1"), h("T2", "get", b"2")
    h("T2", "put", b"1", b"%d" % (int(a) + 2))
    h("T2", "put", b"2", b"%d" % (int(b) - 2))
    h("T2", "commit")
    assert h("T1", "get", b"2") == b"20"  # not 18: the sum T1 sees stays 30
    assert h("T1", "scan") == [(b"1", b"10"), (b"2", b"20")]
    h("T1", "commit")
    assert h.committed == ["T2", "T1"]  # a read-only reader is not aborted

    def t1(s):
        s.get(b"1")
        s.get(b"2")
        s.scan()

    assert_serializable(db, INIT, {"T1": t1, "T2": _transfer}, h)


@pytest.mark.parametrize("level", LEVELS)
def test_g_single_read_skew_with_a_predicate_read_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert _where(h("T1", "scan"), lambda v: v % 5 == 0) == [(b"1", b"10"), (b"2", b"20")]
    a, b = h("T2", "get", b"1"), h("T2", "get", b"2")
    h("T2", "put", b"1", b"%d" % (int(a) + 2))
    h("T2", "put", b"2", b"%d" % (int(b) - 2))
    h("T2", "commit")
    assert _where(h("T1", "scan"), lambda v: v % 3 == 0) == []
    h("T1", "commit")

    def t1(s):
        s.scan()
        s.scan()

    assert h.committed == ["T2", "T1"]
    assert_serializable(db, INIT, {"T1": t1, "T2": _transfer}, h)


@pytest.mark.parametrize("level", LEVELS)
def test_g_single_read_skew_with_a_write_is_prevented(make_db, level):
    db = make_db(level)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert h("T1", "get", b"1") == b"10"
    a, b = h("T2", "get", b"1"), h("T2", "get", b"2")
    h("T2", "put", b"1", b"%d" % (int(a) + 2))
    h("T2", "put", b"2", b"%d" % (int(b) - 2))
    h("T2", "commit")
    for k, v in h("T1", "scan") if h.alive("T1") else []:  # delete from test where value = 20
        if int(v) == 20:
            h("T1", "delete", k)
    h("T1", "commit")

    def t1(s):
        s.get(b"1")
        for k, v in s.scan():
            if int(v) == 20:
                s.delete(k)

    assert h.committed == ["T2"] and h.conflict_at("T1") == "delete"
    assert final_state(db) == {b"1": b"12", b"2": b"18"}
    assert_serializable(db, INIT, {"T1": t1, "T2": _transfer}, h)


# --- G2-item: write skew ----------------------------------------------------------------------------------------

DOCTORS = {b"alice": b"on", b"bob": b"on"}


def _go_off_call(me: bytes):
    """At least one doctor must stay on call: go off only if someone else is on."""

    def program(s):
        on = [k for k, v in s.scan() if v == b"on"]
        if len(on) >= 2:
            s.put(me, b"off")

    return program


def _doctor_step(h: Interleaving, name: str, me: bytes, step: str) -> None:
    if step == "read":
        h(name, "scan")
    elif step == "write":
        if not h.alive(name):
            return
        on = [k for k, v in h.observed[name][-1] if v == b"on"]
        if len(on) >= 2:
            h(name, "put", me, b"off")
    else:
        h(name, "commit")


WRITE_SKEW_SCHEDULES = {
    # hermitage's order: both read, both write, T1 commits, T2 commits
    "rr-ww-cc": [("T1", "read"), ("T2", "read"), ("T1", "write"), ("T2", "write"), ("T1", "commit"), ("T2", "commit")],
    "rr-ww-cc-reversed": [("T1", "read"), ("T2", "read"), ("T2", "write"), ("T1", "write"), ("T2", "commit"), ("T1", "commit")],
    # T1 finishes completely before T2 writes
    "rr-wc-wc": [("T1", "read"), ("T2", "read"), ("T1", "write"), ("T1", "commit"), ("T2", "write"), ("T2", "commit")],
    # T2 reads only after T1 has written (T1's write is invisible to it)
    "rw-r-w-cc": [("T1", "read"), ("T1", "write"), ("T2", "read"), ("T2", "write"), ("T1", "commit"), ("T2", "commit")],
    # T1 committed before T2 read, but T2's snapshot is older
    "rwc-r-wc": [("T1", "read"), ("T1", "write"), ("T1", "commit"), ("T2", "read"), ("T2", "write"), ("T2", "commit")],
}


def _run_write_skew(make_db, level, schedule):
    db = make_db(level, DOCTORS)
    h = Interleaving(db)
    h.begin("T1", "T2")
    me = {"T1": b"alice", "T2": b"bob"}
    for name, step in WRITE_SKEW_SCHEDULES[schedule]:
        _doctor_step(h, name, me[name], step)
    programs = {"T1": _go_off_call(b"alice"), "T2": _go_off_call(b"bob")}
    return db, h, programs


@pytest.mark.parametrize("schedule", list(WRITE_SKEW_SCHEDULES))
def test_g2_item_write_skew_occurs_under_snapshot(make_db, schedule):
    db, h, programs = _run_write_skew(make_db, "snapshot", schedule)
    assert sorted(h.committed) == ["T1", "T2"] and not h.conflicts
    assert final_state(db) == {b"alice": b"off", b"bob": b"off"}  # nobody on call
    assert_not_serializable(db, DOCTORS, programs, h)


@pytest.mark.parametrize("schedule", list(WRITE_SKEW_SCHEDULES))
def test_g2_item_write_skew_is_prevented_under_serializable(make_db, schedule):
    db, h, programs = _run_write_skew(make_db, "serializable", schedule)
    assert len(h.committed) == 1 and len(h.conflicts) == 1
    assert b"on" in final_state(db).values()  # the invariant holds
    assert_serializable(db, DOCTORS, programs, h)


def test_g2_item_hermitage_values_occurs_under_snapshot(make_db):
    db = make_db("snapshot")
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert h("T1", "get", b"1") == b"10" and h("T1", "get", b"2") == b"20"
    assert h("T2", "get", b"1") == b"10" and h("T2", "get", b"2") == b"20"
    h("T1", "put", b"1", b"11")
    h("T2", "put", b"2", b"21")
    h("T1", "commit")
    h("T2", "commit")
    assert h.committed == ["T1", "T2"]

    def t1(s):
        s.get(b"1"), s.get(b"2")
        s.put(b"1", b"11")

    def t2(s):
        s.get(b"1"), s.get(b"2")
        s.put(b"2", b"21")

    assert_not_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


def test_g2_item_hermitage_values_is_prevented_under_serializable(make_db):
    db = make_db("serializable")
    h = Interleaving(db)
    h.begin("T1", "T2")
    h("T1", "get", b"1"), h("T1", "get", b"2")
    h("T2", "get", b"1"), h("T2", "get", b"2")
    h("T1", "put", b"1", b"11")
    h("T2", "put", b"2", b"21")
    h("T1", "commit")
    h("T2", "commit")

    def t1(s):
        s.get(b"1"), s.get(b"2")
        s.put(b"1", b"11")

    def t2(s):
        s.get(b"1"), s.get(b"2")
        s.put(b"2", b"21")

    assert len(h.committed) == 1
    assert_serializable(db, INIT, {"T1": t1, "T2": t2}, h)


# --- G2: anti-dependency cycles over a range read (phantoms) -------------------------------------------------------

TASKS = {b"other/1": b"x", b"zzz": b"y"}


def _claim(me: bytes):
    """Insert a task only if the task range is empty (at most one task)."""

    def program(s):
        if not s.scan(b"task/", b"task0"):
            s.put(b"task/" + me, b"claimed")

    return program


def _run_g2(make_db, level, commit_between: bool):
    db = make_db(level, TASKS)
    h = Interleaving(db)
    h.begin("T1", "T2")
    rows1 = h("T1", "scan", b"task/", b"task0")
    rows2 = h("T2", "scan", b"task/", b"task0")
    assert rows1 in ([], ABORTED) and rows2 in ([], ABORTED)
    if rows1 == []:
        h("T1", "put", b"task/a", b"claimed")
    if commit_between:
        h("T1", "commit")
    if rows2 == [] and h.alive("T2"):
        h("T2", "put", b"task/b", b"claimed")  # a new key: no write-write conflict possible
    if not commit_between:
        h("T1", "commit")
    h("T2", "commit")
    return db, h, {"T1": _claim(b"a"), "T2": _claim(b"b")}


@pytest.mark.parametrize("commit_between", [False, True])
def test_g2_anti_dependency_cycles_occur_under_snapshot(make_db, commit_between):
    db, h, programs = _run_g2(make_db, "snapshot", commit_between)
    assert h.committed == ["T1", "T2"] and not h.conflicts
    assert len(list(db.scan(b"task/", b"task0"))) == 2  # the invariant broke
    assert_not_serializable(db, TASKS, programs, h)


@pytest.mark.parametrize("commit_between", [False, True])
def test_g2_anti_dependency_cycles_are_prevented_under_serializable(make_db, commit_between):
    db, h, programs = _run_g2(make_db, "serializable", commit_between)
    assert len(h.committed) == 1
    assert len(list(db.scan(b"task/", b"task0"))) == 1
    assert_serializable(db, TASKS, programs, h)


def test_g2_hermitage_predicate_is_prevented_under_serializable(make_db):
    # select * from test where value % 3 = 0 (both); T1 inserts (3, 30), T2 (4, 42)
    db = make_db("serializable")
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert _where(h("T1", "scan"), lambda v: v % 3 == 0) == []
    assert _where(h("T2", "scan"), lambda v: v % 3 == 0) == []
    h("T1", "put", b"3", b"30")
    h("T2", "put", b"4", b"42")
    h("T1", "commit")
    h("T2", "commit")

    def ins(k, v):
        def program(s):
            s.scan()
            s.put(k, v)

        return program

    assert len(h.committed) == 1
    assert_serializable(db, INIT, {"T1": ins(b"3", b"30"), "T2": ins(b"4", b"42")}, h)


def test_g2_hermitage_predicate_occurs_under_snapshot(make_db):
    db = make_db("snapshot")
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert _where(h("T1", "scan"), lambda v: v % 3 == 0) == []
    assert _where(h("T2", "scan"), lambda v: v % 3 == 0) == []
    h("T1", "put", b"3", b"30")
    h("T2", "put", b"4", b"42")
    h("T1", "commit")
    h("T2", "commit")
    assert h.committed == ["T1", "T2"]

    def ins(k, v):
        def program(s):
            s.scan()
            s.put(k, v)

        return program

    assert_not_serializable(db, INIT, {"T1": ins(b"3", b"30"), "T2": ins(b"4", b"42")}, h)


def test_g2_reverse_scan_is_protected_under_serializable(make_db):
    db = make_db("serializable", TASKS)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert h("T1", "scan", b"task/", b"task0", True) == []
    assert h("T2", "scan", b"task/", b"task0", True) == []
    h("T1", "put", b"task/a", b"claimed")
    h("T2", "put", b"task/b", b"claimed")
    h("T1", "commit")
    h("T2", "commit")
    assert len(h.committed) == 1
    assert len(list(db.scan(b"task/", b"task0"))) == 1


def test_disjoint_ranges_do_not_conflict_under_serializable(make_db):
    # no false positives from range marks: each writes outside what the other scanned
    db = make_db("serializable", TASKS)
    h = Interleaving(db)
    h.begin("T1", "T2")
    assert h("T1", "scan", b"a/", b"a0") == []
    assert h("T2", "scan", b"b/", b"b0") == []
    h("T1", "put", b"a/1", b"x")
    h("T2", "put", b"b/1", b"x")
    h("T1", "put", b"c/1", b"x")  # outside both ranges
    h("T1", "commit")
    h("T2", "commit")
    assert h.committed == ["T1", "T2"] and not h.conflicts


# --- the read-only anomaly (Fekete, O'Neil and O'Neil 2004) ---------------------------------------------------------
#
# checking x and savings y, both 0.  T1 deposits 20 into savings.  T2 withdraws
# 10 from checking, with a penalty of 1 if that overdraws the total.  T3 (read
# only) prints both balances.  Under snapshot isolation T3 can see the deposit
# while T2 did not, and charged the penalty: no serial order explains it.

BANK = {b"x": b"0", b"y": b"0"}


def _deposit(s):
    s.put(b"y", b"%d" % (int(s.get(b"y")) + 20))


def _withdraw(s):
    x, y = int(s.get(b"x")), int(s.get(b"y"))
    s.put(b"x", b"%d" % (x - 10 - (1 if x + y < 10 else 0)))


def _report(s):
    s.get(b"x")
    s.get(b"y")


def _run_read_only_anomaly(make_db, level, pivot_commits_first: bool):
    db = make_db(level, BANK)
    h = Interleaving(db)
    h.begin("T2")
    x, y = h("T2", "get", b"x"), h("T2", "get", b"y")
    h.begin("T1")
    y1 = h("T1", "get", b"y")
    h("T1", "put", b"y", b"%d" % (int(y1) + 20))
    h("T1", "commit")
    h.begin("T3", readonly=True)
    if pivot_commits_first:
        # T2 commits before T3 reads: the read-only T3 completes the structure
        if x is not ABORTED:
            h("T2", "put", b"x", b"%d" % (int(x) - 10 - (1 if int(x) + int(y) < 10 else 0)))
        h("T2", "commit")
        h("T3", "get", b"x"), h("T3", "get", b"y")
        h("T3", "commit")
    else:
        h("T3", "get", b"x"), h("T3", "get", b"y")
        h("T3", "commit")
        if x is not ABORTED:
            h("T2", "put", b"x", b"%d" % (int(x) - 10 - (1 if int(x) + int(y) < 10 else 0)))
        h("T2", "commit")
    return db, h, {"T1": _deposit, "T2": _withdraw, "T3": _report}


@pytest.mark.parametrize("pivot_commits_first", [False, True])
def test_read_only_anomaly_occurs_under_snapshot(make_db, pivot_commits_first):
    db, h, programs = _run_read_only_anomaly(make_db, "snapshot", pivot_commits_first)
    assert sorted(h.committed) == ["T1", "T2", "T3"] and not h.conflicts
    assert h.observed["T3"] == [b"0", b"20"]
    assert final_state(db) == {b"x": b"-11", b"y": b"20"}
    assert_not_serializable(db, BANK, programs, h)
    # without the read-only transaction the history is serializable (T2, T1)
    h.committed.remove("T3")
    assert_serializable(db, BANK, programs, h)


@pytest.mark.parametrize("pivot_commits_first", [False, True])
def test_read_only_anomaly_is_prevented_under_serializable(make_db, pivot_commits_first):
    db, h, programs = _run_read_only_anomaly(make_db, "serializable", pivot_commits_first)
    assert len(h.conflicts) == 1
    assert "T1" in h.committed  # T1 has no anti-dependency out of it
    if pivot_commits_first:
        assert h.committed == ["T1", "T2"]  # T3 completes the structure: it is the one aborted
        assert h.conflict_at("T3") in ("get", "commit")
    else:
        assert h.committed == ["T1", "T3"]  # T2 is the pivot: aborted
    assert_serializable(db, BANK, programs, h)


# --- canary: the checks above can see anomalies ----------------------------------------------------------------------


def test_canary_with_ssi_switched_off_write_skew_gets_through(make_db):
    db = make_db("serializable", DOCTORS)
    db._ssi.disabled = True  # the test-only switch: detect nothing
    h = Interleaving(db)
    h.begin("T1", "T2")
    for name, step in WRITE_SKEW_SCHEDULES["rr-ww-cc"]:
        _doctor_step(h, name, {"T1": b"alice", "T2": b"bob"}[name], step)
    assert h.committed == ["T1", "T2"]
    assert_not_serializable(db, DOCTORS, {"T1": _go_off_call(b"alice"), "T2": _go_off_call(b"bob")}, h)


@pytest.mark.parametrize("level", LEVELS)
def test_g2_item_over_absent_keys(make_db, level):
    # each reads that the other's key is absent, then inserts its own: write
    # skew on point reads of missing keys (no range read involved)
    db = make_db(level, {})
    h = Interleaving(db)
    h.begin("T1", "T2")

    def claim(me, other):
        def program(s):
            if s.get(other) is None:
                s.put(me, b"1")

        return program

    if h("T1", "get", b"b") is None:
        h("T1", "put", b"a", b"1")
    if h("T2", "get", b"a") is None:
        h("T2", "put", b"b", b"1")
    h("T1", "commit")
    h("T2", "commit")
    programs = {"T1": claim(b"a", b"b"), "T2": claim(b"b", b"a")}
    if level == "snapshot":
        assert h.committed == ["T1", "T2"]
        assert_not_serializable(db, {}, programs, h)
    else:
        assert len(h.committed) == 1
        assert_serializable(db, {}, programs, h)
