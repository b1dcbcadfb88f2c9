"""``kvstore torture``: random transactions, SIGKILL at random moments, checks.

The parent process (``run``) prepares a database directory, then loops over
*rounds* until the time is up.  In each round:

1. A child process (this module, ``_child_main``) opens the database with
   ``sync="full"`` and runs random transactions from ``threads`` threads:
   bank transfers, list appends, puts and deletes of data keys, read-only
   scans that check the bank total, savepoints with ``rollback_to``,
   explicit rollbacks, both isolation levels, and two-phase commits
   (``prepare`` then ``commit_prepared`` / ``rollback_prepared``).  Every
   writing transaction ``<id>`` also writes its *marker* ``torture/m/<id>``,
   whose value lists the operations it did.  The child reports, one
   unbuffered ``os.write`` per line on an ``O_APPEND`` side file (SIGKILL
   keeps what was written)::

       opening                      before kvstore.open
       opened <json>                after it returned (recovery done)
       begun <id> <C|P> <ops>       just before commit() (C) or prepare() (P)
       prepared <id>                after prepare() returned
       acked <id>                   after commit() / commit_prepared() returned
       rolledback <id>              after rollback_prepared() returned
       violation <text>             an invariant the child saw broken
       error <text>                 an unexpected exception (exit status 3)
       done                         a clean stop (db.close() returned)

2. The parent kills the child with SIGKILL: after a random delay (exponential,
   mean ``crash_every``), or the child kills itself at a named failpoint
   (``KVSTORE_FAILPOINTS=name=kill@n``); sometimes the child is left to stop
   cleanly.  Sometimes one or two more children then open the crashed
   database and are killed while they recover.
3. The parent reopens the database (recovery), runs ``db.check()``, reads
   every key and checks: acked ⊆ markers present ⊆ begun (and a marker's
   value is what the child wrote); what was present at the previous check is
   still there; nothing rolled back or in doubt is visible; the bank total;
   each account's balance = its base + the transfers whose markers are
   present; each list holds exactly the ids of the present markers that
   appended to it, each once, and its previous contents are a prefix of its
   contents now; the data keys are exactly those of the present markers
   that put them, minus those a present marker deleted, with the values
   derived from their ids.  Transactions in doubt (``db.prepared()``) must
   be ones the child prepared and did not resolve; the parent commits or
   rolls each back (a seeded choice) and checks again.
4. From time to time the parent *folds* the checked history (deletes the
   markers and data keys, records the balances as the accounts' new base and
   empties the lists, remembering how many entries they dropped) so the
   database stays small however long torture runs.

Everything the checks need is in the database itself (the key
``torture/meta`` holds the number of accounts, the expected total and the
base balances), so a later run on the same directory continues from it.
Every decision is drawn from ``seed`` (``schedule`` lists them); only the
timing varies.  The first violation found ends the run with status 1.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

__all__ = ["run", "schedule"]

# --- the keys ------------------------------------------------------------------------------

PREFIX = b"torture/"
PREFIX_END = b"torture0"  # b"/" + 1
META_KEY = b"torture/meta"
ACCT_PREFIX = b"torture/acct/"
ACCT_END = b"torture/acct0"
LIST_PREFIX = b"torture/list/"
MARK_PREFIX = b"torture/m/"
DATA_PREFIX = b"torture/d/"
DATA_END = b"torture/d0"
GID_PREFIX = b"torture/"

FORMAT_VERSION = 1
ACCOUNTS = 16
INITIAL_BALANCE = 1000
LISTS = 4
FOLD_MARKERS = 1500  # fold once this many markers are present ...
FOLD_LIST = 120  # ... or a list holds this many entries
ISOLATIONS = ("snapshot", "serializable")
MAX_REPORTED = 40  # violations printed per check (the count is exact)
OPEN_TIMEOUT = 60.0  # a child that does not open in this time is a violation


def acct_key(i: int) -> bytes:
    return ACCT_PREFIX + b"%03d" % i


def list_key(i: int) -> bytes:
    return LIST_PREFIX + b"%d" % i


def mark_key(tid: str) -> bytes:
    return MARK_PREFIX + tid.encode()


def data_key(tid: str, j: int) -> bytes:
    return DATA_PREFIX + f"{tid}/{j}".encode()


def data_value(tid: str, j: int, size: int) -> bytes:
    """The value of data key ``j`` of transaction ``tid`` (derived from its id)."""
    unit = f"{tid}/{j};".encode()
    return (unit * (size // len(unit) + 1))[:size]


def parse_list(value: bytes) -> tuple[int, list[str]]:
    """``b"<dropped>|id,id,..."`` -> (dropped, ids).  Raises ValueError."""
    head, sep, rest = value.partition(b"|")
    if not sep or not head.isdigit():
        raise ValueError(f"not a torture list value: {value[:60]!r}")
    return int(head), (rest.decode().split(",") if rest else [])


def format_list(dropped: int, entries: list[str]) -> bytes:
    return f"{dropped}|{','.join(entries)}".encode()


#: One operation in a marker, as JSON: ``["t", from, to, amount]``,
#: ``["a", list]``, ``["p", n, size]`` or ``["d", victim id]`` (``decode_ops``).
Operation = list[Any]


def decode_ops(desc: str) -> list[Operation]:
    """A marker's value: a JSON list of operations, each one of
    ``["t", from, to, amount]`` (transfer), ``["a", list]`` (append),
    ``["p", n, size]`` (put data keys 0..n-1), ``["d", victim id]`` (delete
    the victim's data keys).  Raises ValueError."""
    ops = json.loads(desc)
    if not isinstance(ops, list):
        raise ValueError("not a list")
    for op in ops:
        ok = isinstance(op, list) and op and (
            (op[0] == "t" and len(op) == 4 and all(isinstance(x, int) for x in op[1:]))
            or (op[0] == "a" and len(op) == 2 and isinstance(op[1], int))
            or (op[0] == "p" and len(op) == 3 and all(isinstance(x, int) and x >= 0 for x in op[1:]))
            or (op[0] == "d" and len(op) == 2 and isinstance(op[1], str))
        )
        if not ok:
            raise ValueError(f"bad operation {op!r}")
    return ops


# --- the decisions ----------------------------------------------------------------------------

#: (failpoint, highest n to draw, what the child must do to reach it)
WORK_FAILPOINTS = [
    ("wal.after_append", 400, None),
    ("wal.after_write", 60, None),
    ("wal.before_fsync", 60, None),
    ("wal.after_fsync", 60, None),
    ("wal.before_preallocate_fsync", 2, None),
    ("pages.before_flip_fsync", 4, "checkpoints"),
    ("pages.before_meta_write", 4, "checkpoints"),
    ("pages.before_meta_fsync", 4, "checkpoints"),
    ("pages.after_meta_fsync", 4, "checkpoints"),
    ("recovery.checkpoint_before_flip", 4, "checkpoints"),
    ("recovery.checkpoint_before_truncate", 4, "checkpoints"),
    ("wal.before_roll_fsync", 4, "segments"),
    ("wal.before_segment_header_fsync", 4, "segments"),
    ("wal.before_segment_remove", 3, "segments"),
]
#: Failpoints a child opening a crashed database meets while it recovers
#: (restart appends CLRs and ABORTs, then checkpoints).
RECOVERY_FAILPOINTS = [
    "wal.before_tail_cut_fsync",
    "wal.after_append",
    "wal.before_fsync",
    "wal.after_fsync",
    "recovery.checkpoint_before_flip",
    "recovery.checkpoint_before_truncate",
    "pages.before_flip_fsync",
    "pages.before_meta_write",
    "pages.before_meta_fsync",
    "pages.after_meta_fsync",
]
SMALL_WAL = 16 * 1024  # 4 KiB segments: rolls, WAL-size checkpoints, truncation
BIG_WAL = 64 * 2**20


def _round_plan(seed: int, rnd: int, crash_every: float) -> dict[str, Any]:
    """The decisions of round ``rnd``: a function of (seed, rnd, crash_every) only."""
    rng = random.Random(f"kvstore-torture:{seed}:{rnd}")
    x = rng.random()
    kind = "clean" if x < 0.05 else "failpoint" if x < 0.40 else "timer"
    delay = min(max(rng.expovariate(1.0 / crash_every), 0.01), 5.0 * crash_every)
    plan: dict[str, Any] = {
        "round": rnd,
        "kind": kind,
        "delay": round(delay, 4),
        "failpoint": None,
        "checkpoints": rng.random() < 0.4,
        "checkpoint_interval": rng.choice([0.1, 1.0, 3600.0]),
        "checkpoint_wal_bytes": rng.choice([SMALL_WAL, 256 * 1024, BIG_WAL]),
        "cache_size": rng.choice([256 * 1024, 64 * 2**20]),
        "child_seed": rng.getrandbits(32),
        "resolve_seed": rng.getrandbits(32),
        "recovery_kills": [],
    }
    if kind == "failpoint":
        name, top, needs = rng.choice(WORK_FAILPOINTS)
        plan["failpoint"] = f"{name}=kill@{rng.randint(1, top)}"
        if needs == "checkpoints":
            plan["checkpoints"] = True
        elif needs == "segments":
            plan["checkpoint_wal_bytes"] = SMALL_WAL
        # if the point is not reached in this time, the parent kills the child
        plan["delay"] = round(max(3.0 * crash_every, 0.5), 4)
    for _ in range(rng.choices([0, 1, 2], [0.65, 0.25, 0.10])[0]):
        if rng.random() < 0.5:
            plan["recovery_kills"].append({"failpoint": f"{rng.choice(RECOVERY_FAILPOINTS)}=kill@1"})
        else:
            plan["recovery_kills"].append({"fraction": round(rng.random(), 4)})
    return plan


def schedule(seed: int, rounds: int, crash_every: float = 1.0) -> list[dict[str, Any]]:
    """The decisions of the first ``rounds`` rounds of ``run(..., seed=seed,
    crash_every=crash_every)``: kind of kill (timer, failpoint, clean stop),
    delay, failpoint, the child's settings and seeds, the kills during
    recovery.  The same for the same arguments, every time."""
    return [_round_plan(seed, r, crash_every) for r in range(rounds)]


# --- the state read back and its checks -----------------------------------------------------------


@dataclass
class State:
    """The torture keys of one snapshot, decoded."""

    meta: dict[str, Any]
    balances: dict[int, int] = field(default_factory=dict)
    lists: dict[int, tuple[int, list[str]]] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)
    data: dict[tuple[str, int], bytes] = field(default_factory=dict)
    unknown: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_state(kv: dict[bytes, bytes]) -> State:
    """Decode the torture keys; what cannot be decoded goes to ``problems``."""
    raw = kv.get(META_KEY)
    meta: dict[str, Any] = {}
    st = State(meta)
    if raw is None:
        st.problems.append("the key torture/meta is missing")
    else:
        try:
            meta.update(json.loads(raw))
            n = meta["accounts"]
            if not (isinstance(n, int) and isinstance(meta["total"], int) and isinstance(meta["lists"], int)
                    and isinstance(meta["epoch"], int) and len(meta["base"]) == n):
                raise ValueError("bad fields")
        except (ValueError, KeyError, TypeError) as e:
            st.problems.append(f"torture/meta is damaged ({e}): {raw[:100]!r}")
            meta.clear()
    for key, value in kv.items():
        if key == META_KEY:
            continue
        try:
            if key.startswith(ACCT_PREFIX):
                st.balances[int(key[len(ACCT_PREFIX):])] = int(value)
            elif key.startswith(LIST_PREFIX):
                st.lists[int(key[len(LIST_PREFIX):])] = parse_list(value)
            elif key.startswith(MARK_PREFIX):
                st.markers[key[len(MARK_PREFIX):].decode()] = value.decode()
            elif key.startswith(DATA_PREFIX):
                tid, _, j = key[len(DATA_PREFIX):].decode().rpartition("/")
                if not tid or not j.isdigit():
                    raise ValueError("not a data key")
                st.data[(tid, int(j))] = value
            else:
                raise ValueError("unknown kind of key")
        except ValueError as e:
            st.unknown.append(key)
            st.problems.append(f"unexpected key {key!r} = {value[:60]!r} ({e}): no committed operation writes it")
    return st


