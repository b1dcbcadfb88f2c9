"""Stateful testing of transactions against a model (TESTING.md section 7;
SPEC "Transactions", guarantee 3).

A hypothesis ``RuleBasedStateMachine`` keeps up to four transactions open at
once (four *slots*), interleaves their operations, and checks every answer
against a model:

* the model holds the committed history: the committed data, a commit
  counter, and for each key the number of the commit that last wrote it;
* each open transaction has its snapshot -- the committed data when it began
  -- and its own writes (a list, so a savepoint is a prefix of it).  What the
  transaction must see is its snapshot overlaid with its writes.

Conflicts are predicted exactly under ``isolation="snapshot"`` (first updater
wins): a write raises ``ConflictError`` (kind "write-write", naming the key)
if and only if the key is written by another unfinished transaction, or was
committed after this transaction's snapshot.  A ``delete`` of a key the
transaction cannot see writes nothing and never conflicts.  Under
``"serializable"`` the same write-write conflicts must fire; besides them SSI
may abort a transaction at any operation or at commit, which the model
accepts -- except for a serializable transaction that no other serializable
transaction overlapped: with nobody to form an anti-dependency with, it must
never be aborted.  After a ``ConflictError`` the transaction is rolled back
in the model too.

After every step a fresh read-only transaction must see exactly the model's
committed data, every open snapshot-isolation transaction must still see its
own view (purge and later commits must not disturb it), and every few steps
``db._check_structures()`` walks the B+tree, the page file and the undo chain.

Durability and two-phase commit are in the model too.  Three examples in four
run on ``FaultFS`` (``pages/faultfs.py``) with ``sync="full"``, the fourth on
real files with ``sync="off"``; on FaultFS a *power cut* cuts the power
between steps, or in the middle of a commit, a checkpoint or a
``commit_prepared``/``rollback_prepared`` (``crash_after`` a drawn number of
I/O points), builds the surviving image with a crash plan drawn by hypothesis
(drop all, keep all, a prefix, omit one, a subset, a torn write, a file grown
but not written), and sometimes cuts the power again during the recovery that
follows.  Every commit that returned must be there and nothing else: open
transactions are gone, prepared ones are still in doubt; a commit or a
resolution the cut interrupted is either wholly there or wholly absent.
``prepare`` moves a transaction out of its slot into the model's in-doubt
set (its writes invisible, its keys conflicting) and ``resolve`` commits or
rolls back one of them -- across close and reopen and power cuts.
``backup`` copies the store while transactions are open; the copy must open
and hold exactly the committed data and the same in-doubt transactions.
``misuse`` calls the API with bad arguments (wrong types and sizes, unknown or
duplicate global ids, a backup into the database or into a non-empty
directory, a second open, bad open arguments): each raises the error SPEC
names and changes nothing (the invariants check the state right after).

Keys are few (so conflicts happen) plus a range of filler keys that splits and
merges leaves; values include inline ones near the overflow threshold,
incompressible multi-page overflow values and a compressible one.

There is one rule, ``step``, whose action is drawn from a weighted list (an
operation on a slot, which begins a transaction there when the slot is empty;
maintenance; an autocommit helper): hypothesis enables random subsets of
rules per example ("swarm testing"), and with the CI profile's 60
derandomized examples, fine-grained rules left commits with writes and
savepoint rollbacks almost unexercised.  ``STATS`` counts what ran.
Runs under the profile ``tests/conftest.py`` loads (``HYPOTHESIS_PROFILE=ci``
in CI), 30 steps per example (60 with ``KVSTORE_SOAK=1``, whose profile also
runs 2000 examples); each step adds 1 to the reliability report's
"stateful_steps".
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvstore
from kvstore import ClosedError, ConflictError, DatabaseLockedError, TransactionError, reliability
from pages.faultfs import DropAll, FaultFS, KeepAll, PowerCut

SLOTS = 4  # transactions open at once, at most
CHECK_EVERY = 5  # steps between walks of the structures

#: What the runs exercised, by event (read it from a script or a debugger).
STATS: collections.Counter = collections.Counter()

_rnd = random.Random(20240601)
KEYS = [b"a", b"b", b"c", b"d", b"e\x00", b"\xff"]
SKEW_KEYS = (b"x", b"y")  # only read-then-write touches these: rw-antidependencies without ww conflicts
VALUES = [
    b"",
    b"v1",
    b"v2",
    _rnd.randbytes(100),
    _rnd.randbytes(1000),  # inline, a third of a leaf
    _rnd.randbytes(1500),  # just past the inline limit: one overflow page
    _rnd.randbytes(5000),  # > 4 KiB: a chain of overflow pages
    _rnd.randbytes(9000),
    b"z" * 20000,  # compressible: stored compressed
]
BOUNDS = [None, b"0", b"a", b"b", b"b\x00", b"c", b"e", b"f", b"f050", b"f1", b"y", b"\xff", b"\xff\x00"]
FILL_VALUES = [b"x" * 40, _rnd.randbytes(300)]

CHURN_KEY = b"churn"  # rewritten by the churn action only
CHURN_COMMITS = 60  # enough undo records to fill a few undo pages

#: What a step does, repeated to weight the choice: operations on the
#: transaction in a slot, then maintenance, then autocommit helpers.
ACTIONS = (
    ["put"] * 5
    + ["delete"] * 2
    + ["get"] * 2
    + ["scan"] * 2
    + ["savepoint", "rollback_to", "rollback_to", "savepoint_block", "savepoint_block"]
    + ["read_then_write"] * 3
    + ["commit"] * 3
    + ["rollback", "fill", "misuse", "misuse"]
    + ["prepare", "prepare", "resolve", "resolve"]
    + ["checkpoint", "purge", "purge", "churn", "reopen", "power_cut", "power_cut", "backup"]
    + ["auto_put", "auto_delete", "auto_reads"]
)
MAINTENANCE = ("checkpoint", "purge", "churn", "reopen", "power_cut", "backup")

DB = "/db"  # the database's directory on FaultFS
#: no background checkpoints: every I/O comes from a step, in order, so a
#: power cut after n I/O points is deterministic
QUIET = dict(checkpoint_interval=float("inf"), checkpoint_wal_bytes=1 << 40)
#: crash plans a power cut draws from (FaultFS.plans kinds); DropAll and
#: KeepAll twice, as the two that matter most
CUT_PLANS = ["DropAll", "DropAll", "KeepAll", "KeepAll", "Prefix", "OmitOne", "Subset", "Torn", "GrownNotWritten"]
#: where the power is cut: between steps, or after some I/O points of one of these
CUT_DURING = [None, "commit", "commit", "checkpoint", "checkpoint", "resolve", "recovery"]


def filler(j: int) -> bytes:
    return b"f%03d" % j


def _wrap(b: bytes, how: int):
    return b if how == 0 else bytearray(b) if how == 1 else memoryview(b)


class OpenTx:
    """The model of one open transaction."""

    def __init__(self, tx, level: str, readonly: bool, base: dict, begin_seq: int, overlapped: bool) -> None:
        self.tx = tx
        self.level = level
        self.readonly = readonly
        self.base = base  # committed data at begin
        self.begin_seq = begin_seq  # commits finished at begin
        self.ops: list[tuple[bytes, bytes | None]] = []  # own writes, None = delete
        self.sps: list[tuple[object, int]] = []  # (Savepoint, len(ops) when taken)
        self.gone_sps: list[object] = []
        self.overlapped = overlapped  # another serializable transaction ran concurrently

    def view(self) -> dict[bytes, bytes]:
        v = dict(self.base)
        for k, val in self.ops:
            if val is None:
                v.pop(k, None)
            else:
                v[k] = val
        return v

    def written(self) -> set[bytes]:
        return {k for k, _ in self.ops}

    def __repr__(self) -> str:
        return f"<OpenTx {self.level}{' ro' if self.readonly else ''} ops={len(self.ops)}>"


class KVMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = None  # real files: a scratch directory holding the database and its backups
        self.fs: FaultFS | None = None  # or FaultFS: the current "machine" (a new one after each power cut)
        self.dir = DB
        self.db = None
        self.default_level = "snapshot"
        self.committed: dict[bytes, bytes] = {}
        self.last_write: dict[bytes, int] = {}  # key -> commit number that last wrote it
        self.seq = 0  # commits with writes so far
        self.slots: list[OpenTx | None] = [None] * SLOTS
        self.finished: list = []  # a few finished transaction objects
        self.prepared: dict[bytes, OpenTx] = {}  # global id -> the transaction in doubt
        self.gids = 0  # global ids handed out
        self.backups = 0
        self.steps = 0

    @property
    def txs(self) -> list[OpenTx]:
        return [t for t in self.slots if t is not None]

    @property
    def unfinished(self) -> list[OpenTx]:
        """The open transactions and the prepared ones: both hold their keys."""
        return self.txs + list(self.prepared.values())

    # --- the model ---------------------------------------------------------------------

    def _open_kwargs(self, path: str) -> dict:
        if self.fs is not None:  # a small cache: pages are stolen, so page writes wait unsynced
            return dict(_fs=self.fs, sync="full", cache_size=8 * 4096, **QUIET)
        return dict(sync="off", cache_size=64 * 4096, **QUIET)

    def _open(self, isolation: str) -> None:
        self.db = kvstore.open(self.dir, isolation=isolation, **self._open_kwargs(self.dir))
        self.default_level = isolation
        assert self.db.prepared() == sorted(self.prepared), "in-doubt transactions after open"

    def _ww(self, t: OpenTx, key: bytes) -> bool:
        """Whether a write of ``key`` by ``t`` must raise (first updater wins)."""
        if key in t.written():
            return False
        if any(key in o.written() for o in self.unfinished if o is not t):
            return True
        return self.last_write.get(key, 0) > t.begin_seq

    def _ww_autocommit(self, key: bytes) -> bool:
        return any(key in o.written() for o in self.unfinished)

    def _end(self, t: OpenTx) -> None:
        self.slots[self.slots.index(t)] = None
        self.finished = (self.finished + [t.tx])[-3:]

    def _commit_model(self, ops: list[tuple[bytes, bytes | None]]) -> None:
        if not ops:
            return  # nothing written: no commit the history cares about
        self.seq += 1
        for k, v in ops:
            if v is None:
                self.committed.pop(k, None)
            else:
                self.committed[k] = v
            self.last_write[k] = self.seq

    def _conflicted(self, t: OpenTx, err: ConflictError, expected_ww: bool, key: bytes | None) -> None:
        """``t``'s operation raised ConflictError: check it was allowed, and
        drop ``t`` (the engine rolled it back)."""
        STATS["conflict write-write" if expected_ww else "conflict ssi"] += 1
        if expected_ww:
            assert err.kind == "write-write", (err.kind, err)
            assert err.key == key, (err.key, key)
        else:
            assert t.level == "serializable", f"unexpected conflict under snapshot isolation: {err}"
            assert err.kind != "write-write", f"write-write conflict nobody caused: {err}"
            assert t.overlapped, f"a serializable transaction that ran alone was aborted: {err}"
        assert t.tx.state == "aborted", t.tx.state
        self._end(t)

    def _overlap_all(self) -> None:
        for o in self.txs:
            if o.level == "serializable":
                o.overlapped = True

    def _begin(self, slot: int, level: str | None, readonly: bool) -> OpenTx:
        STATS["begin"] += 1
        tx = self.db.begin(readonly=readonly, isolation=level)
        eff = self.default_level if level is None else level
        assert tx.isolation == eff
        others = any(o.level == "serializable" for o in self.unfinished)
        if eff == "serializable":
            self._overlap_all()
        t = OpenTx(tx, eff, readonly, dict(self.committed), self.seq, eff == "serializable" and others)
        self.slots[slot] = t
        return t

    # --- operations ------------------------------------------------------------------

    def _write(self, t: OpenTx, key: bytes, value: bytes | None, how: int = 0) -> bool:
        """put (value) or delete (None) through ``t``; False if ``t`` ended."""
        if t.readonly:
            with pytest.raises(TransactionError):
                if value is None:
                    t.tx.delete(key)
                else:
                    t.tx.put(key, value)
            assert t.tx.state == "active"
            return True
        view = t.view()
        writes = value is not None or key in view
        STATS[("put " if value is not None else "delete ") + t.level] += 1
        expect = writes and self._ww(t, key)
        try:
            if value is None:
                existed = t.tx.delete(_wrap(key, how))
            else:
                t.tx.put(_wrap(key, how), _wrap(value, how))
        except ConflictError as e:
            self._conflicted(t, e, expect, key)
            return False
        assert not expect, f"expected a write-write conflict on {key!r}"
        if value is None:
            assert existed is (key in view), (key, existed)
        if writes:
            t.ops.append((key, value))
        return True

    def _read(self, t: OpenTx, kind: str, key: bytes, start: bytes | None, stop: bytes | None, reverse: bool) -> None:
        STATS[kind + " " + t.level] += 1
        try:
            if kind == "get":
                got = t.tx.get(key) if reverse else t.tx.get(key, b"<none>")
            else:
                got = list(t.tx.scan(start, stop, reverse=reverse))
        except ConflictError as e:
            self._conflicted(t, e, False, None)
            return
        view = t.view()
        if kind == "scan":
            want = sorted((k, v) for k, v in view.items() if (start is None or k >= start) and (stop is None or k < stop))
            if reverse:
                want.reverse()
            assert [k for k, _ in got] == [k for k, _ in want]
            assert got == want
        else:
            want = view.get(key, None if reverse else b"<none>")
            assert got == want, (key, got[:20] if got else got, want[:20] if want else want)
            assert got is None or type(got) is bytes

    def _finish(self, t: OpenTx, how: str) -> None:
        if how == "rollback":
            STATS["rollback"] += 1
            t.tx.rollback()
            assert t.tx.state == "aborted"
            self._end(t)
            return
        try:
            t.tx.commit()
        except ConflictError as e:
            self._conflicted(t, e, False, None)
            return
        assert t.tx.state == "committed"
        STATS["commit " + t.level + (" with writes" if t.ops else " without writes")] += 1
        self._commit_model(t.ops)
        self._end(t)

    def _savepoints(self, t: OpenTx, action: str, j: int) -> None:
        """Take a savepoint, or roll back to the j-th one still valid (one is
        taken when there is none)."""
        if action == "savepoint" or not t.sps:
            STATS["savepoint"] += 1
            t.sps.append((t.tx.savepoint(), len(t.ops)))
            return
        j %= len(t.sps)
        sp, n = t.sps[j]
        t.tx.rollback_to(sp)
        STATS["rollback_to undid writes" if len(t.ops) > n else "rollback_to undid nothing"] += 1
        del t.ops[n:]
        t.gone_sps += [s for s, _ in t.sps[j + 1 :]]
        del t.sps[j + 1 :]  # later savepoints are gone; this one stays valid

    def _savepoint_block(self, t: OpenTx, key: bytes, value: bytes, n: int, undo: bool) -> None:
        """A savepoint, a few writes after it, a read of them, and (``undo``)
        a rollback to it -- so rollbacks to savepoints really undo writes."""
        self._savepoints(t, "savepoint", 0)
        j = len(t.sps) - 1
        for k in (key, KEYS[n % len(KEYS)], filler(n)):
            if not self._write(t, k, value if k != KEYS[n % len(KEYS)] or n % 3 else None):
                return
        self._read(t, "scan", key, None, None, False)
        if undo and t.tx.state == "active" and len(t.sps) > j:
            self._savepoints(t, "rollback_to", j)
            self._read(t, "scan", key, None, None, True)

    def _fill(self, t: OpenTx, start: int, n: int, value: bytes | None) -> None:
        """Put (or delete, for None) many filler keys one by one: leaf
        splits, merges and redistribution."""
        STATS["fill put" if value is not None else "fill delete"] += 1
        for j in range(start, start + n):
            if not self._write(t, filler(j), value) or t.readonly:
                return

    def _misuse(self, t: OpenTx, n: int) -> None:
        """Wrong types and sizes raise TypeError / ValueError and change
        nothing; a finished transaction raises TransactionError; so do bad
        global ids, bad backup destinations and bad open arguments, and a
        second open raises DatabaseLockedError.  ``n`` mixes several of the
        step's draws, so that every case comes up in a run."""
        if n % 5 == 4 and self.finished:
            case = n // 5
            STATS["misuse of a finished transaction"] += 1
            old = self.finished[case % len(self.finished)]
            calls = [
                lambda: old.get(b"a"),
                lambda: old.put(b"a", b"v"),
                lambda: old.commit(),
                lambda: old.rollback(),
                lambda: old.savepoint(),
            ]
            with pytest.raises((TransactionError, ClosedError)):
                calls[case % len(calls)]()
            return
        STATS["misuse of arguments"] += 1
        tx = t.tx
        writing = [
            (TypeError, lambda: tx.put("a", b"v")),
            (ValueError, lambda: tx.put(b"", b"v")),
            (ValueError, lambda: tx.put(b"k" * 1025, b"v")),
            (TypeError, lambda: tx.put(b"a", "v")),
            (TypeError, lambda: tx.put(b"a", 5)),
            (TypeError, lambda: tx.delete(None)),
            (ValueError, lambda: tx.delete(b"")),
        ]
        reading = [
            (TypeError, lambda: tx.get(5)),
            (ValueError, lambda: tx.get(b"")),
            (TypeError, lambda: tx.get("a")),
            (TypeError, lambda: tx.scan("a")),
            (TypeError, lambda: tx.scan(None, 3)),
            (TypeError, lambda: tx.rollback_to("sp")),
            (ValueError, lambda: self.db.begin(isolation="repeatable read")),
            (TypeError, lambda: self.db.run(5)),
            (ValueError, lambda: self.db.put(b"", b"v")),
        ]
        db, path, kw = self.db, self.dir, self._open_kwargs(self.dir)
        reading += [
            # two-phase commit: bad or unknown global ids
            (TypeError, lambda: tx.prepare("gid")),
            (TypeError, lambda: tx.prepare(7)),
            (ValueError, lambda: tx.prepare(b"")),
            (ValueError, lambda: tx.prepare(b"g" * 1025)),
            (TypeError, lambda: db.commit_prepared("gid")),
            (ValueError, lambda: db.commit_prepared(b"no such gid")),
            (ValueError, lambda: db.rollback_prepared(b"no such gid")),
            # a backup into the database itself
            (ValueError, lambda: db.backup(os.path.join(path, "backup"))),
            # a second open of an open database; bad open arguments
            (DatabaseLockedError, lambda: kvstore.open(path, **kw)),
            (ValueError, lambda: kvstore.open(path, **{**kw, "sync": "sometimes"})),
            (ValueError, lambda: kvstore.open(path, **{**kw, "isolation": "read committed"})),
            (ValueError, lambda: kvstore.open(path, **{**kw, "page_size": 1000})),
        ]
        if self.prepared:
            taken = sorted(self.prepared)[0]
            reading.append((ValueError, lambda: tx.prepare(taken)))  # a global id already in doubt
        if self.backups:
            reading.append((ValueError, lambda: db.backup(self._backup_path(1))))  # not empty
        others = [o for o in self.txs if o is not t and o.sps]
        if others:
            reading.append((ValueError, lambda: tx.rollback_to(others[0].sps[0][0])))
        if t.gone_sps:
            reading.append((ValueError, lambda: tx.rollback_to(t.gone_sps[-1])))
        cases = writing + reading
        case = 13 * n % len(cases)  # spreads the small n hypothesis favours over the list
        exc, call = cases[case]
        if t.readonly and case < len(writing):
            exc = TransactionError  # a read-only transaction refuses any write first
        STATS[f"misuse raises {exc.__name__}"] += 1
        with pytest.raises(exc):
            call()
        assert tx.state == "active"
        assert self.db.prepared() == sorted(self.prepared)

    def _close_and_reopen(self, isolation: str) -> None:
        dropped = self.txs
        self.db.close()
        self.db.close()  # idempotent
        with pytest.raises(ClosedError):
            self.db.get(b"a")
        with pytest.raises(ClosedError):
            self.db.begin()
        for t in dropped:  # close rolled back every active transaction
            assert t.tx.state == "aborted", t.tx.state
            with pytest.raises((TransactionError, ClosedError)):
                t.tx.get(b"a")
            self._end(t)
        self._open(isolation)
        assert self.db.stats()["active_transactions"] == len(self.prepared)  # only those in doubt

    # --- two-phase commit -------------------------------------------------------------------

    def _prepare(self, t: OpenTx, key: bytes, value: bytes, how: int) -> None:
        """``tx.prepare(gid)``: the transaction leaves its slot for the set in
        doubt; its writes stay invisible and its keys taken until resolved.
        A transaction that wrote nothing yet writes ``key`` first."""
        if not t.ops and not t.readonly and not self._write(t, key, value, how):
            return  # the write conflicted: the transaction is gone
        self.gids += 1
        gid = b"gid-%d" % self.gids
        try:
            t.tx.prepare(_wrap(gid, how))
        except ConflictError as e:  # SSI validation runs at prepare as at commit
            self._conflicted(t, e, False, None)
            return
        assert t.tx.state == "prepared", t.tx.state
        STATS["prepare " + t.level + (" with writes" if t.ops else " without writes")] += 1
        self.slots[self.slots.index(t)] = None
        self.prepared[gid] = t

    def _resolve(self, n: int, commit: bool, how: int) -> None:
        """``db.commit_prepared`` / ``db.rollback_prepared`` of one transaction
        in doubt (it may have been prepared before a reopen or a power cut)."""
        if not self.prepared:
            STATS["resolve with nothing in doubt"] += 1
            with pytest.raises(ValueError):
                (self.db.commit_prepared if commit else self.db.rollback_prepared)(b"gid-0")
            return
        gid = sorted(self.prepared)[n % len(self.prepared)]
        t = self.prepared.pop(gid)
        STATS["commit_prepared" if commit else "rollback_prepared"] += 1
        if commit:
            self.db.commit_prepared(_wrap(gid, how))
            self._commit_model(t.ops)
        else:
            self.db.rollback_prepared(_wrap(gid, how))
        assert gid not in self.db.prepared()

    # --- power cuts (FaultFS) -------------------------------------------------------------

    def _power_cut(self, isolation: str, plan_kind: str, j: int, during: str | None, at: int, flag: bool) -> None:
        """Cut the power (between steps, or ``at`` I/O points into a commit,
        a checkpoint, a resolution or the recovery after the cut), rebuild
        the disk with a ``plan_kind`` plan, and reopen.  Every commit that
        returned survives; open transactions are gone; prepared ones are in
        doubt still; an interrupted commit or resolution is all or nothing."""
        if self.fs is None:  # real files: a close and reopen stands in
            STATS["power cut on real files (close and reopen instead)"] += 1
            self._close_and_reopen(isolation)
            return
        fs = self.fs
        maybe_commit: OpenTx | None = None  # a commit the cut interrupted
        maybe_resolve: tuple[bytes, OpenTx, bool] | None = None  # (gid, tx, commit?) likewise
        writers = [t for t in self.txs if t.ops]
        if during == "commit" and not writers and None in self.slots:  # make one
            t = self._begin(self.slots.index(None), None, False)
            if self._write(t, KEYS[j % len(KEYS)], b"cut %d" % at):
                writers = [t]
        if during == "commit" and writers:
            t = writers[j % len(writers)]
            fs.crash_after(at % 3)  # a commit's I/O: a write of the log, its fsync
            try:
                t.tx.commit()
            except PowerCut:
                maybe_commit = t
            except ConflictError as e:
                self._conflicted(t, e, False, None)
            else:
                self._commit_model(t.ops)
                self._end(t)
        elif during == "checkpoint":
            fs.crash_after(at % 16)
            try:
                self.db.checkpoint()
            except PowerCut:
                pass
        elif during == "resolve" and self.prepared:
            gid = sorted(self.prepared)[j % len(self.prepared)]
            t = self.prepared.pop(gid)
            fs.crash_after(at % 3 if flag else at % 8)  # commit: write, fsync; rollback: CLRs too
            try:
                (self.db.commit_prepared if flag else self.db.rollback_prepared)(gid)
            except PowerCut:
                maybe_resolve = (gid, t, flag)
            else:
                if flag:
                    self._commit_model(t.ops)
        cut_mid_op = fs.dead
        plans = fs.plans(kinds=[plan_kind])
        plan = plans[j % len(plans)] if plans else DropAll()
        STATS[f"power cut{' during ' + during if cut_mid_op else ''}: {plan_kind if plans else 'DropAll'}"] += 1
        STATS[f"power cut with {'no' if not fs.pending_ops() else 'some'} unsynced writes"] += 1
        self.db._checkpointer.stop()  # the old "process" is gone: no thread of it may run on
        self.fs = fs.crash(plan)
        for t in self.txs:  # open transactions die with the process; restart rolls them back
            self._end(t)
        self.finished = []
        self.db = None
        if during == "recovery":
            self._crash_during_recovery(isolation, at, flag)
        if maybe_resolve is None:
            self._open(isolation)
        else:
            self._open_any(isolation)
        r = self.db.begin(readonly=True, isolation="snapshot")
        got = dict(r.scan())
        r.commit()
        if maybe_commit is not None:
            if got != self.committed:
                self._commit_model(maybe_commit.ops)
                STATS["power cut during commit: committed"] += 1
            else:
                STATS["power cut during commit: not committed"] += 1
        if maybe_resolve is not None:
            gid, t, commit = maybe_resolve
            if gid in self.db.prepared():
                self.prepared[gid] = t  # the decision did not reach the disk: still in doubt
                STATS["power cut during resolve: still in doubt"] += 1
            else:
                STATS["power cut during resolve: resolved"] += 1
                if commit:
                    self._commit_model(t.ops)
            assert self.db.prepared() == sorted(self.prepared)
        lost = sorted(k for k in self.committed if got.get(k) != self.committed[k])
        extra = sorted(k for k in got if k not in self.committed)
        assert not lost and not extra, (
            f"after a power cut ({plan!r}, during {during}, cut mid-operation: {cut_mid_op}): "
            f"committed keys lost or changed {lost[:8]}, keys nobody committed {extra[:8]}"
        )
        assert self.db.stats()["active_transactions"] == len(self.prepared)

    def _open_any(self, isolation: str) -> None:
        """Open without requiring the in-doubt set to match (a resolution the
        cut interrupted may or may not have reached the disk)."""
        self.db = kvstore.open(self.dir, isolation=isolation, **self._open_kwargs(self.dir))
        self.default_level = isolation

    def _crash_during_recovery(self, isolation: str, at: int, keep: bool) -> None:
        """Cut the power again ``at`` I/O points into the restart (then
        DropAll or KeepAll); the next restart must end in the same state."""
        assert self.fs is not None
        self.fs.crash_after(at % 16)
        try:
            db = kvstore.open(self.dir, isolation=isolation, **self._open_kwargs(self.dir))
        except PowerCut:
            STATS["power cut during recovery"] += 1
            self.fs = self.fs.crash(KeepAll() if keep else DropAll())
        else:
            self.fs.crash_after(None)
            db.close()

    # --- backup ---------------------------------------------------------------------------------

    def _backup_path(self, k: int) -> str:
        return f"/backup-{k}" if self.fs is not None else os.path.join(self.tmp, f"backup-{k}")

    def _backup(self) -> None:
        """``db.backup`` with transactions open; the copy opens and holds the
        committed data and the transactions in doubt, and nothing else."""
        self.backups += 1
        dest = self._backup_path(self.backups)
        info = self.db.backup(dest)
        assert {"dest", "pages", "wal_bytes"} <= set(info)
        copy = kvstore.open(dest, create=False, **self._open_kwargs(dest))
        try:
            assert dict(copy.scan()) == self.committed, "the backup differs from the committed data"
            assert copy.prepared() == sorted(self.prepared), "the backup's transactions in doubt"
            copy._check_structures()
        finally:
            copy.close()

    # --- rules ---------------------------------------------------------------------------

    @initialize(
        isolation=st.sampled_from(["snapshot", "serializable"]),
        backend=st.sampled_from(["faultfs", "faultfs", "faultfs", "files"]),
        seed=st.integers(0, 2**16),
    )
    def open_db(self, isolation: str, backend: str, seed: int) -> None:
        STATS["examples"] += 1
        STATS["examples on " + backend] += 1
        if backend == "faultfs":
            self.fs = FaultFS(seed=seed)
        else:
            self.tmp = tempfile.mkdtemp(prefix="kv-stateful-")
            self.dir = os.path.join(self.tmp, "db")
        self._open(isolation)

    @rule(
        action=st.sampled_from(ACTIONS),
        slot=st.sampled_from([0, 0, 0, 1, 1, 2, 3]),  # slot 0 lives longest
        level=st.sampled_from([None, "snapshot", "serializable"]),
        readonly=st.sampled_from([False, False, False, False, True]),
        key=st.sampled_from(KEYS),
        value=st.sampled_from(VALUES),
        start=st.sampled_from(BOUNDS),
        stop=st.sampled_from(BOUNDS),
        flag=st.booleans(),
        how=st.integers(0, 2),
        n=st.integers(0, 150),
        plan=st.sampled_from(CUT_PLANS),
        during=st.sampled_from(CUT_DURING),
        at=st.integers(0, 40),
    )
    def step(self, action, slot, level, readonly, key, value, start, stop, flag, how, n, plan, during, at) -> None:
        """One step: an operation of the transaction in ``slot`` (an empty
        slot gets a new transaction, of ``level`` and ``readonly``, first),
        the resolution of a prepared transaction, maintenance, or an
        autocommit helper."""
        reliability.add("stateful_steps", 1)
        if action in MAINTENANCE:
            self._maintenance(action, level or self.default_level, (plan, n, during, at, flag))
            return
        if action == "resolve":
            self._resolve(n, flag, how)
            return
        if action.startswith("auto_"):
            self._autocommit(action[5:], key, value, start, stop)
            return
        t = self.slots[slot]
        if t is None:
            t = self._begin(slot, level, readonly)
        if action in ("put", "delete"):
            self._write(t, key, value if action == "put" else None, how)
        elif action in ("get", "scan"):
            self._read(t, action, key, start, stop, flag)
        elif action in ("commit", "rollback"):
            self._finish(t, action)
        elif action in ("savepoint", "rollback_to"):
            self._savepoints(t, action, n)
        elif action == "savepoint_block":
            self._savepoint_block(t, key, value, n, flag)
        elif action == "read_then_write":
            # read a and write b, or the other way round: the pattern of write
            # skew, so serializable transactions form rw-antidependencies
            src, dst = SKEW_KEYS if flag else SKEW_KEYS[::-1]
            self._read(t, "get", src, None, None, n % 2 == 0)
            if t.tx.state == "active":
                self._write(t, dst, value, how)
        elif action == "fill":
            self._fill(t, n, 1 + n % 120, None if flag else FILL_VALUES[how % 2])
        elif action == "prepare":
            self._prepare(t, key, value, how)
        else:
            self._misuse(t, n + 37 * how + 11 * KEYS.index(key) + 3 * VALUES.index(value) + 17 * BOUNDS.index(start))

    def _maintenance(self, action: str, isolation: str, cut: tuple) -> None:
        """A checkpoint, a purge (with transactions open too), a churn of
        commits then a purge, a backup, close and reopen (which rolls back
        every open transaction), or a power cut (``cut``: plan kind, plan
        index, where, after how many I/O points, a flag)."""
        STATS[action + (" with transactions open" if self.txs else "")] += 1
        if action == "power_cut":
            self._power_cut(isolation, *cut)
        elif action == "checkpoint":
            info = self.db.checkpoint()
            assert {"lsn", "pages_written", "seconds", "wal_bytes_truncated"} <= set(info)
        elif action == "purge":
            self.db.purge()
        elif action == "backup":
            self._backup()
        elif action == "churn":
            # many small commits fill whole undo pages, which purge may free
            # (it never frees the page being written): open snapshots must
            # keep reading their versions of the churned key afterwards
            if self.default_level == "serializable":
                self._overlap_all()
            for r in range(CHURN_COMMITS):
                v = b"churn %d %d" % (self.seq, r)
                self.db.put(CHURN_KEY, v)
                self._commit_model([(CHURN_KEY, v)])
            self.db.purge()
        else:
            self._close_and_reopen(isolation)

    def _autocommit(self, action: str, key: bytes, value: bytes, start: bytes | None, stop: bytes | None) -> None:
        """db.put / db.delete / db.get / db.scan, each its own transaction.

        A blind write or a lone read cannot be the pivot of a dangerous
        structure, so only write-write conflicts (after db.run's retries) are
        expected -- unless a serializable transaction is prepared: it cannot
        be aborted any more, so a transaction that completes a structure with
        it as the pivot is (SPEC: "unless it completes such a structure").
        When a conflict may come, the write runs as ``db.run(...,
        retries=0)``: ``db.run`` waits for the blocking writer to finish
        before it retries (up to a second per retry), and here, in one
        thread, it never does."""
        STATS["autocommit " + action] += 1
        exposed = self.default_level == "serializable" and any(
            p.level == "serializable" for p in self.prepared.values()
        )
        if self.default_level == "serializable":
            self._overlap_all()

        def ssi_victim(e: ConflictError) -> bool:
            if exposed and e.kind != "write-write":
                STATS["autocommit aborted: completes a structure with a prepared pivot"] += 1
                return True
            return False

        if action in ("put", "delete"):
            existed = key in self.committed
            expect = (action == "put" or existed) and self._ww_autocommit(key)
            fn = (lambda tx: tx.put(key, value)) if action == "put" else (lambda tx: tx.delete(key))
            try:
                if expect or exposed:
                    got = self.db.run(fn, retries=0)
                elif action == "put":
                    got = self.db.put(key, value)
                else:
                    got = self.db.delete(key)
            except ConflictError as e:
                if ssi_victim(e):
                    return
                assert expect, f"autocommit {action} conflicted with nobody: {e}"
                assert e.kind == "write-write"
                return
            assert not expect, f"autocommit {action} should have met a write-write conflict"
            if action == "put":
                self._commit_model([(key, value)])
            else:
                assert bool(got) is existed
                if existed:
                    self._commit_model([(key, None)])
        else:
            want = sorted((k, v) for k, v in self.committed.items() if (start is None or k >= start) and (stop is None or k < stop))
            try:
                assert self.db.get(key) == self.committed.get(key)
                assert self.db.get(key, b"dflt") == self.committed.get(key, b"dflt")
                assert list(self.db.scan(start, stop)) == want
            except ConflictError as e:
                if not ssi_victim(e):
                    raise

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def committed_state_is_visible(self) -> None:
        r = self.db.begin(readonly=True, isolation="snapshot")  # creates no SSI edges
        got = list(r.scan())
        rev = list(r.scan(reverse=True))
        r.commit()
        want = sorted(self.committed.items())
        assert [k for k, _ in got] == [k for k, _ in want]
        assert got == want
        assert rev == want[::-1]
        st_ = self.db.stats()
        assert st_["active_transactions"] == len(self.txs) + len(self.prepared)
        assert st_["prepared_transactions"] == len(self.prepared)
        assert self.db.prepared() == sorted(self.prepared)

    @invariant()
    def open_snapshots_are_stable(self) -> None:
        for t in self.txs:
            if t.level == "snapshot":  # a serializable one would take SSI read marks
                assert list(t.tx.scan()) == sorted(t.view().items())

    @invariant()
    def structures_check(self) -> None:
        self.steps += 1
        STATS["steps"] += 1
        if self.steps % CHECK_EVERY == 0:
            counts = self.db._check_structures()
            assert counts["keys"] >= len(self.committed)

    def teardown(self) -> None:
        try:
            if self.db is not None:
                self.db._check_structures()
                self.db.close()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)


TestTransactions = KVMachine.TestCase
TestTransactions.settings = settings(stateful_step_count=60 if os.environ.get("KVSTORE_SOAK") else 30)
