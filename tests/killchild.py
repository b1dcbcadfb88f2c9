"""The child process of the SIGKILL loops (tests/test_sigkill.py, TESTING.md section 4).

Run as ``python tests/killchild.py MODE JSON`` where JSON holds the arguments.
It works on a database of bank accounts and tells the parent what it did by
appending lines to a *side file* (one unbuffered ``os.write`` per line on an
``O_APPEND`` descriptor, so a line is either wholly there or absent after a
SIGKILL -- SIGKILL keeps the page cache, so no fsync is needed):

    opening <round>                      before kvstore.open
    opened <round> <json of stats>       after it returned (recovery done)
    begun <id> <from> <to> <amount>      inside the transaction, just before commit
    acked <id> <from> <to> <amount>      after commit() returned (sync="full")
    prepared <id> <from> <to> <amount> <gid>   after tx.prepare(gid) returned
    loser <n>                            an uncommitted transaction wrote n keys
    ready                                the workload is set up; kill me now
    resolved <commit|rollback> <gid>     after commit_prepared / rollback_prepared
    done                                 a normal end (nobody killed us)

Every transfer ``id`` moves ``amount`` from account ``from`` to account ``to``
and writes the marker key ``m/<id>`` = ``b"<from> <to> <amount>"`` in the same
transaction, so the parent can recompute each balance from the markers present.

Modes:

``work``     open, then ``threads`` threads run transfers with ``db.run`` (and
             optionally a thread checkpointing every few ms) until killed or
             ``seconds`` have passed.
``prepare``  open, commit a few transfers, prepare one transfer as ``gid``,
             start a big transaction that never finishes (a loser for restart
             to undo), commit many more transfers (a long log), write ``ready``
             and wait to be killed.
``open``     open (running recovery) and wait to be killed.
``resolve``  open, commit or roll back the prepared ``gid``, write
             ``resolved`` and wait to be killed.

With ``"gate": true`` the child imports everything, then waits for a line on
stdin before it starts (the parent overlaps the start-up with its checks).

Failpoints come from ``KVSTORE_FAILPOINTS`` (``wal.failpoints`` arms them on import).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kvstore  # noqa: E402  (after the path is set)

INITIAL = 1000


def acct(i: int) -> bytes:
    return b"acct/%03d" % i


def marker(tid: str) -> bytes:
    return b"m/" + tid.encode()


class Side:
    """The side file: one atomic unbuffered append per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        data = (line + "\n").encode()
        with self.lock:
            os.write(self.fd, data)


def open_db(a: dict, side: Side) -> kvstore.Database:
    side.say(f"opening {a.get('round', 0)}")
    db = kvstore.open(
        a["path"],
        sync="full",
        create=False,
        cache_size=a.get("cache_size", 64 * 2**20),
        checkpoint_wal_bytes=a.get("checkpoint_wal_bytes", 64 * 2**20),
        checkpoint_interval=a.get("checkpoint_interval", 3600.0),
    )
    st = db.stats()
    rec = {k: st.get(k) for k in ("recovery_seconds", "recovery_records_scanned", "recovery_transactions_undone")}
    side.say(f"opened {a.get('round', 0)} {json.dumps(rec, separators=(',', ':'))}")
    return db


def transfer(db: kvstore.Database, side: Side, tid: str, src: int, dst: int, amount: int) -> None:
    """One bank transfer with its marker; ``begun`` before commit, ``acked`` after."""
    desc = f"{src} {dst} {amount}"

    def fn(tx):
        a = int(tx.get(acct(src)))
        b = int(tx.get(acct(dst)))
        tx.put(acct(src), b"%d" % (a - amount))
        tx.put(acct(dst), b"%d" % (b + amount))
        tx.put(marker(tid), desc.encode())
        side.say(f"begun {tid} {desc}")  # db.run commits right after fn returns

    for attempt in range(10000):  # first updater wins: back off and retry
        try:
            db.run(fn, retries=0)
            break
        except kvstore.ConflictError:
            time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
    else:
        raise RuntimeError(f"transfer {tid} kept conflicting")
    side.say(f"acked {tid} {desc}")


