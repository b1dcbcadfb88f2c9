"""The corruption matrix: damage is detected, never returned as data (TESTING.md 5).

What this proves
----------------
SPEC guarantee 4 at the level of the whole store: whatever single fault hits
the files of a database -- the page file, a WAL segment, the lock file -- the
store either refuses with ``CorruptionError`` naming the damaged page or
segment, or returns exactly the committed data.  It never returns a wrong
value, loses or invents a key, or passes ``check()`` while holding wrong data.
(``tests/test_pages_corruption.py`` proves the same for the page layer alone,
without the log.)

The known store
---------------
``build_known`` runs a seeded workload through ``kvstore.open`` on a FaultFS
with 4 KiB pages, 4 KiB log segments and keys up to 906 bytes (so the B+tree
has three levels and internal pages that the tail never touches), values from
0 bytes to overflow chains, compressible and not, deletes, undo records:

    phase 1 -> checkpoint (files1) -> phase 2 (mid) -> checkpoint (files2) -> tail

The tail is never checkpointed: committed transactions spanning several
segments, one rolled back, one with a ``rollback_to``, and a loser that never
finishes (restart must undo it).  The durable image after the tail is a power
cut under ``sync="full"``: every acknowledged commit is in it.  ``files1``,
``mid`` and ``files2`` supply older valid images (lost writes, torn pages'
old sectors, stale segments).  The *clean* store is the same store reopened
and closed cleanly (its log tail is only CHECKPOINT_END).  The model holds the
committed data after every commit.  Both are decoded independently of the
engine's readers (``pagehelpers.newest_image``, ``wal.format``).

One fault, then one verdict
---------------------------
Each fault changes the files once.  ``evaluate`` then opens the store, scans
it forward and backward, gets every key the model has (and keys it must not
have), and runs ``db.check()`` -- in a worker thread joined with a timeout,
so a hang fails the test instead of stalling it.  Every value is compared with
the model *as it is read*, so a wrong value is caught even if an error comes
later.  The outcome is one of:

* **detected** -- CorruptionError (at open, while reading, or from check)
  whose message names the damaged page's slot or the damaged segment (each
  fault says which names are acceptable).  A refused open must leave every
  file's bytes (so every hash) unchanged; after a CorruptionError past open,
  the read that raised changed nothing and ``close`` runs no checkpoint (the
  page file stays, no segment shrinks or goes).
* **harmless** -- open, every read and ``check()`` succeed and every value
  equals the model.
* **cut** -- the torn-tail rule of SPEC 4: damage that nothing in the files
  proves was ever durable (in the last segment, at or past the checkpoint LSN,
  and no intact later record states a ``durable_lsn`` beyond it) is cut off
  with what follows.  The store must then equal *exactly* the model after the
  commits whose COMMIT record lies before the first damaged record -- not
  some other prefix -- and check clean.  Under ``sync="full"`` this loses the
  last acknowledged commit(s): the limitation DESIGN.md states ("a damaged
  record in the last fsync group ... is cut").  ``permitted_cut`` decides it
  from the bytes alone, independently of the reader.  Cuts count as harmless
  in the reliability report and have their own column in the table.
* **silent** -- anything else that returned data: a wrong value, a missing or
  extra key, a clean check of a wrong store.  Must be zero.
* **crash** (an exception other than CorruptionError), **hang**, **misnamed**
  (CorruptionError not naming the damage), **changed** (a refusal that
  changed a file) fail the row too.

Three engine bugs the matrix found are fixed and kept as regression tests at
the end of this module: a refused open wrote the CLRs restart's undo had
queued; a damaged magic in meta slot 0 was called "not a kvstore page file";
a damaged newest meta was blamed on "segments are missing" without naming
the meta page.

Rows
----
page file: bit flips in every used page (header, body, padding) of both
stores and in free slots; random byte runs; a zeroed 512-byte sector; torn
pages (first k sectors new, the rest the slot's older bytes, zeros or
garbage); misdirected writes (a page's bytes in another page's slot,
page-table pages both ways); lost writes (an older valid image of a page put
back); the newest, the older or both meta pages flipped, zeroed or put back
stale; empty, truncated and wrong-magic page files.  WAL: damage before the
tail (every segment, headers included: below the checkpoint, in segments with
a successor, in earlier fsync groups); every byte of the last record (crash
store: a cut of the last commit; clean store: a cut of CHECKPOINT_END,
harmless); the last fsync group; a middle, the first and the last segment
deleted; two segments swapped; stale segments put back (deleted ones and
older versions of live ones); empty, truncated, wrong-magic and foreign
segments.  The lock file (normally empty): garbage, one byte, missing.
Random edits of any file drawn by hypothesis (a bit, a byte run, zeroed
sectors, a truncation, bytes copied from elsewhere, older bytes, garbage
appended).  A sample of every row on real files (OsFileSystem in tmp_path).

The checks can fail: canary tests plant page checksums off
(``canary.skip_checksum``), a WAL reader that never looks for durability
proof, a write inside a refused open, and a hang; the matrix must call them
silent, changed and hang (they are shown in the table, not counted).

The default run samples (three bits per used page, every byte of the last
record, 40 hypothesis edits: about 1,300 faults); ``KVSTORE_SOAK=1`` flips
twelve bits per page, samples six times as much, damages every byte of every
record of the last segment and runs 1,000 edits.  Outcomes go to the
reliability report (``corruption_detected`` / ``_harmless`` / ``_silent``,
``refused_open_changed_files``) and to a per-row table printed at the end of
the module (``pytest -s``).
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagehelpers import flip_bit, newest_image, replace_at

import kvstore
from kvstore import reliability
from pages.faultfs import FaultFS
from wal import canary
from wal.errors import CorruptionError
from wal.format import (
    SEGMENT_HEADER_SIZE,
    RecordType,
    decode_record,
    parse_segment_name,
)

SOAK = bool(os.environ.get("KVSTORE_SOAK"))

D = "/db"
PS = 4096
SECTOR = 512
PAGE_FILE = "pages.db"
LOCK = "LOCK"
#: Small segments (a quarter of checkpoint_wal_bytes) so the tail spans
#: several; no checkpoint by time.  The build also raises the checkpointer's
#: size trigger so that only its explicit checkpoints run (deterministic).
BUILD_ARGS = dict(checkpoint_interval=float("inf"), checkpoint_wal_bytes=16384, cache_size=24 * PS)
#: Opening a damaged store: a cache that holds most of it (re-reading is slow,
#: and every page is read from the file at least once anyway).
OPEN_ARGS = dict(BUILD_ARGS, cache_size=96 * PS)
#: Seconds one evaluation (open, scans, gets, check) may take before it counts as a hang.
TIMEOUT = 60.0

#: Bits flipped per used page (at least one in the header, one in the body).
BITS_PER_PAGE = 32 if SOAK else 3
HYPOTHESIS_EXAMPLES = 3000 if SOAK else 40


# --- the known store ------------------------------------------------------------------


@dataclass
class Rec:
    """One record of the original log, decoded from the bytes."""

    name: str  # segment file name
    offset: int  # in the file
    lsn: int
    size: int
    type: int
    txid: int
    durable_lsn: int

    @property
    def end(self) -> int:
        return self.lsn + self.size


@dataclass(repr=False)
class Known:
    """The files of a known store and the model of what they hold."""

    files: dict[str, bytes]  # name -> bytes, the store to damage
    older: list[dict[str, bytes]]  # the durable files at earlier moments, oldest first
    model: dict[bytes, bytes]  # the committed data
    absent: list[bytes]  # keys the store must not hold
    base: dict[bytes, bytes]  # the committed data at the checkpoint the page file names
    tail: list[tuple[int, dict[bytes, bytes]]]  # (txid, model after it) per commit after the checkpoint
    records: list[Rec] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)  # segment names in LSN order
    checkpoint_lsn: int = 0
    commit_lsn: dict[int, int] = field(default_factory=dict)  # txid -> LSN of its COMMIT
    used_slots: list[int] = field(default_factory=list)  # non-meta slots the image references
    free_slots: list[int] = field(default_factory=list)
    pages: dict[int, tuple[int, int]] = field(default_factory=dict)  # lid -> (slot, crc)
    pt_slots: set[int] = field(default_factory=set)
    meta_slot: int = 0

    def model_at(self, cut_lsn: int) -> dict[bytes, bytes]:
        """The committed data if the log ended at ``cut_lsn``."""
        state = self.base
        for txid, after in self.tail:
            if self.commit_lsn[txid] < cut_lsn:
                state = after
        return state

    def __repr__(self) -> str:  # (pytest and hypothesis print it: keep it short)
        return f"<Known store: {len(self.files)} files, checkpoint LSN {self.checkpoint_lsn}, {len(self.model)} keys>"

    def segment_first(self, name: str) -> int:
        lsn = parse_segment_name(name)
        assert lsn is not None
        return lsn


def _key(rng: random.Random) -> bytes:
    i = rng.randrange(170)
    return b"k%04d-" % i + bytes([97 + i % 26]) * ((i * 37) % 6 * 180)  # 6 to 906 bytes


def _value(rng: random.Random) -> bytes:
    n = rng.choice([0, 8, 40, 120, 250, 400, 1500, 5000, 9000][: 8 if rng.random() < 0.8 else 9])
    if rng.random() < 0.5:
        return rng.randbytes(n)
    return (rng.randbytes(5) * (n // 5 + 1))[:n]  # compressible (lz4 in records and overflow)


def _files_of(fs: FaultFS, durable: bool = True) -> dict[str, bytes]:
    snap = fs.durable_snapshot() if durable else fs.snapshot()
    return {os.path.basename(p): b for p, b in snap.items() if os.path.dirname(p) == D}


def build_known(seed: int = 5) -> tuple[Known, Known]:
    """(the crash store with its WAL tail, the same store closed cleanly)."""
    rng = random.Random(seed)
    fs = FaultFS(seed=seed, dirs=[D])
    db = kvstore.open(D, _fs=fs, **BUILD_ARGS)
    db._checkpointer.wal_bytes = 1 << 60  # only explicit checkpoints: the build is deterministic
    model: dict[bytes, bytes] = {}
    ever: set[bytes] = set()
    tail: list[tuple[int, dict[bytes, bytes]]] = []
    reserved: set[bytes] = set()  # the loser's keys: nobody else may write them

    def one_tx(record: bool) -> None:
        tx = db.begin()
        for _ in range(rng.randint(1, 3)):
            k = _key(rng)
            if k in reserved:
                continue
            ever.add(k)
            if k in model and rng.random() < 0.25:
                assert tx.delete(k)
                del model[k]
            else:
                v = _value(rng)
                tx.put(k, v)
                model[k] = v
        tx.commit()
        if record and tx.txid:  # (a transaction whose keys were all reserved logged nothing)
            tail.append((tx.txid, dict(model)))

    for _ in range(100):
        one_tx(False)
    db.checkpoint()
    files1 = _files_of(fs)
    for i in range(50):
        one_tx(False)
        if i == 35:
            mid = _files_of(fs)  # segments the next checkpoint deletes: stale ones to put back
    db.checkpoint()
    files2 = _files_of(fs)
    base = dict(model)
    # The tail.  A loser: writes that reach the log (the next commit's flush)
    # but never commit; restart must undo them.
    loser = db.begin()
    reserved.update(sorted(model)[::23])
    for k in sorted(model)[::23]:
        loser.put(k, b"loser " + k[:8])
    loser.put(b"loser-only-key", rng.randbytes(6000))
    reserved.add(b"loser-only-key")
    victim = sorted(model)[5]
    reserved.add(victim)
    assert loser.delete(victim)
    ever.add(b"loser-only-key")
    for i in range(24):
        if i == 10:  # a transaction rolled back: CLRs and ABORT in the log
            tx = db.begin()
            tx.put(b"rolled-back", rng.randbytes(3000))
            tx.put(sorted(set(model) - reserved)[7], b"never")
            tx.rollback()
            ever.add(b"rolled-back")
        if i == 16:  # rollback_to inside a committed transaction
            tx = db.begin()
            tx.put(b"sp-kept", b"kept")
            sp = tx.savepoint()
            tx.put(b"sp-undone", rng.randbytes(2000))
            tx.put(sorted(set(model) - reserved)[9], b"undone too")
            tx.rollback_to(sp)
            tx.commit()
            model[b"sp-kept"] = b"kept"
            ever.update((b"sp-kept", b"sp-undone"))
            tail.append((tx.txid, dict(model)))
        one_tx(True)
    crash_files = _files_of(fs)
    db._checkpointer.stop()
    fs.crash_after(0)  # the old store is dead: nothing it does reaches any image we use
    absent = sorted(ever - set(model)) + [b"never-written", b"\x00", b"\xff" * 1024]
    crash = _describe(Known(crash_files, [files1, mid, files2], model, absent, base, tail))

    # The clean store: reopen (restart + checkpoint) and close cleanly.
    cfs = make_faultfs(crash_files)
    db = kvstore.open(D, _fs=cfs, **OPEN_ARGS)
    db.close()
    clean = _describe(Known(_files_of(cfs), [files1, mid, files2, crash_files], model, absent, dict(model), []))
    return crash, clean


def _describe(k: Known) -> Known:
    """Decode the files independently of the engine's readers: the image's
    slots (``pagehelpers``) and every record of the log (``wal.format``)."""
    img = newest_image(k.files[PAGE_FILE], PS, verify_pages=True)
    assert img is not None
    k.checkpoint_lsn = img.meta.checkpoint_lsn
    k.meta_slot = img.meta_slot
    k.pages = dict(img.pages)
    k.pt_slots = set(img.pt_slots)
    k.used_slots = sorted(img.slots - {0, 1})
    nslots = len(k.files[PAGE_FILE]) // PS
    k.free_slots = [s for s in range(2, nslots) if s not in img.slots]
    k.segments = sorted((n for n in k.files if parse_segment_name(n) is not None), key=parse_segment_name)
    for name in k.segments:
        data, lsn, pos = k.files[name], k.segment_first(name), SEGMENT_HEADER_SIZE
        while pos < len(data):
            rec = decode_record(data, pos, lsn)
            if rec is None and not data[pos:].strip(b"\0"):
                break  # the preallocated zeros after the last record
            assert rec is not None, f"the known store's log does not decode at {name}+{pos}"
            k.records.append(Rec(name, pos, lsn, rec.size, rec.type, rec.txid, rec.durable_lsn))
            if rec.type == RecordType.COMMIT:
                k.commit_lsn[rec.txid] = lsn
            pos += rec.size
            lsn += rec.size
    assert all(txid in k.commit_lsn for txid, _ in k.tail), "a tail commit is not in the log"
    return k


def make_faultfs(files: dict[str, bytes]) -> FaultFS:
    """A FaultFS whose /db durably holds exactly ``files``."""
    fs = FaultFS(seed=0, dirs=[D])
    for name, data in files.items():
        f = fs.create(f"{D}/{name}")
        if data:
            f.pwrite(0, data)
        f.fsync()
        f.close()
    return fs


@pytest.fixture(scope="module")
def known() -> tuple[Known, Known]:
    crash, clean = build_known()
    # The store is what the docstring promises.
    assert len(crash.segments) >= 5, crash.segments
    assert crash.records[-1].type == RecordType.COMMIT
    assert any(r.type == RecordType.CLR for r in crash.records) and any(r.type == RecordType.ABORT for r in crash.records)
    assert len(crash.used_slots) >= 40 and crash.free_slots
    assert clean.records[-1].type == RecordType.CHECKPOINT_END and not clean.tail
    return crash, clean


# --- the verdict on one fault -------------------------------------------------------------


def apply_edits(files: dict[str, bytes], edits: dict[str, Any]) -> dict[str, bytes]:
    """``files`` changed by ``edits``: file name -> its new bytes, None
    (removed), or writes [(offset, bytes)] over its original bytes (cheap to
    keep for the page file, so a row of thousands of faults stays small)."""
    out = dict(files)
    for name, edit in edits.items():
        if edit is None:
            out.pop(name, None)
        elif isinstance(edit, list):
            data = bytearray(out[name])
            for offset, new in edit:
                data[offset : offset + len(new)] = new
            out[name] = bytes(data)
        else:
            out[name] = edit
    return out


@dataclass(repr=False)
class Fault:
    """One damage done to a known store's files, and what is acceptable for it."""

    k: Known  # the store the damage was done to
    row: str
    label: str
    edits: dict[str, Any]  # see apply_edits
    names: list[str]  # regexes; a CorruptionError must match one
    allowed: frozenset[str]  # outcomes that pass
    cut: dict[bytes, bytes] | None = None  # the permitted torn-tail state, if any

    def __repr__(self) -> str:
        return f"<Fault {self.row} / {self.label}>"

    @property
    def files(self) -> dict[str, bytes]:
        """The damaged files (built on demand: faults stay small)."""
        return apply_edits(self.k.files, self.edits)


