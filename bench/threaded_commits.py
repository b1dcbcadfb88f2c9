"""The 8-thread commit ceiling: how many one-put transactions 8 threads
commit per second under each sync mode, and sqlite3's durable rate beside
them (bench/RESULTS.md, "8-thread durable commits").

Each thread updates random keys of its own (no conflicts) for a few
seconds; ``sync="off"`` shows what the GIL allows with no fsync at all.

    .venv/bin/python bench/threaded_commits.py [seconds]
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import kvstore

THREADS = 8
KEYS = 20_000


def _run(worker: Callable[[int, list[int], threading.Event], None], seconds: float) -> tuple[float, float]:
    """(commits per second, slowest thread / mean) of THREADS workers."""
    counts = [0] * THREADS
    stop = threading.Event()
    threads = [threading.Thread(target=worker, args=(i, counts, stop)) for i in range(THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    total = sum(counts)
    return total / (time.perf_counter() - t0), min(counts) / (total / THREADS)


def kvstore_rate(root: str, keys: list[bytes], sync: str, seconds: float) -> str:
    db = kvstore.open(os.path.join(root, f"kv-{sync}"), sync=sync)
    with db.transaction() as tx:
        tx.put_many([(k, b"v" * 100) for k in keys])
    wal = db._wal
    assert wal is not None
    fsyncs = wal.fsyncs

    def worker(i: int, counts: list[int], stop: threading.Event) -> None:
        mine, r, n = keys[i::THREADS], random.Random(i), 0
        while not stop.is_set():
            tx = db.begin()
            tx.put(mine[r.randrange(len(mine))], b"w" * 100)
            tx.commit()
            n += 1
        counts[i] = n

    rate, fair = _run(worker, seconds)
    per_sync = rate * seconds / max(1, wal.fsyncs - fsyncs)
    db.close()
    return f"kvstore sync={sync:<7} {rate:8,.0f} commits/s  slowest/mean {fair:.2f}  commits per fsync {per_sync:,.1f}"


def sqlite_rate(root: str, keys: list[bytes], seconds: float) -> str:
    path = os.path.join(root, "bench.sqlite")

    def connect() -> sqlite3.Connection:
        c = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        return c

    c = connect()
    c.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
    c.execute("BEGIN")
    c.executemany("INSERT INTO kv VALUES (?, ?)", [(k, b"v" * 100) for k in keys])
    c.execute("COMMIT")

    def worker(i: int, counts: list[int], stop: threading.Event) -> None:
        conn, mine, r, n = connect(), keys[i::THREADS], random.Random(i), 0
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (mine[r.randrange(len(mine))], b"w" * 100))
            conn.execute("COMMIT")
            n += 1
        counts[i] = n
        conn.close()

    rate, fair = _run(worker, seconds)
    c.close()
    return f"sqlite3 synchronous=FULL {rate:8,.0f} commits/s  slowest/mean {fair:.2f}"


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    rng = random.Random(1)
    keys = [rng.randbytes(16) for _ in range(KEYS)]
    root = tempfile.mkdtemp(prefix="kvstore-threads-", dir=os.environ.get("KVSTORE_BENCH_DIR"))
    try:
        for sync in ("full", "normal", "off"):
            print(kvstore_rate(root, keys, sync, seconds), flush=True)
        print(sqlite_rate(root, keys, seconds), flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
