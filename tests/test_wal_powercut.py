"""Power cuts at every I/O point of the write-ahead log (TESTING.md section 2).

A seeded workload appends records, flushes some (acknowledged), writes some
to the OS without fsync, rolls segments (segment_size 4096) and, in the
truncation workload, removes old segments.  For every I/O point k the power
is cut before point k (``FaultFS.crash_after``), and the crash is replayed
with crash plans of every kind (drop all, keep all, prefixes, omit-one, torn
sectors, grown-not-written, subsets).  For each crash state:

1. open succeeds -- a power cut never justifies CorruptionError (SPEC 4);
2. the log holds exactly a prefix of the appended records that includes every
   record whose ``flush`` returned before the cut (L1, L2, L3, L5);
3. a second open finds nothing more to cut and the same records (idempotent);
4. the log accepts new records after recovery, and they survive;
5. where the first open cut a torn tail, a power cut at every I/O point of
   that recovery, under every plan, recovers to the same records (SPEC 6).

The number of crash states checked is printed (``pytest -s``).
"""

from __future__ import annotations

import os
import random
from itertools import pairwise

import pytest

from kvstore import reliability
from pages.faultfs import (
    DropAll,
    FaultFS,
    GrownNotWritten,
    KeepAll,
    OmitOne,
    PowerCut,
    Prefix,
    Subset,
    Torn,
)
from wal import NO_LSN, RecordType, WriteAheadLog

DB_ID = bytes.fromhex("6b7673746f72652d77616c2d74657374")
D = "/db"
SEGMENT_SIZE = 4096
SOAK = bool(os.environ.get("KVSTORE_SOAK"))
#: Plans tried per crash point (FaultFS.plans takes them round-robin across
#: kinds, so every kind is represented).
PLANS_PER_POINT = 200 if SOAK else 60
#: Plans tried per I/O point of a recovery that is itself cut.
PLANS_PER_RECOVERY_POINT = 16 if SOAK else 6
#: Cut the recovery of every Nth crash state that needed a tail cut (all of
#: them under KVSTORE_SOAK=1): this is what bounds the file's runtime.
RECOVERY_CUT_STRIDE = 1 if SOAK else 3
ALL_KINDS = {DropAll, KeepAll, Prefix, OmitOne, Subset, Torn, GrownNotWritten}

totals: dict[str, int] = {}


#: this file's counts -> the reliability report's figures (kvstore/reliability.py)
REPORTED = {
    "crash points": "crash_points",
    "crash states checked": "crash_states",
    "nested recovery crash states checked": "nested_crashes",
    "acknowledged commit records verified": "acked_verified",
    "acknowledged commit records lost": "acked_lost",
}


def count(name: str, n: int = 1) -> None:
    totals[name] = totals.get(name, 0) + n
    if name in REPORTED:
        reliability.add(REPORTED[name], n)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nWAL power-cut figures: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))


def key(rec) -> tuple:
    return (rec.lsn, rec.type, rec.txid, rec.prev_lsn, rec.payload)


def open_log(fs, **kw) -> WriteAheadLog:
    return WriteAheadLog.open(fs, D, DB_ID, segment_size=SEGMENT_SIZE, **kw)


class Run:
    """What a workload did before the power went: records appended (in LSN
    order), how many of them were acknowledged durable, and the durable LSN
    the caller may pass to open (a checkpoint LSN, for truncation)."""

    def __init__(self) -> None:
        self.appended: list[tuple] = []
        self.acked = 0
        self.known_durable = 0
        self.truncated_at: int | None = None
        self.finished = False


def payload_for(rng: random.Random, i: int) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return rng.randbytes(rng.randint(0, 120))
    if kind < 0.8:  # several sectors: torn-write plans apply
        return rng.randbytes(rng.randint(500, 1500))
    return (b"compressible %d " % i) * rng.randint(40, 200)


def append(log, run: Run, rtype, txid, payload, prev=NO_LSN) -> int:
    lsn = log.end_lsn
    run.appended.append((lsn, rtype, txid, prev, payload))  # before: append may cut the power
    got = log.append(rtype, txid, payload, prev_lsn=prev)
    assert got == lsn
    return lsn


