"""pytest-benchmark suites for kvstore's hot paths, with sqlite3 paired round by round.

Run (the project's addopts disable benchmarks; ``--benchmark-only`` enables them)::

    .venv/bin/python -m pytest bench/bench_kvstore.py --benchmark-only          # about 2 minutes
    KVSTORE_BENCH_KEYS=1000000 .venv/bin/python -m pytest bench/bench_kvstore.py --benchmark-only

A plain ``pytest`` run never collects ``bench/`` (``testpaths``); ``pytest
bench/bench_kvstore.py`` without ``--benchmark-only`` runs each benchmark
once as a smoke test and measures nothing.

The stores are ``kvstore.benchmark``'s (the same code ``kvstore bench``
measures): a store of ``KVSTORE_BENCH_KEYS`` keys (default 100,000; 16-byte
random keys, 100-byte values) for kvstore and for sqlite3 (WAL,
``synchronous`` FULL, NORMAL or OFF to match ``sync``), loaded once per
module on a real disk (``bench/conftest.py``) and warmed (read once).

================================  =====================================================
benchmark                         one round
================================  =====================================================
``test_get``                      10,000 random loaded keys, 100 per read transaction
``test_put``                      10,000 new random keys in one transaction, committed
``test_commit[off|normal|full]``  one-put transactions (updates of random loaded keys):
                                  2,000 (off, normal) or 150 (full)
``test_commit_8_threads``         8 threads of one-put durable transactions for 1 s;
                                  per-thread counts in ``extra_info``
``test_scan``                     100 scans of 1,000 keys from random loaded keys
``test_checkpoint``               ``db.checkpoint()`` after 5,000 random updates
                                  (setup, not timed): pages written per second
``test_restart``                  ``kvstore.open`` after a clean close, then one get
================================  =====================================================

Pairing: each kvstore round's ``setup`` runs sqlite3's round of the same work
(timed apart), so the two alternate under the same conditions; the ratio
reported is kvstore's median round over sqlite3's.  ``extra_info`` holds
``kvstore_ops_per_s``, ``sqlite3_ops_per_s``, ``ratio`` (kvstore / sqlite3).
A table is printed at the end of the module.  Restart after a crash, by WAL
size, is ``bench_restart.py``; the interleaved comparison with every peer is
``kvstore bench``.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from typing import Any

import pytest

from kvstore import benchmark as kb

KEYS = int(os.environ.get("KVSTORE_BENCH_KEYS", "100000"))
ROUNDS = 5
COMMITS = {"off": 2000, "normal": 2000, "full": 150}

#: workload -> row of the summary table
SUMMARY: dict[str, dict[str, Any]] = {}


class _SummaryPlugin:
    """Prints the kvstore vs sqlite3 table at the end of the session."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not SUMMARY:
            return
        tr = terminalreporter
        tr.section(f"kvstore vs sqlite3 {kb.SqliteStore.version}, {KEYS:,} keys (median rounds; ratio = kvstore / sqlite3)")
        tr.write_line(f"{'benchmark':28s} {'unit':10s} {'kvstore':>12s} {'sqlite3':>12s} {'ratio':>7s}")
        for name, row in SUMMARY.items():
            sq = row.get("sqlite3_ops_per_s")
            line = f"{name:28s} {row['unit']:10s} {row['kvstore_ops_per_s']:>12,.0f} "
            line += f"{sq:>12,.0f} {row['ratio']:>7.2f}" if sq else f"{'-':>12s} {'-':>7s}"
            if "kvstore_per_thread" in row:
                line += f"   per thread: kvstore {row['kvstore_per_thread']}, sqlite3 {row['sqlite3_per_thread']}"
            tr.write_line(line)


_PLUGIN = _SummaryPlugin()


@pytest.fixture(scope="module", autouse=True)
def _summary_table(request: Any) -> None:
    pm = request.config.pluginmanager
    if not pm.is_registered(_PLUGIN):
        pm.register(_PLUGIN, "bench_kvstore_summary")


