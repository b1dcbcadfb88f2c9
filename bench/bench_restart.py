"""pytest-benchmark benchmarks of restart (crash recovery) and of the commit
stall while a checkpoint runs.

Run (the project's addopts disable benchmarks, so enable them)::

    .venv/bin/python -m pytest bench/bench_restart.py --benchmark-enable -q
    KVSTORE_BENCH_BIG=1 .venv/bin/python -m pytest bench/bench_restart.py --benchmark-enable -q

What is measured (16-byte keys, 100-byte random values, seeded RNG, a real
disk -- see ``bench/conftest.py``):

* ``test_restart[keys-updated-wal]``: ``kvstore.open`` of a crashed store of
  ``keys`` keys (10,000 and 100,000; 10,000 and 1,000,000 with
  ``KVSTORE_BENCH_BIG=1``) with ``wal`` MiB (1, 8, 64) of log since its last
  checkpoint, the log's updates drawn from the first ``updated`` keys (all
  of them, or for the big store also only the small store's count).  Each
  store is built once (automatic checkpoints off: huge
  ``checkpoint_wal_bytes`` and ``checkpoint_interval``), checkpointed, then
  updated (random keys, 50 per transaction, sync off) until the log holds
  ``wal`` MiB beyond the checkpoint; the log is flushed to the OS and the
  directory is copied while the store is open -- the copy is the crashed
  image.  Every round opens a fresh copy of it; the time is that of
  ``open`` (analysis and redo in one pass, undo, and the checkpoint that
  ends recovery), with the default 64 MiB cache.  ``extra_info``:
  ``wal_mib``, ``open_s`` (median), ``mib_replayed_per_s`` (``wal_mib /
  open_s``), ``pages_redone`` (distinct pages the log names: restart reads
  each once and the checkpoint writes it), the ``recovery_*`` figures of
  ``stats()``.  Restart costs the log plus the pages it names, so the same
  log restarts in the same time over a store 100 times larger
  (``[1000000-10000-*]`` against ``[10000-10000-*]``), and a log that names
  more distinct pages costs more per MiB.
* ``test_checkpoint_stall``: a store with ``P`` dirty 4 KiB pages (20,000;
  100,000 with ``KVSTORE_BENCH_BIG=1``) in a cache big enough to keep them all
  dirty; ``db.checkpoint()`` runs in another thread while this one commits
  small transactions (one 100-byte put, sync="off") as fast as it can.
  ``extra_info``: median and max commit latency during the checkpoint, the
  median without a checkpoint (the same commits just before), their ratios,
  the checkpoint's duration and pages written.

A summary of every ``extra_info`` is printed when the module ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import threading
import time
import uuid
from typing import Any

import pytest

import kvstore

BIG = bool(os.environ.get("KVSTORE_BENCH_BIG"))
KEY_COUNTS = [10_000, 1_000_000] if BIG else [10_000, 100_000]
#: (keys in the store, keys the log's updates are drawn from): every store
#: updated throughout, and the big one also with updates confined to as many
#: keys as the small one holds -- the same log over a database 10 to 100
#: times larger.
RESTART_STORES = [(n, n) for n in KEY_COUNTS] + [(KEY_COUNTS[1], KEY_COUNTS[0])]
WAL_MIBS = [1, 8, 64]
STALL_PAGES = 100_000 if BIG else 20_000
SEED = 20240612
MiB = 2**20
NO_AUTO = {"checkpoint_wal_bytes": 1 << 50, "checkpoint_interval": 1e9}
RESTART_ROUNDS = 3

_SUMMARY: dict[str, dict[str, Any]] = {}


def key(i: int) -> bytes:
    return b"%016d" % i


@pytest.fixture(scope="module", autouse=True)
def _summary(request: Any) -> Any:
    """Print every benchmark's extra_info when the module ends."""
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or not _SUMMARY:
        return
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        tr.write_line("")
        tr.write_line(f"bench_restart summary (KVSTORE_BENCH_BIG={int(BIG)}):")
        for name, info in _SUMMARY.items():
            tr.write_line(f"  {name:34s} " + "  ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in info.items()))


# --- restart ---------------------------------------------------------------------------------


class Images:
    """Crashed images, built lazily and once: base stores per key count, and
    crashed copies per (keys, wal MiB, keys updated)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.bases: dict[int, str] = {}
        self.crashed: dict[tuple[int, int, int], str] = {}
        self.crashed_info: dict[tuple[int, int, int], dict] = {}

    def base(self, keys: int) -> str:
        """A closed (checkpointed) store of ``keys`` keys."""
        if keys not in self.bases:
            path = os.path.join(self.root, f"base-{keys}")
            rng = random.Random(SEED + keys)
            with kvstore.open(path, sync="off", **NO_AUTO) as db:
                for lo in range(0, keys, 2000):
                    with db.transaction() as tx:
                        for i in range(lo, min(lo + 2000, keys)):
                            tx.put(key(i), rng.randbytes(100))
            self.bases[keys] = path
        return self.bases[keys]

    def image(self, keys: int, wal_mib: int, updated: int) -> tuple[str, dict]:
        """A crashed copy with ``wal_mib`` MiB of log after its checkpoint,
        updating keys drawn from the first ``updated``."""
        if (keys, wal_mib, updated) not in self.crashed:
            live = os.path.join(self.root, f"live-{keys}-{wal_mib}-{updated}")
            shutil.copytree(self.base(keys), live)
            rng = random.Random(SEED + 7 * wal_mib)
            db = kvstore.open(live, sync="off", **NO_AUTO)
            start = db.stats()["last_checkpoint_lsn"]
            commits = 0
            while db._wal.end_lsn - start < wal_mib * MiB:
                with db.transaction() as tx:
                    for _ in range(50):
                        tx.put(key(rng.randrange(updated)), rng.randbytes(100))
                commits += 1
            db._wal.flush(sync=False)  # what the OS has survives a process crash
            image = os.path.join(self.root, f"crashed-{keys}-{wal_mib}-{updated}")
            shutil.copytree(live, image)  # the store is open: a crash image
            info = {"wal_bytes": db._wal.end_lsn - start, "commits": commits}
            db.close()
            shutil.rmtree(live)
            self.crashed[(keys, wal_mib, updated)] = image
            self.crashed_info[(keys, wal_mib, updated)] = info
        return self.crashed[(keys, wal_mib, updated)], self.crashed_info[(keys, wal_mib, updated)]


@pytest.fixture(scope="module")
def images(disk_root: str) -> Any:
    root = os.path.join(disk_root, "restart-" + uuid.uuid4().hex[:8])
    os.makedirs(root)
    yield Images(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("wal_mib", WAL_MIBS)
@pytest.mark.parametrize(("keys", "updated"), RESTART_STORES, ids=lambda v: f"{v:_}")
@pytest.mark.benchmark(group="restart")
def test_restart(benchmark: Any, images: Images, keys: int, updated: int, wal_mib: int) -> None:
    image, built = images.image(keys, wal_mib, updated)
    opened: list[kvstore.Database] = []
    seconds: list[float] = []
    copies: list[str] = []

    def setup() -> tuple[tuple, dict]:
        for db in opened:
            db.close()
        opened.clear()
        for d in copies:
            shutil.rmtree(d, ignore_errors=True)
        copies.clear()
        d = image + "-copy-" + uuid.uuid4().hex[:6]
        shutil.copytree(image, d)
        copies.append(d)
        return (d,), {}

    def run(d: str) -> None:
        t0 = time.perf_counter()
        db = kvstore.open(d, **NO_AUTO)
        seconds.append(time.perf_counter() - t0)
        opened.append(db)

    try:
        benchmark.pedantic(run, setup=setup, rounds=RESTART_ROUNDS, warmup_rounds=0)
        db = opened[-1]
        st = db.stats()
        # The recovered store is whole: every key there, the structures sound.
        assert st["recovery_records_scanned"] > 0
        assert db.get(key(0)) is not None and db.get(key(keys - 1)) is not None
        db._check_structures()
    finally:
        for db in opened:
            db.close()
        for d in copies:
            shutil.rmtree(d, ignore_errors=True)
    med = statistics.median(seconds)
    wal = built["wal_bytes"] / MiB
    benchmark.extra_info.update(
        {
            "keys": keys,
            "updated": updated,
            "wal_mib": round(wal, 2),
            "open_s": round(med, 3),
            "open_s_min": round(min(seconds), 3),
            "mib_replayed_per_s": round(wal / med, 2),
            "recovery_seconds": round(st["recovery_seconds"], 3),
            "records_scanned": st["recovery_records_scanned"],
            "ops_redone": st["recovery_ops_redone"],
            "pages_redone": st["recovery_pages_redone"],
            "ms_per_1000_pages": round(med * 1e6 / max(1, st["recovery_pages_redone"]), 1),
            "records_per_s": int(st["recovery_records_scanned"] / med),
        }
    )
    _SUMMARY[f"restart[{keys}/{updated}-{wal_mib}MiB]"] = dict(benchmark.extra_info)


# --- commit latency while a checkpoint runs ---------------------------------------------------


def dirty_store(path: str, pages: int) -> tuple[kvstore.Database, int]:
    """An open store with about ``pages`` dirty pages (random inserts of
    1000-byte values, nothing checkpointed since)."""
    db = kvstore.open(path, sync="off", page_size=4096, cache_size=(pages * 3 + 10_000) * 4096, **NO_AUTO)
    rng = random.Random(SEED)
    n = 0
    while len(db._store.pool.dirty_table()) < pages:
        with db.transaction() as tx:
            for _ in range(500):
                tx.put(rng.randbytes(16), rng.randbytes(1000))
                n += 1
    return db, n


def commit_latencies(db: kvstore.Database, stop: threading.Event | None, count: int, rng: random.Random) -> list[float]:
    """Commit small transactions until ``stop`` is set (or ``count`` done)."""
    out = []
    perf = time.perf_counter
    while (stop is None and len(out) < count) or (stop is not None and not stop.is_set()):
        k, v = b"hot%06d" % rng.randrange(100_000), rng.randbytes(100)
        t0 = perf()
        with db.transaction() as tx:
            tx.put(k, v)
        out.append(perf() - t0)
    return out


@pytest.mark.benchmark(group="checkpoint-stall")
def test_checkpoint_stall(benchmark: Any, disk_dir: str) -> None:
    rounds = 1 if BIG else 2
    results: list[dict] = []
    stores: list[kvstore.Database] = []

    def setup() -> tuple[tuple, dict]:
        for db in stores:
            db.close()
        stores.clear()
        path = os.path.join(disk_dir, "stall-" + uuid.uuid4().hex[:6])
        db, n = dirty_store(path, STALL_PAGES)
        stores.append(db)
        rng = random.Random(SEED + 1)
        base = commit_latencies(db, None, 3000, rng)  # also warms the hot keys' leaves
        return (db, base, n), {}

    def run(db: kvstore.Database, base: list[float], n: int) -> None:
        dirty = len(db._store.pool.dirty_table())
        done = threading.Event()
        out: dict[str, Any] = {}

        def checkpointer() -> None:
            try:
                out["result"] = db.checkpoint()
            except BaseException as e:  # reported below
                out["error"] = e
            finally:
                done.set()

        th = threading.Thread(target=checkpointer)
        t0 = time.perf_counter()
        th.start()
        during = commit_latencies(db, done, 0, random.Random(SEED + 2))
        th.join()
        took = time.perf_counter() - t0
        if "error" in out:
            raise out["error"]
        results.append({"dirty": dirty, "keys": n, "base": base, "during": during, "took": took, "r": out["result"]})

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=0)
    finally:
        for db in stores:
            db.close()
    res = max(results, key=lambda x: max(x["during"]))  # the worst round
    during, base = res["during"], res["base"]
    med, mx, bmed = statistics.median(during), max(during), statistics.median(base)
    benchmark.extra_info.update(
        {
            "dirty_pages": res["dirty"],
            "pages_written": res["r"]["pages_written"],
            "checkpoint_s": round(res["r"]["seconds"], 3),
            "commits_during": len(during),
            "median_ms": round(med * 1e3, 3),
            "max_ms": round(mx * 1e3, 2),
            "p99_ms": round(sorted(during)[int(0.99 * (len(during) - 1))] * 1e3, 3),
            "max_over_median": round(mx / med, 1),
            "median_no_checkpoint_ms": round(bmed * 1e3, 3),
            "max_no_checkpoint_ms": round(max(base) * 1e3, 3),
            "median_ratio_vs_no_checkpoint": round(med / bmed, 2),
            "max_ratio_vs_no_checkpoint_median": round(mx / bmed, 1),
        }
    )
    _SUMMARY[f"checkpoint_stall[{STALL_PAGES}]"] = dict(benchmark.extra_info)
    assert res["r"]["pages_written"] >= 0.9 * STALL_PAGES
