"""SIGKILL loops with real processes (TESTING.md section 4; SPEC guarantees 1, 2, 6).

A child (``tests/killchild.py``) opens the database with sync="full" and runs
bank transfers between accounts from 2-4 threads; each transfer also writes a
marker key for its id.  It appends ``begun <id> ...`` to a side file just
before commit and ``acked <id> ...`` after commit returned.  The parent kills
it with SIGKILL at a seeded random moment: 20-400 ms after it started working,
at a named failpoint (``KVSTORE_FAILPOINTS=name=kill@n``), or -- after a first
kill -- while a second child is opening the crashed database (recovery).
Then the parent reopens and checks:

* the bank total is unchanged;
* every acked transfer's marker is present (durability; lost must be 0);
* every marker present was begun, with the same accounts and amount;
* each account's balance = initial + the sum of the transfers whose markers
  are present (atomicity: a transfer is there wholly or not at all);
* ``db._check_structures()`` and ``db.check()``.

About 60% of the rounds run checkpoints while transfers commit (a thread in
the child calls ``db.checkpoint()`` every 5-40 ms, or 16 KiB
``checkpoint_wal_bytes`` with 4 KiB WAL segments, so segments roll and are
truncated); in the others no checkpoint runs until the child dies (the one that ends a
recovering open aside).  Each
round's child is started ahead, while the parent checks the previous round,
and waits on its stdin until the parent says go.

``test_prepared_transaction_survives_sigkill_and_kills_during_restart``:
a prepared transfer survives SIGKILL, then restarts killed mid-undo of a
1500-write loser, at the checkpoint ending recovery, and at a random moment
of open; then a child commits or rolls it back and is killed; the decision
is durable and whole.

SIGKILL keeps the page cache, so this tests process crashes; power cuts are
tests/test_crash_db.py's job.  ``KVSTORE_SOAK=1`` runs many more rounds
(``KVSTORE_SIGKILL_ROUNDS`` sets the number).  Run with ``-s`` to see the figures.

The reliability report (TESTING.md section 9) gets "sigkill_rounds" (loop
rounds, each a kill -- sometimes two -- then a verification; and each SIGKILL
of the prepared-transaction test), "acked_verified" (distinct acknowledged
transfers whose markers every later verification found) and "acked_lost"
(acknowledged transfers missing at a verification: must be 0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

import kvstore
from kvstore import ConflictError, reliability

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD = os.path.join(HERE, "killchild.py")
SOAK = bool(os.environ.get("KVSTORE_SOAK"))
ROUNDS = int(os.environ.get("KVSTORE_SIGKILL_ROUNDS", 400 if SOAK else 55))
SEED = int(os.environ.get("KVSTORE_SIGKILL_SEED", 20240611))
ACCOUNTS = 10
INITIAL = 1000  # as killchild.INITIAL
SMALL_WAL = 16 * 1024  # checkpoint_wal_bytes that makes 4 KiB segments: rolls and truncation
BIG_WAL = 1 << 40

#: (failpoint, highest n to draw, what it needs to be reached: None, "checkpoints"
#: -- checkpoints that run while transactions commit -- or "segments" -- small
#: WAL segments, which come with WAL-size checkpoints).  Rounds without
#: concurrent checkpoints draw only the points that need nothing; the
#: checkpoint at the end of a recovering open is hit by RECOVERY_FAILPOINTS.
FAILPOINTS = [
    ("wal.after_append", 300, None),
    ("wal.after_write", 40, None),
    ("wal.before_fsync", 40, None),
    ("wal.after_fsync", 40, None),
    ("wal.before_preallocate_fsync", 2, None),
    ("pages.before_flip_fsync", 6, "checkpoints"),
    ("pages.before_meta_write", 6, "checkpoints"),
    ("pages.before_meta_fsync", 6, "checkpoints"),
    ("pages.after_meta_fsync", 6, "checkpoints"),
    ("recovery.checkpoint_before_flip", 6, "checkpoints"),
    ("recovery.checkpoint_before_truncate", 6, "checkpoints"),
    ("wal.before_roll_fsync", 4, "segments"),
    ("wal.before_segment_header_fsync", 4, "segments"),
    ("wal.before_segment_remove", 3, "segments"),
]
#: Failpoints a second child hits first while it opens a crashed database
#: (restart appends CLRs/ABORTs/CHECKPOINT_BEGIN and checkpoints at its end).
RECOVERY_FAILPOINTS = [
    "recovery.checkpoint_before_flip=kill@1",
    "pages.before_flip_fsync=kill@1",
    "pages.before_meta_fsync=kill@1",
    "pages.after_meta_fsync=kill@1",
    "wal.after_append=kill@1",
    "wal.before_fsync=kill@1",
]


def acct(i: int) -> bytes:
    return b"acct/%03d" % i


# --- the child and its side file ---------------------------------------------------------------


class SideLog:
    """Reads the child's side file incrementally (only whole lines)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.begun: dict[str, str] = {}  # id -> "from to amount"
        self.acked: dict[str, str] = {}
        self.prepared: dict[str, tuple[str, str]] = {}  # gid -> (id, desc)
        self.resolved: list[tuple[str, str]] = []
        self.events: list[str] = []  # opening/opened/ready/done/loser lines, in order

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode().splitlines():
            word, _, rest = line.partition(" ")
            if word in ("begun", "acked"):
                tid, _, desc = rest.partition(" ")
                book = self.begun if word == "begun" else self.acked
                assert book.get(tid, desc) == desc, f"transfer {tid} reported with two descriptions"
                book[tid] = desc
                if word == "acked":
                    assert tid in self.begun, f"{tid} acked before begun"
            elif word == "prepared":
                tid, src, dst, amount, gid = rest.split()
                self.prepared[gid] = (tid, f"{src} {dst} {amount}")
            elif word == "resolved":
                decision, gid = rest.split()
                self.resolved.append((decision, gid))
            else:
                self.events.append(line)

    def last_event(self) -> str:
        return self.events[-1] if self.events else ""