def appending_workload(fs: FaultFS, seed: int, run: Run, n: int = 40) -> None:
    """Appends ``n`` records of one or two transactions; after each, flushes
    durably (acknowledged), writes to the OS only, or does nothing."""
    rng = random.Random(seed)
    log = open_log(fs)
    last = {1: NO_LSN, 2: NO_LSN}
    for i in range(n):
        txid = rng.choice((1, 2))
        rtype = RecordType.COMMIT if rng.random() < 0.2 else RecordType.PAGE_REDO
        last[txid] = append(log, run, rtype, txid, payload_for(rng, i), last[txid])
        action = rng.random()
        if action < 0.2:
            log.flush(last[txid])
            run.acked = len(run.appended)
        elif action < 0.65:
            log.flush(sync=False)  # written, not durable: pending writes pile up
    log.close()
    run.acked = len(run.appended)
    run.finished = True


def truncating_workload(fs: FaultFS, seed: int, run: Run) -> None:
    """Fills several segments, flushes (the checkpoint), truncates below a
    point inside a later segment, then appends and flushes more."""
    rng = random.Random(seed)
    log = open_log(fs)
    for i in range(18):
        append(log, run, RecordType.PAGE_REDO, 1, rng.randbytes(rng.randint(300, 900)))
        if i % 4 == 3:
            log.flush(sync=False)
    target = run.appended[len(run.appended) * 3 // 4][0]  # inside a later segment
    log.flush()
    segs = log.segments()
    run.acked = len(run.appended)
    run.known_durable = target  # the caller's checkpoint: durable from here on
    run.truncated_at = target
    removed = log.truncate_before(target)
    assert len(segs) >= 3 and removed > 0
    assert log.segments()[0].first_lsn <= target < log.segments()[0].end_lsn  # L6: only whole segments below
    for _ in range(4):
        append(log, run, RecordType.COMMIT, 2, rng.randbytes(rng.randint(10, 700)))
        if rng.random() < 0.5:
            log.flush()
            run.acked = len(run.appended)
    log.close()
    run.acked = len(run.appended)
    run.finished = True


def check_recovered(fs: FaultFS, run: Run, what: str) -> tuple[list[tuple], bool]:
    """Checks 1-4 of the module docstring on one crash state; returns the
    recovered records and whether open cut a torn tail."""
    try:
        log = open_log(fs, durable_lsn=run.known_durable)
    except Exception as e:  # noqa: BLE001 - the failure message says it all
        pytest.fail(f"{what}: open raised {e!r} after a power cut")
    got = [key(r) for r in log.records()]
    recs = list(log.records())
    assert all(a.end == b.lsn for a, b in pairwise(recs)), f"{what}: log is not contiguous"
    if run.truncated_at is None:
        assert got == run.appended[: len(got)], f"{what}: not a prefix of the appended records"
    else:  # a contiguous run that starts at or below the truncation point
        start = next((i for i, k in enumerate(run.appended) if got and k[0] == got[0][0]), None)
        assert start is not None, f"{what}: first record {got[:1]} was never appended"
        assert got == run.appended[start : start + len(got)], f"{what}: not a contiguous run of appended records"
        assert got[0][0] <= run.known_durable or run.known_durable == 0
    acked_keys = run.appended[: run.acked]
    if run.truncated_at is not None:
        acked_keys = [k for k in acked_keys if k[0] >= run.known_durable]
    missing = [k[0] for k in acked_keys if k not in got]
    count("acknowledged commit records lost", sum(1 for k in acked_keys if k not in got and k[1] == RecordType.COMMIT))
    assert not missing, f"{what}: acknowledged records lost at LSNs {missing}"
    count("acknowledged commit records verified", sum(1 for k in acked_keys if k[1] == RecordType.COMMIT))
    cut = log.opened_state.cut
    log.close()
    again = open_log(fs, durable_lsn=run.known_durable)
    assert again.opened_state.cut == [], f"{what}: second open cut again {again.opened_state.cut}"
    assert [key(r) for r in again.records()] == got, f"{what}: second open differs"
    lsn = again.append(RecordType.NOOP, 7, b"after recovery")
    again.flush(lsn)
    again.close()
    final = open_log(fs.crash(DropAll()), durable_lsn=run.known_durable)
    after = [key(r) for r in final.records()]
    assert after == got + [(lsn, RecordType.NOOP, 7, NO_LSN, b"after recovery")], f"{what}: write after recovery lost"
    final.close()
    count("crash states checked")
    if cut:
        count("crash states with a torn tail cut")
    return got, bool(cut)


def check_crash_during_recovery(fs: FaultFS, run: Run, plan, expected: list[tuple], what: str) -> None:
    """Cut the power at every I/O point of the recovery of ``fs.crash(plan)``
    (fs is dead; each crash(plan) replays the same state afresh)."""
    j = 0
    while True:
        state = fs.crash(plan)
        state.crash_after(j)
        try:
            open_log(state, durable_lsn=run.known_durable).close()
        except PowerCut:
            pass
        else:
            return
        for p in state.plans(limit=PLANS_PER_RECOVERY_POINT):
            after = state.crash(p)
            log = open_log(after, durable_lsn=run.known_durable)
            got = [key(r) for r in log.records()]
            log.close()
            assert got == expected, f"{what}, recovery cut at I/O point {j} under {p!r}: {len(got)} records, expected {len(expected)}"
            count("nested recovery crash states checked")
        j += 1


def enumerate_power_cuts(workload, seed: int) -> set[type]:
    """Cut the power at every I/O point of ``workload``; check every plan.
    Returns the plan kinds used."""
    kinds: set[type] = set()
    k = 0
    while True:
        fs = FaultFS(seed=seed, dirs=[D])
        fs.crash_after(k)
        run = Run()
        try:
            workload(fs, seed, run)
        except PowerCut:
            pass
        if run.finished:  # ran to the end untouched: the clean state must hold too
            check_recovered(fs.crash(DropAll()), run, f"seed {seed}, after the workload")
            count("crash points", k)
            return kinds
        plans = fs.plans(limit=PLANS_PER_POINT)
        for plan in plans:
            kinds.add(type(plan))
            what = f"seed {seed}, cut before I/O point {k} ({len(fs.pending())} pending), plan {plan!r}"
            got, cut = check_recovered(fs.crash(plan), run, what)
            if cut and totals["crash states with a torn tail cut"] % RECOVERY_CUT_STRIDE == 0:
                check_crash_during_recovery(fs, run, plan, got, what)
        k += 1


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_power_cut_at_every_io_point_recovers_a_prefix_with_every_acked_record(seed):
    kinds = enumerate_power_cuts(appending_workload, seed)
    assert kinds == ALL_KINDS, f"plan kinds not exercised: {ALL_KINDS - kinds}"


def test_power_cut_during_truncation_leaves_a_contiguous_log():
    """L6: whatever removals of truncate_before survive, the log is a
    contiguous run of segments holding everything from the truncation LSN."""
    kinds = enumerate_power_cuts(truncating_workload, 11)
    assert {DropAll, KeepAll, Prefix, Subset} <= kinds


def test_the_workloads_cover_rolls_and_truncation():
    """Guard against a vacuous enumeration: the workloads really roll segments,
    leave several unsynced writes pending, and truncate."""
    fs = FaultFS(seed=1, dirs=[D])
    run = Run()
    appending_workload(fs, 1, run)
    assert len(fs.snapshot()) >= 3 and run.finished
    fs = FaultFS(seed=11, dirs=[D])
    run = Run()
    seen_pending = []
    fs.add_hook(lambda ev: seen_pending.append(len(fs.pending_ops())) if ev.kind == "fsync" else None)
    truncating_workload(fs, 11, run)
    assert max(seen_pending) >= 3
    assert fs.counts["remove"] >= 1
    assert run.truncated_at is not None


# -- a process crash, a reopen, then a power cut ----------------------------------
#
# SIGKILL keeps the page cache: the reopened log sees records that were written
# but never fsynced.  It must not treat them as durable (L1, L5) until an fsync
# has covered them.  The old log object is simply abandoned (the process died).


def process_crash_then_reopen() -> tuple[FaultFS, int]:
    fs = FaultFS(seed=0, dirs=[D])
    log = open_log(fs)
    unsynced = log.append(RecordType.PAGE_REDO, 1, b"written, never fsynced" * 5)
    log.flush(sync=False)
    assert fs.pending(), "the record should be in the page cache only"
    return fs, unsynced


def test_flush_after_reopen_makes_the_adopted_tail_durable():
    fs, unsynced = process_crash_then_reopen()
    log = open_log(fs)
    assert [r.lsn for r in log.records()] == [unsynced]
    log.flush()  # "everything appended is durable" -- including what open adopted
    assert log.durable_lsn > unsynced
    log.close()
    assert [r.lsn for r in open_log(fs.crash(DropAll())).records()] == [unsynced]


def test_power_cut_after_reopen_of_an_unsynced_tail_never_raises():
    fs, unsynced = process_crash_then_reopen()
    log = open_log(fs)
    log.append(RecordType.COMMIT, 1, b"later, written to the OS")
    log.flush(sync=False)
    failures = []
    for plan in fs.plans():
        try:
            open_log(fs.crash(plan)).close()
        except Exception as e:  # noqa: BLE001
            failures.append(f"{plan!r}: {e}")
    assert not failures, "power cut after a reopen made open fail:\n" + "\n".join(failures)
