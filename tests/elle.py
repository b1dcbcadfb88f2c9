"""A small Elle-style checker for list-append transaction histories
(TESTING.md section 6; Kingsbury and Alvaro, "Elle: Inferring Isolation
Anomalies from Experimental Observations", VLDB 2020).

The workload
============

Every key holds a list of integers.  A transaction is a sequence of
micro-operations:

    ("append", k, v)        append v to the list at k (every v is unique)
    ("r", k, [v1, v2, ...]) read the list at k (None: the key is absent)
    ("scan", (lo, hi), {k: [...], ...})
                            read every key in [lo, hi) (None bounds are
                            open); keys missing from the result were absent

Each transaction attempt is a ``Txn`` with its outcome (``"ok"``
committed, ``"fail"`` aborted, ``"info"`` unknown), the real time before it
began and after it finished (ns), its micro-operations that took effect
(``ops``) and those a ``rollback_to`` a savepoint undid (``undone``).

What the lists reveal
=====================

Appends are unique and a list only grows, so a read shows the *order* in
which the values were appended: reading ``[1, 4, 2]`` at k says the writer
of 1 came before the writer of 4, then of 2.  The longest committed read of k
gives k's version order, and every other read of k must be a prefix of it.
From that order and the reads (after stripping the reader's own trailing
appends, which show its writes, not its snapshot) follow Adya's edges
between committed transactions:

    ww  T1 -> T2   T2 appended the value right after T1's in k's order
    wr  T1 -> T2   T2 read a list whose last element T1 appended
    rw  T1 -> T2   T1 read a list, and the next value in k's order is T2's:
                   T2 overwrote what T1 saw.  ``rw-p`` when T1 saw it
                   through a scan (a predicate read, so phantoms count)
    rt  T1 -> T2   T1 finished before T2 began (real time; a snapshot
                   taken at begin sees every commit that finished before)

Worked example: T1 appends 1 to x; T2 reads x = [1] and appends 2 to y; T3
reads y = [] and x = [1].  Then T1 -wr-> T2, T1 -wr-> T3, and T3 -rw-> T2
(T3 read y before T2's append).  No cycle: T1, T3, T2 is a serial order.

Anomalies
=========

Cycles, classified per strongly connected component by the worst cycle it
holds (Adya; Elle's names):

    G0              a cycle of ww edges only (dirty writes)
    G1c             ww and wr edges, at least one wr (circular information flow)
    G-single        exactly one rw edge (read skew, lost update)
    G-nonadjacent   two or more rw edges, no two of them adjacent
    G2-item         rw edges, two of them adjacent (write skew)
    G2              as G2-item, but only through predicate (scan) rw edges

A cycle that needs real-time edges gets the suffix ``-realtime``.  Snapshot
isolation allows exactly G2-item and G2 (Fekete et al. 2005: every cycle
under SI has two *adjacent* rw edges; real-time edges behave as ww/wr do in
that proof, since T1 -rt-> T2 means T1 committed before T2's snapshot);
serializable allows none (``Result.forbidden``).

Besides cycles, each of these is reported, and forbidden at both levels:

    G1a                a committed read saw an aborted or rolled-back append
    G1b                a committed read saw a writer's intermediate state
                       (not its last append to that key)
    incompatible-order two reads of a key where neither is a prefix of the other
    lost-append        a committed append missing from a read that began
                       after the append's transaction finished
    lost-update        two committed transactions read the same version of
                       a key and both appended to it
    duplicate-elements a read lists a value twice
    garbage-read       a read lists a value nobody appended
    internal           a transaction's read disagrees with its own earlier
                       reads and appends
    duplicate-append   the history appended one value twice (a workload bug)

Elle export
===========

``write_elle(history, path)`` writes the history in the JSON form of Elle's
EDN (as elle-cli reads it): a JSON array of operations, one per line,
``{"index", "type": "invoke"|"ok"|"fail"|"info", "f": "txn", "process",
"value": [["append", k, v], ["r", k, [...]]], "time"}``, an invocation and a
completion per transaction (reads are null in the invocation).  Scans become
reads of each key of the range; undone micro-operations become a separate
failed transaction on process ``UNDONE_PROCESS + p``.  ``load_elle`` reads it
back.

    >>> t1 = Txn(1, process=0, type="ok", start=0, end=10)
    >>> t1.append("x", 1)
    >>> t2 = Txn(2, process=1, type="ok", start=20, end=30)
    >>> t2.read("x", [1])
    >>> check([t1, t2]).anomalies
    []
    >>> t3 = Txn(3, process=2, type="ok", start=40, end=50)
    >>> t3.read("x", [])                       # began after t1 finished
    >>> sorted(check([t1, t2, t3]).names())
    ['G-single-realtime', 'lost-append']
"""