class Child:
    """A killchild.py process.  ``gated``: it starts now but waits for ``go()``."""

    def __init__(self, mode: str, args: dict, failpoints: str | None = None, gated: bool = False) -> None:
        env = dict(os.environ)
        env.pop("KVSTORE_FAILPOINTS", None)
        if failpoints:
            env["KVSTORE_FAILPOINTS"] = failpoints
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.failpoints = failpoints
        self.err = tempfile.TemporaryFile()
        if gated:
            args = {**args, "gate": True}
        self.proc = subprocess.Popen(
            [sys.executable, CHILD, mode, json.dumps(args)],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.err,
        )
        self.gated = gated
        self.killed_by_us = False

    def go(self) -> Child:
        if self.gated:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        return self

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.killed_by_us = True
        self.proc.wait()
        if self.gated and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait_until(self, side: SideLog, pred, timeout: float) -> bool:
        """Poll the side file until ``pred()``; False if the child exited or
        the time ran out first."""
        deadline = time.monotonic() + timeout
        while True:
            side.poll()
            if pred():
                return True
            if self.proc.poll() is not None or time.monotonic() > deadline:
                side.poll()
                return pred()
            time.sleep(0.002)

    def expect_sigkill(self, timeout: float = 60) -> None:
        """The child must have died of SIGKILL (ours or a failpoint's)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child still alive after {timeout} s (failpoints {self.failpoints!r}):\n{self.stderr()}")
        assert rc == -signal.SIGKILL, f"child exited with {rc} (failpoints {self.failpoints!r}):\n{self.stderr()}"


def in_open(side: SideLog) -> bool:
    """Whether the child's last word was "opening" (it died inside kvstore.open)."""
    return side.last_event().startswith("opening")


# --- the parent's checks --------------------------------------------------------------------


def create_bank(path: str) -> None:
    with kvstore.open(path, sync="full") as db:
        with db.transaction() as tx:
            for i in range(ACCOUNTS):
                tx.put(acct(i), b"%d" % INITIAL)


def read_bank(db: kvstore.Database) -> tuple[dict[int, int], dict[str, str]]:
    tx = db.begin(readonly=True)
    try:
        balances = {i: int(tx.get(acct(i))) for i in range(ACCOUNTS)}
        markers = {k[2:].decode(): v.decode() for k, v in tx.scan(b"m/", b"m0")}
    finally:
        tx.commit()
    return balances, markers