@pytest.fixture(scope="module")
def bench(disk_root: str) -> Any:
    """Both stores loaded with KEYS keys (kvstore.benchmark.Bench)."""
    b = kb.Bench(kb.Config(keys=KEYS, root=disk_root), [kb.KvstoreStore, kb.SqliteStore])
    try:
        for cls in b.stores:
            b.load(cls)
        yield b
    finally:
        b.close()


def record(benchmark: Any, name: str, unit: str, work: int, sq_times: list[float] | None, **extra: Any) -> None:
    if benchmark.disabled:
        return
    kv_rate = work / benchmark.stats.stats.median
    info: dict[str, Any] = {"unit": unit, "kvstore_ops_per_s": kv_rate, "work_per_round": work, **extra}
    if sq_times:
        sq_rate = work / statistics.median(sq_times)
        info.update(sqlite3_ops_per_s=sq_rate, ratio=kv_rate / sq_rate)
    benchmark.extra_info.update(info)
    SUMMARY[name] = info


def paired(benchmark: Any, kv_round: Any, sq_round: Any, rounds: int = ROUNDS) -> list[float]:
    """Run kvstore rounds under the benchmark with sqlite3's round as each
    round's setup; return sqlite3's round times (the warm-up's left out)."""
    sq_times: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        t0 = time.perf_counter()
        sq_round()
        sq_times.append(time.perf_counter() - t0)
        return (), {}

    benchmark.pedantic(kv_round, setup=setup, rounds=rounds, warmup_rounds=1)
    return sq_times[1:]


# --- get, put, commit, scan ----------------------------------------------------------------------


def test_get(benchmark: Any, bench: Any) -> None:
    rng = random.Random(1)
    kv, sq = bench.main(kb.KvstoreStore, "full"), bench.main(kb.SqliteStore, "full")
    n = 10_000

    def gets(store: kb.Store) -> None:
        keys = [bench.keys[rng.randrange(KEYS)] for _ in range(n)]
        for i in range(0, n, kb.GET_BATCH):
            assert store.get_many(keys[i : i + kb.GET_BATCH]) == kb.GET_BATCH

    sq_times = paired(benchmark, lambda: gets(kv), lambda: gets(sq))
    record(benchmark, "get", "gets/s", n, sq_times)


def test_put(benchmark: Any, bench: Any) -> None:
    rng = random.Random(2)
    kv, sq = bench.main(kb.KvstoreStore, "full"), bench.main(kb.SqliteStore, "full")
    n = 10_000

    def puts(store: kb.Store) -> None:
        w = store.writer()
        w.put_many([(rng.randbytes(16), bench.values[i % 256]) for i in range(n)])
        w.commit()

    sq_times = paired(benchmark, lambda: puts(kv), lambda: puts(sq))
    record(benchmark, "put (10k in one tx)", "puts/s", n, sq_times)


@pytest.mark.parametrize("sync", ["off", "normal", "full"])
def test_commit(benchmark: Any, bench: Any, sync: str) -> None:
    rng = random.Random(3)
    kv, sq = bench.main(kb.KvstoreStore, sync), bench.main(kb.SqliteStore, sync)
    n = COMMITS[sync]

    def commits(store: kb.Store) -> None:
        for _ in range(n):
            store.commit_one(bench.keys[rng.randrange(KEYS)], bench.values[rng.randrange(256)])

    sq_times = paired(benchmark, lambda: commits(kv), lambda: commits(sq))
    record(benchmark, f"commit[{sync}]", "commits/s", n, sq_times)


