"""``kvstore bench``: named workloads against sqlite3 (and lmdb, diskcache),
the machine's own limits and pure-Python floors, measured side by side.

Method
------
The machine this runs on is shared and its CPU speed swings several-fold
within seconds, so an absolute rate measured now and another measured a
minute later cannot be compared.  What can be compared is two rates measured
within the same few hundred milliseconds.  So:

* every participant -- each store, each machine probe, each floor -- runs
  inside this one process, on the same disk;
* a workload is cut into short *slices*: tens of milliseconds of work (a
  time-bounded loop, or a fixed chunk where the work must be the same for
  all, as in a fill), and the slices of all participants are interleaved,
  in a freshly shuffled order for every round of slices;
* a *repetition* runs every workload once this way (workloads in shuffled
  order); the rate of a participant in a repetition is its operations over
  its own timed seconds in that repetition, and the *ratio* kvstore / peer is
  formed within the repetition, from rates measured a few ms apart;
* the report gives, per workload, the median rate of each participant and the
  **median of the per-repetition ratios with their min and max**.

Setup and teardown (opening a fresh store, starting threads, closing) are
never timed.  Keys are 16 random bytes, values 100 random bytes; the loaded
store holds ``keys`` (100,000) of them, put in random order in one
transaction.  Every store is used as its documentation suggests for the job,
from Python, through its standard binding:

================  ==============================================================
kvstore           ``kvstore.open(path, sync=...)`` with every other default;
                  ``db.begin()`` / ``tx.put`` / ``tx.commit()``; reads in one
                  ``begin(readonly=True)``; scans with ``db.scan(start)``
sqlite3           one table ``kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID``,
                  ``journal_mode=WAL``, ``synchronous=FULL`` (NORMAL for the
                  sync="normal" workload), one connection per thread,
                  ``BEGIN IMMEDIATE`` / ``INSERT OR REPLACE`` / ``COMMIT``,
                  ``executemany`` for fills, reads between ``BEGIN`` and
                  ``COMMIT``, scans with ``LIMIT`` and ``fetchall``
lmdb, diskcache   in ``bench/peers.py``, when installed (``pip install
                  kvstore[bench]``) and run from a source checkout
================  ==============================================================

The workloads (``WORKLOADS``) and the probes beside them are listed in the
module's tables below and printed by ``kvstore bench``.  The targets
(``TARGETS``) are issue 8's.  ``bench/RESULTS.md`` holds the latest full run.

Machine probes (fsync rates) live in ``bench/peers.py``, which may call ``os``
directly (this module, inside the package, does its file work through the
``pages.fs`` seam); the pure-Python floors live here.

Example (tiny, so it runs as a doctest)::

    >>> import io
    >>> cfg = Config.tiny()
    >>> report = measure(cfg, extras=None, only=["read_random"])
    >>> row = report["results"][0]
    >>> row["workload"], row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    ('read random, warm', True)
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import itertools
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import ModuleType
from typing import Any, ClassVar, TextIO

import kvstore
from pages.fs import OsFileSystem

KEY_SIZE, VALUE_SIZE = 16, 100
THREADS = 8
SCAN_LENGTH = 1_000
BATCH_PUTS = 100
GET_BATCH = 100  # gets per read transaction
perf = time.perf_counter
_fs = OsFileSystem()


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How much to measure.  On the 2-vCPU machine of bench/RESULTS.md,
    loaded, ``quick()`` took about 2 minutes and ``full()`` about 5;
    ``tiny()`` is for tests."""

    mode: str = "full"
    keys: int = 100_000  # in the loaded store
    repetitions: int = 13
    steps: int = 6  # slices per participant per workload per repetition
    slice_s: float = 0.04  # length of a time-bounded slice
    fill_chunk: int = 1_000  # keys per fill slice (steps x fill_chunk keys per fresh store)
    seed: int = 8
    root: str | None = None  # scratch directory (default: KVSTORE_BENCH_DIR or the system's temp)

    @classmethod
    def full(cls, **kw: Any) -> Config:
        return cls(**kw)

    @classmethod
    def quick(cls, **kw: Any) -> Config:
        return replace(cls(mode="quick", repetitions=7, steps=4, slice_s=0.03), **kw)

    @classmethod
    def tiny(cls, **kw: Any) -> Config:
        return replace(cls(mode="tiny", keys=3_000, repetitions=2, steps=2, slice_s=0.004, fill_chunk=100), **kw)


# --- steps and the scheduler ------------------------------------------------------------------


@dataclass
class Step:
    """What one timed slice did.  ``seconds`` overrides the scheduler's own
    timing (for a slice that times only part of its work); ``per_thread``
    splits ``ops`` by thread."""

    ops: int
    seconds: float | None = None
    per_thread: list[int] | None = None


#: A job: a generator whose first ``next`` sets up (untimed, yields None),
#: each later ``next`` does one slice and yields an int (operations) or a
#: Step, and whose ``close()`` tears down (untimed, in its ``finally``).
Job = Generator["int | Step | None", None, None]