def check_bank(db: kvstore.Database, side: SideLog, pending: dict[str, str] | None = None) -> dict[str, str]:
    """Every invariant; returns the markers present.  ``pending``: transfers
    (prepared, in doubt) whose effect must not be visible yet."""
    side.poll()
    balances, markers = read_bank(db)
    assert sum(balances.values()) == ACCOUNTS * INITIAL, f"bank total changed: {balances}"
    present = set(markers)
    ghosts = present - set(side.begun)
    assert not ghosts, f"markers of transfers never begun: {sorted(ghosts)[:5]}"
    for tid, desc in markers.items():
        assert desc == side.begun[tid], f"marker {tid} = {desc!r}, begun as {side.begun[tid]!r}"
    lost = set(side.acked) - present
    reliability.add("acked_lost", len(lost))
    assert not lost, f"acked transfers lost (durability): {sorted(lost)[:10]} of {len(side.acked)}"
    for tid in pending or {}:
        assert tid not in present, f"the in-doubt transfer {tid} is visible"
    expect = {i: INITIAL for i in range(ACCOUNTS)}
    for desc in markers.values():
        src, dst, amount = map(int, desc.split())
        expect[src] -= amount
        expect[dst] += amount
    assert balances == expect, (
        "atomicity: balances differ from the ledger of the markers present: "
        + str({i: (balances[i], expect[i]) for i in range(ACCOUNTS) if balances[i] != expect[i]})
    )
    db._check_structures()
    assert db.check()["ok"]
    return markers


def verify(path: str, side: SideLog, figures: Counter) -> dict:
    side.poll()  # the child is dead: read its last words
    with kvstore.open(path, sync="full", create=False) as db:
        st = db.stats()
        assert st["prepared_transactions"] == 0
        markers = check_bank(db, side)
        assert db.get(b"loser/00000") is None
    figures["verifications"] += 1
    figures["acked-marker checks (summed over verifications)"] += len(side.acked)
    figures["max recovery records scanned"] = max(figures["max recovery records scanned"], st.get("recovery_records_scanned", 0))
    figures["transactions undone by recovery"] += st.get("recovery_transactions_undone", 0)
    return markers


# --- the loop -----------------------------------------------------------------------------------


def work_args(path: str, side: str, rnd: str, r: random.Random, concurrent: bool) -> dict:
    """The child's settings.  ``concurrent``: checkpoints run while transfers
    commit (a thread calling db.checkpoint() every 5-40 ms, and WAL-size
    checkpoints with 4 KiB segments); otherwise the only checkpoint is the one
    at the end of open, which holds the latch."""
    return {
        "path": path,
        "side": side,
        "accounts": ACCOUNTS,
        "threads": r.randint(2, 4),
        "round": rnd,
        "seed": r.randrange(1 << 30),
        "checkpoints": concurrent and r.random() < 0.5,
        "checkpoint_wal_bytes": SMALL_WAL if concurrent and r.random() < 0.5 else BIG_WAL,
        "cache_size": r.choice([64 * 2**20, 64 * 4096]),
        "seconds": 4.0,
    }


class Round:
    """One round, drawn from its seed up front so that its children can be
    started (gated) while the parent still checks the previous round."""

    def __init__(self, path: str, sidepath: str, rnd: int) -> None:
        r = random.Random(SEED * 1_000_003 + rnd)
        self.concurrent = concurrent = r.random() < 0.6
        needs = {n: k for n, _, k in FAILPOINTS}
        self.rnd = str(rnd)
        self.kind = r.choices(["timed", "failpoint", "opening"], [0.5, 0.32, 0.18])[0]
        self.args = work_args(path, sidepath, self.rnd, r, concurrent)
        self.failpoints = self.point = None
        if self.kind == "failpoint":
            self.point, top = r.choice([(n, top) for n, top, k in FAILPOINTS if concurrent or k is None])
            if needs[self.point] == "checkpoints":
                self.args["checkpoints"] = True
            if needs[self.point] == "segments":
                self.args["checkpoint_wal_bytes"] = SMALL_WAL
            self.failpoints = f"{self.point}=kill@{r.randint(1, top)}"
        self.delay = r.uniform(0.02, 0.4)
        self.second_args = self.second_failpoints = None
        if self.kind == "opening":
            self.second_args = work_args(path, sidepath, self.rnd + "b", r, concurrent)
            self.second_failpoints = r.choice(RECOVERY_FAILPOINTS) if r.random() < 0.5 else None
            self.second_delay = r.uniform(0.0, 0.03)
        self.child = self.second = None

    def spawn(self) -> None:
        self.child = Child("work", self.args, self.failpoints, gated=True)
        if self.second_args is not None:
            self.second = Child("work", self.second_args, self.second_failpoints, gated=True)

    def run(self, side: SideLog, figures: Counter) -> None:
        """Start the child(ren) and kill them."""
        child = self.child.go()
        if self.kind == "failpoint":
            # Wait for the failpoint to kill the child; kill it ourselves after 1.5 s.
            try:
                child.proc.wait(timeout=1.5)
            except subprocess.TimeoutExpired:
                child.kill()
            child.expect_sigkill()
            side.poll()
            if child.killed_by_us:
                figures["failpoint not reached (killed timed)"] += 1
            else:
                figures["kills at failpoints"] += 1
                figures[f"  at {self.point}"] += 1
                if in_open(side):
                    figures["kills inside kvstore.open (recovery)"] += 1
            return
        # Kill 20-400 ms after the child has opened the database.
        opened = child.wait_until(side, lambda: any(e.startswith(f"opened {self.rnd} ") for e in side.events), 30)
        assert opened, f"child of round {self.rnd} did not open:\n{child.stderr()}"
        time.sleep(self.delay)
        child.kill()
        child.expect_sigkill()
        figures["kills (timed, 20-400 ms into the work)"] += 1
        if self.second is None:
            return
        # A second child opens the crashed database and is killed in its recovery.
        second = self.second.go()
        if self.second_failpoints:
            try:
                second.proc.wait(timeout=1.5)
            except subprocess.TimeoutExpired:
                second.kill()
        else:
            started = second.wait_until(side, lambda: f"opening {self.rnd}b" in side.events, 30)
            assert started, f"second child of round {self.rnd} never started opening:\n{second.stderr()}"
            time.sleep(self.second_delay)
            second.kill()
        second.expect_sigkill()
        side.poll()
        figures["kills of a second child while it opens"] += 1
        if in_open(side):
            figures["kills inside kvstore.open (recovery)"] += 1

    def abandon(self) -> None:
        for c in (self.child, self.second):
            if c is not None:
                c.kill()


