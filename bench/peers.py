"""The peers and probes behind ``kvstore bench``, and the studies behind
``bench/RESULTS.md``.

``kvstore bench`` (``kvstore/benchmark.py``) loads this file from the source
checkout it runs from and takes from it:

* ``STORES``: lmdb and diskcache, each used when its module imports (``pip
  install -e '.[bench]'``).  lmdb: ``lmdb.open(path, map_size=4 GiB)`` with
  ``sync=True, metasync=True`` for durable commits and ``sync=False,
  metasync=False`` for the sync="normal" workload (LMDB has no "fsync
  later"), ``putmulti`` for fills, one ``begin()`` per read batch, a cursor
  for scans.  diskcache: ``Cache(path, eviction_policy="none",
  sqlite_synchronous=2)`` (1 for sync="normal"), ``transact()`` for fills,
  ``set(retry=True)`` for single-key commits; it has no range scan.
* ``PROBES``: what the machine itself does, interleaved with the workloads
  like any store (they call ``os`` directly, which the package may not):

  ``fsync_append``         pwrite 100 bytes at the end of a file, fsync; repeat
  ``fdatasync_overwrite``  pwrite 100 bytes into a preallocated, fsynced
                           4 MiB file (moving on, wrapping), fdatasync; repeat
  ``fsync_8_files``        ``fsync_append`` from 8 threads, a file each

* ``describe_machine()``: CPU model, memory, the file system of the run.

Run as a script, it is the front end for the full study::

    .venv/bin/python bench/peers.py                 # the comparison (= kvstore bench)
    .venv/bin/python bench/peers.py --quick         # about 2 minutes
    .venv/bin/python bench/peers.py --all --markdown results.md --json-out results.json
    .venv/bin/python bench/peers.py --scale --long  # adds 10^7 keys (about 15 min here)
    .venv/bin/python bench/peers.py --profile --only read_random commit_full_1

``--scale``: in a child process per size (10^4, 10^5, 10^6 keys; 10^7 with
``--long``), load kvstore and sqlite3 side by side in 10,000-key
transactions (sync="full"), alternating chunks in shuffled order, with
kvstore's default ``cache_size`` (64 MiB): load rates, their ratio per
chunk pair, and the child's peak RSS over its RSS before the load (VmHWM,
reset through ``/proc/self/clear_refs``).  Then reopen kvstore with a cache
that holds the whole tree, warm it, and time random gets in interleaved
slices against sqlite3 and the bisect floor: microseconds per get, tree
depth.

``--restart``: a store of 100,000 keys is checkpointed, then updated
(50-put transactions, sync="off", no automatic checkpoint) until 1, 8 or 64
MiB of log lie past the checkpoint; the child process then exits without
closing (a crash: the OS has every write).  ``kvstore.open`` of a fresh copy
of that image, three times: seconds, and MiB of log replayed per second.

``--profile``: each kvstore workload alone, under cProfile (one profiler
per thread for the 8-thread commits, merged): the functions with the most
own time, as a share of the total.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Run as a script, this module is what kvstore.benchmark.load_extras() would load.
sys.modules.setdefault("kvstore_bench_peers", sys.modules[__name__])

import kvstore  # noqa: E402
from kvstore import benchmark as kb  # noqa: E402

try:
    import lmdb
except ImportError:  # the optional extra is not installed
    lmdb = None
try:
    import diskcache
except ImportError:
    diskcache = None

MiB = 2**20
perf = time.perf_counter


# --- lmdb ------------------------------------------------------------------------------------


class _LmdbWriter(kb.Writer):
    def __init__(self, env: Any) -> None:
        self.txn = env.begin(write=True)

    def put_many(self, items):
        self.txn.cursor().putmulti(items)

    def commit(self):
        self.txn.commit()

    def rollback(self):
        self.txn.abort()


class LmdbStore(kb.Store):
    name = "lmdb"
    version = f"{lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})" if lmdb else None
    sync_note = "sync=True, metasync=True / sync=False for normal"

    def open(self):
        os.makedirs(self.path, exist_ok=True)
        full = self.sync == "full"
        self.env = lmdb.open(self.path, map_size=4 << 30, sync=full, metasync=full, max_readers=256)

    def close(self):
        self.env.close()

    def writer(self):
        return _LmdbWriter(self.env)

    def get_many(self, keys):
        found = 0
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                if get(k) is not None:
                    found += 1
        return found

    def commit_one(self, key, value):
        with self.env.begin(write=True) as txn:
            txn.put(key, value)

    def scan(self, start, n):
        with self.env.begin() as txn:
            cur = txn.cursor()
            if not cur.set_range(start):
                return []
            return list(itertools.islice(cur.iternext(), n))


# --- diskcache -------------------------------------------------------------------------------


class _DiskcacheWriter(kb.Writer):
    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.cm = cache.transact()
        self.cm.__enter__()

    def put_many(self, items):
        put = self.cache.set
        for k, v in items:
            put(k, v)

    def commit(self):
        cm, self.cm = self.cm, None
        cm.__exit__(None, None, None)

    def rollback(self):
        if self.cm is not None:
            cm, self.cm = self.cm, None
            err = RuntimeError("rollback")
            try:
                cm.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass


class DiskcacheStore(kb.Store):
    name = "diskcache"
    version = diskcache.__version__ if diskcache else None
    sync_note = "its SQLite in WAL mode, synchronous=FULL / NORMAL"

    def open(self):
        self.cache = diskcache.Cache(
            self.path,
            size_limit=2**40,
            eviction_policy="none",
            cull_limit=0,
            statistics=0,
            tag_index=0,
            sqlite_synchronous=2 if self.sync == "full" else 1,
        )

    def close(self):
        self.cache.close()

    def writer(self):
        return _DiskcacheWriter(self.cache)

    def get_many(self, keys):
        get = self.cache.get
        found = 0
        for k in keys:
            if get(k) is not None:
                found += 1
        return found

    def commit_one(self, key, value):
        self.cache.set(key, value, retry=True)

    def thread_done(self):
        self.cache.close()  # closes this thread's connection


#: every optional peer; those whose module is missing have version None
STORES = [LmdbStore, DiskcacheStore]


# --- machine probes --------------------------------------------------------------------------


def _probe_file(b: kb.Bench, what: str) -> tuple[str, int]:
    d = b.scratch(what)
    os.makedirs(d)
    return d, os.open(os.path.join(d, "probe"), os.O_RDWR | os.O_CREAT, 0o644)


def _close_probe(d: str, fd: int) -> None:
    os.close(fd)
    shutil.rmtree(d, ignore_errors=True)


def _fsync_append(b: kb.Bench, rng: random.Random):
    """pwrite 100 bytes at the end of a file, fsync: the ceiling of a log
    that fsyncs every commit."""
    d, fd = _probe_file(b, "probe-fsync")
    payload = rng.randbytes(100)
    offset = [0]

    def unit() -> int:
        os.pwrite(fd, payload, offset[0])
        os.fsync(fd)
        offset[0] += len(payload)
        return 1

    yield from kb.unit_slices(b, unit, lambda: _close_probe(d, fd))


def _fdatasync_overwrite(b: kb.Bench, rng: random.Random):
    """pwrite 100 bytes into a preallocated (written and fsynced) 4 MiB
    file, moving on and wrapping, fdatasync: a log that reuses its space
    skips the file-size update each append costs."""
    d, fd = _probe_file(b, "probe-fdatasync")
    size = 4 * MiB
    os.pwrite(fd, bytes(size), 0)
    os.fsync(fd)
    payload = rng.randbytes(100)
    offset = [0]

    def unit() -> int:
        os.pwrite(fd, payload, offset[0])
        os.fdatasync(fd)
        offset[0] = (offset[0] + len(payload)) % (size - len(payload))
        return 1

    yield from kb.unit_slices(b, unit, lambda: _close_probe(d, fd))


def _fsync_8_files(b: kb.Bench, rng: random.Random):
    """``fsync_append`` from 8 threads, each on a file of its own: whether the
    disk and file system overlap fsyncs."""
    d = b.scratch("probe-fsync8")
    os.makedirs(d)
    fds = [os.open(os.path.join(d, f"probe-{i}"), os.O_RDWR | os.O_CREAT, 0o644) for i in range(kb.THREADS)]
    offsets = [0] * kb.THREADS
    payload = rng.randbytes(100)

    def work(i: int) -> None:
        os.pwrite(fds[i], payload, offsets[i])
        os.fsync(fds[i])
        offsets[i] += len(payload)

    try:
        yield from kb.crew_slices(b, kb.Crew(kb.THREADS, work))
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


PROBES = {
    "fsync_append": ("the disk: append 100 bytes + fsync, 1 thread", _fsync_append),
    "fdatasync_overwrite": ("the disk: overwrite 100 bytes of a preallocated file + fdatasync", _fdatasync_overwrite),
    "fsync_8_files": ("the disk: append + fsync from 8 threads, a file each", _fsync_8_files),
}


# --- the machine -----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def fs_type(path: str) -> tuple[str, str]:
    """(file system type, device) of the mount holding ``path``."""
    path = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    for line in _read("/proc/mounts").splitlines():
        device, mountpoint, kind = line.split()[:3]
        inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best[0]):
            best = (mountpoint, kind, device)
    return best[1], best[2]


def describe_machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")), "")
    mem = next((line.split(":", 1)[1].strip() for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), "")
    where = os.environ.get("KVSTORE_BENCH_DIR") or tempfile.gettempdir()
    kind, device = fs_type(where)
    return {"cpu_model": cpu, "memory": mem, "bench_dir": where, "file_system": f"{kind} on {device}"}


# --- scale -----------------------------------------------------------------------------------


def _vm(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _scale_child(n: int, root: str, reps: int = 7, slice_s: float = 0.04, seed: int = 8) -> dict[str, Any]:
    """One size of the scale study, in its own process (see the docstring)."""
    import bisect

    rng = random.Random(seed)
    chunk = 10_000
    values = [rng.randbytes(100) for _ in range(256)]
    kv_path, sq_path = os.path.join(root, "kv"), os.path.join(root, "sq")
    cache = 64 * MiB  # kvstore's default
    db = kvstore.open(kv_path, cache_size=cache)
    sq = kb.SqliteStore(sq_path, "full")
    sq.open()
    rss_before = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    kv_s, sq_s, ratios = 0.0, 0.0, []
    order = random.Random(seed + 1)
    for lo in range(0, n, chunk):
        r = random.Random(seed * 1_000_003 + lo)  # the chunk's keys, made again for the other store
        items = [(r.randbytes(16), values[i % 256]) for i in range(min(chunk, n - lo))]
        times = {}
        for who in order.sample(["kv", "sq"], 2):
            t0 = perf()
            if who == "kv":
                with db.transaction() as tx:
                    for k, v in items:
                        tx.put(k, v)
            else:
                w = sq.writer()
                w.put_many(items)
                w.commit()
            times[who] = perf() - t0
        kv_s += times["kv"]
        sq_s += times["sq"]
        ratios.append(times["sq"] / times["kv"])
    peak = _vm("VmHWM")
    depth = db.stats()["tree_depth"]
    db.close()
    rss_after_load = _vm("VmRSS")
    # warm gets: a cache that holds the whole tree, warmed by a full scan
    pages = sum(kb.dir_bytes(kv_path).values()) // 4096
    db = kvstore.open(kv_path, cache_size=max(cache, pages * 4096 * 2))
    keys = [k for k, _ in db.scan()]
    r = random.Random(seed + 2)
    lookups = [keys[r.randrange(len(keys))] for _ in range(20_000)]
    vals = [b""] * len(keys)

    def in_hundreds(lookup: Callable[[list[bytes]], object]) -> Callable[[], Any]:
        """A job that looks up the keys 100 at a time for a slice per step."""

        def job() -> Any:
            pos = 0
            yield None
            while True:
                t_end = perf() + slice_s
                done = 0
                while perf() < t_end:
                    lookup(lookups[pos : pos + 100])
                    pos = (pos + 100) % 19_900
                    done += 100
                yield done

        return job

    def kv_lookup(ks: list[bytes]) -> None:
        tx = db.begin(readonly=True)
        for k in ks:
            tx.get(k)
        tx.commit()

    def floor_lookup(ks: list[bytes]) -> None:
        for k in ks:
            j = bisect.bisect_left(keys, k)
            if keys[j] == k and vals[j] is not None:
                pass

    kv_gets, sq_gets, floor = in_hundreds(kv_lookup), in_hundreds(sq.get_many), in_hundreds(floor_lookup)

    tx = db.begin(readonly=True)
    for k in lookups:  # warm: every lookup key's path in the cache
        tx.get(k)
    tx.commit()
    misses = db.stats()["cache_misses"]
    rounds = []
    rr = random.Random(seed + 3)
    for _ in range(reps):
        t = kb.interleave({"kvstore": kv_gets, "sqlite3": sq_gets, "floor_bisect": floor}, 4, rr)
        rounds.append({k: v.rate for k, v in t.items()})
    misses = db.stats()["cache_misses"] - misses
    db.close()
    sq.close()
    files = kb.dir_bytes(kv_path)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    return {
        "keys": n,
        "load_kvstore_keys_per_s": n / kv_s,
        "load_sqlite3_keys_per_s": n / sq_s,
        "load_ratio_median": med(ratios),
        "load_ratio_min": min(ratios),
        "load_ratio_max": max(ratios),
        "cache_size": cache,
        "rss_before_load": rss_before,
        "peak_rss_during_load": peak,
        "peak_rss_over_before": peak - rss_before,
        "rss_after_load_closed": rss_after_load,
        "tree_depth": depth,
        "get_us_kvstore": 1e6 / med([x["kvstore"] for x in rounds]),
        "get_us_sqlite3": 1e6 / med([x["sqlite3"] for x in rounds]),
        "get_us_floor_bisect": 1e6 / med([x["floor_bisect"] for x in rounds]),
        "get_ratio_vs_sqlite3": med([x["kvstore"] / x["sqlite3"] for x in rounds]),
        "get_ratio_vs_floor": med([x["kvstore"] / x["floor_bisect"] for x in rounds]),
        "cache_misses_during_gets": misses,
        "kvstore_bytes": sum(files.values()),
        "kvstore_bytes_over_raw": sum(files.values()) / (n * 116),
    }


def scale(sizes: list[int], root: str | None, progress: Any = sys.stderr, reps: int = 7, slice_s: float = 0.04) -> list[dict[str, Any]]:
    """The scale study: one child process per size."""
    out = []
    for n in sizes:
        d = tempfile.mkdtemp(prefix=f"kvstore-scale-{n}-", dir=root)
        try:
            t0 = perf()
            cmd = [sys.executable, os.path.abspath(__file__), "_scale-child", str(n), d, str(reps), str(slice_s)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"scale child for {n:,} keys failed:\n{p.stderr}")
            res = json.loads(p.stdout)
            res["seconds"] = perf() - t0
            out.append(res)
            kb._say(progress, f"scale {n:,} keys: {res['seconds']:.0f} s")
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


# --- restart ---------------------------------------------------------------------------------

NO_AUTO = {"checkpoint_wal_bytes": 1 << 50, "checkpoint_interval": 1e9}


def _restart_child(path: str, keys: int, wal_mib: int) -> None:
    """Build the crash image: load, checkpoint, update until ``wal_mib`` MiB
    of log lie past the checkpoint, exit without closing."""
    rng = random.Random(9)
    values = [rng.randbytes(100) for _ in range(256)]
    key = [rng.randbytes(16) for _ in range(keys)]
    with kvstore.open(path, sync="off", **NO_AUTO) as db:
        with db.transaction() as tx:
            for i, k in enumerate(key):
                tx.put(k, values[i % 256])
    db = kvstore.open(path, sync="off", **NO_AUTO)
    start = db.stats()["last_checkpoint_lsn"]
    wal = db._wal  # the log's end is not public
    while wal.end_lsn - start < wal_mib * MiB:
        with db.transaction() as tx:
            for _ in range(50):
                tx.put(key[rng.randrange(keys)], values[rng.randrange(256)])
    wal.flush(sync=False)  # hand everything to the OS: a process crash keeps it
    print(json.dumps({"wal_bytes": wal.end_lsn - start}), flush=True)
    os._exit(0)


def _crash_image(d: str, keys: int, mib: int) -> tuple[str, int]:
    """Build the crash image in ``d``/image (in a child process); return
    its path and the log bytes past its checkpoint."""
    image = os.path.join(d, "image")
    cmd = [sys.executable, os.path.abspath(__file__), "_restart-child", image, str(keys), str(mib)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"restart child for {mib} MiB failed:\n{p.stderr}")
    return image, json.loads(p.stdout)["wal_bytes"]


def profile_restart(root: str | None, keys: int = 100_000, mib: int = 8) -> dict[str, Any]:
    """``kvstore.open`` of an ``mib`` MiB crash image under cProfile."""
    d = tempfile.mkdtemp(prefix="kvstore-restart-profile-", dir=root)
    try:
        image, wal_bytes = _crash_image(d, keys, mib)
        prof = cProfile.Profile()
        t0 = perf()
        prof.enable()
        db = kvstore.open(image, **NO_AUTO)
        prof.disable()
        took = perf() - t0
        db.close()
        stats = pstats.Stats(prof, stream=io.StringIO())
        return {"workload": f"restart, {wal_bytes / MiB:.0f} MiB of log", "ops": 1, "seconds": took, "top": _top(stats)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def restart(wal_mibs: list[int], root: str | None, keys: int = 100_000, rounds: int = 3, progress: Any = sys.stderr) -> list[dict[str, Any]]:
    out = []
    for mib in wal_mibs:
        d = tempfile.mkdtemp(prefix=f"kvstore-restart-{mib}-", dir=root)
        try:
            image, wal_bytes = _crash_image(d, keys, mib)
            seconds, stats = [], {}
            for i in range(rounds):
                copy = os.path.join(d, f"copy-{i}")
                shutil.copytree(image, copy)
                t0 = perf()
                db = kvstore.open(copy, **NO_AUTO)
                seconds.append(perf() - t0)
                stats = db.stats()
                db.close()
                shutil.rmtree(copy)
            med = statistics.median(seconds)
            res = {
                "keys": keys,
                "wal_mib": wal_bytes / MiB,
                "open_seconds": seconds,
                "open_seconds_median": med,
                "mib_per_s": wal_bytes / MiB / med,
                "records_scanned": stats.get("recovery_records_scanned"),
                "ops_redone": stats.get("recovery_ops_redone"),
            }
            out.append(res)
            kb._say(progress, f"restart {mib} MiB: {med:.2f} s, {res['mib_per_s']:.1f} MiB/s")
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


# --- profiles --------------------------------------------------------------------------------


def _top(stats: pstats.Stats, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time, as shares of the total."""
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1e-9
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    out = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows:
        where = os.path.relpath(file, ROOT) if file.startswith(ROOT) else os.path.basename(file)
        out.append({"function": f"{where}:{line}({fn})" if line else fn, "calls": nc, "own_s": tt, "own_share": tt / total, "cumulative_s": ct})
    return out


