"""Transactions per second through the whole store, against sqlite3 in the same run.

Run with ``.venv/bin/python -m pytest bench/bench_kvstore.py --benchmark-enable -q``
(``--benchmark-only`` works too; without either, each benchmark runs once as a
smoke test and nothing is measured).  About a minute on a quiet machine.

Workloads (100-byte random values, keys ``k00000000``.. drawn at random from
10,000, a fresh database directory on a real disk for each benchmark):

(a) ``put_commit[off|normal|full]``: one thread, ``begin(); put(k, v);
    commit()`` in a loop, under ``sync="off"``, ``"normal"``, ``"full"``.
(b) ``durable_commits_8threads``: 8 threads doing (a) under ``sync="full"``
    for a fixed time, each on keys of its own (no conflicts); group commit should give more commits per second than
    one thread gets.  Reports each thread's commit count and the slowest
    thread's share of the total (1/8 = 0.125 is perfectly fair).
(c) ``point_reads``: ``begin(readonly=True); get(k); commit()`` over 10,000
    keys loaded beforehand.

sqlite3 (the standard library's) does the same workloads on a table
``kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID`` in WAL mode, with
``synchronous`` = OFF, NORMAL or FULL to match the sync mode (FULL for (b),
NORMAL for (c)), one connection per thread, ``BEGIN IMMEDIATE`` / ``INSERT
OR REPLACE`` / ``COMMIT`` for a write and ``BEGIN`` / ``SELECT`` /
``COMMIT`` for a read.

Method: each benchmark is ``benchmark.pedantic`` over kvstore rounds of fixed
work (fixed time for (b)); the sqlite3 round of the same work runs in the
round's ``setup``, so the two alternate round by round under the same
conditions and sqlite3's time is not counted in kvstore's.  Rates are the
work of a round over the median round time.  ``extra_info`` holds
``kvstore_ops_per_s``, ``sqlite3_ops_per_s`` and ``ratio`` (kvstore /
sqlite3), plus per-thread counts for (b); a table of them is printed at the
end of the module.
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import threading
import time

import pytest

import kvstore

ROUNDS = 5
KEYSPACE = 10_000
VALUE = random.Random(7).randbytes(100)
WORK = {"off": 2000, "normal": 2000, "full": 150}  # single-thread commits per round
THREADS = 8
THREAD_SECONDS = 1.5  # length of one 8-thread round
READS = 5000  # point reads per round

#: workload -> row of the summary table
SUMMARY: dict[str, dict] = {}


def keys(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [b"k%08d" % rng.randrange(KEYSPACE) for _ in range(n)]


class KvEngine:
    name = "kvstore"

    def __init__(self, path: str, sync: str) -> None:
        self.db = kvstore.open(path, sync=sync)

    def put_commit(self, key: bytes) -> None:
        tx = self.db.begin()
        tx.put(key, VALUE)
        tx.commit()

    def read(self, key: bytes) -> bytes | None:
        tx = self.db.begin(readonly=True)
        v = tx.get(key)
        tx.commit()
        return v

    def load(self, n: int) -> None:
        with self.db.transaction() as tx:
            for i in range(n):
                tx.put(b"k%08d" % i, VALUE)

    def close(self) -> None:
        self.db.close()


class SqliteEngine:
    name = "sqlite3"

    def __init__(self, path: str, sync: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.file = os.path.join(path, "bench.sqlite")
        self.sync = {"off": "OFF", "normal": "NORMAL", "full": "FULL"}[sync]
        self.local = threading.local()
        self.conns: list[sqlite3.Connection] = []
        self.lock = threading.Lock()
        c = self.conn()
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE IF NOT EXISTS kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")

    def conn(self) -> sqlite3.Connection:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False, timeout=60)
            c.execute(f"PRAGMA synchronous={self.sync}")
            self.local.conn = c
            with self.lock:
                self.conns.append(c)
        return c

    def put_commit(self, key: bytes) -> None:
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, VALUE))
        c.execute("COMMIT")

    def read(self, key: bytes) -> bytes | None:
        c = self.conn()
        c.execute("BEGIN")
        row = c.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        c.execute("COMMIT")
        return row[0] if row else None

    def load(self, n: int) -> None:
        c = self.conn()
        c.execute("BEGIN")
        c.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", ((b"k%08d" % i, VALUE) for i in range(n)))
        c.execute("COMMIT")

    def close(self) -> None:
        for c in self.conns:
            c.close()


class _SummaryPlugin:
    """Prints the kvstore vs sqlite3 table at the end of the session (a
    plugin registered by this module, since bench/conftest.py is shared)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not SUMMARY:
            return
        tr = terminalreporter
        tr.section(f"kvstore vs sqlite3 {sqlite3.sqlite_version} (median rounds; ratio = kvstore / sqlite3)")
        fsync = next((r["raw_fsync_per_s"] for r in SUMMARY.values() if "raw_fsync_per_s" in r), None)
        if fsync:
            tr.write_line(f"the disk: {fsync:,.0f} fsync/s (bench/conftest.py's session probe)")
        tr.write_line(f"{'workload':34s} {'kvstore/s':>11s} {'sqlite3/s':>11s} {'ratio':>7s}")
        for name, row in SUMMARY.items():
            line = f"{name:34s} {row['kvstore_ops_per_s']:>11,.0f} {row['sqlite3_ops_per_s']:>11,.0f} {row['ratio']:>7.2f}"
            if "kvstore_slowest_thread_share" in row:
                line += (
                    f"   slowest thread's share: kvstore {row['kvstore_slowest_thread_share']:.3f}"
                    f" {row['kvstore_per_thread']}, sqlite3 {row['sqlite3_slowest_thread_share']:.3f}"
                    f" {row['sqlite3_per_thread']}"
                )
            tr.write_line(line)


