"""pytest-benchmark benchmarks of the page layer's B+tree (``pages.btree``).

Run (the project's addopts disable benchmarks, so enable them)::

    .venv/bin/python -m pytest bench/bench_pages.py --benchmark-enable -q
    KVSTORE_BENCH_KEYS=100000 .venv/bin/python -m pytest bench/bench_pages.py --benchmark-enable -q

What is measured (16-byte random keys, 100-byte values, seeded RNG):

* ``get``: warm point lookups of random existing keys, 10,000 per round, in a
  tree of ``KVSTORE_BENCH_KEYS`` keys (default 1,000,000) whose every page is
  in the buffer pool; next to it the pure-Python floor, ``bisect_left`` over a
  sorted list of the same keys plus a list index for the value, on the same
  lookup keys.  ``extra_info`` holds ops/sec and the ratio kvstore/floor.
* ``insert``: 20,000 random new keys put into a fresh tree of 100,000 keys
  (fewer if ``KVSTORE_BENCH_KEYS`` is smaller) per round, WAL sync off.
* ``scan``: 100 range scans of 1,000 consecutive keys from random starts per
  round; the floor is a generator over a Python list of 1,000 items.

The big tree is built once per module, in key order (fast; leaves end up
about half full, as after any sorted load).  Stores live in pytest's temporary
directory and are deleted when closed.

Profile the warm get path (no pytest needed)::

    KVSTORE_BENCH_KEYS=1000000 .venv/bin/python bench/bench_pages.py --profile [GETS]
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

import pytest

from pages.fs import OsFileSystem
from pages.store import PageStore
from wal.log import WriteAheadLog

KEYS = int(os.environ.get("KVSTORE_BENCH_KEYS", "1000000"))
KEY_SIZE = 16
VALUE_SIZE = 100
PAGE_SIZE = 4096
CACHE_SIZE = 512 * 2**20  # holds a 1M-key tree (about 70k pages) whole
SEED = 20240601
DB_ID = bytes(range(16))

GET_BATCH = 10_000  # gets per round
INSERT_BASE = min(100_000, KEYS)  # keys in the tree the inserts go into
INSERT_BATCH = 20_000  # inserts per round
INSERT_ROUNDS = 5
SCAN_LEN = 1_000  # keys per scan
SCAN_BATCH = 100  # scans per round

# Mean/min seconds per round of the floors, so the kvstore benchmark that runs
# after its floor can state the ratio (see _ratio).
_FLOORS: dict[str, tuple[float, float]] = {}


@dataclass
class Store:
    directory: str
    wal: WriteAheadLog
    store: PageStore

    def close(self) -> None:
        self.store.close()
        self.wal.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def open_store(directory: str | None = None) -> Store:
    """A new empty PageStore with its log, sync off, cache big enough for the
    whole tree."""
    d = directory or tempfile.mkdtemp(prefix="kvstore-bench-")
    fs = OsFileSystem()
    wal = WriteAheadLog.open(fs, d, DB_ID, sync="off")
    store = PageStore.create(fs, d, DB_ID, wal, page_size=PAGE_SIZE, cache_size=CACHE_SIZE)
    return Store(d, wal, store)


def random_keys(rng: random.Random, n: int, exclude: set[bytes] | frozenset[bytes] = frozenset()) -> list[bytes]:
    """``n`` distinct random keys not in ``exclude``, in generation order."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    while len(out) < n:
        k = rng.randbytes(KEY_SIZE)
        if k not in seen and k not in exclude:
            seen.add(k)
            out.append(k)
    return out


@dataclass
class Dataset:
    keys: list[bytes]  # sorted
    values: list[bytes]  # values[i] belongs to keys[i]
    db: Store | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_dataset(n: int, seed: int = SEED) -> Dataset:
    rng = random.Random(seed)
    keys = sorted(random_keys(rng, n))
    values = [rng.randbytes(VALUE_SIZE) for _ in range(n)]
    return Dataset(keys, values)


def fill(db: Store, keys: list[bytes], values: list[bytes]) -> None:
    put = db.store.tree.put
    for k, v in zip(keys, values, strict=True):
        put(k, v)


def build_tree(n: int, seed: int = SEED, directory: str | None = None) -> Dataset:
    """A dataset of ``n`` keys and a store holding all of them, warm."""
    ds = make_dataset(n, seed)
    ds.db = open_store(directory)
    fill(ds.db, ds.keys, ds.values)
    pool = ds.db.store.pool
    assert pool.evictions == 0 and pool.misses == 0, "the tree must fit the cache"
    ds.extra = {"keys": n, "depth": ds.db.store.tree.depth(), "pages": len(pool)}
    return ds


def cache_stats(db: Store) -> dict[str, int]:
    s = db.store.pool.stats()
    return {"cache_misses": s["cache_misses"], "evictions": s["evictions"]}


