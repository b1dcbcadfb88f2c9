"""The page layer of one database, wired together and logged through the WAL.

``PageStore`` owns the page file, the buffer pool, the B+tree and the
rollback segment, and logs every page change as a PAGE_REDO record.  The
upper layers (recovery, kvstore) drive it: ``flip`` makes the current image
durable with a checkpoint LSN, ``redo`` replays the log over the image that
was durable, so a restart reproduces the pages exactly.

    >>> import tempfile, uuid
    >>> from pages.fs import OsFileSystem
    >>> from wal.log import WriteAheadLog
    >>> fs, d, db_id = OsFileSystem(), tempfile.mkdtemp(), uuid.uuid4().bytes
    >>> wal = WriteAheadLog.open(fs, d, db_id)
    >>> store = PageStore.create(fs, d, db_id, wal)
    >>> store.tree.put(b"k", b"v") is None
    True
    >>> store.tree.read_value(store.tree.get(b"k"))
    b'v'
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from pages.btree import BTree
from pages.buffer_pool import BufferPool
from pages.format import MIN_PAGE_SIZE
from pages.node import PageOp, pack_ops
from pages.pagefile import PageFile, page_file_path
from pages.redo import decode_any, redo_record
from pages.rollback_segment import RollbackSegment
from wal.format import RecordType
from wal.log import WriteAheadLog

#: Record types that carry page ops, and where the ops start in the payload.
OPS_OFFSET = {RecordType.PAGE_REDO: 0, RecordType.TXN_WRITE: 8, RecordType.CLR: 8}

# The meta's application area: B+tree root, rollback segment header, then
# whatever the layer above keeps there (next transaction id, ...).
_ROOTS = struct.Struct("<QQ")
APP_EXTRA_SIZE = 184 - _ROOTS.size


class PageStore:
    """Page file + buffer pool + B+tree + rollback segment of one database."""

    def __init__(self, pagefile: PageFile, wal: WriteAheadLog, cache_size: int, roots: tuple[int, int] | None) -> None:
        self.pagefile = pagefile
        self.wal = wal
        self.pool = BufferPool(pagefile, cache_size, self._flush_log, decode_any)
        self.tree: BTree
        self.undo: RollbackSegment
        if roots is not None:
            self.tree = BTree(self.pool, pagefile, self.log_ops, roots[0])
            self.undo = RollbackSegment(self.pool, pagefile, self.log_ops, roots[1])

    def _flush_log(self, lsn: int) -> None:
        self.wal.flush(lsn)  # P1: the WAL rule, before a page is written

    def log_ops(self, ops: list[PageOp], txid: int = 0) -> int:
        """Append ``ops`` as one PAGE_REDO record; return its LSN."""
        return self.wal.append(RecordType.PAGE_REDO, txid, pack_ops(ops))

    @classmethod
    def create(
        cls,
        fs: Any,
        directory: str,
        db_id: bytes,
        wal: WriteAheadLog,
        *,
        page_size: int = 4096,
        cache_size: int = 64 * 2**20,
        min_page_size: int = MIN_PAGE_SIZE,
    ) -> PageStore:
        """A new page file with an empty tree and rollback segment, flipped
        durable at the log's current end."""
        pagefile = PageFile.create(fs, page_file_path(directory), page_size, db_id, min_page_size=min_page_size)
        self = cls(pagefile, wal, cache_size, None)
        self.tree = BTree.create(self.pool, pagefile, self.log_ops)
        self.undo = RollbackSegment.create(self.pool, pagefile, self.log_ops)
        self.flip(wal.end_lsn)
        return self

    @classmethod
    def open(cls, fs: Any, directory: str, wal: WriteAheadLog, *, cache_size: int = 64 * 2**20) -> PageStore:
        """Open the durable image (run ``redo`` next to catch up with the log)."""
        pagefile = PageFile.open(fs, page_file_path(directory))
        return cls(pagefile, wal, cache_size, cls.roots_of(pagefile.meta.app))

    @staticmethod
    def roots_of(app: bytes) -> tuple[int, int]:
        root: int
        undo_header: int
        root, undo_header = _ROOTS.unpack_from(app)
        return root, undo_header

    def app_area(self, extra: bytes = b"") -> bytes:
        if len(extra) > APP_EXTRA_SIZE:
            raise ValueError(f"extra meta data is {len(extra)} bytes, the limit is {APP_EXTRA_SIZE}")
        return _ROOTS.pack(self.tree.root, self.undo.header) + extra

    @property
    def app_extra(self) -> bytes:
        """What the layer above stored in the meta at the last flip."""
        return self.pagefile.meta.app[_ROOTS.size :]

    def flip(self, checkpoint_lsn: int, extra: bytes = b"") -> dict[str, int]:
        """Write every dirty page and make the image durable, stating that
        redo of this image starts at ``checkpoint_lsn``."""
        written = self.pool.write_dirty()
        result = self.pagefile.flip(checkpoint_lsn, self.app_area(extra))
        result["pages_written"] = written
        return result

    def compact(self, min_gain: int = 1, extra: bytes | None = None) -> dict[str, int]:
        """Give the page file's free tail back to the file system.

        Moves the pages that live beyond where the file could end into free
        slots lower down, flips (at the durable image's checkpoint LSN: the
        pages' contents are unchanged, only where they live), cuts the free
        tail off and fsyncs.  Does nothing, and writes nothing, unless at
        least ``min_gain`` slots would go.  ``extra``: the meta's area for
        the layer above (default: as the durable meta has it).  Returns
        ``pages_relocated`` and ``slots_truncated``.  A crash at any point
        leaves the old image or the new one (``pages.pagefile``, P2-P5).

        This is the whole protocol in one call, for a caller that owns the
        store; the checkpointer runs the same steps with the engine latch
        held only around the parts that need it.

        >>> import tempfile, uuid
        >>> from pages.fs import OsFileSystem
        >>> from wal.log import WriteAheadLog
        >>> fs, d, db_id = OsFileSystem(), tempfile.mkdtemp(), uuid.uuid4().bytes
        >>> wal = WriteAheadLog.open(fs, d, db_id)
        >>> store = PageStore.create(fs, d, db_id, wal)
        >>> store.compact()  # a fresh store has no free tail
        {'pages_relocated': 0, 'slots_truncated': 0}
        """
        pagefile = self.pagefile
        end, lids = pagefile.compaction_plan()
        if pagefile.nslots - end < max(1, min_gain):
            return {"pages_relocated": 0, "slots_truncated": 0}
        moved = sum(pagefile.relocate(lid, end) for lid in lids)
        pagefile.mark_tail_page_table(end)
        app = self.app_area(self.app_extra if extra is None else extra)
        self.wal.flush()  # the table may reflect records not yet durable (P1 for the page table)
        result = pagefile.flip(pagefile.meta.checkpoint_lsn, app)
        pagefile.sync_cut()
        return {"pages_relocated": moved, "slots_truncated": result["slots_truncated"]}

    def redo(self, from_lsn: int | None = None) -> dict[str, int]:
        """Replay every PAGE_REDO record from ``from_lsn`` (default: the
        image's checkpoint LSN) to the end of the log."""
        start = self.pagefile.meta.checkpoint_lsn if from_lsn is None else from_lsn
        return self.redo_records(self.wal.records(start))

    def redo_records(self, records: Iterable[Any], observe: Callable[[Any], None] | None = None) -> dict[str, int]:
        """Replay the page ops of ``records`` (log records in LSN order),
        calling ``observe`` with every record first (restart's analysis
        rides along).  Returns records scanned, ops applied, and the distinct
        pages redo had to look at."""
        scanned = applied = 0
        pages: set[int] = set()
        pool, pagefile = self.pool, self.pagefile
        for rec in records:
            scanned += 1
            if observe is not None:
                observe(rec)
            offset = OPS_OFFSET.get(rec.type)
            if offset is not None:
                applied += redo_record(pool, pagefile, rec.lsn, rec.payload[offset:] if offset else rec.payload, pages)
        return {"records_scanned": scanned, "ops_applied": applied, "pages_redone": len(pages)}

    def pages(self) -> dict[int, Any]:
        """Every allocated page's decoded content (for tests and check)."""
        out = {}
        self.pool.begin_op()
        try:
            for lid in range(1, self.pagefile.nlids):
                if self.pagefile.is_allocated(lid):
                    out[lid] = self.pool.get(lid)
        finally:
            self.pool.end_op()
        return out

    def _check(self) -> dict[str, int]:
        self.pagefile._check()
        counts = self.tree._check()
        counts["undo_records"] = self.undo._check()
        return counts

    def close(self) -> None:
        self.pagefile.close()