def verify(
    st: State,
    *,
    base_markers: dict[str, str] | None = None,
    base_lists: dict[int, tuple[int, list[str]]] | None = None,
    allowed: dict[str, str] | None = None,
    must: set[str] | frozenset[str] = frozenset(),
    forbidden: dict[str, str] | None = None,
    history: dict[str, str] | None = None,
) -> list[str]:
    """Every invariant of ``st``; returns the violations (empty if none).

    ``base_markers``: the markers present at the previous check (None: no
    previous check, so any marker may be present).  ``allowed``: id -> value
    of the transactions begun since (their markers may appear).  ``must``:
    ids that must be present (acknowledged commits).  ``forbidden``: id ->
    why, for ids whose markers must not be visible (rolled back, in doubt).
    ``history``: id -> what became of it earlier, for the messages.
    ``base_lists``: the lists at the previous check (prefix check).
    """
    v = list(st.problems)
    meta = st.meta
    if not meta:
        return v
    n_acc, total, n_lists, base = meta["accounts"], meta["total"], meta["lists"], meta["base"]
    allowed = allowed or {}
    forbidden = forbidden or {}
    history = history or {}

    # the bank total
    missing = [a for a in range(n_acc) if a not in st.balances]
    if missing:
        v.append(f"bank: accounts {missing} are missing")
    extra = sorted(a for a in st.balances if not 0 <= a < n_acc)
    if extra:
        v.append(f"bank: accounts {extra} should not exist (there are {n_acc})")
    s = sum(st.balances.values())
    if s != total:
        v.append(f"bank: the accounts sum to {s}, expected {total} (the total never changes)")

    # markers: acked ⊆ present ⊆ begun, and nothing committed disappears
    present = st.markers
    if base_markers is not None:
        for tid in sorted(must):
            if tid not in present:
                v.append(f"durability: transaction {tid} was acknowledged (commit returned) but its marker is missing")
        for tid in sorted(base_markers):
            if tid not in present and tid not in must:
                v.append(f"durability: transaction {tid}, present at the previous check, has disappeared")
        for tid in sorted(present):
            desc = present[tid]
            if tid in forbidden:
                v.append(f"atomicity: transaction {tid} {forbidden[tid]}, but its marker is visible")
            elif tid in base_markers:
                if desc != base_markers[tid]:
                    v.append(f"marker {tid} changed from {base_markers[tid]} to {desc}")
            elif tid in allowed:
                if desc != allowed[tid]:
                    v.append(f"marker {tid} holds {desc!r}, but the transaction wrote {allowed[tid]!r}")
            elif tid in history:
                v.append(f"phantom: transaction {tid} {history[tid]}, and its marker is present now")
            else:
                v.append(f"phantom: marker {tid} is present, but no transaction with that id was begun")
    ops_of: dict[str, list[Operation]] = {}
    for tid, desc in present.items():
        try:
            ops_of[tid] = decode_ops(desc)
        except ValueError as e:
            v.append(f"marker {tid} holds {desc[:80]!r}, which is not a list of operations ({e})")

    # each account = its base + the transfers present (a transaction is all or nothing)
    expect = {a: base[a] for a in range(n_acc)}
    for tid, ops in ops_of.items():
        for op in ops:
            if op[0] == "t":
                _, src, dst, amount = op
                if src not in expect or dst not in expect:
                    v.append(f"marker {tid}: transfer between accounts {src} and {dst}, which do not exist")
                    continue
                expect[src] -= amount
                expect[dst] += amount
    for a in range(n_acc):
        if a in st.balances and st.balances[a] != expect[a]:
            v.append(
                f"atomicity: account {a} holds {st.balances[a]}, expected {expect[a]} "
                f"(its base {base[a]} plus the transfers whose markers are present)"
            )

    # lists: exactly the present appenders, each once; the old contents a prefix of the new
    appenders: dict[int, set[str]] = {k: set() for k in range(n_lists)}
    for tid, ops in ops_of.items():
        for op in ops:
            if op[0] == "a":
                appenders.setdefault(op[1], set()).add(tid)
    for k in sorted(set(appenders) | set(st.lists)):
        if not 0 <= k < n_lists:
            v.append(f"list {k} should not exist (there are {n_lists})")
            continue
        if k not in st.lists:
            v.append(f"list {k} is missing")
            continue
        dropped, entries = st.lists[k]
        seen: set[str] = set()
        for entry in entries:
            if entry in seen:
                v.append(f"list {k} holds {entry} twice")
            seen.add(entry)
        for entry in sorted(seen - appenders[k]):
            v.append(f"list {k} holds {entry}, but no present marker says it appended to list {k}")
        for entry in sorted(appenders[k] - seen):
            v.append(f"list {k} lacks {entry}, whose marker says it appended to it")
        if base_lists is not None and k in base_lists:
            bd, be = base_lists[k]
            if dropped != bd or entries[: len(be)] != be:
                v.append(
                    f"list {k}: its contents at the previous check ({bd} dropped + {be[-3:]} ... {len(be)} entries) "
                    f"are not a prefix of its contents now ({dropped} dropped + {len(entries)} entries)"
                )

    # data keys: exactly those put by present markers and not deleted by one
    deleted_by: dict[str, str] = {}
    for tid in sorted(ops_of):
        for op in ops_of[tid]:
            if op[0] != "d":
                continue
            victim = op[1]
            if victim in deleted_by:
                v.append(f"transactions {deleted_by[victim]} and {tid} both deleted the data of {victim}")
            deleted_by[victim] = tid
            if victim not in ops_of or not any(o[0] == "p" for o in ops_of[victim]):
                v.append(f"transaction {tid} deleted the data of {victim}, but {victim}'s marker (with a put) is absent")
    expected: dict[tuple[str, int], bytes] = {}
    for tid, ops in ops_of.items():
        if tid in deleted_by:
            continue
        for op in ops:
            if op[0] == "p":
                for j in range(op[1]):
                    expected[(tid, j)] = data_value(tid, j, op[2])
    for key in sorted(st.data):
        tid, j = key
        if key not in expected:
            why = (f"transaction {deleted_by[tid]} deleted it" if tid in deleted_by
                   else "its transaction's marker is absent" if tid not in ops_of else "its marker puts no such key")
            v.append(f"data key {tid}/{j} is present, but {why}")
        elif st.data[key] != expected[key]:
            v.append(f"data key {tid}/{j} holds {st.data[key][:40]!r}..., not the value derived from its id")
    for key in sorted(expected):
        if key not in st.data:
            v.append(f"data key {key[0]}/{key[1]} is missing, but the marker of {key[0]} is present and nothing deleted it")
    return v


