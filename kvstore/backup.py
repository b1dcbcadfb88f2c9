"""Online backup: a consistent copy while readers and writers keep running.

The copy is the page file's durable image plus the log from that image's
checkpoint LSN to the end of the log as flushed when the backup starts:

1. take the checkpointer's mutex, so no flip completes during the copy (the
   durable image's slots are never written while it is durable: P2/P4 of
   ``pages.pagefile``), and no log segment is deleted;
2. flush the log and note its end E;
3. copy the meta of the durable image and every slot it references (page
   and page-table pages; other slots may be changing and are not needed --
   the copy leaves them zero), then the log segments up to E;
4. fsync everything in the destination and its directory; release the mutex.

Opening the copy runs restart: redo from the checkpoint, undo of the
transactions unfinished at E.  So the backup holds exactly the transactions
whose commit record lies below E -- a prefix of the committed history.
Prepared transactions at E stay in doubt in the copy, as they would after a
crash.
"""

from __future__ import annotations

import os
from typing import Any

from kvstore.database import Database
from pages.fs import FileSystem
from pages.pagefile import PAGE_FILE_NAME, PageFile
from wal.format import SEGMENT_HEADER_SIZE

CHUNK = 1 << 20


def backup(db: Database, dest: str) -> dict[str, Any]:
    """Write a consistent copy of ``db`` into directory ``dest``.

    ``dest`` must not exist, or be an empty directory; otherwise ValueError.
    Returns what was copied.
    """
    fs = db._fs
    dest = os.fspath(dest)
    src = os.path.realpath(db.path)
    real = os.path.realpath(dest)
    if real == src or real.startswith(src + os.sep):
        raise ValueError(f"backup destination {dest!r} is inside the database directory {db.path!r}")
    if fs.exists(dest):
        if not fs.is_dir(dest):
            raise ValueError(f"backup destination {dest!r} exists and is not a directory")
        if fs.listdir(dest):
            raise ValueError(f"backup destination {dest!r} is not empty")
    else:
        db._makedirs(dest)
    ckpt = db._checkpointer
    with ckpt._mutex:
        with db._latch:
            store, wal = db._store, db._wal
            assert store is not None and wal is not None  # the caller checked that db is open
            pagefile = store.pagefile
            meta = pagefile.meta
            meta_slot = pagefile._meta_slot
            slots = sorted(pagefile._durable_slots)
            page_size = pagefile.page_size
        wal.flush()
        segments = [s for s in wal.segments() if s.end_lsn > meta.checkpoint_lsn or s is wal.segments()[-1]]
        end = segments[-1].end_lsn
        pages = _copy_page_file(fs, pagefile, dest, meta_slot, slots, page_size)
        wal_bytes = 0
        for seg in segments:
            if seg.end_lsn <= meta.checkpoint_lsn and seg is not segments[-1]:
                continue
            wal_bytes += _copy_prefix(fs, seg.path, os.path.join(dest, os.path.basename(seg.path)), SEGMENT_HEADER_SIZE + seg.end_lsn - seg.first_lsn)
        fs.fsync_dir(dest)
    return {"dest": dest, "pages": pages, "wal_bytes": wal_bytes, "end_lsn": end, "checkpoint_lsn": meta.checkpoint_lsn}


def _copy_page_file(fs: FileSystem, pagefile: PageFile, dest: str, meta_slot: int, slots: list[int], page_size: int) -> int:
    src = pagefile._file
    out = fs.create(os.path.join(dest, PAGE_FILE_NAME))
    try:
        meta = src.pread(meta_slot * page_size, page_size)
        out.pwrite(0, meta)  # the durable meta in both slots: the copy has no older image
        out.pwrite(page_size, meta)
        for slot in slots:
            out.pwrite(slot * page_size, src.pread(slot * page_size, page_size))
        out.fsync()
    finally:
        out.close()
    return len(slots)


def _copy_prefix(fs: FileSystem, src_path: str, dst_path: str, size: int) -> int:
    src = fs.open(src_path)
    out = fs.create(dst_path)
    try:
        pos = 0
        while pos < size:
            chunk = src.pread(pos, min(CHUNK, size - pos))
            if not chunk:
                break
            out.pwrite(pos, chunk)
            pos += len(chunk)
        out.fsync()
    finally:
        out.close()
        src.close()
    return pos
