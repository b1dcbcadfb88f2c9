"""Quickstart: open a store, write in a transaction, read a snapshot, reopen.

Run:  python examples/quickstart.py [DIR]

DIR (optional) is where the database goes, in a fresh subdirectory that is
removed at the end; the default is the system's temporary directory.
"""

import shutil
import sys
import tempfile

import kvstore


def main(path):
    with kvstore.open(path) as db:
        with db.transaction() as tx:  # commits on normal exit, durably (sync="full")
            tx.put(b"apple", b"3")
            tx.put(b"banana", b"5")
            tx.put(b"cherry", b"7")

        snapshot = db.begin(readonly=True)  # sees the store as it is now
        db.put(b"banana", b"6")  # an autocommit write after the snapshot
        print("snapshot sees banana =", snapshot.get(b"banana").decode())
        assert snapshot.get(b"banana") == b"5", "a snapshot must not see later commits"
        snapshot.commit()

        def restock(tx):
            count = int(tx.get(b"apple"))
            tx.put(b"apple", str(count + 10).encode())
            return count + 10

        print("apple restocked to", db.run(restock))  # retried on conflicts

    with kvstore.open(path) as db:  # reopen: everything committed is there
        for key, value in db.scan():
            print(key.decode(), "=", value.decode())
        assert dict(db.scan()) == {b"apple": b"13", b"banana": b"6", b"cherry": b"7"}, "a commit is missing"


if __name__ == "__main__":
    # Work in a fresh directory (inside DIR if given) and remove it at the end.
    workdir = tempfile.mkdtemp(prefix="kvstore-quickstart-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(workdir + "/db")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
