"""Test-only switches that re-create known bug classes (TESTING.md, section 8).

Each switch, when true, makes the engine commit one classic storage bug.  The
reliability suite turns them on one at a time and requires its checks to
catch every one ("k/k caught"); that is how we know the checks can fail.
They are plain module attributes, read where the bug would be, and all false
unless a test sets them through ``planted``:

    >>> from wal import canary
    >>> with canary.planted("skip_checksum"):
    ...     canary.skip_checksum
    True
    >>> canary.skip_checksum
    False

Never set in production code; nothing outside the tests imports ``planted``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: acknowledge a commit without the WAL fsync (wal/writer.py)
skip_wal_fsync = False
#: create or rename a file without fsyncing its directory (pages/fs.py, S2)
skip_dir_fsync = False
#: write a page without first making the log durable to its page LSN
#: (pages/buffer_pool.py, P1: the WAL rule)
page_before_log = False
#: write the meta page without first fsyncing the pages it references
#: (pages/pagefile.py, P3)
meta_before_pages = False
#: accept pages without verifying their checksums (pages/format.py)
skip_checksum = False
#: after an fsync fails, retry it and carry on (wal/writer.py, L4): on Linux
#: the retry "succeeds" with the data already dropped
retry_fsync = False
#: let the same process open a database twice (pages/fs.py: POSIX record
#: locks, which a process never conflicts with itself on, and no in-process set)
second_open = False
#: serializable transactions detect no rw-antidependencies (kvstore/ssi.py)
no_ssi = False
#: snapshot isolation without first-updater-wins (kvstore/database.py)
no_write_conflicts = False

NAMES = (
    "skip_wal_fsync",
    "skip_dir_fsync",
    "page_before_log",
    "meta_before_pages",
    "skip_checksum",
    "retry_fsync",
    "second_open",
    "no_ssi",
    "no_write_conflicts",
)


@contextmanager
def planted(name: str) -> Iterator[None]:
    """Turn the switch ``name`` on for the ``with`` block."""
    if name not in NAMES:
        raise ValueError(f"no canary named {name!r}; known: {', '.join(NAMES)}")
    g = globals()
    g[name] = True
    try:
        yield
    finally:
        g[name] = False
