"""Crash-point enumeration through the whole store (TESTING.md section 2).

A *workload* is a small function ``body(run)`` that drives a store through
``run`` (a ``Run``).  Every step whose outcome a crash may keep or take back
-- a commit, a prepare, the resolution of a prepared transaction -- goes
through ``run``, together with what it changes, so the *model* is written
beside the code that the model describes::

    def one_put(run):
        db = run.open()
        run.commit(lambda: db.put(b"k", b"v"), {b"k": b"v"})
        run.close(db)

The model is a list of states in log order: ``states[j]`` is the committed
data and the set of in-doubt (prepared) global ids after the first ``j``
such steps ("events").  Of the events, ``begun`` had their call started,
``acked`` had it return, and ``durable`` are those the sync mode promises
survive a power cut (SPEC.md, "Opening" and "Two-phase commit"):

=====================  ===========================  ==========================
event                  durable on return under       the model
=====================  ===========================  ==========================
``commit``             sync="full"                  data updated
``prepare``            every mode                   gid in doubt
``commit_prepared``    sync="full"                  its writes visible, gid out
``rollback_prepared``  sync="full"                  gid out
``checkpoint``         every mode: all acked so far  --
``close``              every mode: all acked so far  --
``sync_tick``          sync="normal": all acked      -- (the 100 ms fsync)
=====================  ===========================  ==========================

A process crash (``KeepAll``: the page cache survives) keeps every acked
event in every mode, since commit returns only once the OS has its record.

The enumeration (``enumerate_crashes``):

1. run the workload once, untouched, to count its I/O points;
2. for each I/O point k (every one, or a deterministic sample when a limit
   says so), run it again on a fresh copy with the power cut before point k;
3. for the crash plans at that point -- ``fs.plans()``: drop all, keep all,
   every prefix, omit each, each multi-sector write torn with every fill,
   each growing write grown-not-written, and every subset when at most ten
   operations are pending (else a seeded sample) -- build the image after
   the cut.  With a limit per point, plans are drawn round-robin across the
   kinds from a seeded shuffle, so every kind that applies is represented.
   Identical images are recovered once (``Cache``);
4. recover and require (``check_state``):
   (1) open succeeds -- a power cut never justifies CorruptionError;
   (2) the data equal ``states[j]`` for some ``need <= j <= begun``, where
       ``need`` is ``acked`` after KeepAll and ``durable`` otherwise;
   (3) the in-doubt gids are those of ``states[j]``, and committing them
       makes exactly their modelled writes visible;
   (4) ``db.check()`` is clean; and every backup that returned opens with
       exactly the state the model had when it was taken;
   (5) the recovered store works on: the in-doubt commits and one more
       commit after recovery survive a further power cut;
5. for a deterministic sample of the crash states, cut the power again at
   every I/O point of recovery itself, under several plans, and recover once
   more: the outcome must be the first recovery's (SPEC guarantee 6).

Counts go to ``kvstore.reliability`` (crash_points, crash_states,
nested_crashes, acked_verified, acked_lost).  A crash state is one distinct
image at one crash point: plans that leave identical bytes are one state.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kvstore
from kvstore import reliability
from pages.faultfs import CrashPlan, DropAll, FaultFS, KeepAll, PowerCut

DB = "/db"
PLAN_KINDS = ("DropAll", "KeepAll", "Prefix", "OmitOne", "Torn", "GrownNotWritten", "Subset")
#: The figures a crash enumeration adds to the reliability report.
FIGURES = ("crash_points", "crash_states", "nested_crashes", "acked_verified", "acked_lost")

Changes = Mapping[bytes, "bytes | None"]  # key -> new value, None for a delete


@dataclass(frozen=True)
class State:
    """What a reopened store shows: its committed data and in-doubt gids."""

    data: Mapping[bytes, bytes]
    in_doubt: tuple[bytes, ...] = ()

    def describe(self) -> str:
        keys = sorted(self.data)
        shown = ", ".join(f"{k.decode(errors='replace')}={len(self.data[k])}B" for k in keys[:8])
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"{{{shown}{more}}} in doubt {list(self.in_doubt)}"


def apply(data: Mapping[bytes, bytes], changes: Changes) -> dict[bytes, bytes]:
    out = dict(data)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = bytes(value)
    return out


def open_db(fs: FaultFS, sync: str, path: str = DB, **kw: Any) -> kvstore.Database:
    """Open with no background checkpoints, so the I/O is the same on every
    run: checkpoints happen exactly where the workload asks for them.  (The
    tests of sync="normal" also stop the log's 100 ms fsync thread;
    ``Run.sync_tick`` does its work at chosen moments instead.)"""
    db = kvstore.open(path, _fs=fs, sync=sync, checkpoint_interval=float("inf"), **kw)
    db._checkpointer.stop()
    return db


class Run:
    """One execution of a workload on ``fs``, and its model."""

    def __init__(self, fs: FaultFS, sync: str, open_kw: Mapping[str, Any], initial: State) -> None:
        self.fs = fs
        self.sync = sync
        self.open_kw = dict(open_kw)
        self.states: list[State] = [initial]
        self.begun = 0
        self.acked = 0
        self.durable = 0
        self.prepared_writes: dict[bytes, Changes] = {}
        self.backups: list[tuple[str, State]] = []  # (directory, state) of each backup that returned
        self.notes: dict[str, Any] = {}
        self.finished = False

    # -- the store --------------------------------------------------------

    def open(self, sync: str | None = None) -> kvstore.Database:
        """Open the store (``sync`` overrides the mode the model assumes:
        only the self-tests lie to the model that way)."""
        return open_db(self.fs, sync or self.sync, **self.open_kw)

    def note(self, label: str, value: Any) -> None:
        """Keep an observation for the tests that check a workload does what
        its name says (``notes`` is not part of the model)."""
        self.notes[label] = value

    @property
    def last(self) -> State:
        return self.states[-1]

    # -- events -----------------------------------------------------------

    def _event(self, call: Callable[[], Any], after: State, durable: bool) -> None:
        assert self.begun == len(self.states) - 1, "events run one at a time"
        self.states.append(after)
        self.begun += 1
        call()
        self.acked = self.begun
        if durable:
            self.durable = self.acked

    def commit(self, call: Callable[[], Any], changes: Changes) -> None:
        """``call()`` commits a transaction whose writes are ``changes``."""
        self._event(call, State(apply(self.last.data, changes), self.last.in_doubt), self.sync == "full")

    def prepare(self, tx: Any, gid: bytes, changes: Changes) -> None:
        """``tx`` (whose writes are ``changes``) prepares as ``gid``: durable in every mode."""
        self.prepared_writes[gid] = dict(changes)
        in_doubt = tuple(sorted(self.last.in_doubt + (gid,)))
        self._event(lambda: tx.prepare(gid), State(self.last.data, in_doubt), durable=True)

    def commit_prepared(self, db: kvstore.Database, gid: bytes) -> None:
        in_doubt = tuple(g for g in self.last.in_doubt if g != gid)
        after = State(apply(self.last.data, self.prepared_writes[gid]), in_doubt)
        self._event(lambda: db.commit_prepared(gid), after, self.sync == "full")

    def rollback_prepared(self, db: kvstore.Database, gid: bytes) -> None:
        in_doubt = tuple(g for g in self.last.in_doubt if g != gid)
        self._event(lambda: db.rollback_prepared(gid), State(self.last.data, in_doubt), self.sync == "full")

    # -- durability points ------------------------------------------------

    def checkpoint(self, db: kvstore.Database) -> None:
        db.checkpoint()  # checkpoints fsync in every mode
        self.durable = self.acked

    def close(self, db: kvstore.Database) -> None:
        db.close()  # close checkpoints
        self.durable = self.acked

    def sync_tick(self, db: kvstore.Database) -> None:
        """What sync="normal"'s background thread does every 100 ms (in the
        other modes nothing happens here)."""
        if self.sync != "normal":
            return
        db._wal.sync_written()
        self.durable = self.acked

    def backup(self, db: kvstore.Database, dest: str) -> None:
        """A backup holds exactly what was committed when it began."""
        taken = self.last
        db.backup(dest)
        self.backups.append((dest, taken))


@dataclass
class Workload:
    """``body(run)`` on a store holding ``initial`` (None: the body creates it)."""

    name: str
    body: Callable[[Run], None]
    initial: Mapping[bytes, bytes] | None = None
    open_kw: Mapping[str, Any] = field(default_factory=dict)

    def base(self, sync: str, seed: int) -> FaultFS | None:
        """The image the body starts from (a dead FaultFS to copy), or None."""
        if self.initial is None:
            return None
        fs = FaultFS(seed=seed)
        db = open_db(fs, sync, **self.open_kw)
        with db.transaction() as tx:
            for key, value in self.initial.items():
                tx.put(key, value)
        db.close()
        fs.crash(KeepAll())  # from now on only copies are made of it
        return fs

    def run(self, base: FaultFS | None, sync: str, seed: int, cut: int | None) -> Run:
        """Run the body on a fresh copy of ``base``, the power cut before I/O
        point ``cut`` of the body (None: never)."""
        fs = FaultFS(seed=seed) if base is None else base.crash(KeepAll())
        run = Run(fs, sync, self.open_kw, State(dict(self.initial or {})))
        fs.crash_after(cut)
        try:
            self.body(run)
        except PowerCut:
            return run
        run.finished = True
        return run


# ---------------------------------------------------------------------------
# Recovery and the checks.


@dataclass
class Recovered:
    state: State
    afterwards: dict[bytes, bytes]  # the data after committing every in-doubt gid (see ``recover``)
    backups: dict[str, State]


def digest(fs: FaultFS, extra: Iterable[str] = ()) -> bytes:
    """A fingerprint of every file of a freshly crashed image (and of the
    existence of the directories in ``extra``)."""
    h = hashlib.blake2b(digest_size=20)
    for path, data in sorted(fs.snapshot().items()):
        h.update(b"%d:%s\0%d\0" % (len(path), path.encode(), len(data)))
        h.update(data)
    for d in extra:
        h.update(b"dir %s %d\0" % (d.encode(), fs.exists(d)))
    return h.digest()


def recover_state(fs: FaultFS, sync: str, open_kw: Mapping[str, Any]) -> State:
    """Open (restart runs), read everything, ``check()``, close."""
    return _state_of(open_db(fs, sync, **open_kw))


def _state_of(db: kvstore.Database) -> State:
    """Everything ``db`` holds, after ``check()``; closes it."""
    try:
        state = State(dict(db.scan()), tuple(db.prepared()))
        db.check()
    finally:
        db.close()
    return state


#: The key ``recover`` writes after recovery (no workload uses it).
AFTERWARDS_KEY = b"\xffcommitted after recovery"


def recover(fs: FaultFS, sync: str, open_kw: Mapping[str, Any], backups: Iterable[str]) -> Recovered:
    """``recover_state``; open every backup directory named; then show that
    the recovered store works on: commit every in-doubt transaction and one
    more (sync="full"), cut the power, and read what survived."""
    state = recover_state(fs, sync, open_kw)
    copies = {dest: recover_state_at(fs, dest) for dest in backups}
    db = open_db(fs, "full", **open_kw)
    for gid in state.in_doubt:
        db.commit_prepared(gid)
    db.put(AFTERWARDS_KEY, b"1")
    survived = recover_state(fs.crash(DropAll()), "full", open_kw)
    afterwards = dict(survived.data)
    if afterwards.pop(AFTERWARDS_KEY, None) != b"1" or survived.in_doubt:
        raise AssertionError(f"a commit after recovery did not survive a power cut: {survived.describe()}")
    return Recovered(state, afterwards, copies)


def recover_state_at(fs: FaultFS, path: str) -> State:
    db = kvstore.open(path, _fs=fs, create=False, checkpoint_interval=float("inf"))
    db._checkpointer.stop()
    return _state_of(db)


class Cache:
    """Recovery outcomes by image fingerprint: an image is recovered once.
    Equal outcomes are kept once (thousands of images recover to a handful
    of states)."""

    def __init__(self) -> None:
        self.outcomes: dict[bytes, Recovered] = {}
        self._distinct: dict[tuple, Recovered] = {}

    def _intern(self, got: Recovered) -> Recovered:
        def items(data: Mapping[bytes, bytes]) -> tuple:
            return tuple(sorted(data.items()))

        backups = tuple((d, items(s.data), s.in_doubt) for d, s in sorted(got.backups.items()))
        return self._distinct.setdefault((items(got.state.data), got.state.in_doubt, items(got.afterwards), backups), got)

    @staticmethod
    def key(image: FaultFS, run: Run) -> bytes:
        dests = [d for d, _ in run.backups]
        return digest(image, [DB, *dests]) + repr(dests).encode()

    def recover(self, key: bytes, image: FaultFS, run: Run, where: str) -> Recovered:
        """The outcome of recovering ``image`` (whose ``key`` is given)."""
        got = self.outcomes.get(key)
        if got is None:
            try:
                got = recover(image, run.sync, run.open_kw, [d for d, _ in run.backups])
            except Exception as e:  # (1): open never fails after a power cut; (4): check() is clean
                raise AssertionError(f"{where}: recovery failed: {e!r}") from e
            got = self.outcomes[key] = self._intern(got)
        return got


def check_state(got: Recovered, run: Run, plan: CrashPlan, where: str, tally: Counter) -> int:
    """Checks (2)-(5) of the module docstring; returns the matching j."""
    need = run.acked if isinstance(plan, KeepAll) else run.durable
    for j in range(need, run.begun + 1):
        if run.states[j] == got.state:
            break
    else:
        earlier = [j for j in range(need) if run.states[j] == got.state]
        if earlier:
            tally["acked_lost"] += need - earlier[-1]
            raise AssertionError(
                f"{where}: acknowledged events lost: the store recovered to the state after {earlier[-1]} "
                f"events, but {need} were acknowledged as durable ({run.acked} acked, {run.begun} begun)"
            )
        raise AssertionError(
            f"{where}: the recovered state {got.state.describe()} is no prefix of the {run.begun} begun events "
            f"that includes the {need} acknowledged (the last acknowledged state: {run.states[need].describe()})"
        )
    tally["acked_verified"] += need
    expected = dict(got.state.data)  # (3): the prepared writes survived, whole
    for gid in got.state.in_doubt:
        expected = apply(expected, run.prepared_writes[gid])
    assert got.afterwards == expected, (
        f"{where}: after committing the in-doubt {list(got.state.in_doubt)} and a power cut, the store holds "
        f"{State(got.afterwards).describe()}, not {State(expected).describe()}"
    )
    for dest, taken in run.backups:  # (4): a backup that returned is whole
        assert got.backups[dest] == taken, (
            f"{where}: backup {dest} holds {got.backups[dest].describe()}, not the state when it was taken {taken.describe()}"
        )
    return j


# ---------------------------------------------------------------------------
# Choosing points and plans.


def pick_points(total: int, limit: int | None, rng: random.Random) -> list[int]:
    """Every I/O point below ``total``, or ``limit`` of them: the first and
    last few and an even spread, then seeded picks."""
    if limit is None or total <= limit:
        return list(range(total))
    chosen = set(range(min(4, total))) | set(range(max(0, total - 4), total))
    step = total / (limit // 2)
    chosen |= {int(i * step) for i in range(limit // 2)}
    rest = [k for k in range(total) if k not in chosen]
    chosen |= set(rng.sample(rest, max(0, min(len(rest), limit - len(chosen)))))
    return sorted(chosen)


def pick_plans(fs: FaultFS, limit: int | None, rng: random.Random) -> list[CrashPlan]:
    """Every plan at this point (``fs.plans()``), or at most ``limit``:
    round-robin across the kinds, each kind's plans in a seeded order."""
    plans = fs.plans()
    if limit is None or len(plans) <= limit:
        return plans
    by_kind: dict[str, list[CrashPlan]] = {}
    for plan in plans:
        by_kind.setdefault(type(plan).__name__, []).append(plan)
    for kind_plans in by_kind.values():
        rng.shuffle(kind_plans)
    out: list[CrashPlan] = []
    depth = 0
    while len(out) < limit:
        out.extend(p[depth] for p in by_kind.values() if depth < len(p))
        depth += 1
    return out[:limit]


