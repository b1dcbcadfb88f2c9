"""``kvstore bench``: named workloads against sqlite3, measured side by side.

Method.  The machine is shared and its speed swings, so absolute numbers mean
little; ratios measured close together mean more.  Every workload runs for
both stores inside this one process, in repetitions; in each repetition the
two stores run back to back in a shuffled order, and the ratio
kvstore/sqlite3 of that repetition is recorded.  The report gives the median
ratio with its min and max, and the median rates.  16-byte keys, 100-byte
values.  sqlite3 runs in WAL mode with synchronous=FULL for durable commits
and NORMAL for the normal workload, one table ``kv(k BLOB PRIMARY KEY, v BLOB)
WITHOUT ROWID``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, TextIO

import kvstore

KEY, VALUE = 16, 100


def _keys(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(128).to_bytes(16, "big") for _ in range(n)]


class _Kv:
    name = "kvstore"

    def __init__(self, path: str, sync: str) -> None:
        self.db = kvstore.open(path, sync=sync, cache_size=256 * 2**20, checkpoint_wal_bytes=256 * 2**20)

    def fill(self, items: list[tuple[bytes, bytes]]) -> None:
        with self.db.transaction() as tx:
            for k, v in items:
                tx.put(k, v)

    def get_many(self, keys: list[bytes]) -> None:
        tx = self.db.begin(readonly=True)
        get = tx.get
        for k in keys:
            get(k)
        tx.commit()

    def commit_one(self, k: bytes, v: bytes) -> None:
        # db.run, as a user would: threads drawing the same key conflict
        self.db.run(lambda tx: tx.put(k, v))

    def scan(self, start: bytes, n: int) -> int:
        count = 0
        for _ in self.db.scan(start):
            count += 1
            if count >= n:
                break
        return count

    def close(self) -> None:
        self.db.close()


class _Sqlite:
    name = "sqlite3"

    def __init__(self, path: str, sync: str) -> None:
        self.path = os.path.join(path, "bench.sqlite")
        self.sync = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}[sync]
        self.local = threading.local()
        self.conns: list[sqlite3.Connection] = []
        c = self.conn()
        c.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")

    def conn(self) -> sqlite3.Connection:
        c = getattr(self.local, "c", None)
        if c is None:
            c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={self.sync}")
            self.local.c = c
            self.conns.append(c)
        return c

    def fill(self, items: list[tuple[bytes, bytes]]) -> None:
        c = self.conn()
        c.execute("BEGIN")
        c.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)
        c.execute("COMMIT")

    def get_many(self, keys: list[bytes]) -> None:
        c = self.conn()
        q = "SELECT v FROM kv WHERE k = ?"
        c.execute("BEGIN")
        for k in keys:
            c.execute(q, (k,)).fetchone()
        c.execute("COMMIT")

    def commit_one(self, k: bytes, v: bytes) -> None:
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))
        c.execute("COMMIT")

    def scan(self, start: bytes, n: int) -> int:
        rows = self.conn().execute("SELECT k, v FROM kv WHERE k >= ? ORDER BY k LIMIT ?", (start, n)).fetchall()
        return len(rows)

    def close(self) -> None:
        for c in self.conns:
            c.close()


def _rate(fn: Callable[[], int]) -> float:
    t = time.perf_counter()
    ops = fn()
    return ops / max(time.perf_counter() - t, 1e-9)


def _workloads(n: int, quick: bool) -> list[tuple[str, str, Callable[[Any, random.Random], int]]]:
    """(name, sync mode, fn(store, rng) -> operations done)."""
    keys = _keys(n, 1)
    value = b"v" * VALUE
    batch = 2000 if quick else 10000
    commits = 100 if quick else 400

    def fill_random(store: Any, rng: random.Random) -> int:
        items = [(rng.getrandbits(128).to_bytes(16, "big"), value) for _ in range(batch)]
        store.fill(items)
        return batch

    def read_random(store: Any, rng: random.Random) -> int:
        store.get_many([keys[rng.randrange(n)] for _ in range(batch)])
        return batch

    def commit_loop(store: Any, rng: random.Random) -> int:
        for _ in range(commits):
            store.commit_one(keys[rng.randrange(n)], value)
        return commits

    def commit_threads(store: Any, rng: random.Random) -> int:
        per = max(10, commits // 8)
        seeds = [rng.random() for _ in range(8)]

        def worker(s: float) -> None:
            r = random.Random(s)
            for _ in range(per):
                store.commit_one(keys[r.randrange(n)], value)

        threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return per * 8

    def scan_1000(store: Any, rng: random.Random) -> int:
        return sum(store.scan(keys[rng.randrange(n)], 1000) for _ in range(5))

    return [
        ("fill random, one transaction", "off", fill_random),
        ("read random, warm", "off", read_random),
        ("durable commit, 1 thread", "full", commit_loop),
        ("durable commit, 8 threads", "full", commit_threads),
        ("commit, sync=normal", "normal", commit_loop),
        ("scan 1,000 keys", "off", scan_1000),
    ]


def measure(quick: bool = True, repetitions: int | None = None, n: int | None = None) -> list[dict[str, Any]]:
    """Run every workload; return one result dict per workload."""
    n = n or (20_000 if quick else 100_000)
    reps = repetitions or (5 if quick else 9)
    root = tempfile.mkdtemp(prefix="kvstore-bench-")
    results = []
    try:
        keys = _keys(n, 1)
        items = [(k, b"v" * VALUE) for k in keys]
        for name, sync, fn in _workloads(n, quick):
            stores = []
            for cls in (_Kv, _Sqlite):
                d = tempfile.mkdtemp(dir=root)
                store = cls(d, sync)
                store.fill(items)
                stores.append(store)
            rng = random.Random(7)
            ratios: list[float] = []
            kv_rates: list[float] = []
            sq_rates: list[float] = []
            for _ in range(reps):
                order = list(stores)
                rng.shuffle(order)
                got = {}
                for store in order:
                    got[store.name] = _rate(lambda s=store: fn(s, random.Random(rng.random())))
                kv_rates.append(got["kvstore"])
                sq_rates.append(got["sqlite3"])
                ratios.append(got["kvstore"] / got["sqlite3"])
            for store in stores:
                store.close()
            results.append(
                {
                    "workload": name,
                    "sync": sync,
                    "kvstore_ops_per_s": statistics.median(kv_rates),
                    "sqlite3_ops_per_s": statistics.median(sq_rates),
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "repetitions": reps,
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def run(quick: bool = False, json_output: bool = False, out: TextIO = sys.stdout) -> int:
    results = measure(quick=quick)
    if json_output:
        out.write(json.dumps({"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version, "results": results}) + "\n")
        return 0
    out.write(f"kvstore {kvstore.__version__} vs sqlite3 {sqlite3.sqlite_version}, Python {sys.version.split()[0]}\n")
    out.write(f"{'workload':<30} {'kvstore/s':>11} {'sqlite3/s':>11} {'ratio':>7} {'(min-max)':>14}\n")
    for r in results:
        out.write(
            f"{r['workload']:<30} {r['kvstore_ops_per_s']:>11,.0f} {r['sqlite3_ops_per_s']:>11,.0f} "
            f"{r['ratio_median']:>7.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})\n"
        )
    return 0
