"""Kill a writer with SIGKILL mid-stream: nothing it acknowledged is lost.

Run:  python examples/crash_demo.py [DIR]

A writer process opens a store with sync="full" (the default) and commits
one small transaction after another.  Each transaction writes
``entry/NNNNNN`` and sets ``last`` to its number; after each ``commit()``
returns the writer acknowledges it by printing ``ack NNNNNN`` to its
stdout, a pipe this program reads -- like a server answering a client.
The writer also has one big transaction open that it never commits.

Once ACKS commits have been acknowledged this program kills the writer
with SIGKILL, wherever it is: maybe in the middle of a commit.  Then it
reopens the store, which runs crash recovery (redo the log, undo the
unfinished transactions), and checks:

* every acknowledged entry is there (durability: commit() returned, so the
  commit was on stable storage);
* the entries are exactly 0 .. last, and ``last`` agrees (atomicity: each
  transaction is there wholly or not at all);
* nothing of the never-committed transaction is visible (recovery undoes
  it: recovery_transactions_undone counts it, and the transaction that was
  in flight at the kill too if its writes had reached the log);
* db.check() finds every page and structure intact.

A commit can be durable but not acknowledged (the kill came after the
commit record reached the disk, before the "ack" was printed): such an entry
may be present.  Losing an acknowledged one would be a bug.

DIR (optional) is where the database goes, in a fresh subdirectory that is
removed at the end.  Exits non-zero if anything acknowledged is missing.
Needs a POSIX system (SIGKILL).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import kvstore

ACKS = 300  # kill the writer once this many commits were acknowledged
DRAFT_KEYS = 200  # keys written by the transaction that never commits


def writer(path):
    """The child: commit entries forever, acknowledging each on stdout."""
    db = kvstore.open(path, sync="full")
    draft = db.begin()  # never committed: recovery must undo it
    for i in range(DRAFT_KEYS):
        draft.put(b"draft/%04d" % i, b"uncommitted " * 8)
    i = 0
    while True:
        with db.transaction() as tx:
            tx.put(b"entry/%06d" % i, b"value %d" % i)
            tx.put(b"last", b"%d" % i)
        print(f"ack {i:06d}", flush=True)  # only after commit() returned
        i += 1


def main(workdir):
    path = os.path.join(workdir, "db")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--writer", path],
                             stdout=subprocess.PIPE, text=True)
    acked = []
    for line in child.stdout:
        acked.append(int(line.split()[1]))
        if len(acked) == ACKS:
            os.kill(child.pid, signal.SIGKILL)  # no warning, no cleanup
            break
    acked += [int(line.split()[1]) for line in child.stdout]  # acks still in the pipe
    status = child.wait()
    assert status == -signal.SIGKILL, f"the writer should have died of SIGKILL; exit status {status}"
    assert len(acked) >= ACKS, f"the writer stopped after {len(acked)} acknowledgements"
    print(f"writer killed with SIGKILL after acknowledging {len(acked)} commits "
          f"(the last acknowledged: entry/{acked[-1]:06d})")

    with kvstore.open(path, create=False) as db:  # runs crash recovery
        stats = db.stats()
        print("recovery on reopen:")
        for name in ("recovery_seconds", "recovery_records_scanned", "recovery_ops_redone",
                     "recovery_transactions_undone", "recovery_transactions_in_doubt"):
            value = stats.get(name)
            print(f"  {name:32} {value:.3f}" if isinstance(value, float) else f"  {name:32} {value}")

        entries = [int(key[len(b"entry/"):]) for key, _ in db.scan(b"entry/", b"entry0")]
        last = int(db.get(b"last"))
        lost = sorted(set(acked) - set(entries))
        print(f"entries present: {len(entries)} (entry/000000 .. entry/{entries[-1]:06d}), last = {last}")
        print(f"acknowledged and lost: {len(lost)}")
        print(f"committed but not acknowledged before the kill: {len(entries) - len(acked)}")
        draft = list(db.scan(b"draft/", b"draft0"))
        print(f"keys of the never-committed transaction visible: {len(draft)}")

        assert not lost, f"acknowledged commits were lost: {lost[:10]}"
        assert entries == list(range(len(entries))), "the entries have a gap: a later commit survived an earlier one"
        assert last == entries[-1], f"last = {last} but the newest entry is {entries[-1]}: a transaction was split"
        assert all(db.get(b"entry/%06d" % i) == b"value %d" % i for i in acked), "an entry has a wrong value"
        assert not draft, f"{len(draft)} keys of the uncommitted transaction are visible"
        db.check()  # raises CorruptionError naming the page on damage
    print("OK: every acknowledged commit survived the crash, nothing uncommitted is visible")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--writer"]:
        writer(sys.argv[2])
        sys.exit("the writer should have been killed")  # not reached
    # Work in a fresh directory (inside DIR if given) and remove it at the end.
    workdir = tempfile.mkdtemp(prefix="kvstore-crash-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
