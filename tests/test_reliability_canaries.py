"""Canaries: the suite's checks can fail (TESTING.md section 8, report in section 9).

``wal/canary.py`` holds test-only switches, each re-creating one classic
storage bug.  For every switch this file names a check of the kind the suite
runs anyway -- not one written for the switch -- and requires that

* without the switch the check passes (so it is no false alarm), and
* with the switch planted the check fails (it *catches* the bug).

The checks:

==========================  =================================================
check                       what it requires
==========================  =================================================
``power_cut_enumeration``   a small workload on FaultFS (sync="full", a
                            checkpoint, close); the power is cut at every I/O
                            point and the surviving image built by DropAll,
                            KeepAll and OmitOne(i) for every pending op; the
                            reopened store must open (a power cut never
                            justifies CorruptionError) and hold a prefix of
                            the commits that includes every acknowledged one
``ordering_hooks``          FaultFS hooks on every mutation: no page reaches
                            the page file before the log is durable to its
                            page LSN (P1); no meta page is written while page
                            writes are not durable (P3); commit() returns only
                            once everything the log wrote is durable (L1)
``corruption_detected``     one byte of a stored value flipped in the page
                            file: open and a full scan either raise
                            CorruptionError or return exactly the model --
                            never a wrong value
``fsync_eio_then_power_cut``  the WAL's fsync fails once with EIO; every commit
                            that returned must survive a power cut (DropAll),
                            and the store must refuse writes until reopened
``second_open_refused``     opening a database again in this process, on real
                            files, by the same path and by ``path/.``, raises
                            DatabaseLockedError
``write_skew_prevented``    Hermitage G2-item (two doctors going off call)
                            under ``isolation="serializable"``: one of the two
                            transactions must get ConflictError
``lost_update_prevented``   Hermitage P4 (two read-modify-write increments)
                            under ``isolation="snapshot"``: first updater wins
==========================  =================================================

Each canary adds 1 to the report's "canaries_planted" and, once caught, to
"canaries_caught" (the report prints "k/k").  Two more tests keep the
machinery honest: ``wal/canary.NAMES`` is exactly the module's switches and
every switch is read somewhere in the engine (so none can silently go dead),
and every failpoint the SIGKILL loops name exists in the engine (so the loops
cannot drift into killing at points that no longer exist).
"""

from __future__ import annotations

import ast
import errno
import logging
import os
import re
import struct
from collections.abc import Callable

import pytest

import kvstore
from kvstore import ConflictError, DatabaseLockedError, reliability
from pages.faultfs import DropAll, FaultFS, KeepAll, OmitOne, PowerCut
from wal import canary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_PACKAGES = ("kvstore", "wal", "pages", "recovery")
DB = "/db"
PAGES = DB + "/pages.db"
PAGE_SIZE = 4096
SEGMENT_HEADER = 64
SEGMENT_NAME = re.compile(r"^wal-([0-9a-f]{16})\.log$")
PAGE_HEADER = struct.Struct("<IB3xQQI4x")  # crc, type, page LSN, logical id, body length
PAGE_TYPE_PAGE_TABLE = 5  # page-table pages carry no LSN (the flip writes them, unlogged)
#: no background checkpoints: every I/O comes from the workload, in order
QUIET = dict(checkpoint_interval=float("inf"), checkpoint_wal_bytes=1 << 40)


@pytest.fixture(autouse=True)
def _quiet_engine_logs():
    """The power-cut loops make the engine log every checkpoint the cut
    interrupted; that is expected and would only bury real output."""
    logging.disable(logging.ERROR)
    yield
    logging.disable(logging.NOTSET)


# --- check 1: power-cut enumeration -------------------------------------------------------------


def _value(i: int) -> bytes:
    return (b"%d:" % i) * [5, 200, 2500][i % 3]  # inline, a third of a page, overflow pages


