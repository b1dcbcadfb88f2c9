"""The integrity check: every page, every structure, the log.

``db.check()`` verifies, and reports what it checked:

* every page with an image on disk: its checksum, its logical id and the crc
  the page table expects (so torn, flipped, misdirected and lost writes all
  show), read from the file, not the cache;
* the page table and free space: no slot used twice, none both used and free,
  none leaked;
* the B+tree: key order, separator bounds, equal leaf depth, node fill,
  overflow chains;
* the rollback segment's chain of undo pages and every undo record in it;
* the log: every record from the oldest segment to the end decodes, and the
  segments follow one another without gap.

Damage raises CorruptionError naming the page (or structure, or log
position).  The check holds the engine latch while it walks the structures,
so it is consistent; writers wait for it.
"""

from __future__ import annotations

from typing import Any

from kvstore.database import Database
from wal.errors import CorruptionError


def check(db: Database) -> dict[str, Any]:
    # The checkpointer's mutex first (as backup takes it): a flip in flight
    # has slots written but not yet in any image, which would look leaked.
    with db._checkpointer._mutex:
        return _check(db)


def _check(db: Database) -> dict[str, Any]:
    with db._latch:
        store, wal = db._store, db._wal
        assert store is not None and wal is not None  # the caller checked that db is open
        pagefile = store.pagefile
        report: dict[str, Any] = {"page_size": pagefile.page_size}
        checked = 0
        for lid in range(1, pagefile.nlids):
            if pagefile.has_image(lid):
                pagefile.read_page(lid)  # raises CorruptionError naming page and slot
                checked += 1
        report["pages_checked"] = checked
        try:
            pagefile._check()
        except AssertionError as e:
            raise CorruptionError(f"{pagefile.path} page table / free space", str(e)) from None
        store.pool.begin_op()
        try:
            try:
                counts = store.tree._check()
            except AssertionError as e:
                raise CorruptionError(f"B+tree rooted at page {store.tree.root}", str(e)) from None
            try:
                counts["undo_records"] = store.undo._check()
            except AssertionError as e:
                raise CorruptionError(f"rollback segment (header page {store.undo.header})", str(e)) from None
        finally:
            store.pool.end_op()
        report.update(counts)
        report["undo_pages"] = len(store.undo.pages())
        report["tree_depth"] = store.tree.depth()
        stats = pagefile.stats()
        report["free_slots"] = stats["free_slots"]
        report["slots"] = stats["slots"]
    records = 0
    segments = wal.segments()  # none is deleted meanwhile: the caller holds the checkpointer's mutex
    for _rec in wal.records(segments[0].first_lsn):
        records += 1
    report["wal_records"] = records
    report["wal_segments"] = len(segments)
    report["ok"] = True
    return report
