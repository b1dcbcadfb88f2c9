"""Two-phase commit across two stores, with a coordinator that crashes.

Run:  python examples/two_phase_commit.py [DIR]

Two banks keep their accounts in two separate kvstore databases, bank-a and
bank-b.  A transfer from an account in bank-a to one in bank-b must happen
in both or in neither.  kvstore is a two-phase commit *participant*:

    tx.prepare(gid)          phase 1: the transaction's writes are durable but
                             invisible, its keys are locked, and it survives
                             crashes "in doubt" until it is resolved
    db.prepared()            the in-doubt global ids, after a restart
    db.commit_prepared(gid)  phase 2: make it visible ...
    db.rollback_prepared(gid)             ... or undo it

The *coordinator* is this program.  It prepares the transaction in both
banks; if both prepares succeed it writes its decision, "commit", durably
into a third kvstore (the decision log).  That write is the moment the
global transaction commits.  Then it tells each bank to commit.  If it dies
at any point, recovery reads the log: a logged decision is carried out, and
a global transaction with no decision is rolled back ("presumed abort" --
nobody can have committed it, because commits are only sent after the
decision is logged).

The demonstration runs the coordinator in a child process that kills itself
with SIGKILL in the middle of its work:

    xfer-1  alice (bank-a) pays bob (bank-b) 100: prepared in both banks,
            decision "commit" logged, committed in bank-a -- then the crash,
            before bank-b was told
    xfer-2  carol (bank-a) pays dave (bank-b) 50: prepared in both banks,
            the crash comes before any decision

Then the recovery step (in this process) reopens all three stores, finds
the in-doubt transactions with db.prepared() and resolves each per the log:
xfer-1 is committed in bank-b, xfer-2 is rolled back in both banks.

DIR (optional) is where the databases go, in a fresh subdirectory that is
removed at the end.  Exits non-zero if any balance is wrong afterwards.
Needs a POSIX system (SIGKILL); runs anywhere Python and kvstore run on Linux.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import kvstore

OPENING = {b"alice": 500, b"carol": 300}, {b"bob": 100, b"dave": 200}  # bank-a, bank-b
TRANSFERS = {  # gid -> (payer in bank-a, payee in bank-b, amount)
    b"xfer-1": (b"alice", b"bob", 100),
    b"xfer-2": (b"carol", b"dave", 50),
}


def paths(workdir):
    return (os.path.join(workdir, "bank-a"), os.path.join(workdir, "bank-b"),
            os.path.join(workdir, "coordinator-log"))


def say(line):
    """Report progress to the parent: one line, flushed at once, so it is in
    the pipe before the next step (and before the SIGKILL)."""
    print(line, flush=True)


def add(tx, account, amount):
    tx.put(account, str(int(tx.get(account)) + amount).encode())


# --- the coordinator (runs in the child process) ----------------------------------

def prepare_everywhere(bank_a, bank_b, gid):
    """Phase 1: do the transfer's part in each bank and prepare it there."""
    payer, payee, amount = TRANSFERS[gid]
    tx_a = bank_a.begin()
    add(tx_a, payer, -amount)
    tx_a.prepare(gid)  # durable; a ConflictError here would be a "no" vote
    say(f"prepared {gid.decode()} in bank-a ({payer.decode()} -{amount})")
    tx_b = bank_b.begin()
    add(tx_b, payee, +amount)
    tx_b.prepare(gid)
    say(f"prepared {gid.decode()} in bank-b ({payee.decode()} +{amount})")


def coordinator(workdir):
    path_a, path_b, path_log = paths(workdir)
    bank_a, bank_b = kvstore.open(path_a, create=False), kvstore.open(path_b, create=False)
    decisions = kvstore.open(path_log, create=False)  # sync="full": put() returns once durable

    prepare_everywhere(bank_a, bank_b, b"xfer-1")
    decisions.put(b"decision/xfer-1", b"commit")  # the commit point of xfer-1
    say("logged decision: xfer-1 commit")
    bank_a.commit_prepared(b"xfer-1")  # phase 2 begins ...
    say("committed xfer-1 in bank-a")

    prepare_everywhere(bank_a, bank_b, b"xfer-2")  # ... and xfer-2 is never decided

    say("crashing now (SIGKILL)")
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no cleanup: a real crash


# --- the demonstration (the parent process) -----------------------------------------