def _commits_workload(fs: FaultFS, acked: list[int], states: list[dict] | None = None) -> None:
    """Six commits (with a checkpoint after the third), then close.  Appends
    the number of each commit that returned to ``acked``; ``states[j]`` is the
    committed data after j commits."""
    model: dict[bytes, bytes] = {}
    if states is not None:
        states.append({})
    db = kvstore.open(DB, _fs=fs, sync="full", cache_size=16 * PAGE_SIZE, **QUIET)
    for i in range(6):
        tx = db.begin()
        writes = {b"k%d" % i: _value(i), b"k%d" % ((i + 3) % 5): _value(i + 1), b"marker%d" % i: b"%d" % i}
        for k, v in writes.items():
            tx.put(k, v)
        tx.commit()
        model = {**model, **writes}
        acked.append(i + 1)
        if states is not None:
            states.append(dict(model))
        if i == 2:
            db.checkpoint()
    db.close()


def _read_all(fs: FaultFS) -> dict[bytes, bytes]:
    db = kvstore.open(DB, _fs=fs, sync="full", **QUIET)
    try:
        data = dict(db.scan())
        db._check_structures()
    finally:
        db.close()
    return data


def power_cut_enumeration() -> dict[str, int]:
    states: list[dict] = []
    full = FaultFS(seed=1)
    _commits_workload(full, [], states)
    total = full.io_points
    points = crash_states = 0
    for k in range(total):
        fs = FaultFS(seed=1)
        fs.crash_after(k)
        acked: list[int] = []
        try:
            _commits_workload(fs, acked)
        except PowerCut:
            pass
        else:
            continue
        points += 1
        n = len(fs.pending_ops())
        for plan in [DropAll(), KeepAll()] + [OmitOne(i) for i in range(n) if n > 1]:
            where = f"power cut before I/O point {k} of {total}, {len(acked)} commits acknowledged, plan {plan!r}"
            try:
                data = _read_all(fs.crash(plan))
            except Exception as e:  # a power cut never justifies a refused open or a damaged read
                raise AssertionError(f"{where}: reopen failed: {e!r}") from e
            crash_states += 1
            if not any(states[j] == data for j in range(len(acked), len(states))):
                lost = [j for j in range(1, len(acked) + 1) if b"marker%d" % (j - 1) not in data]
                raise AssertionError(
                    f"{where}: the state is no prefix of the history that includes every acknowledged commit"
                    + (f" (acknowledged commits lost: {lost})" if lost else "")
                )
    assert points > 30 and crash_states > points
    return {"points": points, "states": crash_states}


# --- check 2: ordering hooks --------------------------------------------------------------------


def _log_end(fs: FaultFS, durable: bool) -> int:
    """The end LSN of the log in the durable (or visible) image: the newest
    segment's first LSN plus its record bytes.  (Earlier segments were
    fsynced before the next was created, L2.)  Callable from a hook."""
    end = 0
    for name in fs.listdir(DB):
        m = SEGMENT_NAME.match(name)
        if m is None:
            continue
        path = f"{DB}/{name}"
        data = fs.durable_bytes(path) if durable else fs.visible_bytes(path)
        if data is not None and len(data) >= SEGMENT_HEADER:
            end = max(end, int(m.group(1), 16) + len(data) - SEGMENT_HEADER)
    return end


class OrderingWatcher:
    """A FaultFS hook that records every broken ordering rule."""

    def __init__(self, fs: FaultFS) -> None:
        self.fs = fs
        self.broken: list[str] = []
        self.pages_checked = self.metas_checked = 0
        fs.add_hook(self)

    def __call__(self, ev) -> None:
        if ev.kind != "write" or ev.path != PAGES:
            return
        if ev.offset >= 2 * PAGE_SIZE:  # a page slot (slots 0 and 1 are the meta pages)
            _crc, ptype, lsn, lid, _len = PAGE_HEADER.unpack_from(ev.data)
            if ptype == PAGE_TYPE_PAGE_TABLE:
                return
            durable = _log_end(self.fs, durable=True)
            self.pages_checked += 1
            if not lsn < durable:
                self.broken.append(f"P1: page {lid} written with page LSN {lsn}, the log durable only to {durable}")
        else:  # a meta page: everything it references must be durable already
            self.metas_checked += 1
            undurable = [op.describe() for op in self.fs.pending_ops() if op.path == PAGES]
            if undurable:
                self.broken.append(f"P3: meta page written at offset {ev.offset} before {len(undurable)} page-file "
                                   f"writes were durable, e.g. {undurable[0]}")

    def after_commit(self, what: str) -> None:
        durable, visible = _log_end(self.fs, durable=True), _log_end(self.fs, durable=False)
        if durable < visible:
            self.broken.append(f"L1: {what} returned with the log durable to {durable} of {visible} written")