def profile(cfg: kb.Config, only: list[str] | None, seconds: float = 3.0, progress: Any = sys.stderr) -> dict[str, Any]:
    """Each kvstore workload alone under cProfile for about ``seconds``."""
    out: dict[str, Any] = {}
    b = kb.Bench(cfg, [kb.KvstoreStore])
    try:
        b.load(kb.KvstoreStore)
        for w in kb.WORKLOADS:
            if only and w.key not in only:
                continue
            rng = random.Random(1)
            extra: dict[str, Any] = {}
            if w.threads > 1:
                stats, ops, took = _profile_threads(b, seconds)
                extra["commits_per_fsync"] = stats.commits_per_fsync  # type: ignore[attr-defined]
            elif w.key == "reopen":
                stats, ops, took = _profile_reopen(b)
            else:
                prof = cProfile.Profile()
                steps = max(1, int(seconds / cfg.slice_s))
                if w.key.startswith("fill"):
                    steps = cfg.steps
                ops, took = 0, 0.0
                reps = 1 if not w.key.startswith("fill") else max(1, int(seconds / 0.5))
                for _ in range(reps):
                    gen = w.job(b, kb.KvstoreStore, rng)
                    next(gen)
                    try:
                        for _ in range(steps):
                            t0 = perf()
                            prof.enable()
                            try:
                                got = next(gen)
                            finally:
                                prof.disable()
                            took += perf() - t0
                            ops += got.ops if isinstance(got, kb.Step) else got
                    except StopIteration:
                        pass
                    finally:
                        gen.close()
                stats = pstats.Stats(prof, stream=io.StringIO())
            out[w.key] = {"workload": w.name, "ops": ops, "seconds": took, "top": _top(stats), **extra}
            kb._say(progress, f"profiled {w.key}")
        store = b.main(kb.KvstoreStore, "full")
        out["_diagnostics"] = store.diagnostics()
        out["_size"] = size_breakdown(store, b.loads["kvstore"])
    finally:
        b.close()
    return out