def balances(db):
    return {key.decode(): int(value) for key, value in db.scan()}


def recover(bank_a, bank_b, decisions):
    """Resolve every in-doubt transaction of both banks per the decision log.

    Opening the decision log takes its lock, so no coordinator is still
    running and about to decide: "no decision" really means "never decided".
    """
    for name, bank in (("bank-a", bank_a), ("bank-b", bank_b)):
        for gid in bank.prepared():
            decision = decisions.get(b"decision/" + gid)
            if decision == b"commit":
                bank.commit_prepared(gid)
                print(f"  {name}: {gid.decode()} is in doubt; the log says commit -> committed")
            else:  # no decision logged: presumed abort
                bank.rollback_prepared(gid)
                print(f"  {name}: {gid.decode()} is in doubt; no decision in the log -> rolled back")
    # Every participant has its outcome: the coordinator may forget its decisions.
    with decisions.transaction() as tx:
        for key, _ in tx.scan(b"decision/", b"decision0"):
            tx.delete(key)


def main(workdir):
    path_a, path_b, path_log = paths(workdir)
    for path, accounts in zip((path_a, path_b), OPENING, strict=True):
        with kvstore.open(path) as db, db.transaction() as tx:
            for account, amount in accounts.items():
                tx.put(account, str(amount).encode())
    kvstore.open(path_log).close()
    total = sum(sum(accounts.values()) for accounts in OPENING)
    opening = [{k.decode(): v for k, v in accounts.items()} for accounts in OPENING]
    print(f"opening balances: bank-a {opening[0]}, bank-b {opening[1]}; total {total}")

    print("\nthe coordinator runs in a child process:")
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--coordinator", workdir],
                           capture_output=True, text=True, timeout=60)
    for line in child.stdout.splitlines():
        print("  coordinator: " + line)
    assert child.returncode == -signal.SIGKILL, (
        f"the coordinator should have died of SIGKILL, it exited with {child.returncode}:\n{child.stderr}")
    print(f"  the coordinator was killed (exit status {child.returncode})")

    print("\nrecovery: reopen the three stores")
    with kvstore.open(path_a, create=False) as bank_a, \
         kvstore.open(path_b, create=False) as bank_b, \
         kvstore.open(path_log, create=False) as decisions:
        print(f"  bank-a in doubt: {[g.decode() for g in bank_a.prepared()]}, "
              f"bank-b in doubt: {[g.decode() for g in bank_b.prepared()]}")
        print(f"  decision log: { {k.decode(): v.decode() for k, v in decisions.scan()} }")
        assert bank_a.prepared() == [b"xfer-2"], f"bank-a in doubt: {bank_a.prepared()}"
        assert bank_b.prepared() == [b"xfer-1", b"xfer-2"], f"bank-b in doubt: {bank_b.prepared()}"

        # While in doubt, a prepared transaction's writes are invisible and its keys locked.
        print(f"  while in doubt, bank-b shows bob = {bank_b.get(b'bob').decode()} (xfer-1's +100 not visible)")
        assert bank_b.get(b"bob") == b"100"
        try:
            bank_b.put(b"bob", b"0")
        except kvstore.ConflictError as err:
            print(f"  and writing bob raises ConflictError ({err.kind} on {err.key!r})")
        else:
            raise AssertionError("writing a key held by a prepared transaction should raise ConflictError")

        recover(bank_a, bank_b, decisions)

        a, b = balances(bank_a), balances(bank_b)
        print(f"\nafter recovery: bank-a {a}, bank-b {b}; total {sum(a.values()) + sum(b.values())}")
        assert a == {"alice": 400, "carol": 300}, f"bank-a: xfer-1 should be committed, xfer-2 not: {a}"
        assert b == {"bob": 200, "dave": 200}, f"bank-b: xfer-1 should be committed, xfer-2 not: {b}"
        assert sum(a.values()) + sum(b.values()) == total, "the total changed"
        assert not bank_a.prepared() and not bank_b.prepared(), "something is still in doubt"
        for db in (bank_a, bank_b, decisions):
            db.check()
    print("OK: xfer-1 happened in both banks, xfer-2 in neither")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--coordinator"]:
        coordinator(sys.argv[2])
        sys.exit("the coordinator should have been killed")  # not reached
    # Work in a fresh directory (inside DIR if given) and remove it at the end.
    workdir = tempfile.mkdtemp(prefix="kvstore-2pc-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
