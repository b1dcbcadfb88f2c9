"""What a failed fsync leaves behind, and how the next open undoes it.

When ``fsync`` (or ``fdatasync``) fails, Linux reports the error once and
marks the file's dirty pages clean: the data may never reach the disk, yet
the page cache still shows it, and a later fsync of the same file succeeds
without writing it.  A store that is reopened in the same boot (no power cut
in between) would read that tail, treat it as durable, append after it and
fsync -- and a power cut then leaves a hole below records it acknowledged.

So a failed fsync of a database file leaves a marker next to it,
``<name>.fsync-failed``.  The marker is an empty file whose name is all it
says, and it needs no fsync: if the power fails, the page cache it guards is
gone with it, and whatever the disk holds is what recovery reads anyway.  The
next open that finds a marker first rewrites the file into a new one
(``<name>.rewrite``: written, fsynced, renamed over the old name, directory
fsynced), so every byte the page cache shows is on the disk before anything
trusts it; only then is the marker removed.  A crash during the rewrite
leaves the old file (the rename is atomic) and perhaps a stale
``.rewrite``, which the next open removes.

Records that the failed fsync covered become durable this way, although the
commit that waited for them was told it failed: like a commit whose fsync
failed in SQLite or PostgreSQL, its outcome is unknown to the caller, and
either outcome is consistent.

Creating the marker is best effort: if even that fails (the file system is
gone), the error is logged, and the store is poisoned all the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

MARKER_SUFFIX = ".fsync-failed"
REWRITE_SUFFIX = ".rewrite"
_CHUNK = 1 << 20

log = logging.getLogger("kvstore")


def fsync(fs: Any, f: Any, path: str, *, datasync: bool = False) -> None:
    """``f.fsync()`` (``f.fdatasync()`` if ``datasync``); if it fails, leave
    the marker for ``path`` and raise.  A failed fdatasync leaves the page
    cache exactly as a failed fsync does, so it is marked alike."""
    try:
        if datasync:
            f.fdatasync()
        else:
            f.fsync()
    except OSError:
        note(fs, path)
        raise


def note(fs: Any, path: str) -> None:
    """Leave the marker saying an fsync of ``path`` failed.  Never raises."""
    marker = path + MARKER_SUFFIX
    try:
        if not fs.exists(marker):
            fs.create(marker).close()
    except OSError as e:
        if fs.exists(marker):
            return  # the name is there for this boot, which is all it is for
        log.error("kvstore: an fsync of %s failed and the marker %s could not be made: %s", path, marker, e)
        return
    log.error("kvstore: an fsync of %s failed; the next open rewrites it before trusting it", path)


def is_marker_or_rewrite(name: str) -> bool:
    """Whether ``name`` is one of this module's files (for directory checks)."""
    return name.endswith(MARKER_SUFFIX) or name.endswith(REWRITE_SUFFIX)


def repair(fs: Any, directory: str, owns: Callable[[str], bool]) -> list[str]:
    """Rewrite every file in ``directory`` that has a marker and whose name
    ``owns`` accepts, then remove the marker; remove stale rewrites.  Returns
    the names rewritten.  Raises OSError if a rewrite fails (the file and its
    marker stay as they were, so the next open tries again)."""
    rewritten = []
    for name in fs.listdir(directory):
        if name.endswith(REWRITE_SUFFIX) and owns(name[: -len(REWRITE_SUFFIX)]):
            fs.remove(os.path.join(directory, name))  # a rewrite a crash interrupted
    for name in fs.listdir(directory):
        if not name.endswith(MARKER_SUFFIX) or not owns(name[: -len(MARKER_SUFFIX)]):
            continue
        target = os.path.join(directory, name[: -len(MARKER_SUFFIX)])
        if fs.exists(target):
            _rewrite(fs, target)
            rewritten.append(os.path.basename(target))
            log.warning("kvstore: rewrote %s after a failed fsync, so that what it holds is durable", target)
        fs.remove(os.path.join(directory, name))
    return rewritten


def _rewrite(fs: Any, path: str) -> None:
    tmp = path + REWRITE_SUFFIX
    src = fs.open(path)
    try:
        out = fs.create(tmp)
        try:
            size = src.size()
            for offset in range(0, size, _CHUNK):
                out.pwrite(offset, src.pread(offset, min(_CHUNK, size - offset)))
            out.fsync()
        finally:
            out.close()
    finally:
        src.close()
    fs.rename(tmp, path)  # durable: the seam fsyncs the directory after a rename
