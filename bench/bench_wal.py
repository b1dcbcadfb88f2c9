"""Write-ahead log benchmarks on a real disk, measured against the disk's own fsync rate.

Run with ``.venv/bin/python -m pytest bench/bench_wal.py --benchmark-only``
(the project's ``addopts`` disables benchmarks; ``bench/conftest.py`` makes
``--benchmark-only`` turn them back on).  Method and results:
``bench/README.md``.

Each benchmark is a ``benchmark.pedantic`` run: one warm-up round, then
``ROUNDS`` timed rounds of a fixed amount of work; the rate is the work of
one round divided by the median round time.  The work per round is sized
from the session's fsync probe to about ``ROUND_SECONDS`` of fsyncs (the
``work`` fixture: at most 2,000 fsyncs or commits, reached at 5,000 fsync/s),
so a slow or busy disk does not stretch the run.  Payloads are 100 bytes of
random data (below the compression threshold, so stored as is).

(a) ``raw_fsync_1thread``: os.pwrite 100 bytes at the end of a file, then
    os.fsync, in a loop.  The ceiling for a log that fsyncs every commit.
(b) ``raw_fsync_8threads``: the same on 8 threads, each with its own file;
    the total rate says whether the device overlaps fsyncs.
(c) ``wal_commit_1thread``: ``append(NOOP, txid, payload)`` then
    ``flush(lsn)`` under sync="full", one thread: what one committer gets.
(d) ``wal_group_commit_<n>threads``: n threads doing (c) at once on one log,
    twice (c)'s commits per round shared among them; group commit should give more
    commits per second than the disk gives fsyncs per second.
(e) ``wal_append_only``: ``append`` without ``flush`` (the in-memory framing
    cost, plus the write-behind pwrite every 1 MiB; no fsync).

``test_paired_ratios`` measures the README's ratios a second way: (a), (c)
and (d, 8 threads) timed back to back in short cycles, a ratio per cycle,
the median over the cycles.  It is the better number on a busy machine.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid

import pytest
from conftest import PAIRED, RESULTS, fs_type, fsync_probe

from pages.fs import OsFileSystem
from wal.format import RecordType
from wal.log import WriteAheadLog

ROUNDS = 5
PAYLOAD = os.urandom(100)
#: Seconds of fsyncing one round (and one paired cycle step) aims at: the
#: amounts of work below shrink on a slow disk so a run stays near 30 s on a
#: quiet machine and under about 2 minutes on a busy one.
ROUND_SECONDS = 0.4
APPENDS = 50_000  # per round (no fsync, so not scaled)


def _clamp(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, x)))


@pytest.fixture(scope="module")
def work(raw_fsync_rate) -> dict[str, int]:
    """Work per round, scaled by the session probe (at most 2,000 raw fsyncs)."""
    n = _clamp(raw_fsync_rate * ROUND_SECONDS, 100, 2000)
    pair = _clamp(raw_fsync_rate * ROUND_SECONDS / 4, 40, 200)
    return {
        "raw": n,  # single-thread fsyncs per round
        "raw_per_thread": max(25, n // 4),  # 8 threads
        "wal": n,  # single-thread commits per round
        "group": 2 * n,  # commits per round, shared out among the threads
        "pair": pair,  # raw fsyncs and single-thread commits per paired cycle
        "pair8": 4 * pair,  # 8-thread commits per paired cycle
    }


def _record(benchmark, name: str, ops: int, raw_fsync_rate: float, **extra: float) -> None:
    """Put rates and ratios in ``extra_info`` and the summary table."""
    if benchmark.disabled:  # run once as a smoke test, nothing measured
        return
    median = benchmark.stats.stats.median
    rate = ops / median
    info = {
        "ops_per_round": ops,
        "ops_per_s": round(rate, 1),
        "ratio_to_raw_fsync": round(rate / raw_fsync_rate, 3),
        "probe_fsync_per_s": round(raw_fsync_rate, 1),
        **extra,
    }
    benchmark.extra_info.update(info)
    RESULTS[name] = info


def _open_log(directory: str) -> WriteAheadLog:
    return WriteAheadLog.open(OsFileSystem(), directory, uuid.uuid4().bytes, sync="full")


def _run_threads(count: int, work) -> None:
    """Start ``count`` threads running ``work(i)`` together; wait for all."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --- (a), (b): the disk ---------------------------------------------------------


def test_raw_fsync_1thread(benchmark, disk_dir, raw_fsync_rate, work):
    kind, device = fs_type(disk_dir)
    benchmark.pedantic(fsync_probe, args=(disk_dir, work["raw"], PAYLOAD), rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update({"fs_type": kind, "device": device, "directory": disk_dir})
    _record(benchmark, "raw_fsync_1thread", work["raw"], raw_fsync_rate)


def test_raw_fsync_8threads(benchmark, disk_dir, raw_fsync_rate, work):
    threads = 8
    per_thread = work["raw_per_thread"]

    def round_():
        _run_threads(threads, lambda i: fsync_probe(disk_dir, per_thread, PAYLOAD))

    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, "raw_fsync_8threads", threads * per_thread, raw_fsync_rate, threads=threads)