def ordering_hooks() -> dict[str, int]:
    fs = FaultFS(seed=2)
    watch = OrderingWatcher(fs)
    db = kvstore.open(DB, _fs=fs, sync="full", cache_size=8 * PAGE_SIZE, **QUIET)  # 8 frames: steals
    for i in range(8):
        with db.transaction() as tx:
            tx.put(b"k%03d" % i, _value(i))
        watch.after_commit(f"commit {i}")
    # A big transaction: its pages are stolen while its records are not yet durable.
    tx = db.begin()
    for i in range(300):
        tx.put(b"big%04d" % i, b"b" * 150)
    db.checkpoint()  # a checkpoint with the big transaction still open
    tx.commit()
    watch.after_commit("the big commit")
    db.checkpoint()
    db.close()
    assert not watch.broken, f"{len(watch.broken)} ordering violations; first: {watch.broken[:3]}"
    assert watch.pages_checked > 20 and watch.metas_checked >= 3, (watch.pages_checked, watch.metas_checked)
    return {"pages": watch.pages_checked, "metas": watch.metas_checked}


# --- check 3: a corruption fault must be detected -----------------------------------------------


def corruption_detected(tmp_path) -> dict[str, int]:
    path = str(tmp_path / "corrupt")
    model = {b"key%03d" % i: b"VALUE-%03d-" % i * 8 for i in range(40)}
    with kvstore.open(path) as db:
        with db.transaction() as tx:
            for k, v in model.items():
                tx.put(k, v)
    pages = os.path.join(path, "pages.db")
    with open(pages, "rb") as f:
        image = bytearray(f.read())
    victim = b"VALUE-017-" * 8
    at = image.find(victim)
    assert at > 2 * PAGE_SIZE, "the value is stored inline in a leaf page"
    image[at + 3] ^= 0x01  # one bit of one byte of one value
    with open(pages, "r+b") as f:
        f.write(image)
    try:
        with kvstore.open(path, create=False) as db:
            got = dict(db.scan())
            got_one = db.get(b"key017")
    except kvstore.CorruptionError:
        return {"detected": 1}
    assert got_one == model[b"key017"] and got == model, (
        f"silently wrong: a flipped byte in a page was read back without CorruptionError "
        f"(key017 = {got_one[:24]!r}..., stored {model[b'key017'][:24]!r}...)"
    )
    return {"harmless": 1}


# --- check 4: fsync EIO, then a power cut ------------------------------------------------------


def fsync_eio_then_power_cut() -> dict[str, int]:
    fs = FaultFS(seed=4)
    db = kvstore.open(DB, _fs=fs, sync="full", **QUIET)
    acked: dict[bytes, bytes] = {}
    for i in range(3):
        db.put(b"before%d" % i, b"v%d" % i)
        acked[b"before%d" % i] = b"v%d" % i
    fault = fs.fail("fsync", nth=1, errno_=errno.EIO, path_contains="wal")
    failed = 0
    for i in range(3):
        try:
            db.put(b"after%d" % i, b"w%d" % i)
        except kvstore.Error:
            failed += 1  # a failed commit is not acknowledged
        else:
            acked[b"after%d" % i] = b"w%d" % i
    assert fault.fired == 1, "the injected fsync error did not happen"
    crashed = fs.crash(DropAll())  # the power fails: what the failed fsync dropped is gone for good
    try:
        data = _read_all(crashed)
    except Exception as e:  # a power cut never justifies a refused open
        raise AssertionError(f"reopen after an fsync error and a power cut failed: {e!r}") from e
    lost = sorted(k for k in acked if data.get(k) != acked[k])
    assert not lost, f"acknowledged commits lost after an fsync error and a power cut: {lost}"
    assert failed == 3, (f"after a failed WAL fsync {3 - failed} of 3 later commits succeeded: the store must "
                         f"refuse writes until it is reopened")
    return {"acked": len(acked)}