def _rates(benchmark: Any, n: int, unit: str = "ops") -> dict[str, int]:
    """Operations per second from the mean round and from the best round
    (nothing when benchmarks are disabled: then each test runs once, as a
    smoke test)."""
    if benchmark.stats is None:
        return {}
    st = benchmark.stats.stats
    return {f"{unit}_per_sec": round(n / st.mean), f"{unit}_per_sec_best": round(n / st.min)}


def _record_floor(benchmark: Any, name: str) -> None:
    if benchmark.stats is None:
        return
    st = benchmark.stats.stats
    _FLOORS[name] = (st.mean, st.min)


def _ratio(benchmark: Any, name: str, kv_fn: Any, floor_fn: Any, pairs: int = 15) -> None:
    """Put kvstore/floor ratios in ``extra_info``.

    ``ratio_mean``/``ratio_min`` compare this benchmark's rounds with the
    floor benchmark's (which runs just before it; if it was deselected with
    -k, the floor is timed here).  ``ratio_interleaved`` times ``pairs``
    floor/kvstore rounds alternately and divides the minima: on a shared
    machine whose load changes between the two benchmarks it is the steadier
    number.
    """
    from time import perf_counter

    if benchmark.stats is None:
        return
    if name not in _FLOORS:
        import timeit

        times = timeit.repeat(floor_fn, number=1, repeat=20)
        _FLOORS[name] = (sum(times) / len(times), min(times))
        benchmark.extra_info["floor_source"] = "timeit fallback"
    fmean, fmin = _FLOORS[name]
    st = benchmark.stats.stats
    benchmark.extra_info["ratio_mean"] = round(st.mean / fmean, 3)
    benchmark.extra_info["ratio_min"] = round(st.min / fmin, 3)
    best_kv = best_floor = float("inf")
    for _ in range(pairs):
        t0 = perf_counter()
        floor_fn()
        t1 = perf_counter()
        kv_fn()
        t2 = perf_counter()
        best_floor = min(best_floor, t1 - t0)
        best_kv = min(best_kv, t2 - t1)
    benchmark.extra_info["ratio_interleaved"] = round(best_kv / best_floor, 3)


# --- fixtures ----------------------------------------------------------------------


_SUMMARY: dict[str, dict[str, Any]] = {}  # test name -> its extra_info


@pytest.fixture(scope="module", autouse=True)
def _summary(request: Any) -> Any:
    """Print every benchmark's extra_info (ops/sec, ratios) when the module
    ends: pytest-benchmark's table does not show it (only --benchmark-json)."""
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or not _SUMMARY:
        return
    lines = [f"bench_pages summary (KVSTORE_BENCH_KEYS={KEYS}):"]
    for name, info in _SUMMARY.items():
        lines.append(f"  {name:32s} " + "  ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in info.items()))
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        tr.write_line("")
        for line in lines:
            tr.write_line(line)


@pytest.fixture(autouse=True)
def _collect(request: Any) -> Any:
    yield
    bench = request.node.funcargs.get("benchmark")
    if bench is not None and bench.extra_info:
        _SUMMARY[request.node.name] = dict(bench.extra_info)


@pytest.fixture(scope="module")
def big(tmp_path_factory: Any) -> Any:
    ds = build_tree(KEYS, directory=str(tmp_path_factory.mktemp("pages-big")))
    if KEYS <= SCAN_LEN:
        raise ValueError(f"KVSTORE_BENCH_KEYS must be above {SCAN_LEN}, not {KEYS}")
    rng = random.Random(SEED + 1)
    ds.extra["get_keys"] = [ds.keys[rng.randrange(KEYS)] for _ in range(GET_BATCH)]
    starts = [rng.randrange(KEYS - SCAN_LEN) for _ in range(SCAN_BATCH)]
    ds.extra["scan_ranges"] = [(ds.keys[s], ds.keys[s + SCAN_LEN]) for s in starts]
    ds.extra["scan_lists"] = [list(zip(ds.keys[s : s + SCAN_LEN], ds.values[s : s + SCAN_LEN], strict=True)) for s in starts]
    yield ds
    assert ds.db is not None
    ds.db.close()


# --- inserts -----------------------------------------------------------------------
# First in the file, so it runs before the module's big tree exists: with a
# million-key tree alive, the garbage collector's full collections (which the
# insert rounds trigger, since their trees survive) would walk it too.


@pytest.mark.benchmark(group="insert")
def test_insert_random(benchmark: Any, tmp_path_factory: Any) -> None:
    base = make_dataset(INSERT_BASE, SEED + 2)
    rng = random.Random(SEED + 3)
    new_keys = random_keys(rng, INSERT_BATCH, set(base.keys))
    new_values = [rng.randbytes(VALUE_SIZE) for _ in range(INSERT_BATCH)]
    state: dict[str, Store] = {}

    def setup() -> tuple[tuple, dict]:
        db = open_store(str(tmp_path_factory.mktemp("pages-insert")))
        fill(db, base.keys, base.values)
        state["db"] = db
        return (db.store.tree.put,), {}

    def run(put: Any) -> None:
        for k, v in zip(new_keys, new_values, strict=True):
            put(k, v)

    def teardown(put: Any) -> None:
        db = state.pop("db")
        tree = db.store.tree
        assert tree.get(new_keys[-1]) is not None and tree.get(base.keys[0]) is not None
        db.close()

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=INSERT_ROUNDS, warmup_rounds=0)
    benchmark.extra_info.update(
        base_keys=INSERT_BASE,
        ops_per_round=INSERT_BATCH,
        **_rates(benchmark, INSERT_BATCH, "ops"),
        wal_sync="off",
    )