@dataclass
class Outcome:
    kind: str  # detected | harmless | cut | silent | crash | hang | misnamed | changed
    stage: str = ""  # open | scan | reverse scan | get | check | close
    message: str = ""


class Reader:
    """Checks what a store returns against the acceptable states, as it is
    read.  ``alive`` is the set of states everything read so far agrees
    with; empty means something wrong was returned."""

    def __init__(self, states: dict[str, dict[bytes, bytes]]) -> None:
        self.states = states
        self.alive = set(states)
        self.items = {n: sorted(m.items()) for n, m in states.items()}
        self.wrong = ""

    def _keep(self, ok: Callable[[str], bool], what: str) -> None:
        before = set(self.alive)
        self.alive = {n for n in self.alive if ok(n)}
        if before and not self.alive and not self.wrong:
            self.wrong = what

    def pair(self, i: int, pair: tuple[bytes, bytes], reverse: bool) -> None:
        def ok(n: str) -> bool:
            items = self.items[n]
            j = len(items) - 1 - i if reverse else i
            return 0 <= j < len(items) and items[j] == pair

        self._keep(
            ok, f"{'reverse ' if reverse else ''}scan item {i} is {pair[0][:20]!r}...={pair[1][:12]!r}..., which no acceptable state has there"
        )

    def count(self, n: int, reverse: bool) -> None:
        self._keep(lambda s: len(self.items[s]) == n, f"{'reverse ' if reverse else ''}scan returned {n} pairs")

    def get(self, key: bytes, value: bytes | None) -> None:
        self._keep(lambda s: self.states[s].get(key) == value, f"get({key[:20]!r}...) returned {value[:12] if value else value!r}")