from __future__ import annotations

import bisect
import gc
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

OK, FAIL, INFO = "ok", "fail", "info"
APPEND, READ, SCAN = "append", "r", "scan"

#: the Elle process number of the failed transaction that carries a
#: transaction's undone micro-operations (UNDONE_PROCESS + its process)
UNDONE_PROCESS = 100_000

#: cycle classes from worst to mildest (a component is named by its worst)
CYCLES = ("G0", "G1c", "G-single", "G-nonadjacent", "G2-item", "G2")
SEVERITY = {name: i for i, name in enumerate(CYCLES)}

#: what each isolation level allows; everything else is forbidden
ALLOWED = {
    "serializable": frozenset(),
    "snapshot": frozenset({"G2-item", "G2", "G2-item-realtime", "G2-realtime"}),
}

DEP = ("ww", "wr")  # dependency edges (plus rt in the real-time pass)
RW = ("rw", "rw-p")  # anti-dependency edges: item, predicate
LABELS = ("ww", "wr", "rt", "rw", "rw-p")  # which type names a multi-type edge


# --- histories ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Txn:
    """One transaction attempt and what it observed."""

    id: int
    process: int = 0
    type: str = INFO  # "ok", "fail" or "info"
    start: int = 0  # ns, taken before begin
    end: int | None = None  # ns, taken after commit (or rollback) returned
    ops: list[tuple] = field(default_factory=list)  # micro-operations that took effect
    undone: list[tuple] = field(default_factory=list)  # undone by rollback_to

    def append(self, key: Hashable, value: int) -> None:
        self.ops.append((APPEND, key, value))

    def read(self, key: Hashable, values: Iterable[int] | None) -> None:
        self.ops.append((READ, key, None if values is None else list(values)))

    def scan(self, lo: Hashable | None, hi: Hashable | None, found: dict) -> None:
        self.ops.append((SCAN, (lo, hi), {k: list(v) for k, v in found.items()}))

    def savepoint(self) -> int:
        """A mark for ``rollback_to``: how many micro-operations stand."""
        return len(self.ops)

    def rollback_to(self, mark: int) -> None:
        """The transaction rolled back to the savepoint ``mark``."""
        self.undone.extend(self.ops[mark:])
        del self.ops[mark:]

    def __str__(self) -> str:
        return f"T{self.id}"

    def describe(self) -> str:
        span = "?" if self.end is None else f"{(self.end - self.start) / 1e6:.3f}"
        ops = ", ".join(_show_op(op) for op in self.ops)
        undone = f"; undone: {', '.join(_show_op(op) for op in self.undone)}" if self.undone else ""
        return f"T{self.id} (process {self.process}, {self.type}, start {self.start}, {span} ms): {ops}{undone}"


def _show_list(values: list | None) -> str:
    if values is None or len(values) <= 8:
        return str(values)
    return f"[{values[0]}, {values[1]}, ... ({len(values) - 5} more), {', '.join(map(str, values[-3:]))}]"


def _show_op(op: tuple) -> str:
    f, k, v = op
    if f == SCAN:
        found = ", ".join(f"{key}: {_show_list(values)}" for key, values in v.items())
        return f"scan [{k[0]}, {k[1]}) -> {{{found}}}"
    return f"{f} {k} {v if f == APPEND else _show_list(v)}"


