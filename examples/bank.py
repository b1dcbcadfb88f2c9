"""Bank transfers from several threads: db.run retries conflicts, money is never lost.

Run:  python examples/bank.py [DIR]

A few accounts start with 1000 each.  Four threads move random amounts
between them at the same time, each transfer a transaction run by
``db.run(fn)``.  Under snapshot isolation two transfers that touch the same
account cannot both commit: the second one to write raises ConflictError
("first updater wins"), and ``db.run`` rolls it back and calls ``fn`` again
in a fresh transaction, which sees the winner's balance.  So no update is
lost and the sum of all balances never changes.

Meanwhile an auditor thread adds up every account in a read-only
transaction, over and over: a snapshot never sees half a transfer, and it
neither blocks the writers nor is blocked by them.

DIR (optional) is where the database goes, in a fresh subdirectory that is
removed at the end; the default is the system's temporary directory.  The
program exits non-zero if the total ever changes.
"""

import random
import shutil
import sys
import tempfile
import threading
import time

import kvstore

ACCOUNTS = 5  # few accounts and many threads: transfers often collide
INITIAL = 1000
THREADS = 4
TRANSFERS_PER_THREAD = 50


def account(i):
    return b"account/%02d" % i


def main(workdir):
    with kvstore.open(workdir + "/bank") as db:
        # One transaction opens every account: all of them exist, or none.
        with db.transaction() as tx:
            for i in range(ACCOUNTS):
                tx.put(account(i), str(INITIAL).encode())
        total = ACCOUNTS * INITIAL
        print(f"{ACCOUNTS} accounts with {INITIAL} each: total {total}")

        attempts = [0]  # how many times a transfer function ran, retries included
        attempts_lock = threading.Lock()

        def transfer(tx, src, dst, amount):
            """Move ``amount`` from ``src`` to ``dst`` unless ``src`` would go negative.

            db.run may call this several times: it must only read and write
            through ``tx`` (which is new on every call) so a retry starts over.
            """
            with attempts_lock:
                attempts[0] += 1
            balance_src = int(tx.get(account(src)))
            balance_dst = int(tx.get(account(dst)))
            time.sleep(0.001)  # some "work" between read and write makes collisions likely
            if balance_src < amount:
                return False  # refused; the transaction commits having written nothing
            tx.put(account(src), str(balance_src - amount).encode())  # may raise ConflictError
            tx.put(account(dst), str(balance_dst + amount).encode())
            return True

        errors = []  # an exception in a thread, re-raised by the main thread

        def teller(seed):
            rng = random.Random(seed)
            try:
                for _ in range(TRANSFERS_PER_THREAD):
                    src, dst = rng.sample(range(ACCOUNTS), 2)
                    amount = rng.randint(1, 200)
                    # db.run commits when transfer returns; on ConflictError it
                    # rolls back, backs off a little and calls transfer again.
                    db.run(lambda tx, src=src, dst=dst, amount=amount: transfer(tx, src, dst, amount), retries=100)
            except BaseException as err:
                errors.append(err)

        audits = []
        stop = threading.Event()

        def auditor():
            while not stop.is_set():
                with db.transaction(readonly=True) as snap:
                    audits.append(sum(int(v) for _, v in snap.scan(b"account/", b"account0")))
                time.sleep(0.002)

        started = time.monotonic()
        tellers = [threading.Thread(target=teller, args=(seed,)) for seed in range(THREADS)]
        audit_thread = threading.Thread(target=auditor)
        audit_thread.start()
        for t in tellers:
            t.start()
        for t in tellers:
            t.join()
        stop.set()
        audit_thread.join()
        elapsed = time.monotonic() - started
        if errors:
            raise errors[0]  # e.g. ConflictError after 100 retries

        transfers = THREADS * TRANSFERS_PER_THREAD
        retries = attempts[0] - transfers
        print(f"{THREADS} threads ran {transfers} transfers with db.run in {elapsed:.2f} s")
        print(f"retries after ConflictError: {retries} (db.stats() counts {db.stats()['conflicts']} conflicts)")

        wrong = [t for t in audits if t != total]
        print(f"the auditor summed all accounts {len(audits)} times while transfers ran; "
              f"totals seen: {sorted(set(audits))}")
        assert audits, "the auditor never ran"
        assert not wrong, f"a snapshot saw a total other than {total}: {wrong[:5]}"

        balances = [int(db.get(account(i))) for i in range(ACCOUNTS)]
        print("final balances:", ", ".join(f"{account(i).decode()}={b}" for i, b in enumerate(balances)))
        print(f"total after: {sum(balances)}")
        assert sum(balances) == total, f"money appeared or vanished: total {sum(balances)}, expected {total}"
        assert all(b >= 0 for b in balances), f"an account went negative: {balances}"

    # Reopen: the committed transfers are durable, the total still holds.
    with kvstore.open(workdir + "/bank", create=False) as db:
        reopened = sum(int(v) for _, v in db.scan(b"account/", b"account0"))
        print(f"total after reopening: {reopened}")
        assert reopened == total, f"total after reopening is {reopened}, expected {total}"
        db.check()  # walks every page; raises CorruptionError on damage
    print("OK: the total never changed")


if __name__ == "__main__":
    # Work in a fresh directory (inside DIR if given) and remove it at the end.
    workdir = tempfile.mkdtemp(prefix="kvstore-bank-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