def pick(rng: random.Random, n: int) -> tuple[int, int, int]:
    src = rng.randrange(n)
    dst = rng.randrange(n - 1)
    if dst >= src:
        dst += 1
    return src, dst, rng.randrange(1, 100)


def mode_work(a: dict, side: Side) -> None:
    db = open_db(a, side)
    n, rnd, seed = a["accounts"], a["round"], a["seed"]
    stop = threading.Event()
    deadline = time.monotonic() + a.get("seconds", 5.0)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        i = 0
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                src, dst, amount = pick(rng, n)
                transfer(db, side, f"r{rnd}.t{t}.{i}", src, dst, amount)
                i += 1
        except BaseException as e:  # reported to the parent through the exit status
            errors.append(e)
            stop.set()

    def checkpointer() -> None:
        rng = random.Random(seed)
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.005, 0.04))
            try:
                db.checkpoint()
            except BaseException as e:
                errors.append(e)
                stop.set()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(a["threads"])]
    if a.get("checkpoints"):
        threads.append(threading.Thread(target=checkpointer))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    db.close()
    side.say("done")


def mode_prepare(a: dict, side: Side) -> None:
    db = open_db(a, side)
    n, rng = a["accounts"], random.Random(a["seed"])
    for i in range(5):
        transfer(db, side, f"pre.{i}", *pick(rng, n))
    # The prepared transfer: its accounts stay locked until it is resolved.
    src, dst, amount = a["prep_from"], a["prep_to"], a["prep_amount"]
    tid, gid = a["prep_id"], a["gid"].encode()
    tx = db.begin()
    x, y = int(tx.get(acct(src))), int(tx.get(acct(dst)))
    tx.put(acct(src), b"%d" % (x - amount))
    tx.put(acct(dst), b"%d" % (y + amount))
    tx.put(marker(tid), f"{src} {dst} {amount}".encode())
    side.say(f"begun {tid} {src} {dst} {amount}")
    tx.prepare(gid)
    side.say(f"prepared {tid} {src} {dst} {amount} {a['gid']}")
    # A loser: a big transaction that is never finished (restart undoes it).
    loser = db.begin()
    for i in range(a.get("loser_keys", 2000)):
        loser.put(b"loser/%05d" % i, b"x" * 50)
    db._wal.flush()  # its records are in the log (the page cache) for restart to see
    side.say(f"loser {a.get('loser_keys', 2000)}")
    # A long log after the last checkpoint: many more transfers on the
    # accounts the prepared transaction does not hold.
    free = [i for i in range(n) if i not in (src, dst)]
    for i in range(a.get("tail_transfers", 200)):
        s, d = rng.sample(free, 2)
        transfer(db, side, f"tail.{i}", s, d, rng.randrange(1, 100))
    side.say("ready")
    time.sleep(3600)


def mode_open(a: dict, side: Side) -> None:
    open_db(a, side)
    side.say("ready")
    time.sleep(3600)


def mode_resolve(a: dict, side: Side) -> None:
    db = open_db(a, side)
    gid = a["gid"].encode()
    if a["decision"] == "commit":
        db.commit_prepared(gid)
    else:
        db.rollback_prepared(gid)
    side.say(f"resolved {a['decision']} {a['gid']}")
    time.sleep(3600)


def main() -> None:
    mode, a = sys.argv[1], json.loads(sys.argv[2])
    if a.get("gate"):  # started early (imports done); wait for the parent's go
        if not sys.stdin.readline():
            return  # the parent gave up on us
    side = Side(a["side"])
    {"work": mode_work, "prepare": mode_prepare, "open": mode_open, "resolve": mode_resolve}[mode](a, side)


if __name__ == "__main__":
    main()
