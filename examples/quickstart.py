"""Quickstart: open a store, write in a transaction, read a snapshot, reopen."""

import tempfile

import kvstore

path = tempfile.mkdtemp(prefix="kvstore-quickstart-")

with kvstore.open(path) as db:
    with db.transaction() as tx:  # commits on normal exit, durably (sync="full")
        tx.put(b"apple", b"3")
        tx.put(b"banana", b"5")
        tx.put(b"cherry", b"7")

    snapshot = db.begin(readonly=True)  # sees the store as it is now
    db.put(b"banana", b"6")  # an autocommit write after the snapshot
    print("snapshot sees banana =", snapshot.get(b"banana").decode())
    snapshot.commit()

    def restock(tx):
        count = int(tx.get(b"apple"))
        tx.put(b"apple", str(count + 10).encode())
        return count + 10

    print("apple restocked to", db.run(restock))  # retried on conflicts

with kvstore.open(path) as db:  # reopen: everything committed is there
    for key, value in db.scan():
        print(key.decode(), "=", value.decode())
