"""``db.check()`` and two-phase commit across crash points (SPEC: "Checkpoints,
backup, inspection", "Two-phase commit", guarantees 2 and 4).

* ``db.check()`` returns a report of what it walked, on a quiet store and
  while writers run.
* A bit flipped on disk in a page of every kind (leaf, internal, overflow,
  undo, undo header, page table) is detected: either ``open`` raises
  ``CorruptionError`` or ``check()`` does, naming the page; reading the
  damaged data raises too -- a wrong value is never returned.  The page file
  is located with an independent decoding of its bytes (``durable_image``),
  using only the byte layout documented in ``pages.format``.
* ``check()`` reads pages from the file, not the cache, and walks the log.
* Prepare / commit_prepared / rollback_prepared are cut by a power failure
  (``FaultFS.crash_after``) at every I/O point; after reopening, the
  transaction is either still in doubt with all its writes, or resolved
  entirely -- never partly.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

import kvstore
from kvstore import CorruptionError
from pages.faultfs import DropAll, FaultFS, KeepAll, PowerCut
from pages.format import META_SIZE, PAGE_HEADER, PAGE_HEADER_SIZE, PT_ENTRY, Meta, PageType, pt_fanout

PS = 4096

# --- an independent reading of the page file --------------------------------------------


def durable_image(data: bytes, page_size: int = PS) -> tuple[dict[int, int], list[int]]:
    """({logical id: slot}, [page-table slots]) of the newest valid meta of a
    page file's bytes, decoded from the documented layout alone."""
    metas = []
    for slot in (0, 1):
        try:
            metas.append((Meta.decode(data[slot * page_size : slot * page_size + META_SIZE], "meta"), slot))
        except CorruptionError:
            pass
    assert metas, "no valid meta page"
    meta = max(metas, key=lambda m: m[0].generation)[0]
    fanout = pt_fanout(page_size)
    pages: dict[int, int] = {}
    pt_slots: list[int] = []

    def walk(level: int, index: int, slot: int) -> None:
        pt_slots.append(slot)
        page = data[slot * page_size : (slot + 1) * page_size]
        _crc, ptype, _lsn, _lid, length = PAGE_HEADER.unpack_from(page)
        assert ptype == PageType.PAGE_TABLE
        body = page[PAGE_HEADER_SIZE : PAGE_HEADER_SIZE + length]
        for i in range(len(body) // PT_ENTRY.size):
            s, _c = PT_ENTRY.unpack_from(body, i * PT_ENTRY.size)
            child = index * fanout + i
            if not s:
                continue
            if level == 0:
                if 0 < child < meta.nlids:
                    pages[child] = s
            else:
                walk(level - 1, child, s)

    if meta.pt_depth:
        walk(meta.pt_depth - 1, 0, meta.pt_root)
    return pages, pt_slots


def page_type(data: bytes, slot: int, page_size: int = PS) -> PageType:
    return PageType(PAGE_HEADER.unpack_from(data, slot * page_size)[1])


def pages_by_type(path: str) -> dict[PageType, list[tuple[int, int]]]:
    """{page type: [(logical id, slot)]} of the durable image of ``path``."""
    with open(os.path.join(path, "pages.db"), "rb") as f:
        data = f.read()
    pages, pt_slots = durable_image(data)
    out: dict[PageType, list[tuple[int, int]]] = {}
    for lid, slot in sorted(pages.items()):
        out.setdefault(page_type(data, slot), []).append((lid, slot))
    out[PageType.PAGE_TABLE] = [(0, s) for s in pt_slots]
    return out


def flip_byte(path: str, offset: int, mask: int = 0x04) -> None:
    with open(os.path.join(path, "pages.db"), "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


N_KEYS = 1500
BIG = random.Random(7).randbytes(30000)  # incompressible: an overflow chain of 8 pages


def key(i: int) -> bytes:
    return b"key-%05d" % i


def value(i: int) -> bytes:
    return b"value-%05d-" % i + b"x" * (i % 40)


def build(path: str, prepared: bool = True) -> None:
    """A closed store with a two-level tree, an overflow chain and undo records
    (a prepared transaction keeps its undo records from being purged)."""
    with kvstore.open(path) as db:
        with db.transaction() as tx:
            for i in range(N_KEYS):
                tx.put(key(i), value(i))
        db.put(b"big", BIG)
        if prepared:
            tx = db.begin()
            for i in range(0, N_KEYS, 50):
                tx.put(key(i), b"in doubt")
            tx.prepare(b"gid-check")


# --- the report ---------------------------------------------------------------------------


def test_check_report_on_a_healthy_store(tmp_path):
    path = str(tmp_path / "db")
    build(path)
    expect = pages_by_type(path)
    with kvstore.open(path) as db:
        report = db.check()
        stats = db.stats()
    for field in ("pages_checked", "keys", "leaves", "tree_depth", "undo_records", "undo_pages", "overflow_pages",
                  "wal_records", "wal_segments", "page_size"):
        assert field in report, f"check() report lacks {field!r}: {report}"
    assert report["ok"] is True
    assert report["page_size"] == PS
    assert report["keys"] == N_KEYS + 1
    assert report["leaves"] == len(expect[PageType.LEAF])
    assert report["overflow_pages"] == len(expect[PageType.OVERFLOW]) >= len(BIG) // PS
    assert report["tree_depth"] == 2 == stats["tree_depth"]
    assert report["undo_records"] >= N_KEYS // 50  # the prepared transaction's at least
    assert report["undo_pages"] == len(expect[PageType.UNDO])
    # every page of the durable image was read and verified (close() checkpointed, so
    # the image is complete and nothing else has an image)
    assert report["pages_checked"] == sum(len(v) for t, v in expect.items() if t != PageType.PAGE_TABLE)
    assert report["wal_segments"] >= 1 and report["wal_records"] >= 1


def test_check_counts_the_log_records(tmp_path):
    path = str(tmp_path / "db")
    with kvstore.open(path, checkpoint_interval=3600) as db:
        before = db.check()["wal_records"]
        for i in range(10):
            db.put(key(i), b"v")
        after = db.check()["wal_records"]
        # each autocommit put logs at least a write and a commit
        assert after - before >= 20


def _moved_on(first: dict, last: dict) -> bool:
    return last["keys"] > first["keys"] or last["wal_records"] > first["wal_records"]


def test_check_while_writers_run_always_passes(tmp_path):
    """check() concurrent with writers (overflow values, deletes, splits).
    Background checkpoints are off here: check() during a checkpoint's flip
    has its own test below."""
    db = kvstore.open(str(tmp_path / "db"), checkpoint_wal_bytes=1 << 30, checkpoint_interval=3600)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        rng = random.Random(t)
        try:
            while not stop.is_set():
                with db.transaction() as tx:
                    for _ in range(5):
                        tx.put(b"t%d-%04d" % (t, rng.randrange(500)), rng.randbytes(rng.choice([10, 300, 6000])))
                    if rng.random() < 0.2:
                        tx.delete(b"t%d-%04d" % (t, rng.randrange(500)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    try:
        # at least 15 checks, and on until the writers have visibly moved on
        # (a loaded disk can hold every commit of a short window in fsync)
        reports = [db.check() for _ in range(15)]
        deadline = time.monotonic() + 60
        while not _moved_on(reports[0], reports[-1]) and time.monotonic() < deadline:
            reports.append(db.check())
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    assert not errors, errors
    assert all(r["ok"] for r in reports)
    assert _moved_on(reports[0], reports[-1]), "the writers made no progress while check() ran"
    assert db.check()["ok"]
    db.close()


def test_check_during_a_checkpoint_flip_reports_no_damage(tmp_path):
    from wal import failpoints

    db = kvstore.open(str(tmp_path / "db"), checkpoint_interval=3600)
    try:
        for i in range(300):
            db.put(key(i), value(i))  # dirty pages and page-table entries for the flip
        in_flight, resume = threading.Event(), threading.Event()

        def hold() -> None:
            in_flight.set()
            resume.wait(10)

        failpoints.arm("pages.before_flip_fsync", hold, times=1)
        ckpt = threading.Thread(target=db.checkpoint)
        ckpt.start()
        try:
            assert in_flight.wait(10), "the checkpoint never reached its flip"
            outcome: list = []

            def run_check() -> None:
                try:
                    outcome.append(db.check())
                except BaseException as e:
                    outcome.append(e)

            checker = threading.Thread(target=run_check)
            checker.start()
            checker.join(1.0)  # it may run now, or wait for the flip to finish: both are fine
        finally:
            resume.set()
            ckpt.join(10)
            failpoints.disarm("pages.before_flip_fsync")
        checker.join(10)
        assert outcome and not isinstance(outcome[0], BaseException), f"check() during a flip: {outcome[0]!r}"
        assert outcome[0]["ok"]
        assert db.check()["ok"]
    finally:
        db.close()


# --- damage on disk --------------------------------------------------------------------------


DAMAGE_KINDS = [PageType.LEAF, PageType.INTERNAL, PageType.OVERFLOW, PageType.UNDO, PageType.UNDO_HEADER, PageType.PAGE_TABLE]


def read_everything(db: kvstore.Database) -> None:
    """Read every key (wrong values fail the test; damage may raise)."""
    got = dict(db.scan())
    for i in range(N_KEYS):
        assert got.get(key(i)) == value(i), f"wrong value for {key(i)!r}: {got.get(key(i))!r}"
    assert got.get(b"big") == BIG, "wrong value for the overflow key"
    assert db.get(b"big") == BIG


@pytest.mark.parametrize("kind", DAMAGE_KINDS, ids=lambda k: k.name.lower())
@pytest.mark.parametrize("where", ["header", "body", "tail"])
def test_flipped_bit_in_a_page_on_disk_is_detected(tmp_path, kind, where):
    path = str(tmp_path / "db")
    build(path)
    pages = pages_by_type(path)[kind]
    lid, slot = pages[len(pages) // 2]
    offset = {"header": 8, "body": PAGE_HEADER_SIZE + 20, "tail": PS - 3}[where]  # LSN, body, padding
    flip_byte(path, slot * PS + offset)
    with open(os.path.join(path, "pages.db"), "rb") as f:
        damaged = f.read()

    try:
        db = kvstore.open(path)
    except CorruptionError as e:
        detected_by = f"open: {e}"
        # open refused and changed nothing
        with open(os.path.join(path, "pages.db"), "rb") as f:
            assert f.read() == damaged
    else:
        try:
            with pytest.raises(CorruptionError) as info:
                db.check()
            detected_by = f"check: {info.value}"
            # reading what the damaged page holds raises, or returns the right data
            try:
                read_everything(db)
            except CorruptionError:
                pass
        finally:
            db.close()
        # the damage is still reported after a reopen: nothing papered over it
        try:
            with kvstore.open(path) as db:
                with pytest.raises(CorruptionError):
                    db.check()
        except CorruptionError:
            pass
    if kind == PageType.PAGE_TABLE:
        assert "page-table" in detected_by or "page table" in detected_by, detected_by
        assert f"slot {slot}" in detected_by, detected_by
    else:
        assert f"page {lid} " in detected_by, f"the error does not name page {lid}: {detected_by}"


@pytest.mark.parametrize("kind", [PageType.LEAF, PageType.OVERFLOW], ids=lambda k: k.name.lower())
def test_damaged_data_page_is_never_read_as_a_wrong_value(tmp_path, kind):
    """Flip a byte of the data itself (a key's value bytes in a leaf, the
    value's bytes in an overflow page); the reads that need it raise."""
    path = str(tmp_path / "db")
    build(path, prepared=False)
    with open(os.path.join(path, "pages.db"), "rb") as f:
        data = f.read()
    pages = dict(pages_by_type(path)[kind])
    slots = {slot: lid for lid, slot in pages.items()}
    needle = value(777) if kind == PageType.LEAF else BIG[12000:12032]
    hits = []
    start = data.find(needle)
    while start >= 0:
        hits.append(start)
        start = data.find(needle, start + 1)
    live = [off for off in hits if off // PS in slots]
    assert len(live) == 1, f"expected the data in exactly one live {kind.name} page, found {len(live)}"
    off = live[0]
    lid = slots[off // PS]
    flip_byte(path, off + len(needle) // 2, 0x01)
    with kvstore.open(path) as db:
        target = key(777) if kind == PageType.LEAF else b"big"
        with pytest.raises(CorruptionError) as info:
            db.get(target)
        assert f"page {lid} " in str(info.value)
        with pytest.raises(CorruptionError):
            dict(db.scan())
        with pytest.raises(CorruptionError) as info:
            db.check()
        assert f"page {lid} " in str(info.value)
        assert db.get(key(0 if kind == PageType.OVERFLOW else N_KEYS - 1)) is not None  # elsewhere still readable


def test_check_reads_pages_from_the_file_not_the_cache(tmp_path):
    path = str(tmp_path / "db")
    build(path, prepared=False)
    pages = pages_by_type(path)[PageType.LEAF]
    lid, slot = pages[3]
    with kvstore.open(path, checkpoint_interval=3600) as db:
        read_everything(db)  # every page is now in the cache
        assert db.check()["ok"]
        flip_byte(path, slot * PS + PS // 2)  # damage under the open database
        with pytest.raises(CorruptionError) as info:
            db.check()
        assert f"page {lid} " in str(info.value)


def test_check_walks_the_log_and_reports_a_damaged_record(tmp_path):
    """A damaged record in an older log segment of an open database: only
    check() reads it (restart is long past), and it must say where."""
    path = str(tmp_path / "db")
    rng = random.Random(3)
    db = kvstore.open(path, checkpoint_wal_bytes=16 * 4096, checkpoint_interval=3600)
    try:
        for i in range(40):
            db.put(b"k%03d" % i, rng.randbytes(1500))
            segs = sorted(n for n in os.listdir(path) if "wal" in n)
            if len(segs) >= 3:
                break
        segs = sorted(n for n in os.listdir(path) if "wal" in n)
        assert len(segs) >= 3, segs
        assert db.check()["wal_segments"] == len(segs)
        victim = os.path.join(path, segs[0])
        size = os.path.getsize(victim)
        with open(victim, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0x20]))
        with pytest.raises(CorruptionError) as info:
            db.check()
        assert segs[0] in str(info.value), f"the error does not name the segment {segs[0]}: {info.value}"
    finally:
        db.close()


# --- two-phase commit across crash points --------------------------------------------------

DB = "/db"
N_2PC = 120
CACHE = 8 * 4096  # a tiny cache: pages are stolen (and the log flushed) in the middle of operations


def old(i: int) -> bytes:
    return b"old-%04d-" % i + b"." * 150


def new(i: int) -> bytes:
    return b"new-%04d-" % i + b"," * 150


def setup_prepared(seed: int, n: int = N_2PC, prepare: bool = True) -> tuple[FaultFS, kvstore.Database, kvstore.Transaction]:
    fs = FaultFS(seed=seed)
    db = kvstore.open(DB, _fs=fs, cache_size=CACHE, checkpoint_interval=3600)
    with db.transaction() as tx:
        for i in range(n):
            tx.put(b"k%04d" % i, old(i))
    tx = db.begin()
    for i in range(n):
        tx.put(b"k%04d" % i, new(i))
    tx.delete(b"k0000")
    tx.put(b"created", b"by the prepared transaction")
    if prepare:
        tx.prepare(b"gid")
    return fs, db, tx


def outcome(db: kvstore.Database, n: int = N_2PC) -> str:
    """'old' or 'new' if the store holds entirely one of them; fails otherwise."""
    got = dict(db.scan())
    olds = {b"k%04d" % i: old(i) for i in range(n)}
    news = {b"k%04d" % i: new(i) for i in range(1, n)}
    news[b"created"] = b"by the prepared transaction"
    if got == olds:
        return "old"
    if got == news:
        return "new"
    n_old = sum(got.get(k) == v for k, v in olds.items())
    n_new = sum(got.get(k) == v for k, v in news.items())
    raise AssertionError(f"partial transaction: {n_old} keys hold the old values and {n_new} the new ones")


def reopen(fs: FaultFS) -> kvstore.Database:
    return kvstore.open(DB, _fs=fs, cache_size=CACHE, checkpoint_interval=3600)


def io_points_of(action: str, seed: int) -> int:
    fs, db, tx = setup_prepared(seed, prepare=action != "prepare")
    start = fs.io_points
    if action == "prepare":
        tx.prepare(b"gid")
    elif action == "commit":
        db.commit_prepared(b"gid")
    else:
        db.rollback_prepared(b"gid")
    return fs.io_points - start


def cut_during(action: str, seed: int, k: int) -> tuple[FaultFS, bool]:
    """Run ``action`` with the power cut at its k-th I/O point; return
    (fs, whether the action returned)."""
    fs, db, tx = setup_prepared(seed, prepare=action != "prepare")
    fs.crash_after(k)
    try:
        if action == "prepare":
            tx.prepare(b"gid")
        elif action == "commit":
            db.commit_prepared(b"gid")
        else:
            db.rollback_prepared(b"gid")
    except PowerCut:
        return fs, False
    return fs, True


def check_in_doubt(db: kvstore.Database) -> None:
    assert db.prepared() == [b"gid"]
    assert outcome(db) == "old", "in-doubt writes must stay invisible"
    with pytest.raises(kvstore.ConflictError):
        with db.transaction() as other:
            other.put(b"k0005", b"intruder")  # its keys stay protected
    assert db.check()["ok"]


@pytest.mark.parametrize("action", ["prepare", "commit", "rollback"])
def test_power_cut_at_every_io_point_of_2pc_leaves_in_doubt_or_resolved(action):
    """Cut at each I/O point of prepare / commit_prepared / rollback_prepared;
    after reopening, the transaction is in doubt (and resolving it then by
    rolling back gives the old state) or resolved as decided -- never partial.
    (A cut inside rollback_prepared resolves it as rolled back: see
    test_power_cut_inside_rollback_prepared_never_leaves_a_partial_transaction_in_doubt.)"""
    seed = {"prepare": 1, "commit": 2, "rollback": 3}[action]
    total = io_points_of(action, seed)
    assert total >= 1
    seen: dict[str, int] = {}
    for k in range(total + 1):
        fs, returned = cut_during(action, seed, k)
        plans = [DropAll(), KeepAll()]
        if action != "rollback":  # few I/O points: also torn, reordered and partial writes
            plans += [p for p in fs.plans(limit=12) if not isinstance(p, (DropAll, KeepAll))]
        for plan in plans:
            where = f"{action}: power cut at I/O point {k}/{total} ({'after return' if returned else 'inside'}), {plan!r}"
            db = reopen(fs.crash(plan))
            try:
                if db.prepared():
                    check_in_doubt(db)
                    state = "in doubt"
                    if action == "commit" and returned:
                        raise AssertionError(f"{where}: commit_prepared returned but the transaction is in doubt again")
                    db.rollback_prepared(b"gid")
                    assert outcome(db) == "old", where
                else:
                    state = outcome(db)
                    expect = {"prepare": "old", "commit": "new", "rollback": "old"}[action]
                    assert state == expect, f"{where}: resolved as {state!r}, expected {expect!r}"
                    if action == "prepare" and returned:
                        raise AssertionError(f"{where}: prepare returned but the transaction is gone")
                assert db.check()["ok"]
            finally:
                db.close()
            seen[state] = seen.get(state, 0) + 1
    assert "in doubt" in seen and len(seen) == 2, seen


def test_power_cut_inside_rollback_prepared_never_leaves_a_partial_transaction_in_doubt():
    seed = 3
    total = io_points_of("rollback", seed)
    for k in range(total + 1):
        fs, _returned = cut_during("rollback", seed, k)
        for plan in (DropAll(), KeepAll()):
            db = reopen(fs.crash(plan))
            try:
                if db.prepared():
                    # in doubt: the whole transaction must still be there, so the
                    # coordinator's decision -- whatever it is -- applies to all of it
                    db.commit_prepared(b"gid")
                    assert outcome(db) == "new", f"power cut at I/O point {k}/{total} of rollback_prepared, {plan!r}"
            finally:
                db.close()


def test_in_doubt_transaction_survives_repeated_power_cuts_and_checks_clean():
    fs, db, _tx = setup_prepared(seed=4)
    for round_ in range(4):
        fs = fs.crash(DropAll() if round_ % 2 else KeepAll())
        db = reopen(fs)
        check_in_doubt(db)
        report = db.check()
        assert report["undo_records"] >= N_2PC  # the in-doubt versions' undo is kept
    db.commit_prepared(b"gid")
    fs = fs.crash(DropAll())
    db = reopen(fs)
    assert db.prepared() == [] and outcome(db) == "new"
    assert db.check()["ok"]
    db.close()
