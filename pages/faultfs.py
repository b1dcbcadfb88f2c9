"""An in-memory file system that simulates power cuts and I/O errors.

``FaultFS`` implements the raw calls of the seam (``pages.fs``), so the
durability rules S1-S4 of the base class hold here exactly as on disk.  It
never touches the real disk, and everything it does is deterministic from its
``seed``.  Tests use it to prove kvstore's guarantees (TESTING.md sections 2
and 3); the engine cannot tell it from ``OsFileSystem``.

The model: two images
---------------------
Files and directories are *inodes*.  A file inode has ``data`` (what reads
see: the page cache) and ``durable`` (what survives a power cut).  A directory
inode has visible names and durable names (name -> inode).

Every mutation (write, truncate, create, mkdir, rename, remove) changes the
visible image at once and is appended to one ordered *pending list*:

F1. ``File.fsync()`` makes all pending writes and truncates of that file
    durable, in order, and takes them off the pending list.  It does not make
    the file's *name* durable.  ``File.fdatasync()`` does exactly the same:
    the model holds no file metadata but the size, and Linux's fdatasync
    flushes the size whenever it changed (a grown or truncated file), so the
    two differ only in what they cost on a real disk.  An fdatasync passes
    every gate as an ``fsync`` -- ``fail("fsync")`` fails it (with E2's
    consequences), hooks see ``Event.kind == "fsync"``, it counts in
    ``counts["fsync"]`` and is an fsync I/O point -- so a test that watches
    or fails fsyncs sees it; ``Event.datasync`` and ``counts["fdatasync"]``
    tell it apart.
F2. ``fsync_dir(d)`` makes the pending creates, mkdirs, removes and renames
    in ``d`` durable.  A rename belongs to its *destination* directory: it
    becomes durable (both halves: new name present, old name gone) when the
    destination is fsynced.  (``FileSystem.rename`` fsyncs both directories,
    so this choice matters only to code that bypasses the seam's rule S2.)
F3. A file whose name was never made durable is gone after a power cut, even
    if its data was fsynced.

Power cuts
----------
``fs.crash(plan)`` returns a new ``FaultFS`` built from the durable image plus
the pending operations the plan keeps, applied in their original order.  In
the new file system everything is durable and nothing is pending; its counters
are fresh and it has no faults or hooks.  The old file system is dead: every
call on it or its open files raises ``PowerCut``.  (Its inspection methods --
``crash``, ``plans``, ``pending``, the snapshots and counters -- keep working,
so one cut can be replayed with many plans.)

==========================================  ==================================
plan                                        what survives
==========================================  ==================================
``DropAll()``                               the durable image only
``KeepAll()``                               the visible image (a process
                                            crash: the page cache survives)
``Prefix(k)``                               pending ops ``0 .. k-1``
``OmitOne(i)``                              every pending op but ``i``
``Subset(indices)``                         exactly those pending ops
``Torn(i, sectors_kept, fill)``             ops before ``i``; write ``i`` torn
``GrownNotWritten(i, fill)``                ops before ``i``; write ``i``
                                            grows the file, new bytes lost
==========================================  ==================================

Pending op numbers are the positions shown by ``fs.pending()``.

``Torn``: a write covers the 512-byte sectors between ``offset // 512`` and
the sector of its last byte.  The first ``sectors_kept`` of them reach the
disk.  With ``fill="old"`` the rest were never written: the file looks as if
only that sector-aligned prefix of the write happened (so it grows only as far
as the kept bytes reach).  With ``fill="zero"`` or ``"garbage"`` the file
has its new size and each unkept sector is zeros or seeded random bytes --
the whole sector, as disks tear whole sectors, clipped to the file's size.

``GrownNotWritten``: the file gets its new size (the metadata reached the
disk) but the bytes past the old end of file are zeros or garbage; the part of
the write inside the old file is applied.  If at replay time the write does
not extend the file, it is applied whole.

``fs.plans()`` lists plans of every kind for the current pending list;
``all_subsets(n)`` lists every subset when ``n <= 10``, else a seeded sample.
Garbage is seeded by ``(seed, plan)``: the same plan on the same seed always
writes the same bytes.

``fs.crash_after(n)`` cuts the power after ``n`` more *I/O points* (write,
truncate, fsync, fsync_dir, create, mkdir, rename, remove): the next point
raises ``PowerCut`` before it happens, and so does every later call, from any
thread.  ``fs.io_points`` counts the points so far.  ``PowerCut`` derives from
``BaseException`` so that ``except Exception`` in the engine cannot swallow it.

Errors (like Linux)
-------------------
E1. ``fs.fail(op, nth=..., every=..., errno_=...)`` makes the nth matching raw
    call (counted from when it was armed; with ``every=True`` also every one
    after it) raise ``OSError(errno_)``.  ``op="any"`` matches every kind
    that can fail: write, read, truncate, fsync, fsync_dir, create, open,
    mkdir, rename, remove.  A failed call changes nothing, except:
E2. A failed ``fsync`` (or ``fdatasync``) drops the file's pending writes
    and truncates from the durable path for good: they leave the pending
    list and never become durable, though reads still see them.  The next
    fsync reports success.  This is why the engine must never retry an
    fsync (S3).
E3. A failed ``fsync_dir`` leaves the name operations pending: a later power
    cut may keep or drop them, and a later ``fsync_dir`` may make them durable.
E4. ``fs.short_write(nth, nbytes)`` makes the nth raw write write only
    ``nbytes``; the base class's ``pwrite`` continues it (S1).
E5. Missing and existing paths raise as ``os`` does: ``FileNotFoundError``,
    ``FileExistsError``, ``IsADirectoryError``, ``NotADirectoryError``; a closed
    file raises ``OSError(EBADF)``; a held lock raises ``BlockingIOError``.

Hooks
-----
``fs.add_hook(fn)``: ``fn(event)`` runs before each mutation takes effect (and
after injected faults are checked), with an ``Event``; for ``fsync`` and
``fsync_dir`` ``event.ops`` lists the operations about to become durable.  If
``fn`` raises, the mutation does not happen and the exception propagates (a
``PowerCut`` raised by a hook cuts the power there).  Hooks run under the file
system's lock, so they may read its images (``durable_bytes``) but must not
block on other threads that use it.

Example:

    >>> fs = FaultFS(seed=0, dirs=["/db"])
    >>> f = fs.create("/db/log")     # the seam fsyncs /db: the name is durable
    >>> f.pwrite(0, b"hello")
    >>> f.fsync()
    >>> f.pwrite(5, b" world")
    >>> fs.pending()
    ['0: write /db/log [5, 11) grows 5->11']
    >>> fs.visible_bytes("/db/log"), fs.durable_bytes("/db/log")
    (b'hello world', b'hello')
    >>> fs.crash(DropAll()).visible_bytes("/db/log")
    b'hello'
    >>> fs.crash(KeepAll()).visible_bytes("/db/log")
    b'hello world'
    >>> f.pread(0, 5)
    Traceback (most recent call last):
    ...
    pages.faultfs.PowerCut: the power was cut: crash() was called
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pages.fs import File, FileLock, FileSystem

__all__ = [
    "FaultFS", "FaultFile", "PowerCut", "Event", "Op", "Fault", "ShortWrite",
    "CrashPlan", "DropAll", "KeepAll", "Prefix", "OmitOne", "Subset", "Torn",
    "GrownNotWritten", "all_subsets", "SECTOR",
]

SECTOR = 512  # the unit a disk writes atomically; torn writes tear between sectors
FILLS = ("old", "zero", "garbage")
SUBSET_SAMPLE = 64  # subsets sampled by all_subsets() when 2**n is too many

IO_KINDS = frozenset({"write", "truncate", "fsync", "fsync_dir", "create", "mkdir", "rename", "remove"})
FAULT_KINDS = frozenset({"write", "fsync", "fsync_dir", "create", "truncate", "rename", "remove",
                         "read", "open", "mkdir", "any"})
DATA_OPS = frozenset({"write", "truncate"})


class PowerCut(BaseException):
    """Raised by every call on a file system whose power was cut.

    A ``BaseException``, so ``except Exception`` in the engine does not catch
    it: the "process" must stop at once.  The test then calls ``fs.crash()``.
    """


# ---------------------------------------------------------------------------
# Records: pending operations, hook events, armed faults.


class _Inode:
    __slots__ = ("id", "is_dir", "data", "durable", "names", "durable_names")

    def __init__(self, ino: int, is_dir: bool) -> None:
        self.id = ino
        self.is_dir = is_dir
        self.data = bytearray()  # visible file bytes (the page cache)
        self.durable = bytearray()  # file bytes that survive a power cut
        self.names: dict[str, _Inode] = {}  # visible directory entries
        self.durable_names: dict[str, _Inode] = {}  # durable directory entries


@dataclass(eq=False)
class Op:
    """One pending mutation.  ``repr`` and ``describe()`` are for humans.

    ``kind`` is write, truncate, create, mkdir, rename or remove.  For a write
    ``offset`` and ``data``; ``old_size`` is the file's visible size before
    it.  For a truncate ``old_size`` and ``new_size``.  For a rename ``path``
    is the source and ``dst`` the destination.
    """

    kind: str
    path: str
    offset: int = 0
    data: bytes = b""
    old_size: int = 0
    new_size: int = 0
    dst: str | None = None
    # the inode whose fsync (file) or fsync_dir (directory) makes this durable
    _home: Any = field(default=None, repr=False)
    _name: str = field(default="", repr=False)  # entry name in _home (the new name for rename)
    _child: Any = field(default=None, repr=False)  # the inode created/renamed/removed
    _src_dir: Any = field(default=None, repr=False)  # rename only
    _src_name: str = field(default="", repr=False)  # rename only

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    @property
    def grows(self) -> bool:
        """True for a write that extended the visible file."""
        return self.kind == "write" and self.end > self.old_size

    @property
    def sectors(self) -> int:
        """How many 512-byte sectors a write covers."""
        if self.kind != "write" or not self.data:
            return 0
        return (self.end - 1) // SECTOR - self.offset // SECTOR + 1

    def describe(self) -> str:
        if self.kind == "write":
            s = f"write {self.path} [{self.offset}, {self.end})"
            return s + (f" grows {self.old_size}->{self.end}" if self.grows else "")
        if self.kind == "truncate":
            return f"truncate {self.path} {self.old_size}->{self.new_size}"
        if self.kind == "rename":
            return f"rename {self.path} -> {self.dst}"
        return f"{self.kind} {self.path}"

    __repr__ = describe


@dataclass(frozen=True)
class Event:
    """What a hook sees before a mutation takes effect.

    ``kind``: write, truncate, fsync, fsync_dir, create, mkdir, rename, remove.
    ``path``: the file, directory, or rename source.  ``dst``: rename target.
    ``offset``/``data``: a write (``data`` as it will be written, after any
    short write).  ``length``: bytes written, or a truncate's new size.
    ``ops``: for fsync and fsync_dir, the pending ops about to become durable.
    ``datasync``: the fsync is an ``fdatasync`` (F1).
    """

    kind: str
    path: str
    offset: int | None = None
    data: bytes | None = None
    length: int | None = None
    dst: str | None = None
    ops: tuple[Op, ...] = ()
    datasync: bool = False


@dataclass(eq=False)
class Fault:
    """An armed error (see ``FaultFS.fail``); ``fired`` counts its errors."""

    op: str
    nth: int = 1
    every: bool = False
    errno_: int = errno.EIO
    path_contains: str | None = None
    seen: int = 0  # matching calls since armed
    fired: int = 0

    def _matches(self, kind: str, paths: tuple[str, ...]) -> bool:
        if self.op not in ("any", kind):
            return False
        return self.path_contains is None or any(self.path_contains in p for p in paths)

    def _fires(self) -> bool:
        self.seen += 1
        hit = self.seen == self.nth or (self.every and self.seen > self.nth)
        self.fired += hit
        return hit


@dataclass(eq=False)
class ShortWrite:
    """An armed short write (see ``FaultFS.short_write``)."""

    nth: int
    nbytes: int
    path_contains: str | None = None
    seen: int = 0
    fired: int = 0


# ---------------------------------------------------------------------------
# Crash plans.


class CrashPlan:
    """Base class of the plans ``FaultFS.crash`` accepts."""


@dataclass(frozen=True)
class DropAll(CrashPlan):
    """Keep no pending op: the durable image only."""


@dataclass(frozen=True)
class KeepAll(CrashPlan):
    """A process crash: the whole visible image survives."""


@dataclass(frozen=True)
class Prefix(CrashPlan):
    """Keep the first ``k`` pending ops."""

    k: int


@dataclass(frozen=True)
class OmitOne(CrashPlan):
    """Keep every pending op except op ``i``."""

    i: int


@dataclass(frozen=True)
class Subset(CrashPlan):
    """Keep exactly the pending ops at ``indices``."""

    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(sorted(set(self.indices))))


@dataclass(frozen=True)
class Torn(CrashPlan):
    """Keep ops before ``i``; write ``i`` reaches only its first ``sectors_kept``
    sectors, the others are ``fill``: "old", "zero" or "garbage"."""

    i: int
    sectors_kept: int
    fill: str = "old"

    def __post_init__(self) -> None:
        if self.fill not in FILLS:
            raise ValueError(f"Torn: fill must be one of {FILLS}, got {self.fill!r}")


@dataclass(frozen=True)
class GrownNotWritten(CrashPlan):
    """Keep ops before ``i``; write ``i`` grows the file but its bytes past the
    old end of file are ``fill``: "zero" or "garbage"."""

    i: int
    fill: str = "zero"

    def __post_init__(self) -> None:
        if self.fill not in ("zero", "garbage"):
            raise ValueError(f"GrownNotWritten: fill must be 'zero' or 'garbage', got {self.fill!r}")


PLAN_KINDS = (DropAll, KeepAll, Prefix, OmitOne, Torn, GrownNotWritten, Subset)


def all_subsets(n: int, seed: int = 0, sample: int = SUBSET_SAMPLE) -> list[Subset]:
    """Every subset of ``range(n)`` when ``n <= 10`` (2**n plans, in bitmask
    order), else ``sample`` distinct subsets drawn from ``Random(seed)``.

    >>> len(all_subsets(3)), all_subsets(2)[3]
    (8, Subset(indices=(0, 1)))
    """
    if n < 0:
        raise ValueError(f"all_subsets: n must be >= 0, got {n}")
    if n <= 10:
        masks: Iterable[int] = range(2**n)
    else:
        rng = random.Random(f"{seed}:subsets:{n}")
        chosen: dict[int, None] = {}  # insertion-ordered set
        while len(chosen) < min(sample, 2**n):
            chosen[rng.getrandbits(n)] = None
        masks = chosen
    return [Subset(tuple(i for i in range(n) if m >> i & 1)) for m in masks]


def _write_into(buf: bytearray, offset: int, data: bytes) -> None:
    if offset > len(buf):
        buf.extend(bytes(offset - len(buf)))
    buf[offset:offset + len(data)] = data


def _filler(fill: str, n: int, rng: random.Random) -> bytes:
    return bytes(n) if fill == "zero" else rng.randbytes(n)


# ---------------------------------------------------------------------------
# Files and locks.


class FaultFile(File):
    """An open file of a ``FaultFS``; all logic lives in the file system."""

    def __init__(self, fs: FaultFS, inode: _Inode, path: str) -> None:
        self.path = path
        self._fs = fs
        self._inode = inode
        self._closed = False

    def _pread(self, offset: int, size: int) -> bytes:
        return self._fs._file_pread(self, offset, size)

    def _pwrite(self, offset: int, data: memoryview) -> int:
        return self._fs._file_pwrite(self, offset, data)

    def _size(self) -> int:
        return self._fs._file_size(self)

    def _fsync(self) -> None:
        self._fs._file_fsync(self)

    def _fdatasync(self) -> None:
        self._fs._file_fsync(self, datasync=True)

    def _truncate(self, size: int) -> None:
        self._fs._file_truncate(self, size)

    def _close(self) -> None:
        self._fs._file_close(self)

    def __repr__(self) -> str:
        return f"<FaultFile {self.path}{' closed' if self._closed else ''}>"


class _FaultLock(FileLock):
    def __init__(self, fs: FaultFS, ino: int) -> None:
        self._fs = fs
        self._ino = ino

    def release(self) -> None:
        """Release the lock.  A no-op on a dead file system (the process died)."""
        with self._fs._mu:
            self._fs._locks.discard(self._ino)


# ---------------------------------------------------------------------------
# The file system.


class FaultFS(FileSystem):
    """In-memory, fault-injecting, deterministic file system (see module doc).

    ``dirs``: directories (with their parents) that exist durably from the
    start; "/" always does.  All state is guarded by ``self._mu``.
    """

    def __init__(self, seed: int = 0, dirs: Iterable[str] = ()) -> None:
        self.seed = seed
        self.counts: Counter[str] = Counter()  # raw calls by kind (an fdatasync: "fsync" and "fdatasync")
        self.io_points = 0  # I/O points passed so far
        self._mu = threading.RLock()
        self._next_ino = 0
        self._root = self._new_inode(is_dir=True)
        self._pending: list[Op] = []  # guarded by _mu
        self._hooks: list[Callable[[Event], None]] = []
        self._faults: list[Fault] = []
        self._shorts: list[ShortWrite] = []
        self._locks: set[int] = set()  # inode ids locked
        self._cut: str | None = None  # why the power is off, or None
        self._cut_at: int | None = None  # io_points value at which to cut
        for d in dirs:
            node = self._root
            for part in self._parts(d):
                child = node.names.get(part)
                if child is None:
                    child = self._new_inode(is_dir=True)
                    node.names[part] = node.durable_names[part] = child
                elif not child.is_dir:
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d)
                node = child

    # -- test controls -----------------------------------------------------

    @property
    def dead(self) -> bool:
        """True once the power was cut or ``crash()`` was called."""
        return self._cut is not None

    def crash_after(self, n: int | None) -> None:
        """Cut the power after ``n`` more I/O points (None disarms)."""
        with self._mu:
            if n is not None and n < 0:
                raise ValueError(f"crash_after: n must be >= 0, got {n}")
            self._cut_at = None if n is None else self.io_points + n

    def fail(self, op: str, nth: int | None = None, every: bool = False,
             errno_: int = errno.EIO, path_contains: str | None = None) -> Fault:
        """Make the ``nth`` (1-based, counted from now; default 1) raw call of
        kind ``op`` raise ``OSError(errno_)`` (E1-E3); with ``every=True``
        that call and every matching call after it (SQLite's "persistent").

        ``op``: write, fsync, fsync_dir, create, open, truncate, rename,
        remove, mkdir, read, or any.  ``path_contains`` restricts it to paths
        containing that string.  Returns the ``Fault``; its ``fired`` counts
        the errors raised.
        """
        if op not in FAULT_KINDS:
            raise ValueError(f"fail: unknown op {op!r}; expected one of {sorted(FAULT_KINDS)}")
        if nth is not None and nth < 1:
            raise ValueError(f"fail: nth is 1-based, got {nth}")
        fault = Fault(op, nth or 1, every, errno_, path_contains)
        with self._mu:
            self._faults.append(fault)
        return fault

    def short_write(self, nth: int, nbytes: int, path_contains: str | None = None) -> ShortWrite:
        """Make the ``nth`` raw write (1-based, from now) write only ``nbytes``
        bytes and return that count (E4)."""
        if nth < 1 or nbytes < 0:
            raise ValueError(f"short_write: need nth >= 1 and nbytes >= 0, got {nth}, {nbytes}")
        sw = ShortWrite(nth, nbytes, path_contains)
        with self._mu:
            self._shorts.append(sw)
        return sw

    def clear_faults(self) -> None:
        """Disarm every ``fail`` and ``short_write``."""
        with self._mu:
            self._faults.clear()
            self._shorts.clear()

    def add_hook(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn(event)`` before every mutation takes effect (see module doc)."""
        with self._mu:
            self._hooks.append(fn)

    def remove_hook(self, fn: Callable[[Event], None]) -> None:
        with self._mu:
            self._hooks.remove(fn)

    # -- inspection (works on a dead file system too) ----------------------

    def pending_ops(self) -> list[Op]:
        """The pending operations, oldest first."""
        with self._mu:
            return list(self._pending)

    def pending(self) -> list[str]:
        """Readable descriptions of the pending ops, numbered as plans number them."""
        with self._mu:
            return [f"{i}: {op.describe()}" for i, op in enumerate(self._pending)]

    def visible_bytes(self, path: str) -> bytes | None:
        """What a read of ``path`` returns, or None if it is no file."""
        with self._mu:
            node = self._walk(path, durable=False)
            return None if node is None or node.is_dir else bytes(node.data)

    def durable_bytes(self, path: str) -> bytes | None:
        """What ``path`` would hold after ``crash(DropAll())``, or None if its
        name is not durable."""
        with self._mu:
            node = self._walk(path, durable=True)
            return None if node is None or node.is_dir else bytes(node.durable)

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the visible image: path -> bytes."""
        with self._mu:
            return dict(self._files(durable=False))

    def durable_snapshot(self) -> dict[str, bytes]:
        """Every file of the durable image: path -> bytes."""
        with self._mu:
            return dict(self._files(durable=True))

    def plans(self, kinds: Iterable[type | str] | None = None, limit: int | None = None) -> list[CrashPlan]:
        """A deterministic list of crash plans for the current pending list.

        DropAll, KeepAll, Prefix(k) for 0 < k < n, OmitOne(i) for every i
        (when n > 1), Torn(i, k, fill) for each write over more than one sector
        with k in {1, sectors - 1} and every fill, GrownNotWritten(i, fill) for
        each write that grew its file, and ``all_subsets(n)``.  ``kinds``
        (plan classes or their names) keeps only those kinds; ``limit`` takes
        plans round-robin across kinds until it has that many.
        """
        with self._mu:
            ops = list(self._pending)
        n = len(ops)
        groups: dict[type, list[CrashPlan]] = {
            DropAll: [DropAll()],
            KeepAll: [KeepAll()],
            Prefix: [Prefix(k) for k in range(1, n)],
            OmitOne: [OmitOne(i) for i in range(n)] if n > 1 else [],
            Torn: [Torn(i, k, fill) for i, op in enumerate(ops) if op.sectors > 1
                   for fill in FILLS for k in sorted({1, op.sectors - 1})],
            GrownNotWritten: [GrownNotWritten(i, fill) for i, op in enumerate(ops) if op.grows
                              for fill in ("zero", "garbage")],
            Subset: list(all_subsets(n, self.seed)),
        }
        if kinds is not None:
            wanted = {k if isinstance(k, str) else k.__name__ for k in kinds}
            unknown = wanted - {k.__name__ for k in PLAN_KINDS}
            if unknown:
                raise ValueError(f"plans: unknown plan kinds {sorted(unknown)}")
            groups = {k: v for k, v in groups.items() if k.__name__ in wanted}
        if limit is None:
            return [p for plans in groups.values() for p in plans]
        out: list[CrashPlan] = []
        lists = [list(v) for v in groups.values()]
        depth = 0
        while len(out) < limit and any(depth < len(v) for v in lists):
            out.extend(v[depth] for v in lists if depth < len(v))
            depth += 1
        return out[:limit]

    def crash(self, plan: CrashPlan) -> FaultFS:
        """Cut the power (if not already cut) and return the file system a
        reboot would find under ``plan``.  This one is dead afterwards."""
        with self._mu:
            ops = self._pending
            n = len(ops)
            if isinstance(plan, KeepAll):
                root = self._rebuild(lambda ino: ino.data, lambda ino: ino.names)
            else:
                replay = _Replay()
                keep, last = self._choose(plan, n)
                for i in keep:
                    self._apply(ops[i], replay.data, replay.names)
                if last is not None:
                    self._apply_partial(ops[last], plan, replay.data)
                root = self._rebuild(replay.data, replay.names)
            if self._cut is None:
                self._cut = "crash() was called"
            new = FaultFS(seed=self.seed)
            new._root = root
            new._next_ino = self._next_ino
            if "skip_dir_fsync" in self.__dict__:
                new.skip_dir_fsync = self.skip_dir_fsync
            return new

    def _choose(self, plan: CrashPlan, n: int) -> tuple[Iterable[int], int | None]:
        """(ops kept whole, op applied partially) under ``plan``."""
        def check(i: int) -> int:
            if not 0 <= i < n:
                raise ValueError(f"{plan!r}: op index out of range, {n} ops pending")
            return i

        if isinstance(plan, DropAll):
            return (), None
        if isinstance(plan, Prefix):
            if not 0 <= plan.k <= n:
                raise ValueError(f"{plan!r}: k out of range, {n} ops pending")
            return range(plan.k), None
        if isinstance(plan, OmitOne):
            check(plan.i)
            return (i for i in range(n) if i != plan.i), None
        if isinstance(plan, Subset):
            return [check(i) for i in plan.indices], None
        if isinstance(plan, (Torn, GrownNotWritten)):
            op = self._pending[check(plan.i)]
            if op.kind != "write":
                raise ValueError(f"{plan!r}: op {plan.i} is {op.describe()!r}, not a write")
            if isinstance(plan, Torn) and not 0 <= plan.sectors_kept <= op.sectors:
                raise ValueError(f"{plan!r}: the write covers {op.sectors} sectors")
            return range(plan.i), plan.i
        raise TypeError(f"crash: not a crash plan: {plan!r}")

    # -- applying ops to an image ------------------------------------------

    @staticmethod
    def _apply(op: Op, data: Callable[[_Inode], bytearray],
               names: Callable[[_Inode], dict[str, _Inode]]) -> None:
        """Apply ``op`` to the image whose file bytes are ``data(inode)`` and
        whose directory entries are ``names(inode)`` (durable or replayed).

        A name op removes the old entry only if it still points at the op's
        inode, so replaying any subset in order is well defined.
        """
        if op.kind == "write":
            _write_into(data(op._home), op.offset, op.data)
        elif op.kind == "truncate":
            buf = data(op._home)
            if op.new_size < len(buf):
                del buf[op.new_size:]
            else:
                buf.extend(bytes(op.new_size - len(buf)))
        elif op.kind in ("create", "mkdir"):
            names(op._home)[op._name] = op._child
        elif op.kind == "remove":
            entries = names(op._home)
            if entries.get(op._name) is op._child:
                del entries[op._name]
        elif op.kind == "rename":
            entries = names(op._src_dir)
            if entries.get(op._src_name) is op._child:
                del entries[op._src_name]
            names(op._home)[op._name] = op._child
        else:  # pragma: no cover - ops are made only here
            raise AssertionError(op.kind)

    def _apply_partial(self, op: Op, plan: CrashPlan, data: Callable[[_Inode], bytearray]) -> None:
        buf = data(op._home)
        old_size = len(buf)
        rng = random.Random(f"{self.seed}:{plan!r}")
        if isinstance(plan, GrownNotWritten):
            _write_into(buf, op.offset, op.data)
            if op.end > old_size:
                buf[old_size:op.end] = _filler(plan.fill, op.end - old_size, rng)
            return
        assert isinstance(plan, Torn)
        first = op.offset // SECTOR * SECTOR
        kept_end = min(op.end, first + plan.sectors_kept * SECTOR)
        if plan.fill == "old":  # only a sector-aligned prefix of the write happened
            if kept_end > op.offset:
                _write_into(buf, op.offset, op.data[:kept_end - op.offset])
            return
        _write_into(buf, op.offset, op.data)
        lo = first + plan.sectors_kept * SECTOR
        hi = min(len(buf), (op.end + SECTOR - 1) // SECTOR * SECTOR)
        if hi > lo:
            buf[lo:hi] = _filler(plan.fill, hi - lo, rng)

    def _rebuild(self, data: Callable[[_Inode], bytearray],
                 names: Callable[[_Inode], dict[str, _Inode]]) -> _Inode:
        """A fresh, fully durable tree copied from the image rooted at root."""
        made: dict[int, _Inode] = {}

        def copy(node: _Inode, path: tuple[int, ...]) -> _Inode:
            if node.id in made:
                return made[node.id]
            new = made[node.id] = _Inode(node.id, node.is_dir)
            if node.is_dir:
                for name, child in names(node).items():
                    if child.id in path:  # a cycle only a strange replay can make: cut it
                        continue
                    new.names[name] = new.durable_names[name] = copy(child, path + (child.id,))
            else:
                new.data = bytearray(data(node))
                new.durable = bytearray(new.data)
            return new

        return copy(self._root, (self._root.id,))

    # -- path helpers (caller holds _mu) ----------------------------------

    def _new_inode(self, is_dir: bool) -> _Inode:
        self._next_ino += 1
        return _Inode(self._next_ino, is_dir)

    @staticmethod
    def _norm(path: str) -> str:
        return os.path.abspath(os.fspath(path))

    @classmethod
    def _parts(cls, path: str) -> list[str]:
        return [p for p in cls._norm(path).split("/") if p]

    def _walk(self, path: str, durable: bool) -> _Inode | None:
        node = self._root
        for part in self._parts(path):
            if not node.is_dir:
                return None
            child = (node.durable_names if durable else node.names).get(part)
            if child is None:
                return None
            node = child
        return node

    def _resolve(self, path: str) -> _Inode:
        """The visible inode at ``path``; raises like ``os``."""
        node = self._root
        for part in self._parts(path):
            if not node.is_dir:
                raise _oserror(errno.ENOTDIR, path)
            child = node.names.get(part)
            if child is None:
                raise _oserror(errno.ENOENT, path)
            node = child
        return node

    def _parent(self, path: str, root_errno: int) -> tuple[_Inode, str]:
        """(directory inode, entry name) for ``path``."""
        norm = self._norm(path)
        head, name = os.path.split(norm)
        if not name:
            raise _oserror(root_errno, path)
        parent = self._resolve(head)
        if not parent.is_dir:
            raise _oserror(errno.ENOTDIR, path)
        return parent, name

    def _files(self, durable: bool) -> Iterator[tuple[str, bytes]]:
        def walk(node: _Inode, prefix: str) -> Iterator[tuple[str, bytes]]:
            entries = node.durable_names if durable else node.names
            for name in sorted(entries):
                child = entries[name]
                path = prefix + "/" + name
                if child.is_dir:
                    yield from walk(child, path)
                else:
                    yield path, bytes(child.durable if durable else child.data)

        return walk(self._root, "")

    # -- the gate every call passes (caller holds _mu) ---------------------

    def _enter(self, kind: str, io: bool = False) -> None:
        """Count a raw call; raise PowerCut if the power is (or now goes) off."""
        if self._cut is not None:
            raise PowerCut(f"the power was cut: {self._cut}")
        if io:
            if self._cut_at is not None and self.io_points >= self._cut_at:
                self._cut = f"crash_after: cut before I/O point {self.io_points} ({kind})"
                raise PowerCut(f"the power was cut: {self._cut}")
            self.io_points += 1
        self.counts[kind] += 1

    def _inject(self, kind: str, *paths: str) -> None:
        """Raise an armed fault for this call, if one fires (E1)."""
        for fault in self._faults:
            if fault._matches(kind, paths) and fault._fires():
                code = fault.errno_
                raise OSError(code, f"{os.strerror(code)} (injected: {kind} #{fault.seen})", paths[0])

    def _hook(self, event: Event) -> None:
        for fn in list(self._hooks):
            try:
                fn(event)
            except PowerCut as e:
                self._cut = self._cut or f"a hook cut the power at {event.kind} {event.path}: {e}"
                raise

    def _push(self, op: Op) -> None:
        self._pending.append(op)

    # -- FileSystem raw calls ----------------------------------------------

    def _open(self, path: str, create: bool) -> File:
        with self._mu:
            norm = self._norm(path)
            if create:
                node = self._create(norm, "create", is_dir=False)
            else:
                self._enter("open")
                self._inject("open", norm)
                node = self._resolve(norm)
                if node.is_dir:
                    raise _oserror(errno.EISDIR, path)
            return FaultFile(self, node, norm)

    def _create(self, norm: str, kind: str, is_dir: bool) -> _Inode:
        self._enter(kind, io=True)
        self._inject(kind, norm)
        parent, name = self._parent(norm, errno.EEXIST)
        if name in parent.names:
            raise _oserror(errno.EEXIST, norm)
        self._hook(Event(kind, norm))
        child = self._new_inode(is_dir)
        parent.names[name] = child
        self._push(Op(kind, norm, _home=parent, _name=name, _child=child))
        return child

    def _mkdir(self, path: str) -> None:
        with self._mu:
            self._create(self._norm(path), "mkdir", is_dir=True)

    def _rename(self, src: str, dst: str) -> None:
        with self._mu:
            src, dst = self._norm(src), self._norm(dst)
            self._enter("rename", io=True)
            self._inject("rename", src, dst)
            sdir, sname = self._parent(src, errno.EBUSY)
            child = sdir.names.get(sname)
            if child is None:
                raise _oserror(errno.ENOENT, src)
            ddir, dname = self._parent(dst, errno.EBUSY)
            existing = ddir.names.get(dname)
            if existing is child:
                return  # same file: rename(2) does nothing
            if child.is_dir:
                if existing is not None and not existing.is_dir:
                    raise _oserror(errno.ENOTDIR, dst)
                if existing is not None and existing.names:
                    raise _oserror(errno.ENOTEMPTY, dst)
                if any(node is child for node in self._chain(dst)):
                    raise _oserror(errno.EINVAL, dst)
            elif existing is not None and existing.is_dir:
                raise _oserror(errno.EISDIR, dst)
            self._hook(Event("rename", src, dst=dst))
            del sdir.names[sname]
            ddir.names[dname] = child
            self._push(Op("rename", src, dst=dst, _home=ddir, _name=dname, _child=child,
                          _src_dir=sdir, _src_name=sname))

    def _chain(self, path: str) -> list[_Inode]:
        """The visible inodes from the root down to ``path``'s parent."""
        node, out = self._root, [self._root]
        for part in self._parts(path)[:-1]:
            node = node.names[part]
            out.append(node)
        return out

    def _remove(self, path: str) -> None:
        with self._mu:
            norm = self._norm(path)
            self._enter("remove", io=True)
            self._inject("remove", norm)
            parent, name = self._parent(norm, errno.EBUSY)
            child = parent.names.get(name)
            if child is None:
                raise _oserror(errno.ENOENT, path)
            if child.is_dir:
                raise _oserror(errno.EISDIR, path)
            self._hook(Event("remove", norm))
            del parent.names[name]
            self._push(Op("remove", norm, _home=parent, _name=name, _child=child))

    def _fsync_dir(self, path: str) -> None:
        with self._mu:
            norm = self._norm(path)
            self._enter("fsync_dir", io=True)
            self._inject("fsync_dir", norm)  # E3: the name ops stay pending
            node = self._resolve(norm)
            if not node.is_dir:
                raise _oserror(errno.ENOTDIR, path)
            self._make_durable(node, "fsync_dir", norm)

    def _make_durable(self, home: _Inode, kind: str, path: str, datasync: bool = False) -> None:
        """Apply and unqueue the pending ops of ``home`` (F1, F2).  A file is
        home only to writes and truncates, a directory only to name ops."""
        mine = [op for op in self._pending if op._home is home]
        self._hook(Event(kind, path, ops=tuple(mine), datasync=datasync))
        for op in mine:
            self._apply(op, lambda ino: ino.durable, lambda ino: ino.durable_names)
        chosen = set(map(id, mine))
        self._pending = [op for op in self._pending if id(op) not in chosen]

    def _exists(self, path: str) -> bool:
        with self._mu:
            self._enter("exists")
            return self._walk(path, durable=False) is not None

    def _is_dir(self, path: str) -> bool:
        with self._mu:
            self._enter("is_dir")
            node = self._walk(path, durable=False)
            return node is not None and node.is_dir

    def _listdir(self, path: str) -> list[str]:
        with self._mu:
            self._enter("listdir")
            node = self._resolve(path)
            if not node.is_dir:
                raise _oserror(errno.ENOTDIR, path)
            return list(node.names)

    def _lock(self, path: str) -> FileLock:
        with self._mu:
            norm = self._norm(path)
            self._enter("lock")
            node = self._walk(norm, durable=False)
            if node is None:  # created if missing, like O_CREAT (no dir fsync)
                node = self._create(norm, "create", is_dir=False)
            if node.is_dir:
                raise _oserror(errno.EISDIR, path)
            if node.id in self._locks:
                raise BlockingIOError(errno.EWOULDBLOCK, f"{norm} is locked by this process")
            self._locks.add(node.id)
            return _FaultLock(self, node.id)

    # -- File raw calls ------------------------------------------------------

    def _open_file(self, f: FaultFile, kind: str, io: bool = False) -> _Inode:
        self._enter(kind, io)
        if f._closed:
            raise _oserror(errno.EBADF, f.path)
        return f._inode

    def _file_pread(self, f: FaultFile, offset: int, size: int) -> bytes:
        with self._mu:
            node = self._open_file(f, "read")
            self._inject("read", f.path)
            return bytes(node.data[offset:offset + size])

    def _file_pwrite(self, f: FaultFile, offset: int, data: memoryview) -> int:
        with self._mu:
            node = self._open_file(f, "write", io=True)
            self._inject("write", f.path)
            chunk = bytes(data)
            for sw in self._shorts:
                if sw.path_contains is None or sw.path_contains in f.path:
                    sw.seen += 1
                    if sw.seen == sw.nth:
                        sw.fired += 1
                        chunk = chunk[:sw.nbytes]
            if not chunk:
                return 0
            self._hook(Event("write", f.path, offset=offset, data=chunk, length=len(chunk)))
            old_size = len(node.data)
            _write_into(node.data, offset, chunk)
            self._push(Op("write", f.path, offset=offset, data=chunk, old_size=old_size, _home=node))
            return len(chunk)

    def _file_size(self, f: FaultFile) -> int:
        with self._mu:
            return len(self._open_file(f, "size").data)

    def _file_truncate(self, f: FaultFile, size: int) -> None:
        with self._mu:
            node = self._open_file(f, "truncate", io=True)
            self._inject("truncate", f.path)
            self._hook(Event("truncate", f.path, length=size))
            op = Op("truncate", f.path, old_size=len(node.data), new_size=size, _home=node)
            self._apply(op, lambda ino: ino.data, lambda ino: ino.names)
            self._push(op)

    def _file_fsync(self, f: FaultFile, datasync: bool = False) -> None:
        """``fsync``, or ``fdatasync`` when ``datasync``: the same (F1)."""
        with self._mu:
            node = self._open_file(f, "fsync", io=True)
            if datasync:
                self.counts["fdatasync"] += 1
            try:
                self._inject("fsync", f.path)
            except OSError:  # E2: the kernel forgets the dirty data for good
                self._pending = [op for op in self._pending if not (op._home is node and op.kind in DATA_OPS)]
                raise
            self._make_durable(node, "fsync", f.path, datasync)

    def _file_close(self, f: FaultFile) -> None:
        with self._mu:
            self._enter("close")
            f._closed = True

    # -- invariants --------------------------------------------------------

    def _check(self) -> None:
        """Raise AssertionError if an internal invariant is broken."""
        with self._mu:
            for op in self._pending:
                assert op.kind in IO_KINDS - {"fsync", "fsync_dir"}, op
                assert op._home is not None and op._home.is_dir == (op.kind not in DATA_OPS), op
            seen: set[int] = set()
            stack = [self._root]
            while stack:  # the visible tree is a tree
                node = stack.pop()
                assert node.id not in seen, f"inode {node.id} reachable twice"
                seen.add(node.id)
                stack.extend(c for c in node.names.values() if c.is_dir)

    def __repr__(self) -> str:
        state = f"dead ({self._cut})" if self._cut else f"{len(self._pending)} pending"
        return f"<FaultFS seed={self.seed} io_points={self.io_points} {state}>"


class _Replay:
    """A scratch image for ``crash``: the durable image, copied on first touch."""

    def __init__(self) -> None:
        self._data: dict[int, bytearray] = {}
        self._names: dict[int, dict[str, _Inode]] = {}

    def data(self, ino: _Inode) -> bytearray:
        if ino.id not in self._data:
            self._data[ino.id] = bytearray(ino.durable)
        return self._data[ino.id]

    def names(self, ino: _Inode) -> dict[str, _Inode]:
        if ino.id not in self._names:
            self._names[ino.id] = dict(ino.durable_names)
        return self._names[ino.id]


def _oserror(code: int, path: str) -> OSError:
    """``OSError(code)`` -- Python picks the subclass (FileNotFoundError, ...)."""
    return OSError(code, os.strerror(code), os.fspath(path))