# --- the child ---------------------------------------------------------------------------------


class _Side:
    """The child's side of the side file: one atomic unbuffered append per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        data = (line.replace("\n", " | ") + "\n").encode()
        with self.lock:
            os.write(self.fd, data)


def _child_main(argv: list[str]) -> int:
    """Entry of a child process: ``argv[0]`` is its JSON configuration."""
    cfg = json.loads(argv[0])
    if cfg.get("gate"):  # started early (imports done); wait for the parent's go
        if sys.stdin.readline().strip() != "go":
            return 0
    side = _Side(cfg["side"])
    try:
        return _child(cfg, side)
    except BaseException:
        side.say("error " + traceback.format_exc())
        os._exit(3)


def _child(cfg: dict[str, Any], side: _Side) -> int:
    import kvstore

    side.say("opening")
    db = kvstore.open(
        cfg["path"],
        create=False,
        sync="full",
        cache_size=cfg["cache_size"],
        checkpoint_interval=cfg["checkpoint_interval"],
        checkpoint_wal_bytes=cfg["checkpoint_wal_bytes"],
    )
    st = db.stats()
    side.say("opened " + json.dumps({"recovery_seconds": st.get("recovery_seconds", 0.0)}))
    ppid = cfg["ppid"]
    if cfg["role"] == "recover":  # the parent kills us now
        deadline = time.monotonic() + 60
        while os.getppid() == ppid and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    meta = json.loads(db.get(META_KEY))
    stop = threading.Event()
    work = _Work(db, side, cfg, meta, stop)
    threads = [threading.Thread(target=work.guard, args=(work.worker, t), daemon=True) for t in range(cfg["threads"])]
    if cfg["checkpoints"]:
        threads.append(threading.Thread(target=work.guard, args=(work.checkpointer, 0), daemon=True))
    for th in threads:
        th.start()
    deadline = time.monotonic() + cfg["life"]
    while time.monotonic() < deadline:
        if os.getppid() != ppid:  # the parent is gone: do not linger
            os._exit(0)
        time.sleep(0.02)
    stop.set()
    for th in threads:
        th.join()
    db.close()
    side.say("done")
    return 0


@dataclass
class _Pending:
    """A transaction a worker prepared and resolves after ``wait`` more of its own."""

    wait: int
    gid: bytes
    tid: str
    commit: bool


class _Work:
    """The child's random transactions (one ``worker`` per thread)."""

    def __init__(self, db: Any, side: _Side, cfg: dict[str, Any], meta: dict[str, Any], stop: threading.Event) -> None:
        import kvstore

        self.db, self.side, self.cfg, self.stop = db, side, cfg, stop
        self.ConflictError = kvstore.ConflictError
        self.n_acc, self.total, self.n_lists = meta["accounts"], meta["total"], meta["lists"]
        self.prefix = f"{cfg['epoch']}.{cfg['round']}"

    def guard(self, fn: Callable[[int], None], t: int) -> None:
        try:
            fn(t)
        except BaseException:
            self.side.say(f"error in thread {t}: {traceback.format_exc()}")
            os._exit(3)

    def violation(self, text: str) -> None:
        self.side.say("violation " + text)

    def checkpointer(self, t: int) -> None:
        rng = random.Random(f"{self.cfg['child_seed']}:checkpoint")
        while not self.stop.wait(rng.uniform(0.02, 0.3)):
            self.db.checkpoint()

    def worker(self, t: int) -> None:
        rng = random.Random(f"{self.cfg['child_seed']}:{t}")
        seq = 0
        pending: list[_Pending] = []  # prepared, resolved later
        while not self.stop.is_set():
            try:
                if rng.random() < 0.12:
                    self.read_check(rng)
                else:
                    tid = f"{self.prefix}.{t}.{seq}"
                    seq += 1
                    self.write(rng, tid, pending)
            except self.ConflictError:
                time.sleep(rng.random() * 0.002)  # rolled back already; the next one is new
            for item in pending:
                item.wait -= 1
            for item in [p for p in pending if p.wait <= 0]:
                pending.remove(item)
                self.resolve(item.gid, item.tid, item.commit)
        # a clean stop leaves the pending ones in doubt: close() keeps them so

    # --- read-only checks

    def read_check(self, rng: random.Random) -> None:
        iso = rng.choice(ISOLATIONS)
        tx = self.db.begin(readonly=True, isolation=iso)
        rows = list(tx.scan(ACCT_PREFIX, ACCT_END, reverse=rng.random() < 0.3))
        s = sum(int(v) for _, v in rows)
        if len(rows) != self.n_acc or s != self.total:
            self.violation(f"a read-only transaction ({iso}) saw {len(rows)} accounts summing to {s}, expected {self.n_acc} summing to {self.total}")
        k = rng.randrange(self.n_lists)
        value = tx.get(list_key(k))
        _, entries = parse_list(value)
        for e in entries[-5:]:
            m = tx.get(mark_key(e))
            if m is None or ["a", k] not in json.loads(m):
                self.violation(f"a read-only transaction ({iso}) saw {e} in list {k} but not its marker (or the marker does not append to it): {m!r}")
        tx.commit()

    # --- writing transactions

    def write(self, rng: random.Random, tid: str, pending: list[_Pending]) -> None:
        tx = self.db.begin(isolation=rng.choice(ISOLATIONS))
        try:
            kinds = rng.sample(["t", "a", "p", "d"], rng.choice([1, 1, 2, 2, 3]))
            ops: list[Operation] = []
            for kind in kinds:
                if rng.random() < 0.15:
                    self.junk(tx, rng, tid)
                op = getattr(self, "op_" + kind)(tx, rng, tid)
                if op is not None:
                    ops.append(op)
            if rng.random() < 0.1:
                self.junk(tx, rng, tid)
            desc = json.dumps(ops, separators=(",", ":"))
            tx.put(mark_key(tid), desc.encode())
            end = rng.random()
            if end < 0.07:  # an explicit rollback: never reported, so it must never show
                tx.rollback()
            elif end < 0.15:
                self.two_phase(tx, rng, tid, desc, pending)
            else:
                self.side.say(f"begun {tid} C {desc}")
                tx.commit()
                self.side.say(f"acked {tid}")
        finally:
            if tx.state == "active":
                tx.rollback()

    def two_phase(self, tx: Any, rng: random.Random, tid: str, desc: str, pending: list[_Pending]) -> None:
        """Prepare, then commit or roll back now or after a few more of this
        thread's transactions (so that kills find some in doubt)."""
        gid = GID_PREFIX + tid.encode()
        commit = rng.random() < 0.7
        wait = rng.choice([0, 0, 0, 1, 3, 6])
        self.side.say(f"begun {tid} P {desc}")
        tx.prepare(gid)
        self.side.say(f"prepared {tid}")
        if wait:
            pending.append(_Pending(wait, gid, tid, commit))
            return
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.01))
        self.resolve(gid, tid, commit)

    def resolve(self, gid: bytes, tid: str, commit: bool) -> None:
        if commit:
            self.db.commit_prepared(gid)
            self.side.say(f"acked {tid}")
        else:
            self.db.rollback_prepared(gid)
            self.side.say(f"rolledback {tid}")

    def junk(self, tx: Any, rng: random.Random, tid: str) -> None:
        """Writes undone by rollback_to: an unbalanced deposit, a deleted
        account, a junk data key and list entry.  If any survives, the
        parent's checks see it."""
        sp = tx.savepoint()
        for _ in range(rng.choice([1, 1, 2])):  # a savepoint can be rolled back to again
            a, b = rng.randrange(self.n_acc), rng.randrange(self.n_acc)
            k = rng.randrange(self.n_lists)
            before = {key: tx.get(key) for key in (acct_key(a), acct_key(b), list_key(k))}
            tx.put(acct_key(a), b"%d" % (int(before[acct_key(a)]) + rng.randint(1, 999)))
            if b != a:
                tx.delete(acct_key(b))
            tx.put(DATA_PREFIX + f"{tid}/junk".encode(), b"junk")
            d, entries = parse_list(before[list_key(k)])
            tx.put(list_key(k), format_list(d, entries + [tid + "!"]))
            tx.rollback_to(sp)
            for key, value in before.items():
                if tx.get(key) != value:
                    self.violation(f"rollback_to did not restore {key!r} in transaction {tid}: {tx.get(key)!r} != {value!r}")
            if tx.get(DATA_PREFIX + f"{tid}/junk".encode()) is not None:
                self.violation(f"rollback_to left the junk key of {tid} visible to the transaction itself")

    def op_t(self, tx: Any, rng: random.Random, tid: str) -> Operation:
        src = rng.randrange(self.n_acc)
        dst = rng.randrange(self.n_acc - 1)
        dst += dst >= src
        amount = rng.randint(1, 50)
        x, y = int(tx.get(acct_key(src))), int(tx.get(acct_key(dst)))
        tx.put(acct_key(src), b"%d" % (x - amount))
        tx.put(acct_key(dst), b"%d" % (y + amount))
        return ["t", src, dst, amount]

    def op_a(self, tx: Any, rng: random.Random, tid: str) -> Operation:
        k = rng.randrange(self.n_lists)
        d, entries = parse_list(tx.get(list_key(k)))
        tx.put(list_key(k), format_list(d, entries + [tid]))
        return ["a", k]

    def op_p(self, tx: Any, rng: random.Random, tid: str) -> Operation:
        n = rng.randint(1, 4)
        size = rng.choices([16, 200, 3000, 9000], [50, 30, 15, 5])[0]
        for j in range(n):
            tx.put(data_key(tid, j), data_value(tid, j, size))
        if tx.get(data_key(tid, 0)) != data_value(tid, 0, size):
            self.violation(f"transaction {tid} does not read its own write of {data_key(tid, 0)!r}")
        return ["p", n, size]

    def op_d(self, tx: Any, rng: random.Random, tid: str) -> Operation | None:
        start = DATA_PREFIX + str(rng.randrange(10)).encode()
        victim = None
        for lo in (start, DATA_PREFIX):
            for i, (key, _) in enumerate(tx.scan(lo, DATA_END)):
                owner = key[len(DATA_PREFIX):].decode().rpartition("/")[0]
                if owner != tid:
                    victim, seen = owner, key
                    break
                if i > 8:
                    break
            if victim is not None:
                break
        if victim is None:
            return None
        m = tx.get(mark_key(victim))
        puts = [op for op in json.loads(m) if op[0] == "p"] if m is not None else []
        if not puts:
            self.violation(f"transaction {tid} sees data key {seen!r} but not a marker of {victim} that puts it: {m!r}")
            return None
        for j in range(puts[0][1]):
            if not tx.delete(data_key(victim, j)):
                self.violation(f"transaction {tid} sees {seen!r} but not {data_key(victim, j)!r} (a transaction seen in part)")
        return ["d", victim]