@dataclass
class Limits:
    """How much of the enumeration to run (None: everything)."""

    points: int | None = None  # crash points
    plans: int | None = None  # plans per crash point (before dedup)
    nested_every: int = 10  # cut the recovery of every Nth crash state
    nested_points: int | None = None  # I/O points of a recovery cut (a sample beyond)
    nested_plans: int = 3  # plans per nested cut: DropAll, KeepAll, then others


def check_crash_during_recovery(cut: FaultFS, plan: CrashPlan, first: State, run: Run, limits: Limits,
                                rng: random.Random, where: str, tally: Counter) -> None:
    """Cut the power at every I/O point of the recovery of ``cut.crash(plan)``
    and recover again: the outcome must be ``first`` (SPEC guarantee 6)."""
    probe = cut.crash(plan)
    recover_state(probe, run.sync, run.open_kw)
    total = probe.io_points
    for m in pick_points(total, limits.nested_points, rng):
        fs = cut.crash(plan)
        fs.crash_after(m)
        try:
            recover_state(fs, run.sync, run.open_kw)
        except PowerCut:
            pass
        else:
            raise AssertionError(f"{where}: recovery did not reach I/O point {m} of {total} the second time")
        seen: set[bytes] = set()
        for again in pick_plans(fs, limits.nested_plans, rng):  # DropAll and KeepAll come first
            image = fs.crash(again)
            key = digest(image, [DB])
            if key in seen:
                continue
            seen.add(key)
            try:
                state = recover_state(image, run.sync, run.open_kw)
            except Exception as e:
                raise AssertionError(f"{where}: after a power cut at I/O point {m} of recovery ({again!r}), reopen failed: {e!r}") from e
            assert state == first, (
                f"{where}: a power cut at I/O point {m} of recovery ({again!r}) changed the outcome: "
                f"{state.describe()} instead of {first.describe()}"
            )
            tally["nested_crashes"] += 1