class Store:
    """Where a fault is evaluated: a FaultFS in memory, or real files."""

    def __init__(self, files: dict[str, bytes], tmp: str | None = None) -> None:
        self.tmp = tmp
        if tmp is None:
            self.fs: Any = make_faultfs(files)
            self.path = D
        else:
            self.path = tmp
            os.makedirs(tmp)
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            self.fs = None

    def open(self) -> Any:
        return kvstore.open(self.path, create=False, _fs=self.fs, **OPEN_ARGS)

    def files(self) -> dict[str, bytes]:
        """Every file's bytes as reads see them (FaultFS: the page cache)."""
        if self.tmp is None:
            return _files_of(self.fs, durable=False)
        out = {}
        for name in os.listdir(self.tmp):
            with open(os.path.join(self.tmp, name), "rb") as f:
                out[name] = f.read()
        return out


def _run(fault: Fault, tmp: str | None) -> Outcome:
    known = fault.k
    states = {"model": known.model}
    if fault.cut is not None and fault.cut != known.model:
        states["cut"] = fault.cut
    store = Store(fault.files, tmp)
    before = store.files()
    try:
        db = store.open()
    except CorruptionError as e:
        after = store.files()
        if after != before:
            return Outcome("changed", "open", f"refused open changed files: {e}")
        return _named(fault, Outcome("detected", "open", str(e)))
    except ValueError as e:
        if store.files() != before:
            return Outcome("changed", "open", f"refused open changed files: {e}")
        return Outcome("crash", "open", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - any other error is a finding
        return Outcome("crash", "open", f"{type(e).__name__}: {e}")
    opened = store.files()
    reader = Reader(states)
    stage = "scan"
    try:
        n = 0
        for pair in db.scan():
            reader.pair(n, pair, False)
            n += 1
        reader.count(n, False)
        stage = "reverse scan"
        n = 0
        for pair in db.scan(reverse=True):
            reader.pair(n, pair, True)
            n += 1
        reader.count(n, True)
        stage = "get"
        keys = set(known.model) | set(known.absent) | set(states.get("cut", {}))
        for key in sorted(keys):
            reader.get(key, db.get(key))
        stage = "check"
        report = db.check()
        assert report["ok"]
        stage = "close"
        db.close()
    except CorruptionError as e:
        raised = store.files()
        try:
            db.close()
        except Exception as e2:  # noqa: BLE001
            return Outcome("crash", "close", f"close after CorruptionError raised {type(e2).__name__}: {e2}")
        if reader.wrong:
            return Outcome("silent", stage, f"{reader.wrong}; then CorruptionError: {e}")
        if raised != opened:
            return Outcome("changed", stage, f"the read that raised CorruptionError changed files: {e}")
        changed = _close_changes(opened, store.files())
        if changed:
            return Outcome("changed", "close", f"close after CorruptionError {changed}: {e}")
        return _named(fault, Outcome("detected", stage, str(e)))
    except Exception as e:  # noqa: BLE001
        try:
            db.close()
        except Exception:  # noqa: BLE001
            pass
        if reader.wrong:
            return Outcome("silent", stage, f"{reader.wrong}; then {type(e).__name__}: {e}")
        return Outcome("crash", stage, f"{type(e).__name__}: {e}")
    if reader.wrong:
        return Outcome("silent", "check", reader.wrong + " (and check() passed)")
    if "model" in reader.alive:
        return Outcome("harmless")
    return Outcome("cut")




def _close_changes(opened: dict[str, bytes], closed: dict[str, bytes]) -> str:
    """What ``close`` after a CorruptionError changed that it must not: it
    runs no checkpoint, so the page file stays as it was and no segment goes.
    (It may flush log records open queued -- the restart's CHECKPOINT_END --
    so a segment may grow; its old bytes stay.)"""
    if closed.get(PAGE_FILE) != opened.get(PAGE_FILE):
        return "changed the page file"
    for name, data in opened.items():
        if parse_segment_name(name) is not None and not closed.get(name, b"").startswith(data.rstrip(b"\0")):
            return f"changed or removed {name}"
    return ""


def _named(fault: Fault, out: Outcome) -> Outcome:
    if any(re.search(p, out.message) for p in fault.names):
        return out
    return Outcome("misnamed", out.stage, f"{out.message}  (expected a name matching one of {fault.names})")


def evaluate(fault: Fault, tmp: str | None = None, timeout: float = TIMEOUT) -> Outcome:
    """Open, read everything, check -- in a thread, so a hang is reported."""
    box: list[Outcome] = []

    def work() -> None:
        try:
            box.append(_run(fault, tmp))
        except BaseException as e:  # noqa: BLE001 - reported, not lost in the thread
            box.append(Outcome("crash", "harness", f"{type(e).__name__}: {e}"))

    t = threading.Thread(target=work, name=f"corruption-{fault.row}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return Outcome("hang", "", f"no verdict after {timeout} s")
    return box[0]


# --- the table and the report -----------------------------------------------------------------

TABLE: dict[str, Counter] = defaultdict(Counter)
COLUMNS = ("detected", "harmless", "cut", "silent", "crash", "hang", "misnamed", "changed")


def record(fault: Fault, out: Outcome, count: bool = True) -> None:
    """Add one outcome to the row's table line and to the reliability report."""
    TABLE[fault.row][out.kind] += 1
    if not count:
        return
    if out.kind in ("detected", "misnamed", "changed"):  # (a refusal, whatever else is wrong with it)
        reliability.add("corruption_detected")
    elif out.kind in ("harmless", "cut"):
        reliability.add("corruption_harmless")
    elif out.kind == "silent":
        reliability.add("corruption_silent")
    if out.kind == "changed" and out.stage == "open":
        reliability.add("refused_open_changed_files")


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    if not TABLE:
        return
    width = max(len(r) for r in TABLE) + 2
    cols = [(col, max(len(col) + 2, 8)) for col in COLUMNS]
    lines = ["", "corruption matrix (outcomes per row)"]
    lines.append("row".ljust(width) + "".join(col.rjust(w) for col, w in cols))
    total = sum(TABLE.values(), Counter())
    for row, c in [*TABLE.items(), ("total", total)]:
        lines.append(row.ljust(width) + "".join(str(c.get(col, 0) or "-").rjust(w) for col, w in cols))
    print("\n".join(lines))


def run_row(faults: list[Fault], tmp: Callable[[int], str] | None = None, count: bool = True) -> Counter:
    """Evaluate every fault; fail with every unacceptable outcome listed."""
    assert faults, "a row without faults proves nothing"
    bad = []
    kinds: Counter = Counter()
    for i, fault in enumerate(faults):
        out = evaluate(fault, tmp(i) if tmp else None)
        record(fault, out, count)
        kinds[out.kind] += 1
        if out.kind not in fault.allowed:
            bad.append(f"{fault.row} / {fault.label}: {out.kind} at {out.stage or '-'}: {out.message[:300]}")
    bad.sort(key=lambda line: [k in line for k in ("changed at open", ": silent", ": hang", ": crash")], reverse=True)
    assert not bad, f"{len(bad)} of {len(faults)} faults unacceptable:\n" + "\n".join(bad[:25])
    return kinds


# --- building faults -------------------------------------------------------------------------

DETECTED = frozenset({"detected"})
HARMLESS = frozenset({"harmless"})
DETECTED_OR_HARMLESS = DETECTED | HARMLESS


def with_file(files: dict[str, bytes], name: str, data: bytes | None) -> dict[str, bytes]:
    """``files`` with ``name`` replaced (None: removed)."""
    out = dict(files)
    if data is None:
        out.pop(name, None)
    else:
        out[name] = data
    return out


def slot_names(slot: int) -> list[str]:
    return [rf"\bslot {slot}\b"]


def page_fault(k: Known, row: str, label: str, slot: int, data: bytes, allowed: frozenset[str] | None = None) -> Fault:
    """The page file with ``slot`` holding ``data`` (padded/cut to a page)."""
    data = (data + bytes(PS))[:PS]
    if allowed is None:
        allowed = DETECTED if slot in k.used_slots else HARMLESS
    return Fault(k, row, label, {PAGE_FILE: [(slot * PS, data)]}, slot_names(slot), allowed)


def slot_bytes(files: dict[str, bytes], slot: int) -> bytes:
    return files[PAGE_FILE][slot * PS : (slot + 1) * PS]


def permitted_cut(k: Known, files: dict[str, bytes]) -> dict[bytes, bytes] | None:
    """The state a torn-tail cut must leave, if SPEC 4 permits one for these
    damaged files; None if any cut would lose data the files prove durable.

    Permitted only when nothing but the last segment differs, the damage
    starts at or after the checkpoint LSN, and no record after the damage
    that is still intact states a durable LSN beyond the damaged record.
    The cut must end the log at the first damaged record.
    """
    last = k.segments[-1]
    if set(files) - {last} != set(k.files) - {last}:
        return None
    if any(files[n] != k.files[n] for n in files if n != last):
        return None
    orig, new = k.files[last], files.get(last)
    first = k.segment_first(last)
    if new == orig:
        return k.model
    if new is None or len(new) <= SEGMENT_HEADER_SIZE or new[:SEGMENT_HEADER_SIZE] != orig[:SEGMENT_HEADER_SIZE]:
        # removed, emptied, or its header damaged: the whole segment goes
        # (a bad header on a segment with records is damage: only detection then)
        if new is not None and len(new) > SEGMENT_HEADER_SIZE:
            return None
        cut_lsn = first
    else:
        diff = next((i for i in range(min(len(orig), len(new))) if orig[i] != new[i]), min(len(orig), len(new)))
        if diff >= len(orig):
            return k.model  # bytes appended after the end: garbage past the log
        if all(r.offset + r.size <= diff for r in k.records if r.name == last):
            return k.model  # a change in the preallocated zeros after the last record
        rec = next(r for r in k.records if r.name == last and r.offset <= diff < r.offset + r.size)
        cut_lsn = rec.lsn
    if cut_lsn < k.checkpoint_lsn:
        return None
    for r in k.records:
        if r.name == last and r.lsn > cut_lsn and r.durable_lsn > cut_lsn:
            intact = new is not None and new[r.offset : r.offset + r.size] == orig[r.offset : r.offset + r.size]
            if intact:
                return None
    return k.model_at(cut_lsn)


def wal_fault(k: Known, row: str, label: str, edits: dict[str, Any], names: list[str], allowed: frozenset[str] | None = None) -> Fault:
    """A fault in the log: a permitted cut is acceptable only where
    ``permitted_cut`` says so; otherwise only detection."""
    cut = permitted_cut(k, apply_edits(k.files, edits))
    if allowed is None:
        if cut is None:
            allowed = DETECTED
        elif cut == k.model:
            allowed = DETECTED_OR_HARMLESS
        else:
            allowed = DETECTED | {"cut"}
    return Fault(k, row, label, edits, names, allowed, cut)


def seg_names(k: Known, name: str) -> list[str]:
    """A segment fault's error must name that segment, or (for a gap, a
    swap or a stale segment, which show at the boundary) a neighbour."""
    i = k.segments.index(name) if name in k.segments else None
    near = [name] if i is None else k.segments[max(0, i - 1) : i + 2]
    # A log cut short (or started late) is named by where it ends (starts),
    # which lies in the damaged segment.
    return [re.escape(n) for n in near] + [r"log ends at LSN \d+, before the durable LSN", r"log starts at LSN \d+, after the durable LSN"]


def older_slot_image(k: Known, slot: int) -> bytes:
    """What ``slot`` held at an earlier checkpoint, if that differs from now
    (zeros if it never held anything else): the "old" fill of a torn page."""
    now = slot_bytes(k.files, slot)
    for files in reversed(k.older):
        old = slot_bytes(files, slot)
        if old and old != now:
            return (old + bytes(PS))[:PS]
    return bytes(PS)


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))