# --- point lookups -----------------------------------------------------------------


def _get_floor_fn(ds: Dataset) -> Any:
    keys, values, queries = ds.keys, ds.values, ds.extra["get_keys"]

    def floor() -> None:
        bl = bisect_left
        for k in queries:
            values[bl(keys, k)]

    return floor


@pytest.mark.benchmark(group="get")
def test_get_floor_bisect(benchmark: Any, big: Dataset) -> None:
    floor = _get_floor_fn(big)
    benchmark(floor)
    _record_floor(benchmark, "get")
    benchmark.extra_info.update(keys=KEYS, ops_per_round=GET_BATCH, **_rates(benchmark, GET_BATCH, "ops"))


@pytest.mark.benchmark(group="get")
def test_get_kvstore_warm(benchmark: Any, big: Dataset) -> None:
    assert big.db is not None
    tree = big.db.store.tree
    queries = big.extra["get_keys"]
    # Correctness (outside the timed region): every lookup finds its value.
    for k in queries[:1000]:
        cell = tree.get(k)
        assert cell is not None and cell[3] == big.values[bisect_left(big.keys, k)]
    before = cache_stats(big.db)

    def run() -> None:
        get = tree.get
        for k in queries:
            get(k)

    benchmark(run)
    assert cache_stats(big.db) == before, "the warm benchmark read a page from disk"
    benchmark.extra_info.update(
        keys=KEYS,
        depth=big.extra["depth"],
        pages=big.extra["pages"],
        ops_per_round=GET_BATCH,
        **_rates(benchmark, GET_BATCH, "ops"),
    )
    _ratio(benchmark, "get", run, _get_floor_fn(big))


# --- range scans -------------------------------------------------------------------


def _list_gen(items: list) -> Any:
    yield from items


def _scan_floor_fn(ds: Dataset) -> Any:
    lists = ds.extra["scan_lists"]

    def floor() -> None:
        for items in lists:
            for _ in _list_gen(items):
                pass

    return floor


@pytest.mark.benchmark(group="scan")
def test_scan_floor_list_generator(benchmark: Any, big: Dataset) -> None:
    benchmark(_scan_floor_fn(big))
    _record_floor(benchmark, "scan")
    benchmark.extra_info.update(
        scan_len=SCAN_LEN,
        scans_per_round=SCAN_BATCH,
        **_rates(benchmark, SCAN_LEN * SCAN_BATCH, "keys"),
    )


@pytest.mark.benchmark(group="scan")
def test_scan_kvstore(benchmark: Any, big: Dataset) -> None:
    assert big.db is not None
    tree = big.db.store.tree
    ranges = big.extra["scan_ranges"]
    for (start, stop), items in zip(ranges, big.extra["scan_lists"], strict=True):
        got = [(k, c[3]) for k, c in tree.scan(start, stop)]
        assert got == items

    def run() -> None:
        scan = tree.scan
        for start, stop in ranges:
            for _ in scan(start, stop):
                pass

    benchmark(run)
    benchmark.extra_info.update(
        keys=KEYS,
        scan_len=SCAN_LEN,
        scans_per_round=SCAN_BATCH,
        **_rates(benchmark, SCAN_LEN * SCAN_BATCH, "keys"),
    )
    _ratio(benchmark, "scan", run, _scan_floor_fn(big))


# --- profiling ---------------------------------------------------------------------


def profile_get(n_gets: int = 200_000, top: int = 15) -> None:
    """cProfile ``n_gets`` warm gets on a tree of KEYS keys; print the top
    functions by tottime."""
    import cProfile
    import pstats
    import time

    t0 = time.perf_counter()
    ds = build_tree(KEYS)
    print(f"built {KEYS} keys in {time.perf_counter() - t0:.1f}s: {ds.extra}")
    assert ds.db is not None
    rng = random.Random(SEED + 4)
    queries = [ds.keys[rng.randrange(KEYS)] for _ in range(n_gets)]
    get = ds.db.store.tree.get

    def run() -> None:
        for k in queries:
            get(k)

    run()  # warm
    t0 = time.perf_counter()
    run()
    plain = time.perf_counter() - t0
    print(f"unprofiled: {n_gets / plain:,.0f} gets/s")
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    ds.db.close()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--profile":
        profile_get(int(sys.argv[2]) if len(sys.argv) > 2 else 200_000)
    else:
        print(__doc__)
