"""Online backup while a writer runs, then a restore from the copy.

Run:  python examples/backup_restore.py [DIR]

A writer thread records orders as fast as it can: each transaction adds
one key ``order/NNNNNN`` and sets ``order-count`` to the number of orders,
so in any consistent state the count equals the number of order keys and
the orders are numbered 0 .. count-1.  A second transaction, a "draft",
has written keys but is still open while the backup runs.

``db.backup(dest)`` copies the database while the writer keeps going (it
does not stop readers or writers for long).  The copy holds exactly the
transactions that had committed when the backup started: every order
committed before the call, possibly a few more, never half an order, and
nothing of the draft, which commits only afterwards.

Then a disaster: the database directory is deleted.  Restoring is copying
the backup into place and opening it; opening runs recovery, which rolls
back what was unfinished in the copy (the draft).  ``db.check()`` walks
every page and structure of the restored store.

DIR (optional) is where the databases go, in a fresh subdirectory that is
removed at the end.  Exits non-zero if the restored copy is not consistent.
"""

import os
import shutil
import sys
import tempfile
import threading
import time

import kvstore


def orders_and_count(db):
    """(order numbers present, the order-count value), read from one snapshot."""
    with db.transaction(readonly=True) as tx:
        numbers = [int(key[len(b"order/"):]) for key, _ in tx.scan(b"order/", b"order0")]
        return numbers, int(tx.get(b"order-count", b"0"))


def main(workdir):
    live = os.path.join(workdir, "shop")
    backup = os.path.join(workdir, "shop-backup")

    with kvstore.open(live) as db:
        committed = [0]  # orders the writer has committed (its commit() returned)
        stop = threading.Event()

        def writer():
            while not stop.is_set():
                n = committed[0]
                with db.transaction() as tx:
                    tx.put(b"order/%06d" % n, b"widget x%d" % (n % 7 + 1))
                    tx.put(b"order-count", str(n + 1).encode())
                committed[0] = n + 1

        thread = threading.Thread(target=writer)
        thread.start()
        while committed[0] < 300:  # let some history build up
            time.sleep(0.01)

        draft = db.begin()  # an open transaction: must not be in the backup
        draft.put(b"draft/note", b"not committed when the backup ran")

        before = committed[0]
        info = db.backup(backup)  # the writer keeps running meanwhile
        after = committed[0]
        print(f"backup written while the writer ran: {info['pages']} pages, "
              f"{info['wal_bytes']} bytes of log")
        print(f"the writer had committed {before} orders when the backup started, "
              f"{after} when it returned")

        draft.commit()  # commits after the backup: in the live store, not in the copy
        while committed[0] < after + 50:  # some more orders after the backup
            time.sleep(0.01)
        stop.set()
        thread.join()
        final = committed[0]
        print(f"the writer went on to {final} orders, then stopped")
        numbers, count = orders_and_count(db)
        assert count == final == len(numbers), f"live store: count {count}, {len(numbers)} orders, {final} committed"

    print("\ndisaster: the database directory is deleted")
    shutil.rmtree(live)
    print("restore: copy the backup into place and open it")
    shutil.copytree(backup, live)  # keep the backup itself pristine for another restore

    with kvstore.open(live, create=False) as db:
        stats = db.stats()
        print(f"opening ran recovery in {stats['recovery_seconds'] * 1000:.1f} ms, "
              f"undoing {stats['recovery_transactions_undone']} unfinished transaction(s)")
        report = db.check()  # raises CorruptionError on any damage
        print(f"db.check(): ok, {report['pages_checked']} pages, {report['keys']} keys, "
              f"{report['wal_records']} log records checked")

        numbers, count = orders_and_count(db)
        print(f"restored: order-count = {count}, {len(numbers)} order keys, "
              f"draft present: {db.get(b'draft/note') is not None}")
        assert numbers == list(range(count)), (
            f"the copy is not a consistent prefix: order-count {count}, orders {numbers[:3]}...{numbers[-3:]}")
        # +1: the one commit in flight when `after` was read may be in the copy
        assert before <= count <= after + 1, (
            f"the copy has {count} orders; expected every order committed before the backup "
            f"({before}) and none committed after it returned ({after})")
        assert db.get(b"draft/note") is None, "the draft, uncommitted during the backup, is in the copy"
        assert count < final, "the copy should not contain the orders written after the backup"
    print("OK: the backup is a consistent copy as of the moment it was taken")


if __name__ == "__main__":
    # Work in a fresh directory (inside DIR if given) and remove it at the end.
    workdir = tempfile.mkdtemp(prefix="kvstore-backup-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
