"""Power cuts through the whole store (TESTING.md section 2, SPEC guarantees 1, 2, 6).

A seeded workload of interleaved transactions (a long one open across
several others, puts, deletes, overflow values, savepoints, rollbacks,
checkpoints, reopen) runs on FaultFS with
sync="full".  For every I/O point k the power is cut there, and the
surviving image is built with several crash plans (drop the unsynced writes,
keep them, prefixes, omit one, torn, grown-not-written, random subsets).  Then:

1. open succeeds -- a power cut never justifies CorruptionError;
2. the state equals the model after some prefix of the commits that includes
   every commit that returned (durability, atomicity: no transaction is partly
   visible, since every prefix state is whole transactions);
3. the structures check clean;
4. for a sample of states, the power is cut again at every I/O point of the
   restart itself, and restarting once more ends in the same state
   (idempotent recovery).

The counts are printed (run with -s to see them) and added to the
reliability report.
"""

from __future__ import annotations

import os
import random

import pytest

import kvstore
from kvstore import reliability
from pages.faultfs import DropAll, FaultFS, KeepAll, PowerCut

DB = "/db"
SOAK = bool(os.environ.get("KVSTORE_SOAK"))


def run_workload(fs: FaultFS, seed: int, acked: list[int], states: list[dict] | None = None) -> None:
    """The workload.  Appends the number of each commit that returned to
    ``acked``; with ``states`` given, records the model after each commit
    (states[j] = the committed data after j commits)."""
    rng = random.Random(seed)
    model: dict[bytes, bytes] = {}
    if states is not None:
        states.append(dict(model))
    db = kvstore.open(DB, _fs=fs, sync="full", cache_size=8 * 4096)
    commits = 0
    # A second transaction stays open across several foreground ones, on keys
    # of its own, so transactions interleave: its writes are in the log and
    # the pages (even stolen to disk) while others commit past it.
    bg = None
    bg_writes: dict[bytes, bytes] = {}
    for i in range(14):
        if bg is None and i % 4 == 1:
            bg, bg_writes = db.begin(), {}
        if bg is not None:
            key, value = b"bg%02d" % rng.randrange(6), b"bg%d" % i * rng.choice([1, 300])
            bg.put(key, value)
            bg_writes[key] = value
            if i % 4 == 3:
                if rng.random() < 0.3:
                    bg.rollback()
                else:
                    bg.commit()
                    commits += 1
                    model = {**model, **bg_writes}
                    acked.append(commits)
                    if states is not None:
                        states.append(dict(model))
                bg = None
        tx = db.begin()
        mine = dict(model)
        keys = [b"k%02d" % rng.randrange(12) for _ in range(rng.randrange(1, 4))]
        for key in keys:
            if rng.random() < 0.25 and key in mine:
                tx.delete(key)
                del mine[key]
            else:
                size = rng.choice([3, 40, 900, 9000])
                value = (b"%d:" % i) * (size // 3 + 1)
                tx.put(key, value[:size])
                mine[key] = value[:size]
        tx.put(b"marker%02d" % i, b"%d" % i)
        mine[b"marker%02d" % i] = b"%d" % i
        if rng.random() < 0.3:
            sp = tx.savepoint()
            tx.put(b"tmp", b"x" * 50)
            tx.delete(keys[0])
            tx.rollback_to(sp)
        if rng.random() < 0.15:
            tx.rollback()
        else:
            tx.commit()
            commits += 1
            model = mine
            acked.append(commits)
            if states is not None:
                states.append(dict(model))
        if i in (4, 9):
            db.checkpoint()
        if i == 11:
            if bg is not None:
                bg.rollback()
                bg = None
            db.close()
            db = kvstore.open(DB, _fs=fs, sync="full", cache_size=8 * 4096)
    db.close()


def read_all(fs: FaultFS) -> dict[bytes, bytes]:
    db = kvstore.open(DB, _fs=fs, sync="full", cache_size=8 * 4096)
    try:
        data = dict(db.scan())
        db._check_structures()
    finally:
        db.close()
    return data


def matching_prefix(data: dict, states: list[dict], acked: int, where: str) -> int:
    for j in range(acked, len(states)):
        if states[j] == data:
            return j
    earlier = [j for j in range(acked) if states[j] == data]
    if earlier:
        reliability.add("acked_lost", acked - earlier[-1])
    raise AssertionError(
        f"{where}: state after recovery is no prefix that includes the {acked} acknowledged commits"
        + (f" (it equals the state after {earlier[-1]} commits: a committed transaction was lost)" if earlier else "")
    )


def sample_plans(fs: FaultFS, rng: random.Random, limit: int) -> list:
    plans = fs.plans()
    chosen = [p for p in plans if isinstance(p, (DropAll, KeepAll))]
    rest = [p for p in plans if not isinstance(p, (DropAll, KeepAll))]
    rng.shuffle(rest)
    return chosen + rest[: max(0, limit - len(chosen))]


@pytest.mark.parametrize("seed", [1, 2] + ([3, 4, 5, 6] if SOAK else []))
def test_power_cut_at_every_io_point_loses_no_acknowledged_commit(seed: int) -> None:
    states: list[dict] = []
    full = FaultFS(seed=seed)
    run_workload(full, seed, [], states)
    total = full.io_points
    rng = random.Random(seed * 7919)
    plans_per_point = 12 if SOAK else 3
    checked = points = nested = 0
    for k in range(total):
        fs = FaultFS(seed=seed)
        fs.crash_after(k)
        acked: list[int] = []
        try:
            run_workload(fs, seed, acked)
        except PowerCut:
            pass
        else:
            continue  # the workload ended before point k (it does no I/O after close)
        points += 1
        n_acked = acked[-1] if acked else 0
        for plan in sample_plans(fs, rng, plans_per_point):
            crashed = fs.crash(plan)
            where = f"seed {seed}, power cut at I/O point {k}/{total}, plan {plan!r}"
            try:
                data = read_all(crashed)
            except Exception as e:  # open must never fail after a power cut
                raise AssertionError(f"{where}: reopen failed: {e!r}") from e
            j = matching_prefix(data, states, n_acked, where)
            reliability.add("acked_verified", n_acked)
            checked += 1
            if (SOAK or k % 9 == 0) and isinstance(plan, (DropAll, KeepAll)):
                nested += check_crash_during_recovery(crashed, states[j], where)
    print(f"\n[crash-db] seed {seed}: {points} crash points, {checked} crash states, {nested} nested recovery crashes checked")
    reliability.add("crash_points", points)
    reliability.add("crash_states", checked)
    reliability.add("nested_crashes", nested)
    assert points > 50 and checked >= points


def check_crash_during_recovery(crashed: FaultFS, expected: dict, where: str) -> int:
    """Cut the power at every I/O point of the restart of ``crashed`` (and
    of the one after it); each time, a further restart must end in ``expected``."""
    probe = crashed.crash(KeepAll())
    read_all(probe)
    total = probe.io_points
    done = 0
    for m in range(total):
        fs = crashed.crash(KeepAll())
        fs.crash_after(m)
        try:
            read_all(fs)
        except PowerCut:
            pass
        for plan in (DropAll(), KeepAll()):
            again = fs.crash(plan)
            data = read_all(again)
            assert data == expected, f"{where}: a crash at I/O point {m} of recovery ({plan!r}) changed the outcome"
            done += 1
    return done


def test_prepared_transaction_survives_power_cuts_in_doubt() -> None:
    fs = FaultFS(seed=11)
    db = kvstore.open(DB, _fs=fs, sync="full")
    db.put(b"a", b"1")
    tx = db.begin()
    tx.put(b"a", b"2")
    tx.put(b"b", b"new")
    tx.prepare(b"gid-1")
    fs = fs.crash(DropAll())  # the power fails with the transaction in doubt
    for round_ in range(3):
        db = kvstore.open(DB, _fs=fs, sync="full")
        assert db.prepared() == [b"gid-1"]
        assert db.get(b"a") == b"1" and db.get(b"b") is None, "in-doubt writes must stay invisible"
        with pytest.raises(kvstore.ConflictError):
            with db.transaction() as other:
                other.put(b"a", b"3")  # its keys stay protected
        fs = fs.crash(DropAll() if round_ % 2 else KeepAll())
    db = kvstore.open(DB, _fs=fs, sync="full")
    db.commit_prepared(b"gid-1")
    fs = fs.crash(DropAll())
    db = kvstore.open(DB, _fs=fs, sync="full")
    assert db.prepared() == []
    assert db.get(b"a") == b"2" and db.get(b"b") == b"new"
    db.close()


def test_checkpoint_during_a_commit_wait_does_not_undo_the_commit_after_a_crash() -> None:
    """Regression: a checkpoint taken while a transaction waits for group
    commit (its COMMIT already logged) listed it as unfinished, so restart
    from that checkpoint rolled a committed transaction back."""
    import threading

    fs = FaultFS(seed=5)
    db = kvstore.open(DB, _fs=fs, sync="full")
    db.put(b"before", b"1")
    waiting, release = threading.Event(), threading.Event()
    real_wait = db._wal.commit_wait

    def slow_commit_wait(lsn: int) -> None:
        waiting.set()
        assert release.wait(10)
        real_wait(lsn)

    db._wal.commit_wait = slow_commit_wait  # type: ignore[method-assign]
    tx = db.begin()
    tx.put(b"committed", b"yes")
    committer = threading.Thread(target=tx.commit)
    committer.start()
    assert waiting.wait(10)
    db.checkpoint()  # runs inside the commit window
    release.set()
    committer.join(10)
    assert tx.state == "committed"
    crashed = fs.crash(KeepAll())
    assert read_all(crashed) == {b"before": b"1", b"committed": b"yes"}