class Recorder:
    """Collects transaction attempts from many threads, with real times.

    Call ``begin`` *before* the store's begin and ``finish`` *after* its
    commit or rollback returned, so that "T1 finished before T2 began" in
    the record implies it in the store.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.txns: list[Txn] = []  # guarded by self._mu
        self._mu = threading.Lock()

    def begin(self, process: int, start: int | None = None) -> Txn:
        with self._mu:
            t = Txn(len(self.txns), process, INFO, self.clock() if start is None else start)
            self.txns.append(t)
        return t

    def finish(self, txn: Txn, outcome: str) -> None:
        txn.end = self.clock()
        txn.type = outcome


# --- the checker ----------------------------------------------------------------------------------


@dataclass
class Anomaly:
    name: str
    txns: tuple[int, ...]
    text: str

    def __str__(self) -> str:
        return f"{self.name}: {self.text}"


@dataclass
class Result:
    """What ``check`` found."""

    anomalies: list[Anomaly]
    txns: dict[int, Txn]
    edges: dict[str, int]

    def names(self) -> set[str]:
        return {a.name for a in self.anomalies}

    def forbidden(self, level: str) -> list[Anomaly]:
        """The anomalies the isolation ``level`` rules out."""
        if level not in ALLOWED:
            raise ValueError(f"level must be one of {sorted(ALLOWED)}, not {level!r}")
        return [a for a in self.anomalies if a.name not in ALLOWED[level]]

    def count(self, outcome: str) -> int:
        return sum(1 for t in self.txns.values() if t.type == outcome)

    def report(self, anomalies: list[Anomaly] | None = None, limit: int = 8) -> str:
        shown = self.anomalies if anomalies is None else anomalies
        lines = [
            f"{len(self.txns)} transactions ({self.count(OK)} ok, {self.count(FAIL)} failed, "
            f"{self.count(INFO)} unknown); edges {dict(sorted(self.edges.items()))}; "
            f"{len(shown)} anomalies: {sorted({a.name for a in shown})}"
        ]
        for a in shown[:limit]:
            lines.append(f"  {a}")
            for tid in dict.fromkeys(a.txns):
                lines.append(f"      {self.txns[tid].describe()}")
        if len(shown) > limit:
            lines.append(f"  ... and {len(shown) - limit} more")
        return "\n".join(lines)


def check(history: Iterable[Txn]) -> Result:
    """Infer the version orders and the dependency graph of ``history`` and
    return every anomaly found (see the module docstring)."""
    enabled = gc.isenabled()
    gc.disable()  # the checker makes many objects and no cycles: skip the collector's passes
    try:
        return _Checker(list(history)).run()
    finally:
        if enabled:
            gc.enable()


def _universe(txns: Iterable[Txn]) -> list:
    """Every key the history names: what a scan of a range reads."""
    keys = set()
    for t in txns:
        for f, k, v in (*t.ops, *t.undone):
            if f == SCAN:
                keys.update(v)
            else:
                keys.add(k)
    return sorted(keys)


def _expand(ops: list[tuple], universe: list) -> Iterator[tuple]:
    """Micro-operations as (f, key, value, predicate): a scan is a read of each
    key of the universe in its range; an absent key reads as []."""
    for f, k, v in ops:
        if f == APPEND:
            yield APPEND, k, v, False
        elif f == READ:
            yield READ, k, [] if v is None else v, False
        else:
            lo, hi = k
            first = 0 if lo is None else bisect.bisect_left(universe, lo)
            last = len(universe) if hi is None else bisect.bisect_left(universe, hi)
            for key in universe[first:last]:
                yield READ, key, v.get(key) or [], True


@dataclass
class _Read:
    txn: Txn
    key: Any
    values: list
    seen: list  # values without the reader's own trailing appends: its snapshot
    predicate: bool  # through a scan
    prefix: bool = True  # of its key's version order (else an incompatible-order)


class _Checker:
    def __init__(self, txns: list[Txn]) -> None:
        self.txns = {t.id: t for t in txns}
        if len(self.txns) != len(txns):
            raise ValueError("transaction ids must be unique")
        self.universe = _universe(txns)
        self.anomalies: list[Anomaly] = []
        self.writer: dict[tuple, tuple[Txn, bool]] = {}  # (key, value) -> (appender, undone)
        self.appends: dict[int, dict[Any, list]] = defaultdict(lambda: defaultdict(list))  # standing appends
        self.reads: list[_Read] = []  # of committed transactions
        self.order: dict[Any, list] = {}  # key -> version order (the longest read)
        self.incompatible: set = set()  # keys with an incompatible-order
        self.out: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)  # a -> b -> {type: key}

    def found(self, name: str, txns: Iterable[Txn], text: str) -> None:
        self.anomalies.append(Anomaly(name, tuple(t.id for t in txns), text))

    def run(self) -> Result:
        self._index_appends()
        for t in self.txns.values():
            if t.type == OK:
                self._check_internal(t)
                self._collect_reads(t)
        self._infer_orders()
        self._check_reads()
        self._lost_appends()
        self._lost_updates()
        self._build_graph()
        self._find_cycles()
        edges: dict[str, int] = defaultdict(int)
        for succ in self.out.values():
            for types in succ.values():
                for ty in types:
                    edges[ty] += 1
        return Result(self.anomalies, self.txns, dict(edges))

    # --- what the reads say ------------------------------------------------------------------

    def _index_appends(self) -> None:
        for t in self.txns.values():
            for ops, undone in ((t.ops, False), (t.undone, True)):
                for f, k, v, _ in _expand(ops, self.universe):
                    if f != APPEND:
                        continue
                    if (k, v) in self.writer:
                        other = self.writer[(k, v)][0]
                        self.found("duplicate-append", (other, t), f"{other} and {t} both appended {v} to {k}")
                        continue
                    self.writer[(k, v)] = (t, undone)
                    if not undone:
                        self.appends[t.id][k].append(v)

    def _check_internal(self, t: Txn) -> None:
        """Each read of a key agrees with the transaction's earlier reads and
        appends of it."""
        known: dict[Any, list] = {}
        mine: dict[Any, list] = defaultdict(list)  # own appends before any read
        for f, k, v, _ in _expand(t.ops, self.universe):
            if f == APPEND:
                (known[k] if k in known else mine[k]).append(v)
                continue
            if k in known:
                expected = known[k]
                if v != expected:
                    self.found("internal", (t,), f"{t} read {k} = {_show_list(v)} after it saw or made {_show_list(expected)}")
            elif mine[k] and v[len(v) - len(mine[k]) :] != mine[k]:
                self.found("internal", (t,), f"{t} read {k} = {_show_list(v)}, which does not end with its own appends {mine[k]}")
            known[k] = list(v)

    def _collect_reads(self, t: Txn) -> None:
        for f, k, v, predicate in _expand(t.ops, self.universe):
            if f == READ:
                own = set(self.appends[t.id].get(k, ()))
                n = len(v)
                while n and v[n - 1] in own:
                    n -= 1
                self.reads.append(_Read(t, k, v, v[:n], predicate))

    def _bad_value(self, k: Any, v: int) -> tuple[str, Txn | None, str] | None:
        """Why no committed read may list ``v`` at ``k`` (None: it may)."""
        if (k, v) not in self.writer:
            return "garbage-read", None, "which nobody appended"
        w, undone = self.writer[(k, v)]
        if undone:
            return "G1a", w, f"from {w}, which rolled it back to a savepoint"
        if w.type == FAIL:
            return "G1a", w, f"from {w}, which aborted"
        return None

    def _check_reads(self) -> None:
        """Each committed read lists only committed, distinct values, and
        never a writer's intermediate state.  A read that is a prefix of its
        key's order is judged through the order, which is checked once."""
        bad_positions: dict[Any, list[int]] = {}
        first_duplicate: dict[Any, int | None] = {}
        for k, order in self.order.items():
            bad_positions[k] = [i for i, v in enumerate(order) if self._bad_value(k, v)]
            seen: set = set()
            first_duplicate[k] = next((i for i, v in enumerate(order) if v in seen or seen.add(v)), None)
        reported = set()
        for r in self.reads:
            t, k, values = r.txn, r.key, r.values
            if r.prefix:
                dup = first_duplicate[k] is not None and len(values) > first_duplicate[k]
                positions = bad_positions[k][: bisect.bisect_left(bad_positions[k], len(values))]
            else:
                dup = len(set(values)) != len(values)
                positions = [i for i, v in enumerate(values) if self._bad_value(k, v)]
            if dup:
                self.found("duplicate-elements", (t,), f"{t} read {k} = {_show_list(values)}")
            for i in positions:
                v = values[i]
                if (t.id, k, v) not in reported:
                    reported.add((t.id, k, v))
                    name, w, why = self._bad_value(k, v)  # type: ignore[misc]
                    self.found(name, (t,) if w is None else (w, t), f"{t} read {v} in {k} = {_show_list(values)}, {why}")
            if r.seen and (k, r.seen[-1]) in self.writer:
                last = r.seen[-1]
                w, undone = self.writer[(k, last)]
                mine = self.appends[w.id].get(k, [])
                if w is not t and w.type != FAIL and not undone and mine and mine[-1] != last and (t.id, k) not in reported:
                    reported.add((t.id, k))
                    self.found("G1b", (w, t), f"{t} read {k} = {_show_list(values)}: {w}'s intermediate state (it appended {mine} to {k})")

    def _infer_orders(self) -> None:
        by_key: dict[Any, list[_Read]] = defaultdict(list)
        for r in self.reads:
            by_key[r.key].append(r)
        for k, reads in by_key.items():
            longest = max((r.values for r in reads), key=len)
            self.order[k] = longest
            bad = None
            for r in reads:
                r.prefix = r.values == longest[: len(r.values)]
                if not r.prefix and bad is None:
                    bad = r
            if bad is not None:
                self.incompatible.add(k)
                other = next(r for r in reads if r.values == longest)
                self.found("incompatible-order", (bad.txn, other.txn),
                           f"{k}: {bad.txn} read {_show_list(bad.values)} but {other.txn} read {_show_list(other.values)}")

    def _lost_appends(self) -> None:
        """A committed append must be in every read that began after its
        transaction finished."""
        by_key: dict[Any, list[_Read]] = defaultdict(list)
        for r in self.reads:
            by_key[r.key].append(r)
        appended: dict[Any, list[tuple[int, Txn]]] = defaultdict(list)
        for (k, v), (w, undone) in self.writer.items():
            if not undone and w.type == OK and w.end is not None:
                appended[k].append((v, w))
        for k, reads in by_key.items():
            reads.sort(key=lambda r: r.txn.start)
            starts = [r.txn.start for r in reads]
            # shortest[i]: the index of the shortest read among reads[i:]
            shortest: list[int | None] = [None] * (len(reads) + 1)
            for i in range(len(reads) - 1, -1, -1):
                nxt = shortest[i + 1]
                shortest[i] = i if nxt is None or len(reads[i].values) < len(reads[nxt].values) else nxt
            position = {v: i for i, v in reversed(list(enumerate(self.order.get(k, []))))}
            for v, w in appended.get(k, ()):
                i = bisect.bisect_right(starts, w.end)
                if i == len(reads):
                    continue
                if k in self.incompatible:  # reads that are no prefixes: look at each
                    missing = next((r for r in reads[i:] if v not in r.values), None)
                else:  # all prefixes of the order: the shortest misses v if any does
                    pos = position.get(v)
                    r = reads[shortest[i]]
                    missing = r if pos is None or len(r.values) <= pos else None
                if missing is not None:
                    self.found("lost-append", (w, missing.txn),
                               f"{w} appended {v} to {k} and finished before {missing.txn} began, "
                               f"which read {k} = {_show_list(missing.values)}")

    def _lost_updates(self) -> None:
        """Two committed transactions that read the same version of a key and
        then both appended to it."""
        groups: dict[tuple, list[Txn]] = defaultdict(list)
        for t in self.txns.values():
            if t.type != OK:
                continue
            first_read: dict[Any, tuple] = {}
            wrote = set()
            for f, k, v, _ in _expand(t.ops, self.universe):
                if f == READ and k not in wrote and k not in first_read:
                    first_read[k] = tuple(v)
                elif f == APPEND:
                    wrote.add(k)
            for k in wrote:
                if k in first_read:
                    groups[(k, first_read[k])].append(t)
        for (k, version), txns in groups.items():
            if len(txns) > 1:
                self.found("lost-update", txns,
                           f"{', '.join(map(str, txns))} all read {k} = {_show_list(list(version))} and then appended to it")

    # --- the graph ---------------------------------------------------------------------------

    def _edge(self, a: Txn, b: Txn, ty: str, key: Any) -> None:
        if a is not b:
            self.out[a.id].setdefault(b.id, {}).setdefault(ty, key)

    def _writer_in_graph(self, k: Any, v: int) -> Txn | None:
        w, undone = self.writer.get((k, v), (None, True))
        if w is None or undone or w.type not in (OK, INFO):
            return None
        return w

    def _build_graph(self) -> None:
        for k, order in self.order.items():  # ww: consecutive appenders
            prev = None
            for v in order:
                w = self._writer_in_graph(k, v)
                if w is not None:
                    if prev is not None:
                        self._edge(prev, w, "ww", k)
                    prev = w
        for r in self.reads:  # wr and rw
            if not r.prefix:
                continue
            k, t, seen = r.key, r.txn, r.seen
            if seen:
                w = self._writer_in_graph(k, seen[-1])
                if w is not None:
                    self._edge(w, t, "wr", k)
            order = self.order[k]
            if len(seen) < len(order):
                w = self._writer_in_graph(k, order[len(seen)])
                if w is not None:
                    self._edge(t, w, "rw-p" if r.predicate else "rw", k)
        # rt: T1 finished before T2 began.  Only the frontier of the most
        # recent finishers gets an edge; the others reach T2 through them.
        events = []
        for t in self.txns.values():
            if t.type == OK and t.end is not None:
                events.append((t.start, 0, t))
                events.append((t.end, 1, t))
        events.sort(key=lambda e: (e[0], e[1], e[2].id))  # equal times: not before
        frontier: set[Txn] = set()
        preds: dict[int, list[Txn]] = {}
        for _, kind, t in events:
            if kind == 0:
                preds[t.id] = list(frontier)
                for p in frontier:
                    self._edge(p, t, "rt", None)
            else:
                frontier.difference_update(preds.get(t.id, ()))
                frontier.add(t)

    def _succ(self, types: Iterable[str], within: set | None) -> Callable[[int], list[int]]:
        types = frozenset(types)
        out = self.out

        def succ(n: int) -> list[int]:
            return [m for m, ts in out.get(n, {}).items() if (within is None or m in within) and not types.isdisjoint(ts)]

        return succ

    def _step(self, a: int, b: int, types: Iterable[str]) -> tuple:
        ts = self.out[a][b]
        ty = next(t for t in LABELS if t in ts and t in types)
        return (a, ty, ts[ty], b)

    def _path(self, src: int, dst: int, types: Iterable[str], within: set) -> list[tuple] | None:
        """The shortest path src -> dst over ``types`` inside ``within``, or
        None if there is none."""
        succ = self._succ(types, within)
        parent = {src: None}
        queue = deque([src])
        while queue:
            n = queue.popleft()
            if n == dst:
                break
            for m in succ(n):
                if m not in parent:
                    parent[m] = n
                    queue.append(m)
        if dst not in parent:
            return None
        steps = []
        n = dst
        while parent[n] is not None:
            steps.append(self._step(parent[n], n, types))
            n = parent[n]
        return steps[::-1]

    def _cycle_through(self, comp: set, types: Iterable[str], first: Iterable[str]) -> list[tuple]:
        """A cycle inside ``comp`` over ``types`` starting with an edge of a
        type in ``first``."""
        first = frozenset(first)
        for a in comp:
            for b, ts in self.out.get(a, {}).items():
                if b in comp and not first.isdisjoint(ts):
                    back = self._path(b, a, types, comp)
                    if back is not None:
                        return [self._step(a, b, first)] + back
        raise AssertionError(f"no cycle through {sorted(first)} in {sorted(comp)}")

    def _find_cycles(self) -> None:
        nodes = [t.id for t in self.txns.values() if t.type in (OK, INFO)]
        every = (*DEP, *RW)
        worst: dict[int, int] = {}  # node -> severity of its component without rt
        for comp in _sccs(nodes, self._succ(every, None)):
            if len(comp) > 1:
                name, steps = self._classify(set(comp), realtime=False)
                self._cycle_found(name, steps)
                for n in comp:
                    worst[n] = SEVERITY[name]
        for comp in _sccs(nodes, self._succ((*every, "rt"), None)):
            if len(comp) > 1:
                name, steps = self._classify(set(comp), realtime=True)
                before = min((worst[n] for n in comp if n in worst), default=None)
                if before is None or SEVERITY[name] < before:
                    self._cycle_found(name + "-realtime", steps)

    def _cycle_found(self, name: str, steps: list[tuple]) -> None:
        text = f"T{steps[0][0]}" + "".join(
            f" -{ty}{'' if key is None else ' ' + str(key)}-> T{b}" for _, ty, key, b in steps
        )
        self.found(name, [self.txns[a] for a, _, _, _ in steps], text)

    def _classify(self, comp: set, realtime: bool) -> tuple[str, list[tuple]]:
        """The worst cycle in the strongly connected ``comp``, and a witness."""
        ww = ("ww", "rt") if realtime else ("ww",)
        dep = (*ww, "wr")
        for name, types in (("G0", ww), ("G1c", dep)):
            for sub in _sccs(comp, self._succ(types, comp)):
                if len(sub) > 1:
                    return name, self._cycle_through(set(sub), types, ("wr",) if name == "G1c" else types)
        # dep edges inside comp are acyclic now: a G-single is an rw edge a -> b
        # with a dep path back from b to a
        dsucc = self._succ(dep, comp)
        order = [sub[0] for sub in _sccs(comp, dsucc)]  # successors first
        bit = {n: 1 << i for i, n in enumerate(order)}
        reach: dict[int, int] = {}
        for n in order:
            r = bit[n]
            for m in dsucc(n):
                r |= reach[m]
            reach[n] = r
        rsucc = self._succ(RW, comp)
        for a in comp:
            for b in rsucc(a):
                if reach[b] & bit[a]:
                    back = self._path(b, a, dep, comp)
                    assert back is not None
                    return "G-single", [self._step(a, b, RW)] + back
        steps = self._nonadjacent_cycle(comp, dsucc, rsucc, dep)
        if steps:
            return "G-nonadjacent", steps
        item = (*dep, "rw")
        for sub in _sccs(comp, self._succ(item, comp)):
            if len(sub) > 1:
                return "G2-item", self._cycle_through(set(sub), item, ("rw",))
        return "G2", self._cycle_through(comp, (*dep, *RW), ("rw-p",))

    def _nonadjacent_cycle(self, comp: set, dsucc: Callable, rsucc: Callable, dep: tuple) -> list[tuple] | None:
        """A closed walk with no two adjacent rw edges: a cycle in the graph
        whose steps are a dep edge, or an rw edge followed by a dep edge."""
        via: dict[int, dict[int, int | None]] = {n: {} for n in comp}
        for a in comp:
            for c in dsucc(a):
                via[a][c] = None
            for b in rsucc(a):
                for c in dsucc(b):
                    via[a].setdefault(c, b)
        for sub in _sccs(comp, lambda n: list(via[n])):
            if len(sub) < 2:
                continue
            inside = set(sub)
            a = sub[0]
            c = next(m for m in via[a] if m in inside)
            # BFS back from c to a over the composite steps
            parent = {c: None}
            queue = deque([c])
            while a not in parent:
                n = queue.popleft()
                for m in via[n]:
                    if m in inside and m not in parent:
                        parent[m] = n
                        queue.append(m)
            hops = [(a, c)]
            n = a
            back = []
            while parent[n] is not None:
                back.append((parent[n], n))
                n = parent[n]
            hops += back[::-1]
            steps = []
            for x, y in hops:
                mid = via[x][y]
                if mid is None:
                    steps.append(self._step(x, y, dep))
                else:
                    steps += [self._step(x, mid, RW), self._step(mid, y, dep)]
            return steps
        return None