def test_commit_8_threads(benchmark: Any, bench: Any) -> None:
    counts: dict[str, list[list[int]]] = {"kvstore": [], "sqlite3": []}
    seconds = 1.0

    def crew_round(cls: type[kb.Store]) -> None:
        job = kb._threaded_commits(bench, cls, random.Random(4))
        next(job)
        try:
            step = job.send(None)
        finally:
            job.close()
        assert isinstance(step, kb.Step) and step.per_thread is not None
        counts[cls.name].append(step.per_thread)

    bench.cfg = kb.replace(bench.cfg, slice_s=seconds / 2.5)  # the crew's slice is 2.5 slices
    sq_times = paired(benchmark, lambda: crew_round(kb.KvstoreStore), lambda: crew_round(kb.SqliteStore), rounds=3)
    if benchmark.disabled:
        return
    kv_rates = [sum(c) / seconds for c in counts["kvstore"][1:]]
    sq_rates = [sum(c) / seconds for c in counts["sqlite3"][1:]]
    info = {
        "unit": "commits/s",
        "kvstore_ops_per_s": statistics.median(kv_rates),
        "sqlite3_ops_per_s": statistics.median(sq_rates),
        "ratio": statistics.median(kv_rates) / statistics.median(sq_rates),
        "kvstore_per_thread": [sum(c) for c in zip(*counts["kvstore"][1:], strict=True)],
        "sqlite3_per_thread": [sum(c) for c in zip(*counts["sqlite3"][1:], strict=True)],
        "round_seconds": seconds,
        "sqlite3_round_seconds": sq_times,
    }
    benchmark.extra_info.update(info)
    SUMMARY["commit 8 threads[full]"] = info


def test_scan(benchmark: Any, bench: Any) -> None:
    rng = random.Random(5)
    kv, sq = bench.main(kb.KvstoreStore, "full"), bench.main(kb.SqliteStore, "full")
    starts = bench.sorted_keys[: KEYS - kb.SCAN_LENGTH]
    scans = 100

    def scan(store: kb.Store) -> None:
        for _ in range(scans):
            it = store.scan(starts[rng.randrange(len(starts))], kb.SCAN_LENGTH)
            assert it is not None
            count = 0
            for _ in it:
                count += 1
            assert count == kb.SCAN_LENGTH

    sq_times = paired(benchmark, lambda: scan(kv), lambda: scan(sq))
    record(benchmark, "scan 1,000", "keys/s", scans * kb.SCAN_LENGTH, sq_times)


# --- checkpoint, restart -------------------------------------------------------------------------


def test_checkpoint(benchmark: Any, bench: Any) -> None:
    rng = random.Random(6)
    kv = bench.main(kb.KvstoreStore, "off")
    written: list[int] = []

    def dirty() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for _ in range(50):
            w = kv.writer()
            w.put_many([(bench.keys[rng.randrange(KEYS)], bench.values[rng.randrange(256)]) for _ in range(100)])
            w.commit()
        return (), {}

    def checkpoint() -> None:
        written.append(kv.db.checkpoint()["pages_written"])

    benchmark.pedantic(checkpoint, setup=dirty, rounds=ROUNDS, warmup_rounds=1)
    pages = statistics.median(written[1:]) if len(written) > 1 else written[0]
    record(benchmark, "checkpoint (5k updates)", "pages/s", int(pages), None, pages_written=written)


def test_restart(benchmark: Any, bench: Any) -> None:
    rng = random.Random(7)
    kv, sq = bench.main(kb.KvstoreStore, "full"), bench.main(kb.SqliteStore, "full")
    sq_times: list[float] = []

    def reopen(store: kb.Store) -> None:
        assert store.get_many([bench.keys[rng.randrange(KEYS)]]) == 1

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        kv.close()
        sq.close()
        t0 = time.perf_counter()
        sq.open()
        reopen(sq)
        sq_times.append(time.perf_counter() - t0)
        return (), {}

    def kv_open() -> None:
        kv.open()
        reopen(kv)

    try:
        benchmark.pedantic(kv_open, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    finally:
        bench.cooled(kb.KvstoreStore)
        bench.cooled(kb.SqliteStore)
    record(benchmark, "reopen (clean close)", "opens/s", 1, sq_times[1:])