# --- check 5: a second open in this process ----------------------------------------------------


def second_open_refused(tmp_path) -> dict[str, int]:
    path = str(tmp_path / "locked")
    db = kvstore.open(path)
    db.put(b"a", b"1")
    intruders = []
    try:
        for other in (path, path + "/."):
            try:
                intruders.append(kvstore.open(other))
            except DatabaseLockedError:
                continue
            raise AssertionError(f"a second kvstore.open({other!r}) in the same process succeeded")
    finally:
        for x in intruders:
            try:
                x.close()
            except Exception:
                pass
        db.close()
    return {"refused": 2}


# --- checks 6 and 7: isolation ------------------------------------------------------------------


def write_skew_prevented(tmp_path) -> dict[str, int]:
    """Hermitage G2-item: two doctors on call; each checks that the other is
    on call and goes off.  Serializable must abort one of them."""
    with kvstore.open(str(tmp_path / "skew"), isolation="serializable") as db:
        db.put(b"alice", b"on")
        db.put(b"bob", b"on")
        t1, t2 = db.begin(), db.begin()
        committed = []
        try:
            for t, me in ((t1, b"alice"), (t2, b"bob")):
                if [t.get(b"alice"), t.get(b"bob")].count(b"on") == 2:
                    t.put(me, b"off")
            for name, t in (("T1", t1), ("T2", t2)):
                t.commit()
                committed.append(name)
        except ConflictError:
            pass
        on_call = [k for k in (b"alice", b"bob") if db.get(k) == b"on"]
        assert on_call, f"write skew under serializable: {committed} both committed, nobody is on call"
    return {"prevented": 1}


def lost_update_prevented(tmp_path) -> dict[str, int]:
    """Hermitage P4: two read-modify-write increments of one counter.
    Snapshot isolation (first updater wins) must refuse the second."""
    with kvstore.open(str(tmp_path / "p4"), isolation="snapshot") as db:
        db.put(b"counter", b"0")
        t1, t2 = db.begin(), db.begin()
        v1, v2 = int(t1.get(b"counter")), int(t2.get(b"counter"))
        increments = 0
        t1.put(b"counter", b"%d" % (v1 + 1))
        t1.commit()
        increments += 1
        try:
            t2.put(b"counter", b"%d" % (v2 + 1))
            t2.commit()
            increments += 1
        except ConflictError:
            pass
        final = int(db.get(b"counter"))
        assert final == increments, f"lost update: {increments} increments committed, the counter is {final}"
    return {"prevented": 1}


# --- the table ----------------------------------------------------------------------------------

Check = Callable[..., dict]

#: canary name -> the check that must catch it
CATCHERS: dict[str, Check] = {
    "skip_wal_fsync": power_cut_enumeration,
    "skip_dir_fsync": power_cut_enumeration,
    "page_before_log": ordering_hooks,
    "meta_before_pages": power_cut_enumeration,
    "skip_checksum": corruption_detected,
    "retry_fsync": fsync_eio_then_power_cut,
    "second_open": second_open_refused,
    "no_ssi": write_skew_prevented,
    "no_write_conflicts": lost_update_prevented,
}


def _run(check: Check, tmp_path, label: str):
    d = tmp_path / label
    d.mkdir()
    return check(d) if check.__code__.co_argcount else check()