# --- the parent ----------------------------------------------------------------------------------


class _SideLog:
    """The parent's side of a side file: reads whole lines as they come."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.begun: dict[str, tuple[str, str]] = {}  # id -> (C|P, ops)
        self.acked: set[str] = set()
        self.prepared: set[str] = set()
        self.rolledback: set[str] = set()
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.opening_at: float | None = None
        self.opened_at: float | None = None
        self.opened: dict[str, Any] = {}
        self.done = False

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        now = time.monotonic()
        for line in data[:end].decode(errors="replace").splitlines():
            word, _, rest = line.partition(" ")
            if word == "begun":
                tid, mode, desc = rest.split(" ", 2)
                self.begun[tid] = (mode, desc)
            elif word == "acked":
                self.acked.add(rest)
            elif word == "prepared":
                self.prepared.add(rest)
            elif word == "rolledback":
                self.rolledback.add(rest)
            elif word == "violation":
                self.violations.append(rest)
            elif word == "error":
                self.errors.append(rest)
            elif word == "opening":
                self.opening_at = now
            elif word == "opened":
                self.opened_at = now
                self.opened = json.loads(rest)
            elif word == "done":
                self.done = True

    def has_opened(self) -> bool:
        """Whether the child has reported ``opened`` (a method, so a type
        checker does not carry a narrowed ``opened_at`` across ``poll()``)."""
        return self.opened_at is not None


class _Child:
    """A child process we started, gated: it imports, then waits for ``go``."""

    CODE = "import sys; from kvstore.torture import _child_main; sys.exit(_child_main(sys.argv[1:]))"

    def __init__(self, tmp: str, name: str, cfg: dict[str, Any], failpoints: str | None) -> None:
        self.name = name
        self.failpoints = failpoints
        self.side_path = os.path.join(tmp, name + ".side")
        self.err_path = os.path.join(tmp, name + ".err")
        cfg = {**cfg, "side": self.side_path, "gate": True, "ppid": os.getpid()}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env.pop("KVSTORE_FAILPOINTS", None)
        if failpoints:
            env["KVSTORE_FAILPOINTS"] = failpoints
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", self.CODE, json.dumps(cfg)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # a ^C reaches the parent only; it kills us
            )
        self.side = _SideLog(self.side_path)
        self.killed_by_us = False
        self.started_at: float | None = None

    def go(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.proc.stdin.write(b"go\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.killed_by_us = True
        self.proc.wait()

    def abandon(self) -> None:
        """Never started (or no longer needed): let it go, or kill it."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()  # EOF: a gated child exits by itself
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()

    def stderr_tail(self) -> str:
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-1500:].decode(errors="replace").strip()
        except OSError:
            return ""