def _sample(rng: random.Random, items: list, n: int) -> list:
    """``n`` of ``items`` (six times as many under KVSTORE_SOAK=1)."""
    n = n * 6 if SOAK else n
    return list(items) if len(items) <= n else rng.sample(items, n)


# --- page file rows ------------------------------------------------------------------------


def faults_bit_flips(known: tuple[Known, Known]) -> list[Fault]:
    """Bits in the header, the body and the padding of every page the image
    uses -- B+tree, overflow, undo and page-table pages -- in the crash store
    (met by redo, undo or the restart's checkpoint) and in the clean store
    (met by a scan, a get or check)."""
    faults = []
    for k, bits in zip(known, (BITS_PER_PAGE, max(1, BITS_PER_PAGE // 3)), strict=True):
        rng = _rng("flip", k.checkpoint_lsn)
        for slot in k.used_slots:
            page = slot_bytes(k.files, slot)
            picks = [rng.randrange(32 * 8), rng.randrange(32 * 8, PS * 8), (PS - 1) * 8 + rng.randrange(8)]
            picks += [rng.randrange(PS * 8) for _ in range(bits - 3)]
            for bit in picks[:bits]:
                faults.append(page_fault(k, "page: bit flip, used page", f"slot {slot} bit {bit}", slot, flip_bit(page, bit)))
    return faults


def test_flipped_bit_in_any_used_page_is_detected(known):
    run_row(faults_bit_flips(known))


def faults_free_slots(known: tuple[Known, Known]) -> list[Fault]:
    crash, _clean = known
    rng = _rng("free")
    faults = [
        page_fault(crash, "page: bit flip, free slot", f"slot {slot}", slot, flip_bit(slot_bytes(crash.files, slot), rng.randrange(PS * 8)))
        for slot in _sample(rng, crash.free_slots, 12)
    ]
    return faults


def test_flipped_bit_in_a_free_slot_is_harmless(known):
    run_row(faults_free_slots(known))


def faults_byte_runs(known: tuple[Known, Known]) -> list[Fault]:
    crash, clean = known
    faults = []
    for k in (crash, clean):
        rng = _rng("run", k.checkpoint_lsn)
        for slot in k.used_slots if k is crash or SOAK else _sample(rng, k.used_slots, 25):
            page = bytearray(slot_bytes(k.files, slot))
            n = rng.randint(2, 64)
            at = rng.randrange(PS - n)
            page[at : at + n] = rng.randbytes(n)
            faults.append(page_fault(k, "page: byte run", f"slot {slot} [{at}:{at + n}]", slot, bytes(page)))
    return faults


def test_random_byte_run_in_any_used_page_is_detected(known):
    run_row(faults_byte_runs(known))


def faults_zeroed_sectors(known: tuple[Known, Known]) -> list[Fault]:
    """A 512-byte sector of a used page zeroed (one that was not zeros)."""
    crash, clean = known
    faults = []
    for k in (crash, clean):
        rng = _rng("sector", k.checkpoint_lsn)
        for slot in k.used_slots if k is crash or SOAK else _sample(rng, k.used_slots, 25):
            page = slot_bytes(k.files, slot)
            sectors = [i for i in range(PS // SECTOR) if any(page[i * SECTOR : (i + 1) * SECTOR])]
            sector = rng.choice(sectors)
            zeroed = replace_at(page, sector * SECTOR, bytes(SECTOR))
            faults.append(page_fault(k, "page: zeroed sector", f"slot {slot} sector {sector}", slot, zeroed))
    return faults


def test_zeroed_sector_of_any_used_page_is_detected(known):
    run_row(faults_zeroed_sectors(known))


def faults_torn_pages(known: tuple[Known, Known]) -> list[Fault]:
    """The first k sectors of a page's write reached the disk; the rest of the
    slot holds what it held before (an older page or nothing), zeros, or
    garbage.  (k is drawn among the values that change the page.)"""
    crash, _clean = known
    rng = _rng("torn")
    faults = []
    fills = ("old", "zero", "garbage")
    for i, slot in enumerate(crash.used_slots):
        new = slot_bytes(crash.files, slot)
        for fill in fills if SOAK else fills[i % 3 : i % 3 + 1]:
            rest = {"old": older_slot_image(crash, slot), "zero": bytes(PS), "garbage": rng.randbytes(PS)}[fill]
            torn = {kept: new[: kept * SECTOR] + rest[kept * SECTOR :] for kept in range(1, PS // SECTOR)}
            changing = [kept for kept, page in torn.items() if page != new]
            if changing:
                kept = rng.choice(changing)
                faults.append(page_fault(crash, "page: torn page", f"slot {slot} {kept} sectors, then {fill}", slot, torn[kept]))
    return faults


def test_torn_page_is_detected(known):
    run_row(faults_torn_pages(known))


def faults_misdirected(known: tuple[Known, Known]) -> list[Fault]:
    """A page's bytes land in another page's slot: that page is damaged (and
    the copy's own slot keeps its bytes).  Page-table pages both ways."""
    crash, clean = known
    faults = []
    for k, n in ((crash, 50), (clean, 15)):
        rng = _rng("misdirected", k.checkpoint_lsn)
        used = k.used_slots
        pairs = [(a, b) for a in used for b in used if a != b]
        pt = min(k.pt_slots)
        chosen = _sample(rng, pairs, n) + [(pt, used[0] if used[0] != pt else used[1]), (used[-1] if used[-1] != pt else used[-2], pt)]
        for src, dst in chosen:
            faults.append(page_fault(k, "page: misdirected write", f"slot {src} -> slot {dst}", dst, slot_bytes(k.files, src)))
        for src, dst in _sample(rng, [(a, b) for a in used for b in k.free_slots], 4):
            faults.append(page_fault(k, "page: misdirected write", f"slot {src} -> free slot {dst}", dst, slot_bytes(k.files, src)))
    return faults


def test_misdirected_write_is_detected(known):
    run_row(faults_misdirected(known))


def faults_lost_writes(known: tuple[Known, Known]) -> list[Fault]:
    """Every page whose image changed since an earlier checkpoint gets that
    older, valid image back in its current slot: its crc and id are right,
    only the page table's crc tells."""
    crash, clean = known
    faults = []
    for k in (crash, clean):
        for files in k.older:
            img = newest_image(files[PAGE_FILE], PS, verify_pages=False)
            assert img is not None
            for lid, (slot, crc) in sorted(k.pages.items()):
                if lid in img.pages and img.pages[lid][1] != crc:
                    stale = slot_bytes(files, img.pages[lid][0])
                    faults.append(page_fault(k, "page: lost write", f"page {lid} slot {slot} <- generation {img.meta.generation}", slot, stale))
    rng = _rng("lost")
    return faults if SOAK else _sample(rng, faults, 120)


def test_lost_write_an_older_valid_image_of_a_page_is_detected(known):
    run_row(faults_lost_writes(known))


# --- meta pages and the page file as a whole -------------------------------------------------


def bit(k: Known, name: str, bit: int) -> tuple[int, bytes]:
    """A write that flips ``bit`` of file ``name``."""
    return bit // 8, bytes([k.files[name][bit // 8] ^ (1 << bit % 8)])


def meta_fault(k: Known, label: str, writes: list[tuple[int, bytes]], allowed: frozenset[str]) -> Fault:
    # (the known meta bugs are tolerated here, and pinned by their xfail tests)
    return Fault(k, "page file: meta pages", label, {PAGE_FILE: writes}, [re.escape(PAGE_FILE), r"meta"], allowed)


def faults_meta(known: tuple[Known, Known]) -> list[Fault]:
    """The older meta damaged: the newest is used, harmless.  The newest
    damaged (flipped, zeroed, or put back as it was a checkpoint earlier): open
    falls back to the older meta, whose checkpoint's log is gone -- detected.
    Both damaged: detected.  Bytes of a meta slot past the meta: harmless."""
    faults = []
    for k in known:
        data = k.files[PAGE_FILE]
        new, old = k.meta_slot, 1 - k.meta_slot
        rng = _rng("meta", k.checkpoint_lsn)
        for b in [rng.randrange(256 * 8) for _ in range(4)] + [4 * 8 + 3, 16 * 8]:  # ... magic, generation
            faults.append(meta_fault(k, f"older meta slot {old} bit {b}", [bit(k, PAGE_FILE, old * PS * 8 + b)], HARMLESS))
            faults.append(meta_fault(k, f"newest meta slot {new} bit {b}", [bit(k, PAGE_FILE, new * PS * 8 + b)], DETECTED))
            faults.append(meta_fault(k, f"both metas bit {b}", [bit(k, PAGE_FILE, b), bit(k, PAGE_FILE, PS * 8 + b)], DETECTED))
        faults.append(meta_fault(k, "older meta zeroed", [(old * PS, bytes(PS))], HARMLESS))
        faults.append(meta_fault(k, "newest meta zeroed", [(new * PS, bytes(PS))], DETECTED))
        faults.append(meta_fault(k, "both metas zeroed", [(0, bytes(2 * PS))], DETECTED))
        faults.append(meta_fault(k, "meta slot padding garbage", [(new * PS + 1024, rng.randbytes(512))], HARMLESS))
        for files in k.older:  # a lost write of a meta: the slot as it was at an earlier checkpoint
            stale = files[PAGE_FILE][new * PS : (new + 1) * PS]
            if stale != data[new * PS : (new + 1) * PS]:
                faults.append(meta_fault(k, "newest meta put back stale", [(new * PS, stale)], DETECTED))
    return faults


def test_one_or_both_meta_pages_damaged(known):
    run_row(faults_meta(known))


def faults_page_file(known: tuple[Known, Known]) -> list[Fault]:
    faults = []
    name = [re.escape(PAGE_FILE)]
    for k in known:
        data = k.files[PAGE_FILE]
        top = max(k.used_slots)
        cuts = {"empty": 0, "inside meta 0": 100, "after meta 0": PS, "inside meta 1": PS + 100, "metas only": 2 * PS}
        cuts |= {"inside the last used slot": top * PS + 1000, "without the last used slot": top * PS}
        for label, n in cuts.items():
            allowed = DETECTED
            names = name
            if n >= top * PS:
                names = slot_names(top)
            faults.append(Fault(k, "page file: empty / truncated / wrong magic", f"{label} ({n} bytes)", {PAGE_FILE: data[:n]}, names, allowed))
        faults.append(Fault(k, "page file: empty / truncated / wrong magic", "wrong magic, meta 0", {PAGE_FILE: [(4, b"XXXX")]},
                            name, (DETECTED if k.meta_slot == 0 else HARMLESS)))
        faults.append(Fault(k, "page file: empty / truncated / wrong magic", "wrong magic, both metas",
                            {PAGE_FILE: [(4, b"XXXX"), (PS + 4, b"XXXX")]}, name, DETECTED))
    return faults


def test_empty_truncated_or_wrong_magic_page_file_is_detected(known):
    run_row(faults_page_file(known))


def test_missing_page_file_is_refused_and_nothing_is_created(known):
    """Not a corruption outcome but its neighbour: log segments without a page
    file are refused (the engine's decision: ValueError, as for a directory
    that is not a database) and open creates nothing over them."""
    for k in known:
        for create in (False, True):
            store = Store(with_file(k.files, PAGE_FILE, None))
            before = store.files()
            with pytest.raises((ValueError, CorruptionError)):
                kvstore.open(store.path, create=create, _fs=store.fs, **OPEN_ARGS)
            assert store.files() == before


# --- WAL rows ----------------------------------------------------------------------------------


def _damage_byte(data: bytes, offset: int, rng: random.Random) -> bytes:
    return replace_at(data, offset, bytes([data[offset] ^ rng.randrange(1, 256)]))


def faults_wal_before_tail(known: tuple[Known, Known]) -> list[Fault]:
    """A damaged byte anywhere the files prove durable -- a segment header, a
    record in a segment that has a successor, below the checkpoint LSN, or
    followed by a record stating a durable LSN beyond it -- raises, naming the
    segment, whichever store."""
    faults = []
    for k in known:
        rng = _rng("wal", k.checkpoint_lsn)
        for name in k.segments:
            data = k.files[name]
            offsets = [rng.randrange(SEGMENT_HEADER_SIZE)] + [rng.randrange(SEGMENT_HEADER_SIZE, len(data)) for _ in range(40 if SOAK else 5)]
            for off in offsets:
                f = wal_fault(k, "wal: damage before the tail", f"{name}+{off}", {name: _damage_byte(data, off, rng)}, seg_names(k, name))
                if f.cut is None:  # the tail itself is the next test's
                    faults.append(f)
    assert len(faults) >= 30
    return faults


def test_wal_damage_before_the_tail_is_detected(known):
    run_row(faults_wal_before_tail(known))


def faults_wal_last_record(known: tuple[Known, Known]) -> list[Fault]:
    """SPEC 4: nothing proves the last record durable, so damage to any of its
    bytes is a torn tail: cut, with exactly the state before it.  In the crash
    store that record is the last acknowledged COMMIT (the documented
    limitation: that commit is lost); in the clean store it is CHECKPOINT_END
    (nothing is lost).  KVSTORE_SOAK=1 damages every byte of every record of
    the last segment (cut or detected, as ``permitted_cut`` rules)."""
    crash, clean = known
    faults = []
    for k in known:
        rng = _rng("last", k.checkpoint_lsn)
        last = k.records[-1]
        data = k.files[last.name]
        for off in range(last.offset, last.offset + last.size):
            damaged = {last.name: _damage_byte(data, off, rng)}
            f = wal_fault(k, "wal: every byte of the last record", f"{last.name}+{off}", damaged, seg_names(k, last.name))
            if k is crash:
                assert f.cut == k.model_at(last.lsn) != k.model
                f.allowed = frozenset({"cut"})
            else:
                assert f.cut == k.model
                f.allowed = HARMLESS
            faults.append(f)
        if SOAK:
            for r in k.records:
                if r.name == last.name and r is not last:
                    for off in range(r.offset, r.offset + r.size):
                        faults.append(wal_fault(k, "wal: every byte of the last segment", f"{r.name}+{off}",
                                                {r.name: _damage_byte(data, off, rng)}, seg_names(k, r.name)))
    return faults


def test_wal_damage_at_every_byte_of_the_last_record_is_cut_as_a_torn_tail(known):
    run_row(faults_wal_last_record(known))


def faults_wal_last_group(known: tuple[Known, Known]) -> list[Fault]:
    """Bytes of the last fsync group (the records written with the last
    commit): cut exactly before the damaged record, or detected."""
    crash, _clean = known
    rng = _rng("group")
    last = crash.records[-1]
    group = [r for r in crash.records if r.name == last.name and r.lsn >= last.durable_lsn]
    faults = []
    data = crash.files[last.name]
    for r in group:
        for off in sorted({r.offset, r.offset + r.size - 1, *(rng.randrange(r.offset, r.offset + r.size) for _ in range(3))}):
            f = wal_fault(crash, "wal: last fsync group", f"{r.name}+{off}", {r.name: _damage_byte(data, off, rng)}, seg_names(crash, r.name))
            assert f.cut is not None
            faults.append(f)
    return faults


def test_wal_damage_in_the_last_fsync_group_is_cut_never_misread(known):
    run_row(faults_wal_last_group(known))


def faults_segments(known: tuple[Known, Known]) -> list[Fault]:
    """A middle segment deleted (a gap), the first deleted (the checkpoint's
    log is gone), two segments' contents swapped, a segment the checkpoint
    deleted put back (stale: a gap, or harmless log below the checkpoint), an
    older version of a live segment put back.  The last segment deleted is a
    cut of its commits (nothing names it any more: SPEC 4's limit)."""
    crash, _clean = known
    k = crash
    segs = k.segments
    faults = []
    for name in segs[1:-1]:
        faults.append(wal_fault(k, "wal: middle segment deleted", name, {name: None}, [*seg_names(k, name), "gap"], DETECTED))
    faults.append(wal_fault(k, "wal: first segment deleted", segs[0], {segs[0]: None}, [*seg_names(k, segs[0]), "segments are missing"], DETECTED))
    f = wal_fault(k, "wal: last segment deleted", segs[-1], {segs[-1]: None}, seg_names(k, segs[-1]))
    assert f.cut == k.model_at(k.segment_first(segs[-1]))
    faults.append(f)
    rng = _rng("swap")
    pairs = list(pairwise(segs)) + [(segs[0], segs[-1])] + _sample(rng, [(a, b) for a in segs for b in segs if a < b], 4)
    for a, b in pairs:
        files = {a: k.files[b], b: k.files[a]}
        faults.append(wal_fault(k, "wal: two segments swapped", f"{a} <-> {b}", files, [*seg_names(k, a), *seg_names(k, b)], DETECTED))
    for older in k.older:
        for name, data in older.items():
            if parse_segment_name(name) is None or k.files.get(name) == data:
                continue
            files = {name: data}
            allowed = DETECTED_OR_HARMLESS if name not in k.files else None
            faults.append(wal_fault(k, "wal: stale segment put back", name, files, [*seg_names(k, name), "gap", "stale"], allowed))
    return faults


def test_deleted_swapped_or_stale_segments_are_detected(known):
    run_row(faults_segments(known))


def _header_with(data: bytes, magic: bytes | None = None, db_id: bytes | None = None) -> bytes:
    """A segment whose header has a valid crc but another magic or database id."""
    import struct

    import crc32c

    body = bytearray(data[: SEGMENT_HEADER_SIZE - 4])
    if magic is not None:
        body[0:8] = magic
    if db_id is not None:
        body[16:32] = db_id
    return bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body))) + data[SEGMENT_HEADER_SIZE:]


def faults_segment_files(known: tuple[Known, Known]) -> list[Fault]:
    """The first, a middle and the last segment: empty, cut inside the header,
    cut to the header, cut mid-record, cut at a record boundary, a wrong magic
    (bad crc, and a valid crc), another database's id.  Detected -- except on
    the last segment, where an empty or truncated file is the torn tail SPEC 4
    cuts (then the state must be exactly the log's prefix)."""
    faults = []
    for k in known:
        rng = _rng("segfile", k.checkpoint_lsn)
        for name in sorted({k.segments[0], k.segments[len(k.segments) // 2], k.segments[-1]}):
            data = k.files[name]
            recs = [r for r in k.records if r.name == name]
            mid = recs[len(recs) // 2] if recs else None
            variants = {"empty": b"", "cut inside the header": data[:30], "header only": data[:SEGMENT_HEADER_SIZE]}
            if mid is not None:
                variants["cut mid-record"] = data[: mid.offset + mid.size // 2]
                variants["cut at a record boundary"] = data[: mid.offset]
            variants["wrong magic"] = b"kvsXXX\r\n" + data[8:]
            variants["wrong magic, valid crc"] = _header_with(data, magic=b"notWAL\r\n")
            variants["another database's segment"] = _header_with(data, db_id=rng.randbytes(16))
            for label, new in variants.items():
                if new == data:
                    continue
                faults.append(wal_fault(k, "wal: empty / truncated / wrong magic segment", f"{name}: {label}", {name: new}, seg_names(k, name)))
    return faults


def test_empty_truncated_or_wrong_magic_segments(known):
    run_row(faults_segment_files(known))


def faults_lock(known: tuple[Known, Known]) -> list[Fault]:
    """The lock file holds no data: empty, garbage or missing, the store opens."""
    faults = []
    for k in known:
        for label, data in (("garbage", random.Random(1).randbytes(700)), ("one byte", b"x"), ("missing", None)):
            faults.append(Fault(k, "lock file: garbage / missing", label, {LOCK: data}, [LOCK], HARMLESS))
    return faults


def test_lock_file_damage_is_harmless(known):
    run_row(faults_lock(known))


#: Every row's fault builder (the real-files test samples them).
ROW_BUILDERS = (
    faults_bit_flips,
    faults_free_slots,
    faults_byte_runs,
    faults_zeroed_sectors,
    faults_torn_pages,
    faults_misdirected,
    faults_lost_writes,
    faults_meta,
    faults_page_file,
    faults_wal_before_tail,
    faults_wal_last_record,
    faults_wal_last_group,
    faults_segments,
    faults_segment_files,
    faults_lock,
)


# --- random edits (hypothesis) ----------------------------------------------------------------


def _edit_names(k: Known, name: str) -> tuple[list[str], frozenset[str]]:
    """What a detection must name, and the outcomes beyond detection a
    random edit of file ``name`` may have (before the torn-tail rule)."""
    if name == PAGE_FILE:
        return [re.escape(PAGE_FILE), r"B\+tree|rollback segment|page table"], DETECTED_OR_HARMLESS
    if name == LOCK:
        return [LOCK], HARMLESS
    return seg_names(k, name), DETECTED


EDITS = ("flip", "run", "zero sectors", "truncate", "copy", "older bytes", "append")


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_edit_of_any_file_is_detected_or_harmless_never_wrong(known, data):
    """One random edit of one file of either store: a flipped bit, a run of
    random bytes, zeroed sectors, a truncation, bytes copied from elsewhere in
    the directory (misdirected), the bytes an older image had there (lost
    write), garbage appended.  Within the timeout, always an acceptable
    outcome: detected and named, harmless, or a permitted cut."""
    k = dict(zip(("crash", "clean"), known, strict=True))[data.draw(st.sampled_from(("crash", "clean")), label="store")]
    name = data.draw(st.sampled_from(sorted(k.files, key=lambda n: (n != PAGE_FILE, n))), label="file")
    old = k.files[name]
    kind = data.draw(st.sampled_from(EDITS), label="edit")
    size = len(old)
    if kind == "flip" and size:
        new = flip_bit(old, data.draw(st.integers(0, size * 8 - 1), label="bit"))
    elif kind == "run" and size:
        at = data.draw(st.integers(0, size - 1), label="at")
        new = replace_at(old, at, data.draw(st.binary(min_size=1, max_size=min(256, size - at)), label="bytes"))
    elif kind == "zero sectors" and size > SECTOR:
        at = data.draw(st.integers(0, size // SECTOR - 1), label="sector") * SECTOR
        new = replace_at(old, at, bytes(min(size - at, SECTOR * data.draw(st.integers(1, 8), label="sectors"))))
    elif kind == "truncate":
        new = old[: data.draw(st.integers(0, max(0, size - 1)), label="length")]
    elif kind == "copy" and size:
        src_name = data.draw(st.sampled_from(sorted(n for n in k.files if k.files[n])), label="from")
        src = k.files[src_name]
        n = data.draw(st.integers(1, min(PS, len(src), size)), label="length")
        a = data.draw(st.integers(0, len(src) - n), label="from offset")
        b = data.draw(st.integers(0, size - n), label="to offset")
        new = replace_at(old, b, src[a : a + n])
    elif kind == "older bytes" and any(files.get(name) for files in k.older):
        older = data.draw(st.sampled_from([f[name] for f in k.older if f.get(name)]), label="image")
        a = data.draw(st.integers(0, len(older) - 1), label="at")
        n = data.draw(st.integers(1, min(2 * PS, len(older) - a)), label="length")
        new = replace_at(old, a, older[a : a + n])[: max(size, a + n)]
    else:
        new = old + data.draw(st.binary(min_size=1, max_size=300), label="appended")
    if new == old:
        return
    files = {name: new}
    names, allowed = _edit_names(k, name)
    if parse_segment_name(name) is not None:
        fault = wal_fault(k, "random edits (hypothesis)", f"{name}: {kind}", files, names)
        fault.allowed |= allowed
    else:
        fault = Fault(k, "random edits (hypothesis)", f"{name}: {kind}", files, names, allowed)
    run_row([fault])


# --- real files -----------------------------------------------------------------------------------


def test_matrix_on_real_files(known, tmp_path):
    """Users hit real files: a sample of every row, written to a directory
    in tmp_path and opened with the real file system (OsFileSystem, flock)."""
    rng = _rng("real files")
    faults = []
    for build in ROW_BUILDERS:
        for f in _sample(rng, build(known), 2):
            f.row = "real files: " + f.row
            faults.append(f)
    run_row(faults, tmp=lambda i: str(tmp_path / f"db{i}"))


# --- the checks can fail ---------------------------------------------------------------------------


def test_canary_page_checksums_switched_off_gives_silent_outcomes(known):
    """With page checksum verification planted off (``canary.skip_checksum``),
    lost writes and flipped bits in data must come out silently wrong: the
    matrix's verdict is not vacuous.  (Not counted in the report.)"""
    crash, _clean = known
    rng = _rng("canary")
    faults = _sample(rng, faults_lost_writes(known), 15) + [
        f for f in _sample(rng, faults_byte_runs(known), 40) if f.k is crash
    ]
    for f in faults:
        f.row = "canary (planted): skip_checksum"
    with canary.planted("skip_checksum"):
        outcomes = Counter(evaluate(f).kind for f in faults)
    for kind, n in outcomes.items():
        TABLE[faults[0].row][kind] += n
    assert outcomes["silent"] >= 3, outcomes


def test_canary_no_durability_proof_gives_silent_outcomes(known, monkeypatch):
    """Plant a WAL reader that never looks for proof that a bad record was
    durable: damage before the tail of the last segment is then cut as if
    torn, losing proven commits -- which the matrix must call silent."""
    import wal.reader

    crash, _clean = known
    last = crash.records[-1]
    rng = _rng("proof")
    faults = []
    for r in crash.records:  # a byte of each record of the last segment before the last fsync group
        if r.name == last.name and crash.checkpoint_lsn <= r.lsn < last.durable_lsn:
            off = rng.randrange(r.offset, r.offset + r.size)
            files = {r.name: _damage_byte(crash.files[r.name], off, rng)}
            f = wal_fault(crash, "canary (planted): no durability proof", f"{r.name}+{off}", files, seg_names(crash, r.name))
            assert f.cut is None  # proven durable: only detection is acceptable
            faults.append(f)
    assert len(faults) >= 3
    monkeypatch.setattr(wal.reader, "_find_durability_proof", lambda *a: None)
    outcomes = Counter()
    for f in faults:
        f.row = "canary (planted): no durability proof"
        out = evaluate(f)
        TABLE[f.row][out.kind] += 1
        outcomes[out.kind] += 1
    assert outcomes["silent"] == len(faults), outcomes


def test_canary_a_write_during_a_refused_open_is_caught(known, monkeypatch):
    """Plant an open that writes to the page file and then refuses: the
    matrix must report the changed file."""
    from pages.pagefile import PageFile

    crash, _clean = known
    real_open = PageFile.open.__func__

    def open_writes_then_refuses(cls, fs, path):
        f = fs.open(path)
        f.pwrite(PS * 5 + 100, b"scribble")
        f.close()
        raise CorruptionError(path, "planted")

    monkeypatch.setattr(PageFile, "open", classmethod(open_writes_then_refuses))
    f = Fault(crash, "canary (planted): write in a refused open", "-", {}, [PAGE_FILE], DETECTED)
    out = evaluate(f)
    monkeypatch.setattr(PageFile, "open", classmethod(real_open))
    TABLE[f.row][out.kind] += 1
    assert out.kind == "changed", out


def test_canary_a_hang_is_reported_not_waited_for(known, monkeypatch):
    import time

    from kvstore.database import Database

    crash, _clean = known
    real = Database._restart
    monkeypatch.setattr(Database, "_restart", lambda self: (time.sleep(1.0), real(self)))
    f = Fault(crash, "canary (planted): hang", "-", {}, [], HARMLESS)
    out = evaluate(f, timeout=0.2)
    TABLE[f.row][out.kind] += 1
    assert out.kind == "hang", out


# --- regressions of the engine bugs the matrix found ---------------------------------------------


def test_refused_open_during_restart_undo_writes_nothing(known):
    """Reproduction: the crash store (a loser in its tail), one bit flipped in
    each used page in turn; some page is first met by undo after a CLR."""
    crash, _clean = known
    for slot in crash.used_slots:
        f = page_fault(crash, "bug reproduction", f"slot {slot}", slot, flip_bit(slot_bytes(crash.files, slot), 5 * 8))
        out = evaluate(f)
        assert out.kind == "detected", f"slot {slot}: {out.kind}: {out.message}"


def test_damaged_magic_of_meta_0_falls_back_to_meta_1(known):
    crash, _clean = known
    assert crash.meta_slot == 1  # meta 0 is the older one: the store is intact without it
    f = meta_fault(crash, "magic of meta 0", [bit(crash, PAGE_FILE, 4 * 8 + 1)], HARMLESS)
    out = evaluate(f)
    assert out.kind == "harmless", out


def test_damaged_newest_meta_is_named_by_the_error(known):
    for k in known:
        f = meta_fault(k, "newest meta", [bit(k, PAGE_FILE, (k.meta_slot * PS + 100) * 8)], DETECTED)
        out = evaluate(f)
        assert out.kind == "detected" and re.search(rf"{PAGE_FILE}.*meta|meta.*{PAGE_FILE}", out.message), out