def sigkill_loop(tmp_path, rounds: int) -> tuple[Counter, SideLog]:
    path = str(tmp_path / "db")
    sidepath = str(tmp_path / "side.log")
    create_bank(path)
    side = SideLog(sidepath)
    figures: Counter = Counter()
    nxt = Round(path, sidepath, 0)
    nxt.spawn()
    try:
        for rnd in range(rounds):
            cur = nxt
            cur.run(side, figures)
            figures["rounds with checkpoints racing commits"] += cur.concurrent
            nxt = Round(path, sidepath, rnd + 1)
            if rnd + 1 < rounds:
                nxt.spawn()  # its start-up overlaps the checks below
            try:
                verify(path, side, figures)
            except AssertionError as e:
                raise AssertionError(f"round {rnd} ({cur.kind}, failpoints {cur.failpoints or cur.second_failpoints!r}): {e}") from None
            figures["rounds"] += 1
            reliability.add("sigkill_rounds", 1)
    finally:
        nxt.abandon()
    figures["begun transfers"] = len(side.begun)
    figures["acked transfers verified"] = len(side.acked)
    reliability.add("acked_verified", len(side.acked))
    return figures, side


def report(title: str, figures: Counter, elapsed: float) -> None:
    print(f"\n{title} ({elapsed:.1f} s, seed {SEED}):")
    for key in sorted(figures, key=lambda k: (k.startswith("  "), k)):
        print(f"  {key:44s} {figures[key]}")
    print(f"  {'lost acked transfers':44s} 0")


def test_sigkill_loop(tmp_path):
    t0 = time.monotonic()
    figures, side = sigkill_loop(tmp_path, ROUNDS)
    report("SIGKILL loop", figures, time.monotonic() - t0)
    assert figures["rounds"] == ROUNDS
    assert figures["kills at failpoints"] > 0 and figures["kills (timed, 20-400 ms into the work)"] > 0
    assert figures["kills inside kvstore.open (recovery)"] > 0
    assert figures["rounds with checkpoints racing commits"] > 0
    assert len(side.acked) > ROUNDS, "the children acknowledged too few transfers to prove anything"


# --- a prepared transaction across kills ---------------------------------------------------------


