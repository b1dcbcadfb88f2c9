"""Fixtures for the benchmarks: a directory on a real disk, the raw fsync
probe every ratio is measured against, and a summary table at the end.

pytest collects only ``test_*.py`` by default; the hook below collects the
``bench_*.py`` modules of this directory as well.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: File systems that keep data in memory: fsync there measures nothing.
MEMORY_FS = frozenset({"tmpfs", "ramfs", "devtmpfs", "overlay-tmpfs"})
#: The fallback when the temporary directory is in memory (never committed).
FALLBACK_DIR = os.path.join(ROOT, ".bench-tmp")

#: name -> dict of numbers, filled by the benchmarks, printed at the end.
RESULTS: dict[str, dict[str, float]] = {}
#: The paired-cycle ratios of bench_wal.test_paired_ratios.
PAIRED: dict[str, float] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pyproject's addopts has --benchmark-disable, and pytest-benchmark
    # refuses --benchmark-only together with it ("Can't have both").  Asking
    # for --benchmark-only means asking for benchmarks, so enable them here,
    # before the plugin's own pytest_configure reads the options.
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def fs_type(path: str) -> tuple[str, str]:
    """(file system type, device) of the mount holding ``path``, from /proc/mounts."""
    path = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                device, mountpoint, kind = line.split()[:3]
                mountpoint = mountpoint.replace("\\040", " ")
                inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
                if inside and len(mountpoint) >= len(best[0]):
                    best = (mountpoint, kind, device)
    except OSError:
        pass
    return best[1], best[2]


@pytest.fixture(scope="session")
def disk_root(tmp_path_factory) -> str:
    """A directory on a real disk: KVSTORE_BENCH_DIR if set, else pytest's
    temporary directory unless that is in memory, else ``.bench-tmp``."""
    root = os.environ.get("KVSTORE_BENCH_DIR")
    if not root:
        root = str(tmp_path_factory.mktemp("bench"))
        if fs_type(root)[0] in MEMORY_FS:
            os.makedirs(FALLBACK_DIR, exist_ok=True)
            ignore = os.path.join(FALLBACK_DIR, ".gitignore")
            if not os.path.exists(ignore):
                with open(ignore, "w", encoding="utf-8") as f:
                    f.write("*\n")  # keeps the directory out of git without touching .gitignore
            root = os.path.join(FALLBACK_DIR, uuid.uuid4().hex[:12])
    os.makedirs(root, exist_ok=True)
    kind, device = fs_type(root)
    if kind in MEMORY_FS:
        pytest.exit(f"benchmark directory {root} is on {kind}: fsync would measure nothing", returncode=2)
    return root


@pytest.fixture
def disk_dir(disk_root) -> str:
    """A fresh directory on the real disk for one benchmark."""
    d = os.path.join(disk_root, uuid.uuid4().hex[:12])
    os.mkdir(d)
    return d


def fsync_probe(directory: str, count: int, payload: bytes = b"x" * 100) -> float:
    """Append ``payload`` to a new file ``count`` times with pwrite + fsync;
    return fsyncs per second.  Calls os directly: it measures the disk."""
    fd = os.open(os.path.join(directory, f"probe-{uuid.uuid4().hex[:8]}"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        offset = 0
        t0 = time.perf_counter()
        for _ in range(count):
            os.pwrite(fd, payload, offset)
            os.fsync(fd)
            offset += len(payload)
        return count / (time.perf_counter() - t0)
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def raw_fsync_rate(disk_root) -> float:
    """The disk's single-thread fsync rate (append 100 bytes, fsync), measured
    once per session: the denominator of every ratio in ``extra_info``.

    The median of 7 runs of 200 fsyncs, after one to warm up, so that a burst
    of I/O from another process does not skew every ratio of the session.
    """
    d = os.path.join(disk_root, "baseline")
    os.makedirs(d, exist_ok=True)
    fsync_probe(d, 100)  # warm up: the first fsyncs of a new file cost more
    return statistics.median(fsync_probe(d, 200) for _ in range(7))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    if PAIRED:
        tr.section("kvstore WAL ratios, paired cycles (median [q1, q3])")
        for key, label in [
            ("raw", "raw fsync/s, 1 thread"),
            ("wal1", "WAL commits/s, 1 thread"),
            ("wal8", "WAL commits/s, 8 threads"),
            ("wal1_ratio", "WAL 1-thread commits/s / raw fsync/s"),
            ("wal8_ratio", "WAL 8-thread commits/s / raw fsync/s"),
            ("cpf8", "commits per fsync, 8 threads"),
        ]:
            tr.write_line(
                f"{label:40s} {PAIRED[key + '_median']:>10,.2f}   [{PAIRED[key + '_q1']:,.2f}, {PAIRED[key + '_q3']:,.2f}]"
            )
    if not RESULTS:
        return
    tr.section("kvstore WAL benchmark summary (rates from the median round)")
    base = RESULTS.get("raw_fsync_1thread", {}).get("ops_per_s")
    for name, r in RESULTS.items():
        parts = [f"{name:28s} {r['ops_per_s']:>12,.0f} /s"]
        if base and not name.startswith("raw_fsync_1"):
            parts.append(f"x{r['ops_per_s'] / base:6.2f} of raw fsync/s")
        if "commits_per_fsync" in r:
            parts.append(f"{r['commits_per_fsync']:.2f} commits per fsync")
        tr.write_line("   ".join(parts))
    if "probe_fsync_per_s" in next(iter(RESULTS.values())):
        probe = next(iter(RESULTS.values()))["probe_fsync_per_s"]
        tr.write_line(f"(session probe, median of 7 x 200 fsyncs: {probe:,.0f} fsync/s; extra_info ratios use it)")