def size_breakdown(store: Any, load: dict[str, Any]) -> dict[str, Any]:
    """Where kvstore's bytes go after the load: ``db.check()``'s counts and
    the files (as measured right after the load, closed)."""
    report = store.db.check()
    st = store.db.stats()
    page = st["page_size"]
    raw = load["raw_bytes"]
    return {
        "files": load["files"],
        "raw_bytes": raw,
        "page_size": page,
        "pages_allocated": st["pages"],
        "leaves": report["leaves"],
        "tree_depth": report["tree_depth"],
        "undo_pages": report["undo_pages"],
        "undo_records": report["undo_records"],
        "overflow_pages": report["overflow_pages"],
        "leaf_fill": raw / (report["leaves"] * page) if report["leaves"] else None,
        "wal_bytes_now": st["wal_bytes"],
    }


def _profile_reopen(b: kb.Bench, opens: int = 5) -> tuple[pstats.Stats, int, float]:
    """Open (and read one key) after a clean close, ``opens`` times; the
    closes are neither timed nor profiled."""
    store = b.main(kb.KvstoreStore, "full")
    prof = cProfile.Profile()
    took = 0.0
    for i in range(opens):
        store.close()
        t0 = perf()
        prof.enable()
        store.open()
        store.get_many([b.keys[i]])
        prof.disable()
        took += perf() - t0
    b.cooled(kb.KvstoreStore)
    return pstats.Stats(prof, stream=io.StringIO()), opens, took


