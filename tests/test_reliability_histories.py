"""Randomized isolation histories in Elle's list-append style, checked for
dependency cycles (TESTING.md section 6; SPEC "Transactions" and
"Guarantees" 3).

Several threads run random transactions against one store.  Every key holds
a list of unique integers, stored as comma-separated ASCII (``b"3,17,42"``);
a transaction reads keys, appends to them (get, then put the longer list),
scans key ranges, sometimes rolls back to a savepoint (once, or to a nested
one) and sometimes rolls back altogether.  Half of them go through
``db.run`` (every attempt it makes is recorded: the ones that lost a
conflict as failed), the rest through ``db.begin`` / ``commit`` /
``rollback``, some read-only.  A last reader reads every key once all
threads have finished, so every key's full order is known.

The history -- each attempt's micro-operations with what they observed, its
outcome, and the real time before ``begin`` and after ``commit`` returned --
goes to the checker in tests/elle.py, which infers version orders from the
lists, builds ww, wr, rw (item and predicate) and real-time edges and
classifies every cycle.  Snapshot isolation may show only G2-item / G2
(write skew); serializable shows no cycle at all; neither may show G1a, G1b,
lost or reordered appends.  Each history is written as Elle JSON to the
test's tmp_path, and copied to ``$KVSTORE_HISTORY_DIR`` when that is set
(``elle-cli --model list-append`` reads it).

The checker's canary: with conflict detection switched off (wal/canary.py:
``no_ssi`` under serializable, ``no_write_conflicts`` under snapshot) the
same workload, made more contended, must make the checker report anomalies
the level forbids.  Threads make runs vary, so a few seeds are tried; one
of them must be caught.

A bug these histories found, fixed (kvstore/ssi.py): serializable commits
can become visible in another order than the one they were decided in, and
SSI, comparing decision numbers only, missed a dangerous structure.
``test_serializable_commit_visible_before_an_earlier_decided_one`` is its
deterministic regression test.

``KVSTORE_SOAK=1`` runs four times the transactions, more histories and
more canary seeds.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass

import pytest
from commitwindow import CommitWindow
from elle import FAIL, OK, Recorder, Txn, check, write_elle

import kvstore
from kvstore import ConflictError, reliability
from wal import canary

SOAK = bool(os.environ.get("KVSTORE_SOAK"))


@pytest.fixture(autouse=True)
def fast_thread_switches():
    # threads interleave inside transactions, not only between them
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-5)
    yield
    sys.setswitchinterval(old)


# --- the workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    level: str
    threads: int
    txns: int  # per thread
    keys: int
    seed: int
    max_ops: int = 4
    hot: float = 0.5  # chance that a key is one of the first three
    yield_chance: float = 0.5  # time.sleep(0) after a micro-operation
    retries: int = 6


def key_bytes(k: int) -> bytes:
    return b"k%03d" % k


def key_int(kb: bytes) -> int:
    return int(kb[1:])


def decode(value: bytes | None) -> list[int] | None:
    if value is None:
        return None
    return [int(x) for x in value.split(b",")]


def appended(value: bytes | None, v: int) -> bytes:
    return b"%d" % v if value is None else value + b",%d" % v


def read(tx, t: Txn, k: int) -> None:
    t.read(k, decode(tx.get(key_bytes(k))))


def append(tx, t: Txn, k: int, v: int, record_read: bool = False) -> None:
    """Append ``v`` to the list at ``k``: get it, put it back longer."""
    kb = key_bytes(k)
    current = tx.get(kb)
    if record_read:
        t.read(k, decode(current))
    tx.put(kb, appended(current, v))
    t.append(k, v)


def scan(tx, t: Txn, lo: int, hi: int | None) -> None:
    found = {key_int(kb): decode(vb) for kb, vb in tx.scan(key_bytes(lo), None if hi is None else key_bytes(hi))}
    t.scan(lo, hi, found)


class Client:
    """One thread's transactions."""

    def __init__(self, db, rec: Recorder, w: Workload, process: int, values: itertools.count, engine_txns: dict) -> None:
        self.db, self.rec, self.w, self.process, self.values = db, rec, w, process, values
        self.engine_txns = engine_txns  # history id -> the store's Transaction
        self.rng = random.Random(f"{w.seed}/{process}")

    # a plan is a list of micro-operations to run: ("r", k), ("append", k),
    # ("rmw", k) (read it, then append to it) or ("scan", lo, hi)
    def key(self) -> int:
        rng = self.rng
        return rng.randrange(min(3, self.w.keys)) if rng.random() < self.w.hot else rng.randrange(self.w.keys)

    def plan(self, lo: int = 1, readonly: bool = False) -> list[tuple]:
        ops = []
        for _ in range(self.rng.randint(lo, self.w.max_ops)):
            roll = self.rng.random()
            if roll < 0.35 or (readonly and roll < 0.8):
                ops.append(("r", self.key()))
            elif roll < 0.8:
                ops.append(("rmw" if self.rng.random() < 0.3 else "append", self.key()))
            else:
                a, b = self.key(), self.key()
                lo_, hi = min(a, b), max(a, b) + 1
                ops.append(("scan", lo_, None if hi >= self.w.keys and self.rng.random() < 0.5 else hi))
        return ops

    def do(self, tx, t: Txn, op: tuple) -> None:
        self.engine_txns[t.id] = tx
        f = op[0]
        if f == "r":
            read(tx, t, op[1])
        elif f in ("append", "rmw"):
            append(tx, t, op[1], next(self.values), record_read=f == "rmw")
        else:
            scan(tx, t, op[1], op[2])
        if self.rng.random() < self.w.yield_chance:
            time.sleep(0)

    def run_one(self) -> None:
        if self.rng.random() < 0.5:
            self.with_db_run(self.plan())
        else:
            self.explicit()

    def with_db_run(self, plan: list[tuple]) -> None:
        """``db.run``: each attempt is its own transaction in the history.
        Every attempt is dated from before the call (its begin is later)."""
        attempts: list[Txn] = []
        start = self.rec.clock()

        def fn(tx):
            if attempts:
                self.rec.finish(attempts[-1], FAIL)
            t = self.rec.begin(self.process, start=start)
            attempts.append(t)
            for op in plan:
                self.do(tx, t, op)

        try:
            self.db.run(fn, retries=self.w.retries)
        except ConflictError:
            self.rec.finish(attempts[-1], FAIL)
        else:
            self.rec.finish(attempts[-1], OK)

    def explicit(self) -> None:
        """``db.begin``: maybe read-only, maybe savepoints, maybe rolled back."""
        rng = self.rng
        readonly = rng.random() < 0.15
        before = self.plan(readonly=readonly)
        t = self.rec.begin(self.process)
        tx = self.db.begin(readonly=readonly)
        try:
            for op in before:
                self.do(tx, t, op)
            if not readonly and rng.random() < 0.35:
                self.savepoints(tx, t)
                for op in self.plan(lo=0):
                    self.do(tx, t, op)
            if rng.random() < 0.1:
                tx.rollback()
                self.rec.finish(t, FAIL)
            else:
                tx.commit()
                self.rec.finish(t, OK)
        except ConflictError:
            assert tx.state == "aborted", "a ConflictError leaves the transaction rolled back"
            self.rec.finish(t, FAIL)

    def savepoints(self, tx, t: Txn) -> None:
        rng = self.rng
        sp, mark = tx.savepoint(), t.savepoint()
        for op in self.plan():
            self.do(tx, t, op)
        if rng.random() < 0.4:  # a nested savepoint, rolled back to
            sp2, mark2 = tx.savepoint(), t.savepoint()
            for op in self.plan():
                self.do(tx, t, op)
            tx.rollback_to(sp2)
            t.rollback_to(mark2)
            for op in self.plan(lo=0):
                self.do(tx, t, op)
        if rng.random() < 0.7:
            tx.rollback_to(sp)
            t.rollback_to(mark)
            if rng.random() < 0.3:  # the savepoint stays valid: use it again
                for op in self.plan():
                    self.do(tx, t, op)
                tx.rollback_to(sp)
                t.rollback_to(mark)