# --- (c), (d): commits through the log -------------------------------------------


def test_wal_commit_1thread(benchmark, disk_dir, raw_fsync_rate, work):
    log = _open_log(disk_dir)
    commits = work["wal"]
    counts = {"commits": 0, "fsyncs": 0}

    def round_():
        before = log.fsyncs
        for txid in range(commits):
            log.flush(log.append(RecordType.NOOP, txid + 1, PAYLOAD))
        counts["commits"] += commits
        counts["fsyncs"] += log.fsyncs - before

    try:
        benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    finally:
        log.close()
    _record(
        benchmark,
        "wal_commit_1thread",
        commits,
        raw_fsync_rate,
        commits_per_fsync=round(counts["commits"] / max(1, counts["fsyncs"]), 3),
    )


@pytest.mark.parametrize("threads", [2, 8, 32])
def test_wal_group_commit(benchmark, disk_dir, raw_fsync_rate, work, threads):
    log = _open_log(disk_dir)
    counts = {"commits": 0, "fsyncs": 0, "writes": 0}
    per_thread = work["group"] // threads

    def committer(i: int) -> None:
        for n in range(per_thread):
            log.flush(log.append(RecordType.NOOP, i * 1_000_000 + n + 1, PAYLOAD))

    def round_():
        fsyncs, writes = log.fsyncs, log.writes
        _run_threads(threads, committer)
        counts["commits"] += threads * per_thread
        counts["fsyncs"] += log.fsyncs - fsyncs
        counts["writes"] += log.writes - writes

    t0 = time.perf_counter()
    try:
        benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    finally:
        log.close()
    _record(
        benchmark,
        f"wal_group_commit_{threads}threads",
        threads * per_thread,
        raw_fsync_rate,
        threads=threads,
        commits_per_fsync=round(counts["commits"] / max(1, counts["fsyncs"]), 3),
        commits_per_write=round(counts["commits"] / max(1, counts["writes"]), 3),
        fsyncs_per_s_overall=round(counts["fsyncs"] / (time.perf_counter() - t0), 1),
    )


# --- (e): appending without waiting ----------------------------------------------


def test_wal_append_only(benchmark, disk_dir, raw_fsync_rate):
    log = _open_log(disk_dir)

    def round_():
        for txid in range(APPENDS):
            log.append(RecordType.NOOP, txid + 1, PAYLOAD)

    try:
        benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
        fsyncs = log.fsyncs
    finally:
        log.close()
    _record(benchmark, "wal_append_only", APPENDS, raw_fsync_rate, fsyncs_during_appends=fsyncs)


# --- the ratios, measured in pairs ------------------------------------------------

PAIR_CYCLES = 11


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def test_paired_ratios(benchmark, disk_dir, raw_fsync_rate, work):
    """The README's ratios, robust to load from other processes.

    (a), (c) and (d) above run minutes apart, so a burst of someone else's I/O
    can land on one and not the other.  Here each cycle times the three back
    to back, a fraction of a second apart, and computes its own ratios; the
    result is the median over ``PAIR_CYCLES`` cycles (and the quartiles).
    """
    log = _open_log(disk_dir)
    rows: list[dict[str, float]] = []
    txid = iter(range(1, 10**9))
    n1, n8 = work["pair"], work["pair8"]  # 200 and 800 on a quiet disk

    def cycle() -> None:
        raw = fsync_probe(disk_dir, n1, PAYLOAD)
        t0 = time.perf_counter()
        for _ in range(n1):
            log.flush(log.append(RecordType.NOOP, next(txid), PAYLOAD))
        wal1 = n1 / (time.perf_counter() - t0)
        fsyncs = log.fsyncs
        per_thread = n8 // 8

        def committer(i: int) -> None:
            for n in range(per_thread):
                log.flush(log.append(RecordType.NOOP, i * 1_000_000 + n + 1, PAYLOAD))

        t0 = time.perf_counter()
        _run_threads(8, committer)
        wal8 = n8 / (time.perf_counter() - t0)
        rows.append(
            {
                "raw": raw,
                "wal1": wal1,
                "wal8": wal8,
                "wal1_ratio": wal1 / raw,
                "wal8_ratio": wal8 / raw,
                "cpf8": n8 / (log.fsyncs - fsyncs),
            }
        )

    def all_cycles() -> None:
        for _ in range(1 if benchmark.disabled else PAIR_CYCLES):  # disabled: a smoke test
            cycle()

    try:
        benchmark.pedantic(all_cycles, rounds=1)
    finally:
        log.close()
    if benchmark.disabled:
        return
    info: dict[str, float] = {"cycles": len(rows), "commits_1thread_per_cycle": n1, "commits_8threads_per_cycle": n8}
    for key in ("raw", "wal1", "wal8", "wal1_ratio", "wal8_ratio", "cpf8"):
        lo, mid, hi = _quartiles([r[key] for r in rows])
        info[f"{key}_median"] = round(mid, 3)
        info[f"{key}_q1"] = round(lo, 3)
        info[f"{key}_q3"] = round(hi, 3)
    benchmark.extra_info.update(info)
    PAIRED.update(info)