def _profile_threads(b: kb.Bench, seconds: float) -> tuple[pstats.Stats, int, float]:
    """8 threads of durable one-put commits, each under its own profiler."""
    store = b.main(kb.KvstoreStore, "full")
    profs = [cProfile.Profile() for _ in range(kb.THREADS)]
    mine = [b.keys[i :: kb.THREADS] for i in range(kb.THREADS)]
    stop = threading.Event()
    counts = [0] * kb.THREADS
    wal = getattr(store.db, "_wal", None)
    fsyncs0 = getattr(wal, "fsyncs", 0)

    def work(i: int) -> None:
        r = random.Random(i)
        profs[i].enable()
        try:
            while not stop.is_set():
                store.commit_one(mine[i][r.randrange(len(mine[i]))], b.values[r.randrange(256)])
                counts[i] += 1
        finally:
            profs[i].disable()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(kb.THREADS)]
    t0 = perf()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    took = perf() - t0
    stats = pstats.Stats(profs[0], stream=io.StringIO())
    for p in profs[1:]:
        stats.add(p)
    stats.commits_per_fsync = sum(counts) / max(1, getattr(wal, "fsyncs", 0) - fsyncs0)  # type: ignore[attr-defined]
    return stats, sum(counts), took


def format_profiles(profiles: dict[str, Any]) -> str:
    lines = []
    for key, p in profiles.items():
        if key.startswith("_"):
            continue
        cpf = f", {p['commits_per_fsync']:.2f} commits per fsync" if "commits_per_fsync" in p else ""
        lines.append(f"{p['workload']} ({key}): {p['ops']:,} ops in {p['seconds']:.2f} s under the profiler{cpf}")
        for row in p["top"]:
            lines.append(f"  {row['own_share'] * 100:5.1f}%  {row['own_s']:7.3f} s  {row['calls']:>9,}  {row['function']}")
    return "\n".join(lines) + "\n"


