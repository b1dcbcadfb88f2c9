"""Write skew: what snapshot isolation allows and serializable isolation prevents.

Run:  python examples/inventory.py [DIR]

Two warehouses hold 5 widgets each.  The rule: together they must keep at
least 6 in stock.  Two clerks each want to take 3, clerk 1 from warehouse A
and clerk 2 from warehouse B.  Each clerk reads both stock levels, checks
that the rule still holds after taking 3 (10 - 3 = 7 >= 6: fine), and takes
them.  Both read before either writes (a barrier makes sure of it).

* isolation="snapshot": the clerks write different keys, so nothing
  conflicts, both commit, and 4 widgets are left -- the rule is broken
  although each transaction on its own kept it.  That is write skew.
* isolation="serializable": the same code.  kvstore notices that the two
  transactions each read what the other wrote (a cycle no serial order
  could produce) and rolls one back with ConflictError.  db.run retries it;
  the retry sees the other clerk's withdrawal (7 left), refuses to go
  below 6 and takes nothing.  (A retry that begins while the winner's
  commit is still being made durable does not see it yet, and is rolled
  back again for the same reason; db.run backs off a little longer each
  time, so on a busy machine it may take a few attempts.)

db.run uses the database's isolation level, so each part opens its store
with kvstore.open(path, isolation=...).  (A single transaction can also ask
for one: db.begin(isolation="serializable").)

DIR (optional) is where the databases go, in a fresh subdirectory that is
removed at the end.  Exits non-zero if either outcome is not as described.
"""

import shutil
import sys
import tempfile
import threading

import kvstore

MINIMUM = 6  # widgets that must stay in stock across both warehouses
START = 5  # in each warehouse
TAKE = 3


def run_clerks(path, isolation):
    """Two clerks take TAKE widgets each, concurrently; return (log, A, B, conflicts)."""
    with kvstore.open(path, isolation=isolation) as db:
        with db.transaction() as tx:
            tx.put(b"stock/A", str(START).encode())
            tx.put(b"stock/B", str(START).encode())

        log = []
        log_lock = threading.Lock()
        both_have_read = threading.Barrier(2, timeout=10)
        errors = []

        def clerk(number, warehouse):
            attempt = 0
            waited = False

            def take(tx):
                nonlocal attempt, waited
                attempt += 1
                a = int(tx.get(b"stock/A"))
                b = int(tx.get(b"stock/B"))
                if not waited:  # the first time only: let the other clerk read too
                    waited = True
                    both_have_read.wait()
                mine = a if warehouse == b"A" else b
                with log_lock:
                    if a + b - TAKE < MINIMUM:
                        log.append(f"clerk {number}, attempt {attempt}: sees A={a} B={b}; "
                                   f"taking {TAKE} would leave {a + b - TAKE} < {MINIMUM}: refuses")
                        return False
                    log.append(f"clerk {number}, attempt {attempt}: sees A={a} B={b}; "
                               f"takes {TAKE} from {warehouse.decode()}")
                tx.put(b"stock/" + warehouse, str(mine - TAKE).encode())
                return True  # db.run commits now; under "serializable" this may raise ConflictError

            try:
                db.run(take)  # on ConflictError: roll back, call take again in a new transaction
            except BaseException as err:
                errors.append(err)  # re-raised by the main thread
                return
            if attempt > 1:
                with log_lock:
                    times = "once" if attempt == 2 else f"{attempt - 1} times"
                    log.append(f"clerk {number}: rolled back with ConflictError, db.run retried it {times}")

        clerks = [threading.Thread(target=clerk, args=(1, b"A")),
                  threading.Thread(target=clerk, args=(2, b"B"))]
        for t in clerks:
            t.start()
        for t in clerks:
            t.join()
        if errors:
            raise errors[0]
        a, b = int(db.get(b"stock/A")), int(db.get(b"stock/B"))
        db.check()
        return log, a, b, db.stats()["conflicts"]


def main(workdir):
    print(f"two warehouses with {START} widgets each; rule: A + B >= {MINIMUM}; "
          f"clerk 1 takes {TAKE} from A, clerk 2 takes {TAKE} from B, concurrently")

    print('\nisolation="snapshot":')
    log, a, b, conflicts = run_clerks(workdir + "/snapshot", "snapshot")
    for line in log:
        print("  " + line)
    print(f"  result: A={a} B={b}, total {a + b} -- "
          + (f"below the minimum {MINIMUM}: write skew!" if a + b < MINIMUM else "rule kept"))
    assert a + b == 2 * START - 2 * TAKE, (
        f"expected both clerks to commit under snapshot isolation (total {2 * START - 2 * TAKE}), got {a + b}")
    assert conflicts == 0, f"snapshot isolation reported {conflicts} conflicts for writes to different keys"

    print('\nisolation="serializable":')
    log, a, b, conflicts = run_clerks(workdir + "/serializable", "serializable")
    for line in log:
        print("  " + line)
    print(f"  result: A={a} B={b}, total {a + b} -- "
          + ("rule kept" if a + b >= MINIMUM else f"below the minimum {MINIMUM}!"))
    assert a + b >= MINIMUM, f"serializable isolation let the total drop to {a + b} < {MINIMUM}"
    assert a + b == 2 * START - TAKE, f"expected exactly one clerk to take {TAKE}, total is {a + b}"
    assert conflicts >= 1, "expected a ConflictError under serializable isolation"
    assert any("retried" in line for line in log), "expected db.run to retry one clerk"
    print("\nOK: write skew happens under snapshot isolation and is prevented under serializable")


if __name__ == "__main__":
    # Work in a fresh directory (inside DIR if given) and remove it at the end.
    workdir = tempfile.mkdtemp(prefix="kvstore-inventory-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