@pytest.mark.parametrize("decision", ["commit", "rollback"])
def test_prepared_transaction_survives_sigkill_and_kills_during_restart(tmp_path, decision):
    path = str(tmp_path / "db")
    sidepath = str(tmp_path / "side.log")
    create_bank(path)
    side = SideLog(sidepath)
    gid = f"gid-{decision}"
    base = {"path": path, "side": sidepath, "accounts": ACCOUNTS, "checkpoint_wal_bytes": BIG_WAL, "seed": 7}

    # 1. Prepare a transfer, leave a big loser running, commit a long tail; SIGKILL.
    child = Child(
        "prepare",
        {**base, "round": "p", "prep_id": "prep.1", "prep_from": 0, "prep_to": 1, "prep_amount": 77, "gid": gid,
         "loser_keys": 1500, "tail_transfers": 150},
    )
    assert child.wait_until(side, lambda: side.last_event() == "ready", 60), child.stderr()
    child.kill()
    child.expect_sigkill()
    assert gid in side.prepared and len(side.acked) == 155

    # 2. Restart killed half-way through undoing the loser (1500 writes, so
    #    1500 CLRs): the next restart resumes at the last CLR's undo-next.
    child = Child("open", {**base, "round": "k1"}, "wal.after_append=kill@700")
    child.expect_sigkill(30)
    side.poll()
    assert in_open(side), "the failpoint should have killed it inside open"
    # 3. Restart killed at the checkpoint that ends recovery (the undo done, ABORT logged).
    child = Child("open", {**base, "round": "k2"}, "recovery.checkpoint_before_flip=kill@1")
    child.expect_sigkill(30)
    side.poll()
    assert in_open(side), "the failpoint should have killed it inside open"
    # 4. Restart killed at a random moment while it opens the long log.
    child = Child("open", {**base, "round": "k3"})
    assert child.wait_until(side, lambda: "opening k3" in side.events, 30), child.stderr()
    time.sleep(random.Random(3).uniform(0.0, 0.05))
    child.kill()
    child.expect_sigkill()
    side.poll()
    k3_in_open = in_open(side)

    # 5. Reopen: the transfer is in doubt, invisible and its keys protected; the loser is gone.
    with kvstore.open(path, create=False) as db:
        assert db.prepared() == [gid.encode()]
        assert db.stats()["prepared_transactions"] == 1
        check_bank(db, side, pending={"prep.1": side.prepared[gid][1]})
        assert db.get(b"loser/00000") is None and db.get(b"loser/01499") is None
        assert not list(db.scan(b"loser/", b"loser0"))
        with pytest.raises(ConflictError):
            db.put(acct(0), b"0")
        with pytest.raises(ConflictError):
            db.put(b"m/prep.1", b"x")
    # Still in doubt after a clean close and reopen.
    with kvstore.open(path, create=False) as db:
        assert db.prepared() == [gid.encode()]

    # 6. Resolve it in a child that is killed right after the call returned.
    child = Child("resolve", {**base, "round": "res", "gid": gid, "decision": decision})
    assert child.wait_until(side, lambda: bool(side.resolved), 30), child.stderr()
    child.kill()
    child.expect_sigkill()

    # 7. The decision is durable and whole.
    with kvstore.open(path, create=False) as db:
        assert db.prepared() == []
        markers = check_bank(db, side)
        balances, _ = read_bank(db)
        if decision == "commit":
            assert markers.get("prep.1") == "0 1 77"
        else:
            assert "prep.1" not in markers
        db.put(acct(0), b"%d" % balances[0])  # the keys are free again
    # five SIGKILLs (the preparing child, two restarts at failpoints, a timed
    # one in open, the resolving child), each followed by a recovery
    reliability.add("sigkill_rounds", 5)
    reliability.add("acked_verified", len(side.acked))
    where = "inside" if k3_in_open else "after"
    print(
        f"\nprepared across SIGKILL ({decision}): 1 prepare, 2 kills at failpoints in restart, a timed kill {where} open, "
        f"{len(side.acked)} acked verified, lost 0"
    )


@pytest.mark.parametrize("point", ["pages.before_create_fsync", "wal.after_append", "wal.before_fsync"])
def test_sigkill_while_a_database_is_created_leaves_one_the_next_open_finishes(tmp_path, point):
    """A process killed while it creates a database (before the new page
    file's fsync, or while it logs the empty tree) leaves a directory that
    the next open turns into a working, empty database -- creation is the one
    place the loops above never kill, since their databases already exist."""
    path = str(tmp_path / "db")
    child = f"import kvstore; kvstore.open({path!r}).put(b'never', b'acknowledged')"
    env = dict(os.environ, KVSTORE_FAILPOINTS=f"{point}=kill@1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=60, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed at {point}: {proc.stderr.decode()}"
    reliability.add("sigkill_rounds")
    with kvstore.open(path) as db:
        assert list(db.scan()) == []
        assert db.check()["ok"]
        db.put(b"k", b"v")
    with kvstore.open(path) as db:
        assert db.get(b"k") == b"v"