@dataclass
class Run:
    history: list[Txn]
    engine_txns: dict  # history id -> the store's Transaction


def run_workload(path, w: Workload) -> Run:
    """Run ``w`` against a fresh store at ``path``; return the history."""
    rec = Recorder()
    values = itertools.count(1)
    errors: list[BaseException] = []
    engine_txns: dict = {}
    db = kvstore.open(path, sync="off", isolation=w.level)
    try:
        clients = [Client(db, rec, w, p, values, engine_txns) for p in range(w.threads)]

        def loop(client: Client) -> None:
            try:
                for _ in range(w.txns):
                    client.run_one()
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=loop, args=(c,), name=f"client-{c.process}") for c in clients]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
            assert not th.is_alive(), f"{th.name} hangs"
        if errors:
            raise errors[0]
        last = rec.begin(w.threads)  # reads every key after everything
        tx = db.begin(readonly=True)
        for k in range(w.keys):
            read(tx, last, k)
        tx.commit()
        rec.finish(last, OK)
        db.check()
    finally:
        db.close()
    return Run(rec.txns, engine_txns)


def save_history(history: list[Txn], tmp_path, request, name: str):
    """Elle JSON in tmp_path, and a copy in $KVSTORE_HISTORY_DIR if set."""
    path = tmp_path / f"{name}.json"
    write_elle(history, path)
    target = os.environ.get("KVSTORE_HISTORY_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{request.node.name}-{name}")
        shutil.copy(path, os.path.join(target, f"{safe}.json"))
    return path