class _Stop(Exception):
    """A violation that makes going on pointless (the database cannot be opened)."""


class _Torture:
    def __init__(self, path: str, seconds: float, threads: int, seed: int, crash_every: float,
                 json_output: bool, out: TextIO, err: TextIO,
                 tamper: Callable[[Any], None] | None, trace: list[dict[str, Any]] | None) -> None:
        self.path = os.path.abspath(path)
        self.seconds, self.threads, self.seed, self.crash_every = seconds, threads, seed, crash_every
        self.json_output, self.out, self.err = json_output, out, err
        self.tamper, self.trace = tamper, trace
        isatty = getattr(out, "isatty", None)
        self.live = (not json_output) and bool(isatty and isatty())
        self.c = dict.fromkeys(
            ["rounds", "kills", "kills_timer", "kills_failpoint", "kills_recovery", "clean_stops", "recoveries",
             "checks", "begun", "acked", "verified", "lost", "committed_unacked", "prepared", "in_doubt",
             "in_doubt_committed", "in_doubt_rolled_back", "in_doubt_kept", "folds"], 0)
        self.kept: dict[str, tuple[bytes, str, int]] = {}  # left in doubt: id -> (gid, ops, since round)
        self.interrupted = False
        self.violations: list[str] = []
        self.epoch = 0
        self.base_markers: dict[str, str] = {}
        self.base_lists: dict[int, tuple[int, list[str]]] = {}
        self.history: dict[str, str] = {}  # id -> what became of it (for messages)
        self.recovery_estimate = 0.05
        self.children: list[_Child] = []
        self.started = time.monotonic()
        self.round = -1
        self.live_acked = 0
        self.last_progress = 0.0

    # --- reporting

    def violation(self, text: str) -> None:
        text = " | ".join(line.strip() for line in text.strip().splitlines())  # one line each
        self.violations.append(text)
        where = "at start-up" if self.round < 0 else f"round {self.round}"
        if len(self.violations) <= MAX_REPORTED:
            self._clear_live()
            self.err.write(f"kvstore torture: VIOLATION ({where}): {text}\n")
            self.err.flush()
        elif len(self.violations) == MAX_REPORTED + 1:
            self.err.write("kvstore torture: (more violations not shown)\n")

    def _clear_live(self) -> None:
        if self.live and self.last_progress:
            self.out.write("\r" + " " * 79 + "\r")
            self.out.flush()

    def progress(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < 0.2:
            return
        self.last_progress = now
        c = self.c
        line = (f"torture: round {c['rounds']}  commits {c['acked'] + self.live_acked}  kills {c['kills']}  "
                f"recoveries {c['recoveries']}  {now - self.started:.1f}/{self.seconds:g} s")
        self.out.write("\r" + line[:79].ljust(79))
        self.out.flush()

    def summary(self) -> dict[str, Any]:
        c = self.c
        return {
            **c,
            "violations": len(self.violations),
            "violation_messages": self.violations,
            "seconds": round(time.monotonic() - self.started, 3),
            "seed": self.seed,
            "threads": self.threads,
            "crash_every": self.crash_every,
            "path": self.path,
            "ok": not self.violations,
            "interrupted": self.interrupted,
        }

    def print_summary(self) -> None:
        s = self.summary()
        if self.json_output:
            self.out.write(json.dumps(s) + "\n")
            self.out.flush()
            return
        self._clear_live()
        w = self.out.write
        w(f"kvstore torture {self.path}: {s['rounds']} rounds in {s['seconds']:.1f} s "
          f"(seed {self.seed}, {self.threads} threads, a crash every {self.crash_every:g} s on average)\n")
        w(f"  kills         {s['kills']} (timer {s['kills_timer']}, failpoint {s['kills_failpoint']}, "
          f"during recovery {s['kills_recovery']}); clean stops {s['clean_stops']}\n")
        w(f"  recoveries    {s['recoveries']}; db.check() passed {s['checks']} times; folds {s['folds']}\n")
        w(f"  transactions  begun {s['begun']}, acked {s['acked']}, verified {s['verified']}, lost {s['lost']} "
          f"(committed but not acked: {s['committed_unacked']})\n")
        w(f"  two-phase     prepared {s['prepared']}; in doubt after a crash {s['in_doubt']} "
          f"(committed {s['in_doubt_committed']}, rolled back {s['in_doubt_rolled_back']}; "
          f"left in doubt for a later round {s['in_doubt_kept']} times)\n")
        w(f"  violations    {s['violations']}\n")
        if not s["ok"]:
            w(f"FAILED: {s['violations']} violation(s), see above; the database is left as it was\n")
        else:
            w("INTERRUPTED (no violation so far)\n" if self.interrupted else "OK\n")
        self.out.flush()

    # --- the database, from the parent

    def _open(self, create: bool = False) -> Any:
        import kvstore

        try:
            return kvstore.open(self.path, create=create, sync="full")
        except kvstore.CorruptionError as e:
            self.violation(f"the database cannot be opened: CorruptionError: {e}")
            raise _Stop from None
        except Exception as e:
            if create:  # at start-up: a bad path, a locked database ... (the caller's problem)
                raise
            self.violation(f"reopening the database after round {self.round} failed: {type(e).__name__}: {e}")
            raise _Stop from None

    def _check(self, db: Any) -> bool:
        import kvstore

        try:
            db.check()
        except kvstore.CorruptionError as e:
            self.violation(f"db.check() failed: {e}")
            return False
        except Exception as e:  # the check itself broke on the damage: a finding too
            self.violation(f"db.check() failed with {type(e).__name__}: {e}")
            return False
        self.c["checks"] += 1
        return True

    @staticmethod
    def _read(db: Any) -> tuple[dict[bytes, bytes], list[bytes]]:
        tx = db.begin(readonly=True)
        try:
            foreign = [k for k, _ in _first(tx.scan(None, PREFIX), 3)] + [k for k, _ in _first(tx.scan(PREFIX_END, None), 3)]
            kv = dict(tx.scan(PREFIX, PREFIX_END))
        finally:
            tx.commit()
        return kv, foreign

    def _state(self, db: Any) -> State:
        kv, foreign = self._read(db)
        st = parse_state(kv)
        for key in foreign:
            st.problems.append(f"unexpected key {key!r} outside torture/ (torture writes nothing there)")
        return st

    def _fold(self, db: Any, st: State, new_epoch: bool) -> None:
        """Delete the checked markers and data, make the balances the new base
        and empty the lists (counting what they dropped): one transaction."""
        tx = db.begin()
        try:
            for tid in st.markers:
                tx.delete(mark_key(tid))
                self.history[tid] = f"was folded away after round {self.round}"
            for tid, j in st.data:
                tx.delete(data_key(tid, j))
            for k, (d, entries) in st.lists.items():
                tx.put(list_key(k), format_list(d + len(entries), []))
            meta = dict(st.meta)
            meta["base"] = [st.balances[a] for a in range(meta["accounts"])]
            if new_epoch:
                meta["epoch"] += 1
            tx.put(META_KEY, json.dumps(meta).encode())
            tx.commit()
        finally:
            if tx.state == "active":
                tx.rollback()
        self.epoch = meta["epoch"]
        self.base_markers = {}
        self.base_lists = {k: (d + len(e), []) for k, (d, e) in st.lists.items()}
        self.c["folds"] += 1

    def startup(self) -> None:
        """Create the database, or check the one there; resolve what is in
        doubt; fold; start a new epoch (ids never repeat across runs)."""
        db = self._open(create=True)
        try:
            self._startup(db)
        except (_Stop, ValueError):
            raise
        except Exception as e:  # the engine broke while torture read or resolved what it found
            tb = traceback.format_exc().strip().splitlines()
            self.violation(f"checking the database as found failed with {type(e).__name__}: {e} ({' | '.join(tb[-6:])})")
            raise _Stop from None
        finally:
            try:
                db.close()
            except Exception as e:
                self.violation(f"closing the database failed with {type(e).__name__}: {e}")
                raise _Stop from None

    def _startup(self, db: Any) -> None:
        if not self._check(db):
            raise _Stop
        kv, foreign = self._read(db)
        if foreign:
            raise ValueError(f"{self.path!r} holds keys that torture did not write (e.g. {foreign[0]!r}); "
                             "torture runs only on a new directory or one an earlier torture run left")
        if not kv:
            tx = db.begin()
            meta = {"version": FORMAT_VERSION, "accounts": ACCOUNTS, "total": ACCOUNTS * INITIAL_BALANCE,
                    "lists": LISTS, "epoch": 0, "base": [INITIAL_BALANCE] * ACCOUNTS}
            tx.put(META_KEY, json.dumps(meta).encode())
            for a in range(ACCOUNTS):
                tx.put(acct_key(a), b"%d" % INITIAL_BALANCE)
            for k in range(LISTS):
                tx.put(list_key(k), format_list(0, []))
            tx.commit()
        st = self._state(db)
        if st.meta and st.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{self.path!r} was written by another version of torture ({st.meta.get('version')!r})")
        for text in verify(st):
            self.violation(f"the database as found: {text}")
        rng = random.Random(f"kvstore-torture:{self.seed}:start-up")
        for gid in db.prepared():
            if not gid.startswith(GID_PREFIX):
                raise ValueError(f"{self.path!r} has a prepared transaction {gid!r} that torture did not make")
            (db.commit_prepared if rng.random() < 0.5 else db.rollback_prepared)(gid)
        if self.violations:
            raise _Stop
        st = self._state(db)
        for text in verify(st):
            self.violation(f"after resolving the transactions in doubt: {text}")
        if self.violations:
            raise _Stop
        self._fold(db, st, new_epoch=True)

    # --- rounds

    def _spawn(self, plan: dict[str, Any], name: str, role: str, failpoints: str | None, life: float) -> _Child:
        cfg = {
            "path": self.path, "role": role, "threads": self.threads, "round": plan["round"], "epoch": self.epoch,
            "child_seed": plan["child_seed"], "checkpoints": plan["checkpoints"],
            "checkpoint_interval": plan["checkpoint_interval"] if role == "work" else 3600.0,
            "checkpoint_wal_bytes": plan["checkpoint_wal_bytes"] if role == "work" else BIG_WAL,
            "cache_size": plan["cache_size"], "life": life,
        }
        child = _Child(self.tmp, name, cfg, failpoints)
        self.children.append(child)
        return child

    def _spawn_work(self, plan: dict[str, Any]) -> _Child:
        life = plan["delay"] if plan["kind"] == "clean" else plan["delay"] + 60.0
        return self._spawn(plan, f"r{plan['round']}", "work", plan["failpoint"], life)

    def _wait_open(self, child: _Child, deadline: float) -> float | None:
        """Until the child opened (return when, ``time.monotonic()``), died,
        or the run is over (return None)."""
        while not child.side.has_opened():
            child.side.poll()
            if child.side.has_opened():
                break
            if child.proc.poll() is not None:
                child.side.poll()
                return child.side.opened_at
            now = time.monotonic()
            if now >= deadline:
                return None
            if child.started_at is not None and now - child.started_at > OPEN_TIMEOUT:
                self.violation(f"child {child.name} did not open the database within {OPEN_TIMEOUT:g} s")
                return None
            self.progress()
            time.sleep(0.003)
        return child.side.opened_at

    def _finish(self, child: _Child, expect_exit: bool) -> None:
        """Classify how the child ended and collect what it reported."""
        rc = child.proc.wait()
        child.side.poll()
        seen: dict[str, int] = {}
        for text in child.side.violations:
            seen[text] = seen.get(text, 0) + 1
        for text, n in seen.items():
            self.violation(f"child {child.name}: {text}" + (f" (seen {n} times)" if n > 1 else ""))
        if rc == -signal.SIGKILL:
            self.c["kills"] += 1
            if child.side.opened_at is None and child.side.opening_at is not None:
                self.c["kills_recovery"] += 1  # inside kvstore.open (by the timer or a failpoint)
            elif child.killed_by_us:
                self.c["kills_timer"] += 1
            else:
                self.c["kills_failpoint"] += 1
        elif rc == 0 and (child.side.done or not expect_exit):
            self.c["clean_stops"] += child.side.done
        else:
            detail = " | ".join(child.side.errors)[-1500:] or child.stderr_tail() or "(no output)"
            self.violation(f"child {child.name} exited with status {rc}: {detail}")
        o = child.side.opened
        if o.get("recovery_seconds"):
            self.recovery_estimate = 0.7 * self.recovery_estimate + 0.3 * max(0.005, float(o["recovery_seconds"]))

    def run_work(self, child: _Child, plan: dict[str, Any], deadline: float) -> None:
        child.go()
        opened_at = self._wait_open(child, deadline)
        if opened_at is not None:
            kill_at = opened_at + (plan["delay"] + 30.0 if plan["kind"] == "clean" else plan["delay"])
            while child.proc.poll() is None:
                now = time.monotonic()
                if now >= min(kill_at, deadline):
                    if plan["kind"] == "clean" and now >= kill_at:
                        self.violation(f"child {child.name} did not stop and close within 30 s of its time")
                    child.kill()
                    break
                child.side.poll()
                self.live_acked = len(child.side.acked)
                self.progress()
                time.sleep(0.005)
        child.kill()  # no-op if it is dead already
        self._finish(child, expect_exit=plan["kind"] == "clean")

    def run_recovery(self, child: _Child, rk: dict[str, Any]) -> None:
        """A child opens the crashed database and is killed while it recovers
        (by a failpoint, or at a random moment of its expected recovery)."""
        child.go()
        end = time.monotonic() + OPEN_TIMEOUT
        kill_at = None
        while child.proc.poll() is None:
            child.side.poll()
            now = time.monotonic()
            if child.side.opened_at is not None:
                break  # it finished recovering first: kill it now
            if kill_at is None and child.side.opening_at is not None and "fraction" in rk:
                kill_at = child.side.opening_at + rk["fraction"] * self.recovery_estimate * 1.5
            if (kill_at is not None and now >= kill_at) or now >= end:
                break
            time.sleep(0.001)
        child.kill()
        self._finish(child, expect_exit=False)
        if child.side.opened_at is not None:
            self.c["recoveries"] += 1

    def check_round(self, plan: dict[str, Any], sides: list[_SideLog], crashed: bool) -> None:
        """Reopen, check, resolve the transactions in doubt, check again, fold.
        An unexpected exception from the engine is a violation too."""
        try:
            self._check_round(plan, sides, crashed)
        except _Stop:
            raise
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()
            self.violation(f"the parent's checks failed with {type(e).__name__}: {e} ({' | '.join(tb[-6:])})")

    def _check_round(self, plan: dict[str, Any], sides: list[_SideLog], crashed: bool) -> None:
        begun: dict[str, tuple[str, str]] = {}
        acked: set[str] = set()
        prepared: set[str] = set()
        rolledback: set[str] = set()
        for s in sides:
            begun.update(s.begun)
            acked |= s.acked
            prepared |= s.prepared
            rolledback |= s.rolledback
        self.c["begun"] += len(begun)
        self.c["acked"] += len(acked)
        self.c["prepared"] += len(prepared)
        self.live_acked = 0
        found = len(self.violations)
        for tid in sorted(acked - set(begun)):
            self.violation(f"child reported {tid} acked but never begun")

        db = self._open()
        try:
            if crashed:
                self.c["recoveries"] += 1
            if not self._check(db):
                return
            st = self._state(db)
            in_doubt: dict[str, bytes] = {}
            for gid in db.prepared():
                owner = gid[len(GID_PREFIX):].decode(errors="replace") if gid.startswith(GID_PREFIX) else None
                if owner is not None and owner in self.kept:
                    in_doubt[owner] = gid
                elif owner is None or begun.get(owner, ("",))[0] != "P":
                    self.violation(f"transaction {gid!r} is in doubt, but the child never prepared it")
                elif owner in acked:
                    self.violation(f"transaction {owner} is in doubt, but commit_prepared returned for it")
                elif owner in rolledback:
                    self.violation(f"transaction {owner} is in doubt, but rollback_prepared returned for it")
                else:
                    in_doubt[owner] = gid
            for tid in sorted(set(self.kept) - set(in_doubt)):
                self.violation(f"transaction {tid}, prepared and left in doubt since round {self.kept[tid][2]}, "
                               "is no longer in doubt (a prepared transaction must survive crashes until resolved)")
            forbidden = {tid: "was rolled back (rollback_prepared returned)" for tid in rolledback}
            forbidden.update({tid: "is in doubt (prepared, not resolved)" for tid in in_doubt})
            allowed = {tid: desc for tid, (_, desc) in begun.items()}
            allowed.update({tid: desc for tid, (_, desc, _) in self.kept.items()})
            for text in verify(st, base_markers=self.base_markers, base_lists=self.base_lists, allowed=allowed,
                               must=acked, forbidden=forbidden, history=self.history):
                self.violation(text)
            present = set(st.markers)
            self.c["verified"] += len(acked & present)
            self.c["lost"] += len(acked - present)
            self.c["committed_unacked"] += len((present - set(self.base_markers)) - acked)
            if len(self.violations) > found:
                return

            # Resolve the transactions in doubt (a seeded choice: commit, roll
            # back, or leave in doubt for the next rounds), then check again.
            kept: dict[str, tuple[bytes, str, int]] = {}
            if in_doubt:
                self.c["in_doubt"] += len(set(in_doubt) - set(self.kept))
                rng = random.Random(plan["resolve_seed"])
                committed: set[str] = set()
                for tid in sorted(in_doubt):
                    x = rng.random()
                    since = self.kept[tid][2] if tid in self.kept else plan["round"]
                    if x < 0.25 and plan["round"] - since < 3:
                        kept[tid] = (in_doubt[tid], allowed[tid], since)
                        decision = "keep"
                    elif x < 0.625:
                        db.commit_prepared(in_doubt[tid])
                        committed.add(tid)
                        self.c["in_doubt_committed"] += 1
                        decision = "commit"
                    else:
                        db.rollback_prepared(in_doubt[tid])
                        forbidden[tid] = "was rolled back by the parent (rollback_prepared after a crash)"
                        self.history[tid] = "was rolled back by the parent (rollback_prepared after a crash)"
                        self.c["in_doubt_rolled_back"] += 1
                        decision = "rollback"
                    if self.trace is not None:
                        self.trace.append({"round": plan["round"], "resolve": tid, "decision": decision})
                left = sorted(db.prepared())
                if left != sorted(g for g, _, _ in kept.values()):
                    self.violation(f"in doubt after commit_prepared/rollback_prepared: {left[:5]}, "
                                   f"expected only those left in doubt on purpose: {sorted(kept)[:5]}")
                for tid in committed:
                    forbidden.pop(tid, None)
                if not self._check(db):
                    return
                st2 = self._state(db)
                for text in verify(st2, base_markers=st.markers, base_lists=st.lists,
                                   allowed={t: allowed[t] for t in committed}, must=committed,
                                   forbidden=forbidden, history=self.history):
                    self.violation(f"after resolving the transactions in doubt: {text}")
                st = st2
                if len(self.violations) > found:
                    return
            self.kept = kept
            self.c["in_doubt_kept"] += len(kept)

            for tid in rolledback:
                self.history[tid] = "was rolled back (rollback_prepared returned)"
            for tid in begun:
                if tid not in st.markers and tid not in kept:
                    self.history.setdefault(tid, f"was absent after round {plan['round']} (never committed)")
            self.base_markers = dict(st.markers)
            self.base_lists = {k: v for k, v in st.lists.items()}
            # (a fold would conflict with the keys of the transactions left in doubt)
            if not kept and (len(st.markers) >= FOLD_MARKERS or any(len(e) >= FOLD_LIST for _, e in st.lists.values())):
                self._fold(db, st, new_epoch=False)
            if self.tamper is not None:
                self.tamper(db)
        finally:
            db.close()

    def main(self) -> int:
        deadline = self.started + self.seconds
        self.tmp = tempfile.mkdtemp(prefix="kvstore-torture-")
        nxt: _Child | None = None
        try:
            try:
                self.startup()
                rnd = 0
                while True:
                    self.round = rnd
                    plan = _round_plan(self.seed, rnd, self.crash_every)
                    if self.trace is not None:
                        self.trace.append(plan)
                    child = nxt if nxt is not None else self._spawn_work(plan)
                    nxt = None
                    recovering = [self._spawn(plan, f"r{rnd}.rec{i}", "recover", rk.get("failpoint"), 60.0)
                                  for i, rk in enumerate(plan["recovery_kills"])]
                    self.run_work(child, plan, deadline)
                    crashed = not child.side.done
                    sides = [child.side]
                    for rk, rc in zip(plan["recovery_kills"], recovering, strict=True):
                        if crashed and time.monotonic() < deadline:
                            self.run_recovery(rc, rk)
                            sides.append(rc.side)
                        else:
                            rc.abandon()
                    last = time.monotonic() >= deadline or bool(self.violations)
                    if not last:  # its start-up overlaps our checks
                        nxt = self._spawn_work(_round_plan(self.seed, rnd + 1, self.crash_every))
                    t_check = time.monotonic()
                    self.check_round(plan, sides, crashed)  # even after a child saw a violation
                    if self.trace is not None:
                        sd = child.side
                        self.trace.append({
                            "round": rnd,
                            "outcome": {-signal.SIGKILL: "killed", 0: "exited"}.get(child.proc.returncode, "failed"),
                            "killed_by_parent": child.killed_by_us,
                            "open_seconds": None if sd.opened_at is None or sd.opening_at is None else round(sd.opened_at - sd.opening_at, 4),
                            "worked_seconds": None if sd.opened_at is None else round(t_check - sd.opened_at, 4),
                            "acked": len(sd.acked),
                            "check_seconds": round(time.monotonic() - t_check, 4),
                        })
                    self.c["rounds"] += 1
                    self.progress(force=True)
                    if last or self.violations:
                        break
                    rnd += 1
            except _Stop:
                pass
            except KeyboardInterrupt:
                self.interrupted = True
                self.print_summary()
                raise
        finally:
            if nxt is not None:
                nxt.abandon()
            for ch in self.children:
                if ch.proc.poll() is None:
                    ch.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.print_summary()
        return 1 if self.violations else 0


_T = TypeVar("_T")


def _first(it: Iterable[_T], n: int) -> list[_T]:
    out: list[_T] = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out


def run(
    path: str,
    *,
    seconds: float = 60.0,
    threads: int = 4,
    seed: int = 0,
    crash_every: float = 1.0,
    json_output: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    _tamper: Callable[[Any], None] | None = None,
    _trace: list[dict[str, Any]] | None = None,
) -> int:
    """Torture the database in directory ``path`` for ``seconds`` seconds
    (see the module's docstring); return 0 if no invariant was violated, 1
    otherwise.  ``path`` is created if missing; a database an earlier run
    left there is checked and continued.

    Raises ValueError for a bad argument or a directory that holds anything
    but a torture database.  ``_tamper(db)`` (tests only) is called with the
    parent's open database after each round's checks; ``_trace`` (tests only)
    receives the decisions as they are taken.
    """
    def number(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")
        return float(value)

    seconds = number("seconds", seconds)
    crash_every = number("crash_every", crash_every)
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int, not {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if not hasattr(signal, "SIGKILL"):
        raise ValueError("torture needs SIGKILL (a POSIX system)")
    path = os.fspath(path)
    return _Torture(path, seconds, threads, seed, crash_every, json_output, out, err, _tamper, _trace).main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child_main(sys.argv[2:]))
    sys.stderr.write("use: kvstore torture PATH [--seconds S] [--threads T] [--seed N] [--crash-every S]\n")
    sys.exit(2)