@pytest.mark.parametrize("name", canary.NAMES)
def test_canary_is_caught(name, tmp_path):
    check = CATCHERS[name]
    assert not any(getattr(canary, n) for n in canary.NAMES), "a canary was left planted"
    _run(check, tmp_path, "clean")  # passes on the real engine: no false alarm
    reliability.add("canaries_planted", 1)
    with canary.planted(name):  # before kvstore.open: some switches are read when a database opens
        try:
            outcome = _run(check, tmp_path, "planted")
        except AssertionError as e:
            caught = str(e).splitlines()[0][:300]
        else:
            pytest.fail(f"canary {name!r} planted, and {check.__name__} passed anyway ({outcome}): "
                        "the check cannot see this bug")
    reliability.add("canaries_caught", 1)
    print(f"\n[canary] {name}: caught by {check.__name__}: {caught}")


def test_every_canary_has_a_catcher():
    assert set(CATCHERS) == set(canary.NAMES)


# --- the switches and the failpoints cannot drift -------------------------------------------------


def _engine_sources() -> dict[str, str]:
    """Engine module path (relative to the root) -> source."""
    out = {}
    for pkg in ENGINE_PACKAGES:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    full = os.path.join(dirpath, name)
                    with open(full, encoding="utf-8") as f:
                        out[os.path.relpath(full, ROOT)] = f.read()
    return out


def test_canary_names_are_the_modules_switches_and_each_is_read_by_the_engine():
    switches = {k for k, v in vars(canary).items() if isinstance(v, bool) and not k.startswith("_")}
    assert switches == set(canary.NAMES), "wal/canary.NAMES must list exactly the module's boolean switches"
    assert len(canary.NAMES) == len(set(canary.NAMES))
    assert not any(getattr(canary, n) for n in canary.NAMES), "every switch is off unless planted"
    sources = {p: s for p, s in _engine_sources().items() if p != os.path.join("wal", "canary.py")}
    dead = []
    for name in canary.NAMES:
        readers = [p for p, s in sources.items() if re.search(rf"\bcanary\.{name}\b", s)]
        if not readers:
            dead.append(name)
    assert not dead, f"canary switches no engine module reads (dead switches): {dead}"


def _failpoints_called_in_engine() -> set[str]:
    """Names passed as a literal to a failpoint(...) call in engine code
    (docstrings and comments do not count)."""
    names = set()
    for path, src in _engine_sources().items():
        for node in ast.walk(ast.parse(src, path)):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "failpoint"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return names


def _literal_lists(path: str, names: tuple[str, ...]) -> dict[str, list]:
    """The module-level literal assignments ``names`` of the file ``path``, read
    without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if isinstance(target, ast.Name) and target.id in names:
            found[target.id] = ast.literal_eval(node.value)
    return found


def _point_name(entry) -> str:
    text = entry[0] if isinstance(entry, (tuple, list)) else entry
    return text.split("=", 1)[0]


def test_failpoints_the_kill_loops_name_exist_in_the_engine():
    from kvstore import torture

    listed: dict[str, set[str]] = {
        "kvstore/torture.py WORK_FAILPOINTS": {_point_name(e) for e in torture.WORK_FAILPOINTS},
        "kvstore/torture.py RECOVERY_FAILPOINTS": {_point_name(e) for e in torture.RECOVERY_FAILPOINTS},
    }
    sigkill = _literal_lists(os.path.join(ROOT, "tests", "test_sigkill.py"), ("FAILPOINTS", "RECOVERY_FAILPOINTS"))
    assert set(sigkill) == {"FAILPOINTS", "RECOVERY_FAILPOINTS"}, "tests/test_sigkill.py lists moved or were renamed"
    for var, entries in sigkill.items():
        listed[f"tests/test_sigkill.py {var}"] = {_point_name(e) for e in entries}
    engine = _failpoints_called_in_engine()
    assert len(engine) >= 10, sorted(engine)
    for where, points in listed.items():
        assert points, f"{where} is empty"
        missing = sorted(points - engine)
        assert not missing, f"{where} names failpoints the engine never reaches (no failpoint(...) call): {missing}"