# --- real runs: nothing the level forbids ------------------------------------------------------------

SCALE = 4 if SOAK else 1  # values grow with the history: every append rewrites a list
RUNS = [
    Workload("snapshot", threads=4, txns=700 * SCALE, keys=6, seed=1),
    Workload("snapshot", threads=8, txns=350 * SCALE, keys=10, seed=2),
    Workload("serializable", threads=4, txns=700 * SCALE, keys=6, seed=3),
    Workload("serializable", threads=8, txns=350 * SCALE, keys=10, seed=4),
    Workload("serializable", threads=6, txns=400 * SCALE, keys=3, seed=5, hot=0.8),  # every key hot
]
if SOAK:
    RUNS += [
        Workload(level, threads=t, txns=1000, keys=k, seed=s)
        for s, t, k in ((6, 5, 4), (7, 8, 24))
        for level in ("snapshot", "serializable")
    ]
#: cycles that show snapshot isolation's write skew; a real snapshot run of
#: this size always has some, so their absence means the checker went blind
WRITE_SKEW = {"G2-item", "G2", "G2-item-realtime", "G2-realtime"}

@pytest.mark.parametrize("w", RUNS, ids=lambda w: f"{w.level}-{w.threads}threads-{w.keys}keys-seed{w.seed}")
def test_history_shows_only_what_the_level_allows(tmp_path, request, w):
    run = run_workload(tmp_path / "db", w)
    history = run.history
    save_history(history, tmp_path, request, "history")
    result = check(history)
    bad = result.forbidden(w.level)
    reliability.add("histories", 1)
    reliability.add("history_txns", len(history))
    reliability.add("history_anomalies", len(bad))
    assert not bad, f"{w.level} forbids these:\n{result.report(bad)}"
    # not vacuous: transactions committed, conflicted, and saw each other
    assert result.count(OK) > w.threads * w.txns // 3, result.report()
    assert result.count(FAIL) > 0, result.report()
    edges = result.edges
    assert edges.get("ww", 0) > 50 and edges.get("wr", 0) > 50 and edges.get("rw", 0) > 20, result.report()
    assert edges.get("rw-p", 0) > 0, result.report()
    if w.level == "snapshot":
        assert result.names() & WRITE_SKEW, f"no write skew in a snapshot history:\n{result.report()}"
    rolled_back = sum(1 for t in history if t.undone and t.type == OK)
    assert rolled_back > 0, "some committed transactions rolled back to a savepoint"


