"""The file-system seam: every byte kvstore reads or writes passes through here.

This module is the only engine module that calls ``os`` file functions
(``tests/test_seam.py`` fails otherwise).  The engine receives a
``FileSystem`` object and never touches ``os`` itself, so tests can swap in
``pages.faultfs.FaultFS``, which simulates power cuts and I/O errors.

Interface
---------
``FileSystem``: ``open(path)``, ``create(path)``, ``exists``, ``is_dir``,
``listdir``, ``mkdir``, ``rename``, ``remove``, ``fsync_dir``, ``lock``.
``File``: ``pread``, ``pwrite``, ``size``, ``fsync``, ``fdatasync``,
``truncate``, ``close``.

``fsync`` makes a file's data and metadata durable; ``fdatasync`` its data
and the metadata needed to read it back -- on Linux that includes the file
size whenever it changed (a grown or truncated file), but not the times, so
an overwrite of already allocated, already durable-sized space costs no
journal commit.  Where the platform has no ``fdatasync`` it is an ``fsync``.

The durability rules live in this base class, so every implementation keeps
them the same way (the subclasses supply only the raw ``_``-prefixed calls):

S1. ``File.pwrite`` loops until every byte is written: a short write from the
    OS is continued, never mistaken for success.
S2. ``create``, ``mkdir``, ``rename`` and ``remove`` fsync the parent directory
    before they return, so the name change is durable (the ALICE study's most
    common crash bug is forgetting this).
S3. Nothing here retries a failed ``fsync`` (or ``fdatasync``).  After an
    fsync error the kernel may have dropped the dirty pages and will report
    success next time; the caller must treat the error as final (the WAL and
    page file poison themselves).
S4. No mmap, no buffered file objects: raw descriptors, ``os.pread`` and
    ``os.pwrite`` (or their portable stand-ins, below).

Portability
-----------
``OsFileSystem`` needs five things that are POSIX-only or Windows-only.
Each has one fallback, and the whole choice is made in
``OsFileSystem.__init__``:

=====================  ============================  =======================================
facility               POSIX                         fallback
=====================  ============================  =======================================
positioned read/write  ``os.pread``, ``os.pwrite``   ``os.lseek`` then ``os.read`` /
                                                     ``os.write`` under the file's mutex
                                                     (``_SeekingFile``)
the lock file          ``fcntl.flock``               ``msvcrt.locking(fd, LK_NBLCK, 1)``
                                                     after seeking to 0, ``LK_UNLCK`` on
                                                     release (``_MsvcrtFileLock``)
directory fsync (S2)   open the directory, fsync     skipped, in ``_fsync_dir`` and nowhere
                                                     else: Windows cannot open a directory
data-only sync         ``os.fdatasync``              ``os.fsync`` (macOS and Windows have no
                                                     ``os.fdatasync``)
binary mode            --                            ``os.O_BINARY`` wherever it exists
=====================  ============================  =======================================

The switch is ``OsFileSystem(portable=...)``:

- ``False``: each POSIX call where the platform has it, the fallback only
  where it does not (no ``os.pread``, no ``fcntl``, ``os.name == "nt"``).
- ``True``: every fallback, even where the POSIX call exists, so that Linux
  runs the code Windows runs (``tests/test_portability.py``).  The lock
  fallback needs a ``msvcrt`` module; where there is none (every POSIX
  system) the lock stays ``flock`` -- the tests inject a stand-in
  ``msvcrt`` to run that path.
- ``None``, the default and what ``kvstore.open`` uses: ``True`` if the
  environment variable ``KVSTORE_PORTABLE`` is ``1`` (any value but empty
  or ``0``), else ``False``.

On POSIX, portable mode gives up the directory fsyncs, so a power cut may
lose a file just created or renamed: it is for testing, not production.
``fs.calls`` says what an instance uses, and ``fs.datasync_call`` which
call ``File.fdatasync`` makes:

    >>> OsFileSystem(portable=True).calls["positioned_io"]
    'lseek+read/write'
    >>> OsFileSystem(portable=True).calls["dir_fsync"]
    'skipped'
    >>> OsFileSystem(portable=True).datasync_call
    'fsync'

Example:

    >>> import tempfile, os.path
    >>> fs = OsFileSystem()
    >>> d = tempfile.mkdtemp()
    >>> f = fs.create(os.path.join(d, "x"))
    >>> f.pwrite(0, b"hello")
    >>> f.fsync()
    >>> f.pwrite(0, b"j")
    >>> f.fdatasync()
    >>> f.pread(1, 3)
    b'ell'
    >>> f.size()
    5
    >>> f.close()
    >>> fs.listdir(d)
    ['x']
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

from wal import canary

__all__ = ["File", "FileSystem", "OsFileSystem", "FileLock", "PORTABLE_ENV"]


class File:
    """An open file.  Subclasses implement the raw calls."""

    path: str

    def pread(self, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (fewer only at end of file)."""
        if offset < 0 or size < 0:
            raise ValueError(f"pread: offset and size must be >= 0, got {offset}, {size}")
        parts = []
        while size > 0:
            chunk = self._pread(offset, size)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` (S1: loops over short writes)."""
        if offset < 0:
            raise ValueError(f"pwrite: offset must be >= 0, got {offset}")
        view = memoryview(data)
        while view:
            n = self._pwrite(offset, view)
            if n <= 0:
                raise OSError(errno.EIO, f"pwrite wrote nothing to {self.path}")
            offset += n
            view = view[n:]

    def size(self) -> int:
        """The current size of the file in bytes."""
        return self._size()

    def fsync(self) -> None:
        """Make the file's data durable.  Never retry after an error (S3)."""
        self._fsync()

    def fdatasync(self) -> None:
        """Make the file's data durable, and its size, but not necessarily
        its other metadata (times).  Never retry after an error (S3).

        Cheaper than ``fsync`` for an overwrite of space the file already
        has durably; an ``fsync`` where the platform has nothing cheaper.
        """
        self._fdatasync()

    def truncate(self, size: int) -> None:
        """Cut or extend the file to ``size`` bytes (call fsync to make it durable)."""
        if size < 0:
            raise ValueError(f"truncate: size must be >= 0, got {size}")
        self._truncate(size)

    def close(self) -> None:
        """Close the file; later calls fail."""
        self._close()

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # raw calls, supplied by the implementation
    def _pread(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def _pwrite(self, offset: int, data: memoryview) -> int:
        raise NotImplementedError

    def _size(self) -> int:
        raise NotImplementedError

    def _fsync(self) -> None:
        raise NotImplementedError

    def _fdatasync(self) -> None:
        self._fsync()  # an implementation without a data-only sync does the full one

    def _truncate(self, size: int) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class FileLock:
    """An exclusive lock on a file, held until ``release()``."""

    def release(self) -> None:
        """Release the lock."""

    def forget_in_child(self) -> None:
        """In a forked child: drop the inherited handle without unlocking
        (the lock belongs to the parent)."""


class FileSystem:
    """The seam.  Subclasses implement the raw calls; the durability rules
    (S2) are kept here so that every implementation keeps them alike."""

    #: Test-only canary switch: skip the directory fsync of S2.
    skip_dir_fsync = False

    def open(self, path: str) -> File:
        """Open an existing file for reading and writing.

        Raises FileNotFoundError if it does not exist.
        """
        return self._open(path, create=False)

    def create(self, path: str) -> File:
        """Create a new, empty file and make its name durable (S2).

        Raises FileExistsError if it exists.
        """
        f = self._open(path, create=True)
        try:
            self._after_name_change(path)
        except BaseException:
            f.close()
            raise
        return f

    def mkdir(self, path: str) -> None:
        """Create a directory and make its name durable (S2)."""
        self._mkdir(path)
        self._after_name_change(path)

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst`` (replacing it) durably (S2)."""
        self._rename(src, dst)
        self._after_name_change(dst)
        if os.path.dirname(src) != os.path.dirname(dst):
            self._after_name_change(src)

    def remove(self, path: str) -> None:
        """Remove a file durably (S2)."""
        self._remove(path)
        self._after_name_change(path)

    def rmdir(self, path: str) -> None:
        """Remove an empty directory durably (S2)."""
        self._rmdir(path)
        self._after_name_change(path)

    def fsync_dir(self, path: str) -> None:
        """Make the names in directory ``path`` durable."""
        self._fsync_dir(path)

    def exists(self, path: str) -> bool:
        return self._exists(path)

    def is_dir(self, path: str) -> bool:
        return self._is_dir(path)

    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path``, sorted."""
        return sorted(self._listdir(path))

    def lock(self, path: str) -> FileLock:
        """Take an exclusive lock on the file ``path`` (created if missing).

        Raises BlockingIOError at once if somebody holds it.
        """
        return self._lock(path)

    def _after_name_change(self, path: str) -> None:
        if not (self.skip_dir_fsync or canary.skip_dir_fsync):
            self._fsync_dir(os.path.dirname(os.path.abspath(path)) or "/")

    # raw calls, supplied by the implementation
    def _open(self, path: str, create: bool) -> File:
        raise NotImplementedError

    def _mkdir(self, path: str) -> None:
        raise NotImplementedError

    def _rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def _remove(self, path: str) -> None:
        raise NotImplementedError

    def _fsync_dir(self, path: str) -> None:
        raise NotImplementedError

    def _rmdir(self, path: str) -> None:
        raise NotImplementedError

    def _exists(self, path: str) -> bool:
        raise NotImplementedError

    def _is_dir(self, path: str) -> bool:
        raise NotImplementedError

    def _listdir(self, path: str) -> list[str]:
        raise NotImplementedError

    def _lock(self, path: str) -> FileLock:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# The real implementation over os.

#: The environment variable that selects the portable fallbacks when
#: ``OsFileSystem(portable=None)`` (see "Portability" above).
PORTABLE_ENV = "KVSTORE_PORTABLE"

#: Whether this platform has ``os.fdatasync`` (Linux and most POSIX systems;
#: not macOS, not Windows).
HAS_FDATASYNC = hasattr(os, "fdatasync")

#: Whether this platform can open a directory to fsync it.  Windows cannot
#: (``os.open`` of a directory raises PermissionError).
CAN_FSYNC_DIRECTORIES = os.name != "nt"

#: The lock file's locked region under msvcrt: one byte at offset 0 (the file
#: is empty; a region may extend past the end of a file).
LOCK_BYTES = 1

#: What ``msvcrt.locking(..., LK_NBLCK, ...)`` raises when another handle
#: holds the region: EACCES (the C runtime's locking violation); EDEADLOCK is
#: what its retrying modes give up with.
_LOCKED_ERRNOS = frozenset({errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK), errno.EDEADLK})


def _fcntl_module() -> Any:
    """``fcntl``, or None where it does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


def _msvcrt_module() -> Any:
    """``msvcrt``, or None where it does not exist (everywhere but Windows)."""
    try:
        import msvcrt
    except ImportError:
        return None
    return msvcrt


def portable_from_environment() -> bool:
    """True if ``$KVSTORE_PORTABLE`` asks for the portable fallbacks.

    ``1`` (or any value but empty and ``0``) means yes.
    """
    return os.environ.get(PORTABLE_ENV, "") not in ("", "0")


class _OsFile(File):
    """A file over a raw descriptor, with ``os.pread``/``os.pwrite``.
    ``datasync``: ``fdatasync`` calls ``os.fdatasync`` (else ``os.fsync``)."""

    __slots__ = ("path", "_fd", "_datasync")

    def __init__(self, path: str, fd: int, datasync: bool = HAS_FDATASYNC) -> None:
        self.path = path
        self._fd = fd
        self._datasync = datasync

    def _pread(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def _pwrite(self, offset: int, data: memoryview) -> int:
        return os.pwrite(self._fd, data, offset)

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def _fsync(self) -> None:
        os.fsync(self._fd)

    def _fdatasync(self) -> None:
        if self._datasync:
            os.fdatasync(self._fd)
        else:
            os.fsync(self._fd)  # the fallback of "Portability"

    def _truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _SeekingFile(_OsFile):
    """Positioned I/O without ``os.pread``/``os.pwrite``: seek, then read or
    write.  A descriptor has one file offset, so the seek and the transfer
    happen under the file's mutex, or another thread could move the offset
    between them (the engine reads one file from many threads)."""

    __slots__ = ("_mutex",)

    def __init__(self, path: str, fd: int, datasync: bool = HAS_FDATASYNC) -> None:
        super().__init__(path, fd, datasync)
        self._mutex = threading.Lock()  # guards the descriptor's file offset

    def _pread(self, offset: int, size: int) -> bytes:
        with self._mutex:
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, size)

    def _pwrite(self, offset: int, data: memoryview) -> int:
        with self._mutex:
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.write(self._fd, data)


class _OsFileLock(FileLock):
    """An ``fcntl.flock`` lock: it belongs to the open file description and
    goes when the last descriptor of it closes (or the process dies)."""

    def __init__(self, fd: int, key: tuple[int, int], owner: OsFileSystem) -> None:
        self._fd = fd
        self._key = key
        self._owner = owner

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with OsFileSystem._locks_guard:
                OsFileSystem._held.discard(self._key)
            os.close(fd)  # closing the descriptor drops the flock

    def forget_in_child(self) -> None:
        # flock belongs to the open file description the parent shares: closing
        # our copy of the descriptor leaves the parent's lock in place.
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _MsvcrtFileLock(_OsFileLock):
    """A ``msvcrt.locking`` lock on ``LOCK_BYTES`` at offset 0.  The region
    is unlocked before the descriptor closes: Windows frees the locks of a
    closed handle only "when resources allow", and a reopen must not race
    that."""

    def __init__(self, fd: int, key: tuple[int, int], owner: OsFileSystem, msvcrt: Any) -> None:
        super().__init__(fd, key, owner)
        self._msvcrt = msvcrt

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.lseek(self._fd, 0, os.SEEK_SET)
                self._msvcrt.locking(self._fd, self._msvcrt.LK_UNLCK, LOCK_BYTES)
            except OSError:
                pass  # closing the handle below frees the region too, only later
            super().release()


class OsFileSystem(FileSystem):
    """The real file system: raw descriptors, pread/pwrite, fsync.

    ``portable`` selects the fallbacks of "Portability" in the module
    docstring: True uses all of them, False only those the platform needs,
    None (the default) reads ``$KVSTORE_PORTABLE``.  ``calls`` says what
    this instance uses.
    """

    _locks_guard = threading.Lock()
    _held: set[tuple[int, int]] = set()  # (st_dev, st_ino) of lock files held by this process

    def __init__(self, portable: bool | None = None) -> None:
        self.portable = portable_from_environment() if portable is None else bool(portable)
        # O_BINARY where it exists (Windows translates line ends otherwise),
        # O_CLOEXEC where it exists (Windows descriptors are not inherited
        # anyway, PEP 446)
        self._flags = os.O_RDWR | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        self._positioned_io = not self.portable and hasattr(os, "pread") and hasattr(os, "pwrite")
        self._dir_fsync = not self.portable and CAN_FSYNC_DIRECTORIES
        self._datasync = not self.portable and HAS_FDATASYNC
        self._fcntl = _fcntl_module()
        # msvcrt where there is no fcntl, or when portable and msvcrt exists
        # (not looked for otherwise: a failed import costs ~0.1 ms an open)
        self._msvcrt = _msvcrt_module() if self.portable or self._fcntl is None else None
        self._file_class = _OsFile if self._positioned_io else _SeekingFile
        #: What this instance uses for each facility of "Portability".
        self.calls = {
            "positioned_io": "pread/pwrite" if self._positioned_io else "lseek+read/write",
            "lock": "msvcrt" if self._msvcrt is not None else "flock" if self._fcntl is not None else "none",
            "dir_fsync": "fsync" if self._dir_fsync else "skipped",
        }
        #: What ``File.fdatasync`` calls: "fdatasync", or "fsync" where the
        #: platform has no data-only sync, or in portable mode.
        self.datasync_call = "fdatasync" if self._datasync else "fsync"

    @classmethod
    def forget_locks_in_child(cls) -> None:
        """After fork, in the child: the parent's locks are not the child's."""
        cls._locks_guard = threading.Lock()
        cls._held = set()

    def _open(self, path: str, create: bool) -> File:
        flags = self._flags
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags, 0o644)
        return self._file_class(path, fd, self._datasync)

    def _mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def _rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _remove(self, path: str) -> None:
        os.remove(path)

    def _rmdir(self, path: str) -> None:
        os.rmdir(path)

    def _fsync_dir(self, path: str) -> None:
        if not self._dir_fsync:
            return  # the one place directory fsyncs are skipped (Windows, or portable)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _exists(self, path: str) -> bool:
        return os.path.exists(path)

    def _is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def _listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def _lock(self, path: str) -> FileLock:
        fd = os.open(path, self._flags | os.O_CREAT, 0o644)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with self._locks_guard:
                if canary.second_open and self._fcntl is not None:
                    # the bug: per-process POSIX locks, no in-process set
                    self._fcntl.lockf(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
                    return _OsFileLock(fd, key, self)
                if key in self._held:
                    raise BlockingIOError(errno.EWOULDBLOCK, f"{path} is locked by this process")
                # flock and msvcrt locks belong to the descriptor, so a second
                # open in this same process conflicts too; the set above makes
                # that explicit and independent of the platform's lock flavour.
                lock = self._lock_descriptor(path, fd, key)
                self._held.add(key)
        except BaseException:
            os.close(fd)
            raise
        return lock

    def _lock_descriptor(self, path: str, fd: int, key: tuple[int, int]) -> FileLock:
        """Lock the open lock file ``fd`` with the OS, or raise BlockingIOError."""
        if self._msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)  # the region starts at the file offset
            try:
                self._msvcrt.locking(fd, self._msvcrt.LK_NBLCK, LOCK_BYTES)
            except OSError as e:
                if e.errno in _LOCKED_ERRNOS:
                    raise BlockingIOError(errno.EWOULDBLOCK, f"{path} is locked by another process") from e
                raise
            return _MsvcrtFileLock(fd, key, self, self._msvcrt)
        if self._fcntl is not None:
            self._fcntl.flock(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
            return _OsFileLock(fd, key, self)
        raise OSError(errno.ENOSYS, f"cannot lock {path}: this platform has neither fcntl nor msvcrt")