# --- markdown --------------------------------------------------------------------------------


def format_markdown(report: dict[str, Any]) -> str:
    """The comparison, scale and restart tables for RESULTS.md."""
    out: list[str] = []
    res = report.get("results", [])
    peers = [p for p in ("lmdb", "diskcache") if any(p in r["ratios"] for r in res)]
    head = "| workload | unit | kvstore | sqlite3 | kvstore / sqlite3 | " + " | ".join(f"kvstore / {p}" for p in peers) + " | beside it |"
    out += [head, "|" + "---|" * (6 + len(peers))]
    for r in res:
        probes = [n for n in r["ratios"] if n not in ("sqlite3", *peers)]
        beside = "; ".join(f"{n} {r['rates'][n]['median']:,.0f}/s (kvstore / it {kb._fmt_ratio(r['ratios'][n])})" for n in probes)
        cells = [
            r["workload"],
            r["unit"],
            f"{r['kvstore_ops_per_s']:,.0f}",
            f"{r['sqlite3_ops_per_s']:,.0f}",
            f"**{r['ratio_median']:.2f}** [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}]",
            *[kb._fmt_ratio(r["ratios"].get(p)).replace("-", "–") for p in peers],
            beside or "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for r in res:
        if "per_thread_total" in r:
            out.append(f"{r['workload']}, commits per thread over the whole run (slowest / mean):")
            out.append("")
            for name, tot in r["per_thread_total"].items():
                out.append(f"- {name}: {tot} ({r['slowest_thread_share'][name]:.2f})")
            out.append("")
    if not res:
        return _markdown_studies(report, out)
    out.append("| store | load 100k keys, one transaction (once) | on disk after the load, closed | × raw | files |")
    out.append("|---|---:|---:|---:|---|")
    for name, info in report["loads"].items():
        out.append(f"| {name} | {info['load_keys_per_s']:,.0f} keys/s | {info['bytes']:,} | {info['bytes_over_raw']:.2f} | {info['files']} |")
    out.append("")
    out.append("| target | value | held? |")
    out.append("|---|---:|---|")
    for t in report["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        out.append(f"| {t['target']} | {value} | {'yes' if t['held'] else 'NO' if t['held'] is False else 'n/a'} |")
    return _markdown_studies(report, out)


def _markdown_studies(report: dict[str, Any], out: list[str]) -> str:
    if report.get("scale"):
        out.append("")
        out.append(
            "| keys | load kvstore keys/s | load sqlite3 keys/s | load ratio [min–max] | peak RSS over start (cache_size 64 MiB) "
            "| depth | get µs kvstore | sqlite3 | bisect floor | get ratio vs sqlite3 | vs floor |"
        )
        out.append("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in report["scale"]:
            out.append(
                f"| {s['keys']:,} | {s['load_kvstore_keys_per_s']:,.0f} | {s['load_sqlite3_keys_per_s']:,.0f} | "
                f"{s['load_ratio_median']:.2f} [{s['load_ratio_min']:.2f}–{s['load_ratio_max']:.2f}] | "
                f"{s['peak_rss_over_before'] / MiB:,.0f} MiB | {s['tree_depth']} | {s['get_us_kvstore']:.2f} | "
                f"{s['get_us_sqlite3']:.2f} | {s['get_us_floor_bisect']:.2f} | {s['get_ratio_vs_sqlite3']:.2f} | {s['get_ratio_vs_floor']:.2f} |"
            )
    if report.get("restart"):
        out.append("")
        out.append("| WAL past the checkpoint | open (recovery), median of 3 | MiB replayed / s | records scanned |")
        out.append("|---:|---:|---:|---:|")
        for s in report["restart"]:
            out.append(f"| {s['wal_mib']:.1f} MiB | {s['open_seconds_median']:.2f} s | {s['mib_per_s']:.1f} | {s['records_scanned']:,} |")
    return "\n".join(out) + "\n"


# --- the front end ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scale-child":
        print(json.dumps(_scale_child(int(argv[1]), argv[2], int(argv[3]), float(argv[4]))))
        return 0
    if argv and argv[0] == "_restart-child":
        _restart_child(argv[1], int(argv[2]), int(argv[3]))
        return 0
    p = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short comparison (about 2 minutes)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--json-out", help="also write the JSON report to this file")
    p.add_argument("--markdown", help="also write the RESULTS.md tables to this file")
    p.add_argument("--keys", type=int, help="keys in the loaded store (default 100,000)")
    p.add_argument("--reps", type=int, help="repetitions")
    p.add_argument("--only", nargs="+", help=f"only these workloads: {' '.join(w.key for w in kb.WORKLOADS)}")
    p.add_argument("--no-compare", action="store_true", help="skip the side-by-side comparison")
    p.add_argument("--scale", action="store_true", help="the scale study (10^4, 10^5, 10^6 keys)")
    p.add_argument("--long", action="store_true", help="the scale study up to 10^7 keys (implies --scale)")
    p.add_argument("--restart", action="store_true", help="restart time against WAL size (1, 8, 64 MiB)")
    p.add_argument("--profile", action="store_true", help="profile each kvstore workload alone (cProfile)")
    p.add_argument("--all", action="store_true", help="comparison, scale, restart and profiles")
    args = p.parse_args(argv)
    cfg = kb.Config.quick() if args.quick else kb.Config.full()
    if args.keys:
        cfg = kb.replace(cfg, keys=args.keys)
    if args.reps:
        cfg = kb.replace(cfg, repetitions=args.reps)
    root = os.environ.get("KVSTORE_BENCH_DIR") or None
    report: dict[str, Any] = {}
    if not args.no_compare:
        report = kb.measure(cfg, extras=sys.modules[__name__], only=args.only, progress=sys.stderr)
    if args.scale or args.long or args.all:
        report["scale"] = scale([10_000, 100_000, 1_000_000] + ([10_000_000] if args.long else []), root)
    if args.restart or args.all:
        report["restart"] = restart([1, 8, 64], root)
    if args.profile or args.all:
        report["profiles"] = profile(cfg, args.only)
        if args.restart or args.all:
            report["profiles"]["restart_8mib"] = profile_restart(root)
    if args.json:
        print(json.dumps(report))
    else:
        if "results" in report:
            sys.stdout.write(kb.format_report(report))
        for s in report.get("scale", []):
            print(json.dumps(s))
        for s in report.get("restart", []):
            print(json.dumps(s))
        if "profiles" in report:
            sys.stdout.write(format_profiles(report["profiles"]))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