@dataclass
class Tally:
    """One participant's slices in one repetition."""

    ops: int = 0
    seconds: float = 0.0
    per_thread: list[int] | None = None

    def add(self, got: int | Step, elapsed: float) -> None:
        if isinstance(got, Step):
            self.ops += got.ops
            self.seconds += elapsed if got.seconds is None else got.seconds
            if got.per_thread is not None:
                if self.per_thread is None:
                    self.per_thread = [0] * len(got.per_thread)
                self.per_thread = [a + b for a, b in zip(self.per_thread, got.per_thread, strict=True)]
        else:
            self.ops += got
            self.seconds += elapsed

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def interleave(jobs: dict[str, Callable[[], Job]], steps: int, rng: random.Random) -> dict[str, Tally]:
    """Set every job up, then run ``steps`` rounds of one slice per job, each
    round in a fresh shuffled order, timing each slice; tear them all down.

    Setup and teardown are not timed.  Returns each job's tally.

    >>> def counter(n):
    ...     yield None
    ...     while True:
    ...         yield n
    >>> t = interleave({"a": lambda: counter(1), "b": lambda: counter(3)}, 4, random.Random(0))
    >>> t["a"].ops, t["b"].ops
    (4, 12)
    """
    gens: dict[str, Job] = {}
    tallies = {name: Tally() for name in jobs}
    try:
        for name, make in jobs.items():
            gen = make()
            next(gen)  # set up
            gens[name] = gen
        for _ in range(steps):
            order = list(gens)
            rng.shuffle(order)
            for name in order:
                t0 = perf()
                got = next(gens[name])
                elapsed = perf() - t0
                if got is None:
                    raise RuntimeError(f"job {name} yielded no result for a slice")
                tallies[name].add(got, elapsed)
    finally:
        for gen in gens.values():
            gen.close()  # tear down
    return tallies


class Crew:
    """``n`` worker threads that run ``work(i)`` in a loop during each slice.

    ``slice(seconds)`` starts them together, stops them after ``seconds`` and
    returns a Step whose time is that window and whose ``per_thread`` counts
    only units finished inside it; the unit each thread has in flight when
    the window closes is finished, untimed, before ``slice`` returns.
    ``warm(i)`` runs once in each thread before the first slice (a
    connection, a first commit), ``done(i)`` when the crew closes."""

    def __init__(
        self, n: int, work: Callable[[int], None], warm: Callable[[int], None] | None = None, done: Callable[[int], None] | None = None
    ) -> None:
        self.n = n
        self._work, self._warm, self._done = work, warm, done
        self._start = threading.Barrier(n + 1)
        self._finish = threading.Barrier(n + 1)
        self._stop = threading.Event()
        self._quit = False
        self._counts = [0] * n
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"bench-{i}") for i in range(n)]
        for t in self._threads:
            t.start()
        self._finish.wait(120)  # every warm() done
        if self._errors:
            self.close()
            self._raise()

    def _run(self, i: int) -> None:
        try:
            if self._warm is not None:
                self._warm(i)
        except BaseException as e:  # reported by the main thread
            self._errors.append(e)
        self._finish.wait()
        try:
            while True:
                self._start.wait()
                if self._quit:
                    return
                try:
                    while not self._stop.is_set():
                        self._work(i)
                        if self._stop.is_set():
                            break
                        self._counts[i] += 1
                except BaseException as e:  # reported by the main thread
                    self._errors.append(e)
                self._finish.wait()
        finally:
            if self._done is not None:
                self._done(i)

    def _raise(self) -> None:
        if self._errors:
            raise self._errors[0]

    def slice(self, seconds: float) -> Step:
        self._counts = [0] * self.n
        self._stop.clear()
        self._start.wait(120)
        t0 = perf()
        time.sleep(seconds)
        self._stop.set()
        elapsed = perf() - t0
        self._finish.wait(600)
        self._raise()
        counts = list(self._counts)
        return Step(sum(counts), elapsed, counts)

    def close(self) -> None:
        self._quit = True
        try:
            self._start.wait(120)
        except threading.BrokenBarrierError:
            pass
        for t in self._threads:
            t.join(120)


# --- the stores ------------------------------------------------------------------------------


class Writer:
    """One write transaction of a store, for fills."""

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError


class Store:
    """One database of one store, as the workloads use it.

    A subclass sets ``name``, ``version`` (a string, or None when its module
    is missing, which leaves the store out of the run) and implements the
    methods; ``scan`` may return None for a store without range scans.
    ``commit_one`` is called from many threads at once; ``thread_done`` is
    called by each such thread when it ends."""

    name: ClassVar[str] = ""
    version: ClassVar[str | None] = None
    #: what a sync mode means for this store (shown in the report)
    sync_note: ClassVar[str] = ""

    def __init__(self, path: str, sync: str) -> None:
        self.path = path
        self.sync = sync

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def writer(self) -> Writer:
        raise NotImplementedError

    def get_many(self, keys: Sequence[bytes]) -> int:
        """Read ``keys`` in one read transaction; return how many were found."""
        raise NotImplementedError

    def commit_one(self, key: bytes, value: bytes) -> None:
        """One transaction that puts one key, durable as ``sync`` says."""
        raise NotImplementedError

    def scan(self, start: bytes, n: int) -> Iterable[tuple[bytes, bytes]] | None:
        """Up to ``n`` pairs from ``start`` on, in key order (None: unsupported)."""
        return None

    def thread_done(self) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        """Counters worth reporting (commits per fsync, ...)."""
        return {}


class _KvWriter(Writer):
    def __init__(self, tx: kvstore.Transaction) -> None:
        self.tx = tx

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self.tx.put_many(items)

    def commit(self) -> None:
        self.tx.commit()

    def rollback(self) -> None:
        if not self.tx.finished:
            self.tx.rollback()


class KvstoreStore(Store):
    name = "kvstore"
    version = kvstore.__version__
    sync_note = 'sync="full" / "normal" as SPEC says'

    db: kvstore.Database

    def open(self) -> None:
        self.db = kvstore.open(self.path, sync=self.sync)

    def close(self) -> None:
        self.db.close()

    def writer(self) -> Writer:
        return _KvWriter(self.db.begin())

    def get_many(self, keys: Sequence[bytes]) -> int:
        tx = self.db.begin(readonly=True)
        get = tx.get
        found = 0
        for k in keys:
            if get(k) is not None:
                found += 1
        tx.commit()
        return found

    def commit_one(self, key: bytes, value: bytes) -> None:
        tx = self.db.begin()
        tx.put(key, value)
        tx.commit()

    def scan(self, start: bytes, n: int) -> Iterable[tuple[bytes, bytes]]:
        return itertools.islice(self.db.scan(start), n)

    def diagnostics(self) -> dict[str, Any]:
        st = self.db.stats()
        return {k: st[k] for k in ("tree_depth", "pages", "page_size", "wal_bytes", "wal_segments", "undo_pages")}


class _SqliteWriter(Writer):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.execute("BEGIN")

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


_SQLITE_SYNC = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}


class SqliteStore(Store):
    name = "sqlite3"
    version = sqlite3.sqlite_version
    sync_note = "journal_mode=WAL, synchronous=FULL / NORMAL"

    def __init__(self, path: str, sync: str) -> None:
        super().__init__(path, sync)
        self.file = os.path.join(path, "bench.sqlite")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        if not _fs.exists(self.path):
            _fs.mkdir(self.path)
        self.conn().execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        c: sqlite3.Connection | None = getattr(self._local, "c", None)
        if c is None:
            c = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False, timeout=60)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={_SQLITE_SYNC[self.sync]}")
            self._local.c = c
            with self._lock:
                self._conns.append(c)
        return c

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()

    def thread_done(self) -> None:
        c = getattr(self._local, "c", None)
        if c is not None:
            with self._lock:
                if c in self._conns:
                    self._conns.remove(c)
            c.close()
            self._local.c = None

    def writer(self) -> Writer:
        return _SqliteWriter(self.conn())

    def get_many(self, keys: Sequence[bytes]) -> int:
        c = self.conn()
        q = "SELECT v FROM kv WHERE k = ?"
        found = 0
        c.execute("BEGIN")
        for k in keys:
            if c.execute(q, (k,)).fetchone() is not None:
                found += 1
        c.execute("COMMIT")
        return found

    def commit_one(self, key: bytes, value: bytes) -> None:
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))
        c.execute("COMMIT")

    def scan(self, start: bytes, n: int) -> Iterable[tuple[bytes, bytes]]:
        rows: list[tuple[bytes, bytes]] = self.conn().execute("SELECT k, v FROM kv WHERE k >= ? ORDER BY k LIMIT ?", (start, n)).fetchall()
        return rows


def dir_bytes(path: str) -> dict[str, int]:
    """Size of each file directly in ``path`` (through the seam)."""
    out = {}
    for name in sorted(_fs.listdir(path)):
        p = os.path.join(path, name)
        if _fs.is_dir(p):
            continue
        f = _fs.open(p)
        try:
            out[name] = f.size()
        finally:
            f.close()
    return out


# --- the context a run shares ------------------------------------------------------------------