_PLUGIN = _SummaryPlugin()


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    pm = request.config.pluginmanager
    if not pm.is_registered(_PLUGIN):
        pm.register(_PLUGIN, "bench_kvstore_summary")


def record(benchmark, name: str, kv_rate: float, sq_rate: float, **extra) -> None:
    if benchmark.disabled:
        return
    info = {"kvstore_ops_per_s": kv_rate, "sqlite3_ops_per_s": sq_rate, "ratio": kv_rate / sq_rate, **extra}
    benchmark.extra_info.update(info)
    SUMMARY[name] = info


# --- (a) single-key transactions ------------------------------------------------------------


@pytest.mark.parametrize("sync", ["off", "normal", "full"])
def test_put_commit(benchmark, disk_dir, raw_fsync_rate, sync):
    n = WORK[sync]
    kv = KvEngine(os.path.join(disk_dir, "kv"), sync)
    sq = SqliteEngine(os.path.join(disk_dir, "sq"), sync)
    sq_times: list[float] = []
    rounds = {"i": 0}

    def sqlite_round():  # the setup of each kvstore round
        ks = keys(rounds["i"], n)
        t0 = time.perf_counter()
        for k in ks:
            sq.put_commit(k)
        sq_times.append(time.perf_counter() - t0)
        rounds["i"] += 1
        return (keys(1000 + rounds["i"], n),), {}

    def kv_round(ks):
        for k in ks:
            kv.put_commit(k)

    try:
        benchmark.pedantic(kv_round, setup=sqlite_round, rounds=ROUNDS, warmup_rounds=1)
        assert kv.db.stats()["commits"] >= n
        if not benchmark.disabled:
            record(
                benchmark,
                f"put_commit[{sync}]",
                n / benchmark.stats.stats.median,
                n / statistics.median(sq_times),
                work_per_round=n,
                raw_fsync_per_s=raw_fsync_rate,
            )
    finally:
        kv.close()
        sq.close()


# --- (b) durable commits from 8 threads --------------------------------------------------------


def threaded_round(engine, seconds: float) -> list[int]:
    """THREADS threads doing put + commit until ``seconds`` pass; returns
    each thread's number of commits."""
    counts = [0] * THREADS
    stop = threading.Event()
    start = threading.Barrier(THREADS + 1)
    errors: list[BaseException] = []

    def work(me: int) -> None:
        ks = [b"t%d-%s" % (me, k) for k in keys(10_000 + me, 4096)]  # disjoint: no conflicts
        try:
            start.wait()
            i = 0
            while not stop.is_set():
                engine.put_commit(ks[i % len(ks)])
                counts[me] += 1
                i += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(me,)) for me in range(THREADS)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    return counts


def test_durable_commits_8threads(benchmark, disk_dir, raw_fsync_rate):
    kv = KvEngine(os.path.join(disk_dir, "kv"), "full")
    sq = SqliteEngine(os.path.join(disk_dir, "sq"), "full")
    kv_counts: list[list[int]] = []
    sq_counts: list[list[int]] = []
    kv_seconds: list[float] = []

    def sqlite_round():
        sq_counts.append(threaded_round(sq, THREAD_SECONDS))

    def kv_round():
        t0 = time.perf_counter()
        kv_counts.append(threaded_round(kv, THREAD_SECONDS))
        kv_seconds.append(time.perf_counter() - t0)

    try:
        benchmark.pedantic(kv_round, setup=sqlite_round, rounds=3, warmup_rounds=1)
        if benchmark.disabled:
            return
        # rates from the timed rounds (the first of each list is the warm-up)
        kv_rates = [sum(c) / THREAD_SECONDS for c in kv_counts[1:]]
        sq_rates = [sum(c) / THREAD_SECONDS for c in sq_counts[1:]]
        mid_kv = kv_counts[1:][kv_rates.index(statistics.median_low(kv_rates))]
        mid_sq = sq_counts[1:][sq_rates.index(statistics.median_low(sq_rates))]
        record(
            benchmark,
            "durable_commits_8threads[full]",
            statistics.median(kv_rates),
            statistics.median(sq_rates),
            kvstore_per_thread=mid_kv,
            sqlite3_per_thread=mid_sq,
            kvstore_slowest_thread_share=min(mid_kv) / sum(mid_kv),
            sqlite3_slowest_thread_share=min(mid_sq) / sum(mid_sq),
            seconds_per_round=THREAD_SECONDS,
            raw_fsync_per_s=raw_fsync_rate,
        )
    finally:
        kv.close()
        sq.close()


# --- (c) point reads ----------------------------------------------------------------------------


def test_point_reads(benchmark, disk_dir):
    kv = KvEngine(os.path.join(disk_dir, "kv"), "normal")
    sq = SqliteEngine(os.path.join(disk_dir, "sq"), "normal")
    kv.load(KEYSPACE)
    sq.load(KEYSPACE)
    sq_times: list[float] = []
    rounds = {"i": 0}

    def sqlite_round():
        ks = keys(500 + rounds["i"], READS)
        t0 = time.perf_counter()
        for k in ks:
            assert sq.read(k) is not None
        sq_times.append(time.perf_counter() - t0)
        rounds["i"] += 1
        return (keys(900 + rounds["i"], READS),), {}

    def kv_round(ks):
        for k in ks:
            if kv.read(k) is None:
                raise AssertionError(k)

    try:
        benchmark.pedantic(kv_round, setup=sqlite_round, rounds=ROUNDS, warmup_rounds=1)
        if not benchmark.disabled:
            record(benchmark, "point_reads", READS / benchmark.stats.stats.median, READS / statistics.median(sq_times), work_per_round=READS)
    finally:
        kv.close()
        sq.close()