def _sccs(nodes: Iterable[int], succ: Callable[[int], list[int]]) -> list[list[int]]:
    """Tarjan's strongly connected components, iteratively; a component
    comes after every component it reaches (successors first)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    comps: list[list[int]] = []
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(succ(root)))]
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ(w))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(comp)
    return comps


# --- Elle's JSON ----------------------------------------------------------------------------------


def _elle_value(ops: list[tuple], universe: list, invoke: bool) -> list:
    value = []
    for f, k, v, _ in _expand(ops, universe):
        if f == APPEND:
            value.append([APPEND, k, v])
        else:
            value.append([READ, k, None if invoke else v])
    return value


def to_elle(history: Iterable[Txn]) -> list[dict]:
    """The history as Elle operations: an invocation and a completion per
    transaction, in time order (a completion first when times tie)."""
    txns = sorted(history, key=lambda t: (t.start, t.id))
    if not txns:
        return []
    universe = _universe(txns)
    t0 = txns[0].start
    events = []
    for t in txns:
        parts = [(t.process, t.type, t.ops)]
        if t.undone:
            parts.append((UNDONE_PROCESS + t.process, FAIL, t.undone))
        for process, outcome, ops in parts:
            base = {"f": "txn", "process": process, "txn": t.id}
            events.append((t.start, 1, {"type": "invoke", **base, "value": _elle_value(ops, universe, True), "time": t.start - t0}))
            if t.end is not None:
                events.append((t.end, 0, {"type": outcome, **base, "value": _elle_value(ops, universe, False), "time": t.end - t0}))
    events.sort(key=lambda e: (e[0], e[1]))
    ops = []
    for i, (_, _, op) in enumerate(events):
        ops.append({"index": i, **op})
    return ops


def from_elle(ops: Iterable[dict]) -> list[Txn]:
    """Transactions from Elle operations (scans come back as point reads)."""
    pending: dict[Any, dict] = {}
    txns: list[Txn] = []

    def make(invoke: dict | None, done: dict | None) -> Txn:
        op = done if done is not None else invoke
        assert op is not None
        t = Txn(len(txns), op["process"], done["type"] if done else INFO,
                (invoke or op).get("time", 0), done.get("time") if done else None)
        for f, k, v in op["value"]:
            if f == APPEND:
                t.append(k, v)
            elif done is not None:
                t.read(k, v)
        return t

    for op in ops:
        if op["type"] == "invoke":
            pending[op["process"]] = op
        else:
            txns.append(make(pending.pop(op["process"], None), op))
    for invoke in pending.values():
        txns.append(make(invoke, None))
    return txns


def write_elle(history: Iterable[Txn], path: Any) -> None:
    """Write the history as Elle JSON (an array, one operation a line)."""
    lines = [json.dumps(op, separators=(",", ":")) for op in to_elle(history)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[" + ",\n ".join(lines) + "]\n")


def load_elle(path: Any) -> list[Txn]:
    with open(path, encoding="utf-8") as f:
        return from_elle(json.load(f))