class Bench:
    """The data and the stores one run shares: the loaded keys, each store's
    loaded database (opened on demand in the sync mode a workload asks
    for), scratch directories."""

    def __init__(self, cfg: Config, stores: list[type[Store]]) -> None:
        self.cfg = cfg
        self.stores = stores
        rng = random.Random(cfg.seed)
        self.keys = [rng.randbytes(KEY_SIZE) for _ in range(cfg.keys)]
        self.values = [rng.randbytes(VALUE_SIZE) for _ in range(256)]
        self.items = [(k, self.values[i % 256]) for i, k in enumerate(self.keys)]
        self.sorted_items = sorted(self.items)
        self.sorted_keys = [k for k, _ in self.sorted_items]
        root = cfg.root or os.environ.get("KVSTORE_BENCH_DIR") or None
        if root and not _fs.exists(root):
            _fs.mkdir(root)
        self.root = tempfile.mkdtemp(prefix="kvstore-bench-", dir=root)
        self._main: dict[str, Store] = {}
        self._open_mode: dict[str, str | None] = {}
        self._cold: set[str] = set()
        self._serial = itertools.count()
        self.loads: dict[str, dict[str, Any]] = {}

    def scratch(self, what: str) -> str:
        """A new directory under the run's root (not created)."""
        return os.path.join(self.root, f"{what}-{next(self._serial)}")

    def load(self, cls: type[Store]) -> dict[str, Any]:
        """Create ``cls``'s loaded database: every key in one transaction
        (timed, once, not interleaved), then close it cleanly and measure
        its files."""
        path = self.scratch(cls.name + "-main")
        store = cls(path, "full")
        store.open()
        t0 = perf()
        w = store.writer()
        w.put_many(self.items)
        w.commit()
        seconds = perf() - t0
        store.close()
        files = dir_bytes(path)
        raw = len(self.items) * (KEY_SIZE + VALUE_SIZE)
        info = {
            "keys": len(self.items),
            "load_seconds": seconds,
            "load_keys_per_s": len(self.items) / seconds,
            "files": files,
            "bytes": sum(files.values()),
            "raw_bytes": raw,
            "bytes_over_raw": sum(files.values()) / raw,
        }
        self._main[cls.name] = store
        self._open_mode[cls.name] = None
        self.loads[cls.name] = info
        return info

    def main(self, cls: type[Store], sync: str) -> Store:
        """``cls``'s loaded database, open in mode ``sync`` and warm."""
        store = self._main[cls.name]
        mode = self._open_mode[cls.name]
        if mode != sync:
            if mode is not None:
                store.close()
            store.sync = sync
            store.open()
            self._open_mode[cls.name] = sync
            self._cold.add(cls.name)
        if cls.name in self._cold:
            self.warm(store)
            self._cold.discard(cls.name)
        return store

    def warm(self, store: Store) -> None:
        """Read the whole loaded store once (a scan where the store has
        one, then gets), so that the workloads meet a warm cache."""
        it = store.scan(self.sorted_keys[0], len(self.sorted_keys))
        if it is not None:
            for _ in it:
                pass
        keys = self.keys if it is None else self.keys[:: max(1, len(self.keys) // 5_000)]
        for i in range(0, len(keys), 1_000):
            store.get_many(keys[i : i + 1_000])

    def cooled(self, cls: type[Store]) -> None:
        """Mark ``cls``'s loaded database cold (reopened): warm it before its next use."""
        self._cold.add(cls.name)

    def close(self) -> None:
        for name, store in self._main.items():
            if self._open_mode[name] is not None:
                store.close()
                self._open_mode[name] = None
        shutil.rmtree(self.root, ignore_errors=True)

    def remove(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


# --- workloads -------------------------------------------------------------------------------


def _time_bounded(seconds: float, unit: Callable[[], int]) -> int:
    """Run ``unit`` (which returns operations done) until ``seconds`` pass,
    at least once."""
    end = perf() + seconds
    done = unit()
    while perf() < end:
        done += unit()
    return done


def _fill_job(order: str) -> Callable[[Bench, type[Store], random.Random], Job]:
    def job(b: Bench, cls: type[Store], rng: random.Random) -> Job:
        n = b.cfg.steps * b.cfg.fill_chunk
        if order == "sequential":
            base = rng.getrandbits(64) << 64
            keys = [(base + i).to_bytes(KEY_SIZE, "big") for i in range(n)]
        else:
            keys = [rng.randbytes(KEY_SIZE) for _ in range(n)]
        items = [(k, b.values[i % 256]) for i, k in enumerate(keys)]
        path = b.scratch(cls.name + "-fill")
        store = cls(path, "full")
        store.open()
        w = store.writer()
        committed = False
        try:
            yield None
            c = b.cfg.fill_chunk
            for i in range(b.cfg.steps):
                w.put_many(items[i * c : (i + 1) * c])
                if i == b.cfg.steps - 1:
                    w.commit()  # the commit is part of the last slice
                    committed = True
                yield c
        finally:
            if not committed:
                w.rollback()
            store.close()
            b.remove(path)

    return job


def _read_random(b: Bench, cls: type[Store], rng: random.Random) -> Job:
    store = b.main(cls, "full")
    keys, n = b.keys, len(b.keys)
    lookups = [keys[rng.randrange(n)] for _ in range(20_000)]
    pos = [0]

    def unit() -> int:
        i = pos[0]
        pos[0] = (i + GET_BATCH) % (len(lookups) - GET_BATCH)
        found = store.get_many(lookups[i : i + GET_BATCH])
        if found != GET_BATCH:
            raise AssertionError(f"{cls.name}: {GET_BATCH - found} of {GET_BATCH} loaded keys missing")
        return GET_BATCH

    yield None
    while True:
        yield _time_bounded(b.cfg.slice_s, unit)


def _commit_job(sync: str, puts: int) -> Callable[[Bench, type[Store], random.Random], Job]:
    """Single-thread transactions of ``puts`` puts (random loaded keys)."""

    def job(b: Bench, cls: type[Store], rng: random.Random) -> Job:
        store = b.main(cls, sync)
        keys, values, n = b.keys, b.values, len(b.keys)

        def one() -> int:
            store.commit_one(keys[rng.randrange(n)], values[rng.randrange(256)])
            return 1

        def batch() -> int:
            w = store.writer()
            w.put_many([(keys[rng.randrange(n)], values[rng.randrange(256)]) for _ in range(puts)])
            w.commit()
            return puts

        unit = one if puts == 1 else batch
        yield None
        while True:
            yield _time_bounded(b.cfg.slice_s, unit)

    return job


def _threaded_commits(b: Bench, cls: type[Store], rng: random.Random) -> Job:
    """THREADS threads, each committing one-put transactions on keys of its
    own (so no two conflict), durable (sync="full")."""
    store = b.main(cls, "full")
    mine = [b.keys[i::THREADS] for i in range(THREADS)]
    rngs = [random.Random(rng.random()) for _ in range(THREADS)]
    values = b.values

    def work(i: int) -> None:
        r = rngs[i]
        ks = mine[i]
        store.commit_one(ks[r.randrange(len(ks))], values[r.randrange(256)])

    yield from crew_slices(b, Crew(THREADS, work, warm=work, done=lambda i: store.thread_done()))


def crew_slices(b: Bench, crew: Crew) -> Job:
    """The job of a threaded workload: ready once ``crew`` exists, then one
    slice of 2.5 times the usual length per step; closes the crew at the end."""
    try:
        yield None
        while True:
            yield crew.slice(b.cfg.slice_s * 2.5)
    finally:
        crew.close()


def unit_slices(b: Bench, unit: Callable[[], int], cleanup: Callable[[], None]) -> Job:
    """The job of a probe: ready at once, then as many ``unit()`` calls as
    fit in a slice per step; ``cleanup()`` at the end."""
    try:
        yield None
        while True:
            yield _time_bounded(b.cfg.slice_s, unit)
    finally:
        cleanup()


def _scan(b: Bench, cls: type[Store], rng: random.Random) -> Job:
    store = b.main(cls, "full")
    starts = b.sorted_keys[: max(1, len(b.sorted_keys) - SCAN_LENGTH)]

    def unit() -> int:
        it = store.scan(starts[rng.randrange(len(starts))], SCAN_LENGTH)
        assert it is not None
        count = 0
        for _ in it:
            count += 1
        if count != min(SCAN_LENGTH, len(b.sorted_keys)):
            raise AssertionError(f"{cls.name}: a scan returned {count} pairs")
        return count

    yield None
    while True:
        yield _time_bounded(b.cfg.slice_s, unit)


def _reopen(b: Bench, cls: type[Store], rng: random.Random) -> Job:
    """Close (untimed), then open and read one key (timed), until the slice
    is used up."""
    store = b.main(cls, "full")
    keys = b.keys
    try:
        yield None
        while True:
            end = perf() + b.cfg.slice_s
            count, timed = 0, 0.0
            while count == 0 or perf() < end:
                store.close()
                t0 = perf()
                store.open()
                found = store.get_many([keys[rng.randrange(len(keys))]])
                timed += perf() - t0
                if found != 1:
                    raise AssertionError(f"{cls.name}: a key is missing after reopen")
                count += 1
            yield Step(count, timed)
    finally:
        b.cooled(cls)


# --- pure-Python floors (machine probes are in bench/peers.py) -----------------------------------


def _floor_bisect(b: Bench, rng: random.Random) -> Job:
    """``bisect_left`` over the sorted list of the loaded keys (and a list
    index for the value): the cheapest warm point lookup Python offers on
    sorted data.  Same batches as the stores' gets."""
    keys = b.sorted_keys
    vals = [v for _, v in b.sorted_items]
    n = len(keys)
    lookups = [b.keys[rng.randrange(n)] for _ in range(20_000)]
    pos = [0]

    def unit() -> int:
        i = pos[0]
        pos[0] = (i + GET_BATCH) % (len(lookups) - GET_BATCH)
        found = 0
        for k in lookups[i : i + GET_BATCH]:
            j = bisect.bisect_left(keys, k)
            if j < n and keys[j] == k and vals[j] is not None:
                found += 1
        return found

    yield None
    while True:
        yield _time_bounded(b.cfg.slice_s, unit)


def _floor_generator(b: Bench, rng: random.Random) -> Job:
    """A generator over a Python list of the sorted pairs, 1,000 at a time,
    consumed by the loop the stores' scans are consumed by."""
    items = b.sorted_items
    starts = max(1, len(items) - SCAN_LENGTH)

    def unit() -> int:
        i = rng.randrange(starts)
        count = 0
        for _ in (x for x in items[i : i + SCAN_LENGTH]):
            count += 1
        return count

    yield None
    while True:
        yield _time_bounded(b.cfg.slice_s, unit)


#: name -> (description, job factory(bench, rng)); bench/peers.py adds the machine probes
FLOORS: dict[str, tuple[str, Callable[[Bench, random.Random], Job]]] = {
    "floor_bisect": ("pure Python: bisect over a sorted list of the keys", _floor_bisect),
    "floor_generator": ("pure Python: a generator over a list of the pairs", _floor_generator),
}


@dataclass(frozen=True)
class Workload:
    key: str  # short name (JSON, --only)
    name: str  # as printed
    unit: str
    job: Callable[[Bench, type[Store], random.Random], Job]
    beside: tuple[str, ...] = ()  # probes and floors interleaved with it
    needs_scan: bool = False
    threads: int = 1


WORKLOADS = [
    Workload("fill_seq", "fill sequential, one transaction", "keys/s", _fill_job("sequential")),
    Workload("fill_random", "fill random, one transaction", "keys/s", _fill_job("random")),
    Workload("read_random", "read random, warm", "gets/s", _read_random, beside=("floor_bisect",)),
    Workload("commit_full_1", "durable commit, 1 thread", "commits/s", _commit_job("full", 1), beside=("fsync_append", "fdatasync_overwrite")),
    Workload("commit_full_8", "durable commit, 8 threads", "commits/s", _threaded_commits, beside=("fsync_8_files",), threads=THREADS),
    Workload("commit_normal_1", 'commit, sync="normal"', "commits/s", _commit_job("normal", 1)),
    Workload("batch_100", "100-put batches, durable", "puts/s", _commit_job("full", BATCH_PUTS)),
    Workload("scan_1000", "scan 1,000 keys", "keys/s", _scan, beside=("floor_generator",), needs_scan=True),
    Workload("reopen", "reopen after clean close", "opens/s", _reopen),
]


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    workload: str  # a Workload.key, or "size"
    what: str
    check: Callable[[dict[str, Any], dict[str, Any]], tuple[float | None, bool | None]]  # (row, report) -> (value, held)


def _ratio_at_least(x: float) -> Callable[[dict[str, Any], dict[str, Any]], tuple[float | None, bool | None]]:
    def check(row: dict[str, Any], report: dict[str, Any]) -> tuple[float | None, bool | None]:
        r = row.get("ratio_median")
        return (r, None if r is None else r >= x)

    return check


def _fair_share(row: dict[str, Any], report: dict[str, Any]) -> tuple[float | None, bool | None]:
    share = row.get("slowest_thread_share", {}).get("kvstore")
    return (share, None if share is None else share >= 0.25)


def _reopen_ms(row: dict[str, Any], report: dict[str, Any]) -> tuple[float | None, bool | None]:
    rate = row["rates"]["kvstore"]["median"]
    ms = 1000 / rate if rate else None
    return (ms, None if ms is None else ms <= 10)


def _size(row: dict[str, Any], report: dict[str, Any]) -> tuple[float | None, bool | None]:
    x = report["loads"].get("kvstore", {}).get("bytes_over_raw")
    return (x, None if x is None else x <= 1.5)


TARGETS = [
    Target("commit_full_8", "durable commits, 8 threads: >= 3x sqlite3", _ratio_at_least(3.0)),
    Target("commit_full_8", "  ... and the slowest thread >= 25% of the mean", _fair_share),
    Target("commit_full_1", "durable commits, 1 thread: >= 1x sqlite3", _ratio_at_least(1.0)),
    Target("commit_normal_1", 'commits, sync="normal": >= 1x sqlite3', _ratio_at_least(1.0)),
    Target("read_random", "warm random get: >= 2x sqlite3", _ratio_at_least(2.0)),
    Target("fill_random", "fill random, one transaction: >= 1x sqlite3", _ratio_at_least(1.0)),
    Target("scan_1000", "scan: >= 1x sqlite3", _ratio_at_least(1.0)),
    Target("reopen", "reopen after clean close, {keys:,} keys: <= 10 ms", _reopen_ms),
    Target("size", "on-disk size after the load: <= 1.5x the raw bytes", _size),
]


# --- the run ---------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "each": xs}


def load_extras() -> ModuleType | None:
    """``bench/peers.py`` of the source checkout this package runs from (the
    lmdb and diskcache peers, the machine probes), or None outside one."""
    name = "kvstore_bench_peers"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "peers.py")
    if not _fs.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class _Collected:
    rates: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # workload -> participant -> per rep
    per_thread: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)


def measure(
    cfg: Config,
    extras: ModuleType | None | bool = True,
    only: Sequence[str] | None = None,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Run every workload (or those named in ``only``) ``cfg.repetitions``
    times as the module docstring says; return the report (the JSON of
    ``kvstore bench --json``).  ``extras``: True loads ``bench/peers.py``
    when there is one, None runs without it, or pass the module."""
    if extras is True:
        extras = load_extras()
    elif extras is False:
        extras = None
    stores: list[type[Store]] = [KvstoreStore, SqliteStore]
    probes: dict[str, tuple[str, Callable[[Bench, random.Random], Job]]] = dict(FLOORS)
    unavailable: dict[str, str] = {}
    if extras is not None:
        stores += [s for s in extras.STORES if s.version is not None]
        unavailable.update({s.name: "not installed" for s in extras.STORES if s.version is None})
        probes.update(extras.PROBES)
    else:
        unavailable["lmdb, diskcache, machine probes"] = "bench/peers.py not found (run from a source checkout)"
    workloads = [w for w in WORKLOADS if only is None or w.key in only]
    if only is not None and len(workloads) != len(set(only)):
        raise ValueError(f"unknown workloads in {list(only)}; known: {[w.key for w in WORKLOADS]}")
    started = perf()
    machine = _machine(extras)
    b = Bench(cfg, stores)
    rng = random.Random(cfg.seed)
    got = _Collected()
    try:
        for cls in stores:
            b.load(cls)
            _say(progress, f"loaded {cls.name}: {b.loads[cls.name]['load_keys_per_s']:,.0f} keys/s, {b.loads[cls.name]['bytes']:,} bytes")
        for rep in range(cfg.repetitions):
            order = list(workloads)
            rng.shuffle(order)
            for w in order:
                jobs: dict[str, Callable[[], Job]] = {}
                for cls in stores:
                    if w.needs_scan and cls.scan is Store.scan:
                        continue
                    jobs[cls.name] = functools.partial(w.job, b, cls, random.Random(rng.random()))
                for p in w.beside:
                    if p in probes:
                        jobs[p] = functools.partial(probes[p][1], b, random.Random(rng.random()))
                tallies = interleave(jobs, cfg.steps, rng)
                for name, t in tallies.items():
                    got.rates.setdefault(w.key, {}).setdefault(name, []).append(t.rate)
                    if t.per_thread is not None:
                        got.per_thread.setdefault(w.key, {}).setdefault(name, []).append(t.per_thread)
            _say(progress, f"repetition {rep + 1}/{cfg.repetitions} done ({perf() - started:.0f} s)")
        diag = {}
        for cls in stores:
            store = b.main(cls, "full")
            diag[cls.name] = store.diagnostics()
    finally:
        b.close()
    report = {
        "kvstore": kvstore.__version__,
        "versions": {"python": platform.python_version(), **{cls.name: cls.version for cls in stores}},
        "unavailable": unavailable,
        "machine": machine,
        "config": {k: v for k, v in asdict(cfg).items() if k != "root"},
        "loads": b.loads,
        "diagnostics": diag,
        "probes": {name: desc for name, (desc, _) in probes.items()},
        "results": [_row(w, got, stores) for w in workloads],
        "seconds": perf() - started,
    }
    report["targets"] = _targets(report, workloads)
    return report


def _row(w: Workload, got: _Collected, stores: list[type[Store]]) -> dict[str, Any]:
    rates = got.rates[w.key]
    reps = len(rates["kvstore"])
    ratios = {other: _stats([rates["kvstore"][i] / r[i] for i in range(reps) if r[i] > 0]) for other, r in rates.items() if other != "kvstore"}
    row: dict[str, Any] = {
        "workload": w.name,
        "key": w.key,
        "unit": w.unit,
        "rates": {name: _stats(r) for name, r in rates.items()},
        "ratios": ratios,
        "repetitions": reps,
        "kvstore_ops_per_s": statistics.median(rates["kvstore"]),
        "sqlite3_ops_per_s": statistics.median(rates["sqlite3"]),
        "ratio_median": ratios["sqlite3"]["median"],
        "ratio_min": ratios["sqlite3"]["min"],
        "ratio_max": ratios["sqlite3"]["max"],
    }
    if w.key in got.per_thread:
        pt = got.per_thread[w.key]
        row["per_thread"] = pt
        row["per_thread_total"] = {name: [sum(c) for c in zip(*counts, strict=True)] for name, counts in pt.items()}
        row["slowest_thread_share"] = {name: min(tot) / statistics.mean(tot) if sum(tot) else 0.0 for name, tot in row["per_thread_total"].items()}
    return row


def _targets(report: dict[str, Any], workloads: list[Workload]) -> list[dict[str, Any]]:
    rows = {r["key"]: r for r in report["results"]}
    out = []
    for t in TARGETS:
        if t.workload != "size" and t.workload not in rows:
            continue
        value, held = t.check(rows.get(t.workload, {}), report)
        what = t.what.format(keys=report["config"]["keys"]).strip(" .")
        out.append({"workload": t.workload, "target": what, "value": value, "held": held})
    return out


def _machine(extras: ModuleType | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if extras is not None:
        info.update(extras.describe_machine())
    return info


def _say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        progress.write(f"[bench] {text}\n")
        progress.flush()


# --- the report as text ------------------------------------------------------------------------


def _fmt_ratio(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def format_report(report: dict[str, Any]) -> str:
    """The report as the text table ``kvstore bench`` prints."""
    v = report["versions"]
    peers = ", ".join(f"{k} {x}" for k, x in v.items() if k not in ("kvstore", "python"))
    lines = [
        f"kvstore {report['kvstore']} vs {peers}; Python {v['python']}",
        f"machine: {report['machine'].get('cpu_model', report['machine']['platform'])}, {report['machine']['cpus']} CPUs; "
        f"load average at start {_load(report['machine'].get('load_average'))}",
        f"mode {report['config']['mode']}: {report['config']['keys']:,} keys loaded, {report['config']['repetitions']} repetitions x "
        f"{report['config']['steps']} interleaved slices of {report['config']['slice_s'] * 1000:.0f} ms; {report['seconds']:.0f} s",
        "rates: median over repetitions; ratio: kvstore / other, formed within each repetition, median [min-max]",
        "",
    ]
    stores = [n for n in report["versions"] if n not in ("python", "kvstore", "sqlite3")]
    head = f"{'workload':<34} {'unit':<10} {'kvstore':>10} {'sqlite3':>10} {'vs sqlite3':>18}"
    for o in stores:
        head += f" {'vs ' + o:>18}"
    lines.append(head)
    for r in report["results"]:
        line = (
            f"{r['workload']:<34} {r['unit']:<10} {r['kvstore_ops_per_s']:>10,.0f} {r['sqlite3_ops_per_s']:>10,.0f} "
            f"{_fmt_ratio(r['ratios']['sqlite3']):>18}"
        )
        for o in stores:
            line += f" {_fmt_ratio(r['ratios'].get(o)):>18}"
        lines.append(line)
    lines.append("")
    lines.append(f"{'beside the workload':<34} {'probe or floor':<20} {'its rate':>12} {'kvstore / it':>18}")
    for r in report["results"]:
        for n in r["rates"]:
            if n in report["probes"]:
                lines.append(f"{r['workload']:<34} {n:<20} {r['rates'][n]['median']:>12,.0f} {_fmt_ratio(r['ratios'][n]):>18}")
    for n in stores:
        rates = ", ".join(f"{r['key']} {r['rates'][n]['median']:,.0f}" for r in report["results"] if n in r["rates"])
        lines.append(f"{n} rates (median /s): {rates}")
    lines.append("")
    for r in report["results"]:
        if "per_thread_total" in r:
            lines.append(f"{r['workload']}: commits per thread over the run (slowest thread / mean):")
            for name, tot in r["per_thread_total"].items():
                lines.append(f"  {name:<16} {tot}  ({r['slowest_thread_share'][name]:.2f})")
    lines.append("")
    lines.append("after loading the keys in one transaction (timed once, not interleaved), closed cleanly:")
    for name, info in report["loads"].items():
        lines.append(
            f"  {name:<10} load {info['load_keys_per_s']:>9,.0f} keys/s   on disk {info['bytes']:>12,} bytes = "
            f"{info['bytes_over_raw']:.2f}x raw   {info['files']}"
        )
    lines.append("")
    lines.append("targets (issue 8, judged on a full run):")
    for t in report["targets"]:
        mark = {True: "held", False: "MISSED", None: "n/a"}[t["held"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  [{mark:>6}] {t['target']:<58} {value}")
    if report["unavailable"]:
        lines.append("not measured: " + "; ".join(f"{k}: {v}" for k, v in report["unavailable"].items()))
    return "\n".join(lines) + "\n"


def _load(la: Any) -> str:
    return "-" if not la else " ".join(f"{x:.1f}" for x in la)


def run(
    quick: bool = False,
    json_output: bool = False,
    out: TextIO = sys.stdout,
    *,
    keys: int | None = None,
    repetitions: int | None = None,
    only: Sequence[str] | None = None,
    progress: TextIO | None = sys.stderr,
) -> int:
    """``kvstore bench [--quick] [--json]``: measure, print the table (or
    one JSON object), return the exit status."""
    cfg = Config.quick() if quick else Config.full()
    if keys is not None:
        cfg = replace(cfg, keys=keys)
    if repetitions is not None:
        cfg = replace(cfg, repetitions=repetitions)
    report = measure(cfg, only=only, progress=progress)
    if json_output:
        out.write(json.dumps(report) + "\n")
    else:
        out.write(format_report(report))
    return 0
