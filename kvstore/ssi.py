"""Serializable Snapshot Isolation: read marks, rw-antidependencies, and the
dangerous-structure rule (Cahill, Röhm and Fekete 2008; Ports and Grittner
2012, as in PostgreSQL's README-SSI).

Every serializable transaction records what it read: keys, and the ranges its
scans covered (predicate marks, so phantoms count).  A read-write
anti-dependency R -> W means R read something W overwrote, so R must come
before W in any equivalent serial order.  It is found from either side:

* W writes a key that a concurrent R read, or that lies in a range R scanned
  (``on_write``);
* R reads a key and skips a version its snapshot cannot see, written by W
  (``on_read`` with the skipped writers).

A non-serializable execution always contains a *dangerous structure*
T_in -> T_pivot -> T_out in which T_out commits first.  When one forms, the
pivot is aborted if it has not committed; otherwise the transaction that
completes the structure is.  Refinement for read-only T_in (Ports and
Grittner, "read-only optimisation"): the structure is dangerous only if T_out
committed before T_in took its snapshot.

Two numbers per commit, from one sequence (as PostgreSQL's prepareSeqNo and
commitSeqNo): ``prepare_seq`` when the commit is *decided* (the transaction
passed its checks and can no longer be a victim) and ``commit_seq`` when it
becomes *visible* to new snapshots, after its log wait.  Group commit wakes
committers in any order, so visibility order need not follow decision order.
"T_out committed first" is therefore judged conservatively: T_out counts
from its decision, the pivot and T_in until they are visible -- T_out came
later only if it was decided after they were visible.  (Comparing decision
numbers alone let cycles through when T_out, decided after the pivot, became
visible before it; the isolation-history checker found it.)

Consequences (the liveness the tests check): a transaction with only incoming
or only outgoing anti-dependencies always commits, and a read-only one fails
only when it completes a dangerous structure whose pivot already committed.

Only serializable transactions take part; a snapshot-isolation writer creates
no edges (as in PostgreSQL).  The state of a committed transaction is kept
until every transaction concurrent with it has finished.

Not thread-safe: the caller holds the engine latch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from wal import canary
from wal.errors import ConflictError


class SsiTxn:
    """The SSI state of one serializable transaction."""

    __slots__ = (
        "txid", "snap_seq", "prepare_seq", "commit_seq", "wrote", "declared_readonly", "ins", "outs",
        "earliest_out", "doomed", "keys", "ranges", "done", "snapshot",
    )

    def __init__(self, txid: int, snap_seq: int, readonly: bool, snapshot: Any = None) -> None:
        self.txid = txid  # 0 for a read-only transaction
        self.snapshot = snapshot  # the MVCC snapshot (kvstore.mvcc.Snapshot), for visibility
        self.snap_seq = snap_seq  # the sequence when its snapshot was taken
        self.prepare_seq: int | None = None  # when its commit was decided
        self.commit_seq: int | None = None  # when its commit became visible
        self.wrote = False
        self.declared_readonly = readonly
        self.ins: set[SsiTxn] = set()  # R -> self
        self.outs: set[SsiTxn] = set()  # self -> W
        # the earliest decision among decided W with self -> W; kept after W
        # itself is forgotten, so a structure with W as T_out is still seen
        self.earliest_out: int | None = None
        self.doomed: ConflictError | None = None
        self.keys: set[bytes] = set()
        self.ranges: list[tuple[bytes | None, bytes | None]] = []
        self.done = False  # decided or aborted

    @property
    def readonly(self) -> bool:
        return self.declared_readonly or not self.wrote

    def __repr__(self) -> str:
        return f"SsiTxn({self.txid}, snap {self.snap_seq}, commit {self.commit_seq})"


def dangerous(t_in: SsiTxn, pivot: SsiTxn) -> bool:
    """Whether T_in -> pivot -> T_out is a dangerous structure for some
    decided T_out (the earliest one is the best candidate): T_out committed
    before the pivot and before T_in (T_in may be T_out itself, as in write
    skew).  Conservative across the commit window: T_out is later only if
    it was decided after the pivot (or T_in) became visible."""
    out = pivot.earliest_out
    if out is None:
        return False
    if pivot.commit_seq is not None and out > pivot.commit_seq:
        return False
    if t_in.commit_seq is not None and out > t_in.commit_seq:
        return False
    if t_in.readonly:
        return out <= t_in.snap_seq  # read-only refinement (conservative too)
    return True


def _note_out(t: SsiTxn, seq: int) -> None:
    if t.earliest_out is None or seq < t.earliest_out:
        t.earliest_out = seq


class SsiManager:
    """Read marks and anti-dependencies of all serializable transactions."""

    def __init__(self) -> None:
        self.by_txid: dict[int, SsiTxn] = {}  # writers, by transaction id
        self.key_readers: dict[bytes, set[SsiTxn]] = {}
        self.range_readers: list[tuple[bytes | None, bytes | None, SsiTxn]] = []
        self.live: set[SsiTxn] = set()  # begun, and kept until nobody concurrent remains
        #: test-only canary switch: detect nothing (the isolation checker must notice)
        self.disabled = canary.no_ssi

    def begin(self, txid: int, snap_seq: int, readonly: bool, snapshot: Any = None) -> SsiTxn:
        t = SsiTxn(txid, snap_seq, readonly, snapshot)
        if txid:
            self.by_txid[txid] = t
        self.live.add(t)
        return t

    # --- recording reads and writes ---------------------------------------------------

    def on_read(self, t: SsiTxn, key: bytes, skipped_writers: Iterable[int]) -> None:
        """``t`` read ``key``; the writers of newer versions it could not see
        are ``skipped_writers``.  Raises ConflictError if ``t`` must abort."""
        if self.disabled:
            return
        if key not in t.keys:
            t.keys.add(key)
            self.key_readers.setdefault(key, set()).add(t)
        for w in skipped_writers:
            writer = self.by_txid.get(w)
            if writer is not None and writer is not t:
                self._edge(t, writer, t, key)

    def on_scan(self, t: SsiTxn, start: bytes | None, stop: bytes | None) -> None:
        """``t`` scanned [start, stop): a predicate mark against phantoms."""
        if self.disabled:
            return
        t.ranges.append((start, stop))
        self.range_readers.append((start, stop, t))

    def on_write(self, t: SsiTxn, key: bytes) -> None:
        """``t`` writes ``key``: every concurrent reader of it gets an edge
        reader -> t.  Raises ConflictError if ``t`` must abort."""
        t.wrote = True
        if self.disabled:
            return
        readers = self.key_readers.get(key)
        for r in list(readers) if readers else ():
            if r is not t and self._concurrent(r, t):
                self._edge(r, t, t, key)
        for start, stop, r in self.range_readers:
            if r is not t and (start is None or start <= key) and (stop is None or key < stop) and self._concurrent(r, t):
                self._edge(r, t, t, key)

    @staticmethod
    def _concurrent(reader: SsiTxn, writer: SsiTxn) -> bool:
        """The reader's commit is not visible to the writer's snapshot
        (an undecided or decided-but-invisible reader always is).

        Decided by visibility, not by commit numbers: a commit is numbered when
        it is decided but becomes visible only once durable, and a transaction
        beginning in between does not see it."""
        if reader.commit_seq is None:
            return True
        if reader.txid and writer.snapshot is not None:
            return not writer.snapshot.sees(reader.txid)
        return reader.commit_seq > writer.snap_seq

    def _edge(self, r: SsiTxn, w: SsiTxn, current: SsiTxn, key: bytes) -> None:
        if w not in r.outs:
            r.outs.add(w)
            w.ins.add(r)
            if dangerous(r, w):  # w as the pivot: r -> w -> (decided T_out)
                self._abort_for(w, r, key)
            if w.prepare_seq is not None:  # r as the pivot: i -> r -> w, w decided
                _note_out(r, w.prepare_seq)
                for i in list(r.ins):
                    if dangerous(i, r):
                        self._abort_for(r, i, key)
        self._raise_if_doomed(current)

    def _abort_for(self, pivot: SsiTxn, t_in: SsiTxn, key: bytes | None) -> None:
        """Doom the pivot of a dangerous structure, or T_in if the pivot is
        already decided (prepared or committing) and so cannot be aborted."""
        if pivot.prepare_seq is None:
            victim = pivot
            role = "is the pivot of a dangerous structure (it read what a committed transaction overwrote, and wrote what another read)"
        else:
            victim = t_in
            role = "would complete a dangerous structure whose pivot has already committed or prepared (it read what the pivot wrote)"
        if victim.prepare_seq is not None or victim.doomed is not None:
            return
        victim.doomed = ConflictError(
            f"serialization failure: transaction {role}{'' if key is None else f' (on key {key!r})'}; retry it",
            key,
            "rw-antidependency",
        )

    @staticmethod
    def _raise_if_doomed(t: SsiTxn) -> None:
        if t.doomed is not None:
            raise t.doomed

    # --- finishing ------------------------------------------------------------------

    def check_commit(self, t: SsiTxn) -> None:
        """Raise ConflictError if ``t`` may not commit (call before its commit
        record is written): ``t`` is doomed, the pivot of a dangerous
        structure, or would complete one as T_in whose pivot committed."""
        self._raise_if_doomed(t)
        if self.disabled:
            return
        for i in t.ins:  # t as the pivot
            if dangerous(i, t):
                self._abort_for(t, i, None)
        for p in t.outs:  # t as T_in
            if dangerous(t, p):
                self._abort_for(p, t, None)
        self._raise_if_doomed(t)

    def decided(self, t: SsiTxn, seq: int) -> None:
        """``t`` passed ``check_commit`` and its commit record is logged (or
        it is prepared): it will commit, as number ``seq`` of the decisions.
        Every p -> t now has a T_out; doom p where that makes a dangerous
        structure."""
        t.prepare_seq = seq
        t.done = True
        if self.disabled:
            return
        for p in list(t.ins):
            _note_out(p, seq)
            for i in list(p.ins):
                if dangerous(i, p):
                    self._abort_for(p, i, None)

    def made_visible(self, t: SsiTxn, seq: int) -> None:
        """``t``'s commit is visible to every snapshot taken from now on
        (number ``seq`` of the sequence); drop what no unfinished transaction
        needs any more.  Becoming visible only makes structures less
        dangerous, so nothing is re-checked."""
        t.commit_seq = seq
        self.cleanup()

    def aborted(self, t: SsiTxn) -> None:
        """Forget ``t`` at once: an aborted transaction's reads never mattered."""
        t.done = True
        self._forget(t)

    def cleanup(self) -> None:
        """Drop the committed transactions no unfinished serializable one is
        concurrent with: every live snapshot sees the commit.  Decided by
        visibility, not commit numbers: a commit is numbered before its log
        wait, and a snapshot taken during the wait does not see it -- nor
        does one taken later, until the commit is visible, so a commit still
        in its wait is kept even when nobody concurrent is live yet."""
        unfinished = [t for t in self.live if not t.done]
        for c in [t for t in self.live if t.commit_seq is not None]:
            if all(not self._concurrent(c, t) for t in unfinished):
                self._forget(c)

    def _forget(self, t: SsiTxn) -> None:
        self.live.discard(t)
        if t.txid and self.by_txid.get(t.txid) is t:
            del self.by_txid[t.txid]
        for key in t.keys:
            readers = self.key_readers.get(key)
            if readers is not None:
                readers.discard(t)
                if not readers:
                    del self.key_readers[key]
        if t.ranges:
            self.range_readers = [e for e in self.range_readers if e[2] is not t]
        for o in t.outs:
            o.ins.discard(t)
        for i in t.ins:
            i.outs.discard(t)
        t.outs = set()
        t.ins = set()