# ---------------------------------------------------------------------------
# The enumeration.


def enumerate_crashes(workload: Workload, sync: str, limits: Limits, seed: int, tally: Counter) -> Counter:
    """Steps 1-5 of the module docstring for one workload and sync mode.
    Adds the figures to ``tally``; returns how many plans of each kind were
    tried, and in ``"nested"`` how many states had their recovery cut (for
    the caller's coverage assertions)."""
    rng = random.Random(f"{workload.name}:{sync}:{seed}")
    base = workload.base(sync, seed)
    whole = workload.run(base, sync, seed, None)
    assert whole.finished, f"{workload.name}: the workload did not finish untouched"
    total = whole.fs.io_points
    kinds: Counter = Counter()
    cache = Cache()
    # The workload ran to its end: its final state is durable and exact.
    image = whole.fs.crash(DropAll())
    final = cache.recover(cache.key(image, whole), image, whole, f"{workload.name} after the workload").state
    assert final == whole.last, f"{workload.name}: after a clean run the store holds {final.describe()}, not {whole.last.describe()}"
    states_seen = 0
    for k in pick_points(total, limits.points, rng):
        run = workload.run(base, sync, seed, k)
        assert not run.finished, f"{workload.name}: the run cut at I/O point {k} of {total} finished"
        tally["crash_points"] += 1
        seen: set[bytes] = set()
        for plan in pick_plans(run.fs, limits.plans, rng):
            kinds[type(plan).__name__] += 1
            image = run.fs.crash(plan)
            key = cache.key(image, run)
            if key in seen:
                continue  # another plan at this point left the same bytes
            seen.add(key)
            where = f"{workload.name} (sync={sync}, seed {seed}): power cut before I/O point {k} of {total}, plan {plan!r}"
            got = cache.recover(key, image, run, where)
            check_state(got, run, plan, where, tally)
            tally["crash_states"] += 1
            states_seen += 1
            if states_seen % limits.nested_every == 0:
                check_crash_during_recovery(run.fs, plan, got.state, run, limits, rng, where, tally)
                kinds["nested"] += 1
    return kinds


def report(tally: Counter) -> None:
    """Add an enumeration's figures to the reliability report."""
    for name in FIGURES:
        reliability.add(name, tally.get(name, 0))