# --- a bug found and fixed, deterministically -----------------------------------------------------------------


def test_serializable_commit_visible_before_an_earlier_decided_one(tmp_path, request):
    """Regression: the cycle the randomized serializable histories found now
    and then (about once in 10,000 transactions), made deterministic:

    1. T1 appends to k0 and reads k1; its commit is decided (number n) and
       held in the log wait, not yet visible.
    2. T2 begins (does not see T1), reads k1 and appends to it, commits
       (number n + 1) and becomes visible: SSI records T1 -rw k1-> T2.
    3. T3 (read-only) begins: it sees T2, not T1.  It reads k1 (T2's append).
    4. T1's commit finishes.  T3 reads k0 without T1's append: T3 -rw-> T1.

    T3 -rw k0-> T1 -rw k1-> T2 -wr k1-> T3 is a cycle (G2-item): T3 must
    precede T1, T1 precede T2, T2 precede T3.  T1 is a committed pivot and
    T_out = T2 became visible before it and before T3's snapshot, so T3 must
    be aborted.  dangerous() used to compare decision numbers (n + 1 >= n:
    "T_out did not commit first") and let all three commit; now T_out counts
    from its decision and the pivot until it is visible."""
    rec = Recorder()

    def attempt(t: Txn, tx, *steps) -> None:
        """Run the steps, commit; a ConflictError (what a fix may raise) fails t."""
        try:
            for step in steps:
                step()
            tx.commit()
            rec.finish(t, OK)
        except ConflictError:
            rec.finish(t, FAIL)

    with kvstore.open(tmp_path / "db", sync="off", isolation="serializable") as db:
        t0, tx0 = rec.begin(0), db.begin()
        attempt(t0, tx0, lambda: append(tx0, t0, 0, 1), lambda: append(tx0, t0, 1, 2))
        t1, tx1 = rec.begin(1), db.begin()
        append(tx1, t1, 0, 10)
        read(tx1, t1, 1)
        assert t1.ops == [("append", 0, 10), ("r", 1, [2])]
        window = CommitWindow(db)
        window.commit_in_background(tx1)
        try:
            t2, tx2 = rec.begin(2), db.begin()
            attempt(t2, tx2, lambda: append(tx2, t2, 1, 20, record_read=True))
            t3, tx3 = rec.begin(3), db.begin(readonly=True)
            read(tx3, t3, 1)
        finally:
            window.release()
        assert window.error is None, window.error
        rec.finish(t1, OK)
        attempt(t3, tx3, lambda: read(tx3, t3, 0))
        t4, tx4 = rec.begin(4), db.begin(readonly=True)
        attempt(t4, tx4, lambda: read(tx4, t4, 0), lambda: read(tx4, t4, 1))
    history = rec.txns
    save_history(history, tmp_path, request, "history")
    result = check(history)
    assert not result.forbidden("serializable"), result.report()


# --- the checker's canary ----------------------------------------------------------------------------

CANARY_SEEDS = range(100, 112 if SOAK else 105)


@pytest.mark.parametrize(
    "level, switch",
    [("serializable", "no_ssi"), ("snapshot", "no_write_conflicts")],
)
def test_checker_catches_conflict_detection_switched_off(tmp_path, request, level, switch):
    reliability.add("canaries_planted", 1)
    tried = []
    for seed in CANARY_SEEDS:
        w = Workload(level, threads=6, txns=40 * SCALE, keys=4, seed=seed, max_ops=4, hot=0.7)
        with canary.planted(switch):
            history = run_workload(tmp_path / f"db-{seed}", w).history
        save_history(history, tmp_path, request, f"canary-{switch}-seed{seed}")
        result = check(history)
        caught = result.forbidden(level)
        tried.append((seed, len(history), sorted({a.name for a in caught})))
        if caught:
            break
    assert caught, f"with {switch} the checker saw nothing the {level} level forbids: {tried}"
    reliability.add("canaries_caught", 1)
