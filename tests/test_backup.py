"""Online backup: ``db.backup(dest)`` (SPEC: "Checkpoints, backup, inspection").

The main test takes several backups in a row while four threads run bank
transfers (each with a marker key naming its accounts and amount) and
background checkpoints roll and truncate the log.  Each backup must open,
pass ``check()``, and be a consistent state:

* the bank total is unchanged;
* each account's balance = initial + the sum of the transfers whose markers
  are in the backup (so every transfer in it is there wholly);
* every transfer acknowledged before ``backup()`` was called is in it;
* every transfer in it was committed in the source.

Then the destination rules (missing, empty, non-empty, a file, inside the
database), prepared transactions (in doubt in the copy), uncommitted work
(absent from the copy), and a 5 MiB value.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

import kvstore

ACCOUNTS = 16
INITIAL = 1000


def acct(i: int) -> bytes:
    return b"acct-%02d" % i


def read_bank(db: kvstore.Database) -> tuple[dict[int, int], dict[int, tuple[int, int, int]]]:
    """(balances, {transfer id: (src, dst, amount)}) from one snapshot."""
    balances: dict[int, int] = {}
    markers: dict[int, tuple[int, int, int]] = {}
    with db.transaction(readonly=True) as tx:
        for k, v in tx.scan():
            if k.startswith(b"acct-"):
                balances[int(k[5:])] = int(v)
            elif k.startswith(b"xfer-"):
                src, dst, amount = (int(x) for x in v.split(b","))
                markers[int(k[5:])] = (src, dst, amount)
    return balances, markers


def check_consistent(balances: dict[int, int], markers: dict[int, tuple[int, int, int]], where: str) -> None:
    assert sorted(balances) == list(range(ACCOUNTS)), f"{where}: accounts missing"
    assert sum(balances.values()) == ACCOUNTS * INITIAL, f"{where}: the bank total changed"
    expect = {i: INITIAL for i in range(ACCOUNTS)}
    for src, dst, amount in markers.values():
        expect[src] -= amount
        expect[dst] += amount
    bad = {i: (balances[i], expect[i]) for i in range(ACCOUNTS) if balances[i] != expect[i]}
    assert not bad, f"{where}: balances disagree with the transfers present (a partial transfer): {bad}"


def test_backups_taken_while_four_threads_transfer_are_consistent(tmp_path):
    src = str(tmp_path / "src")
    db = kvstore.open(src, checkpoint_wal_bytes=1024 * 1024, checkpoint_interval=0.3)
    with db.transaction() as tx:
        for i in range(ACCOUNTS):
            tx.put(acct(i), b"%d" % INITIAL)
    lock = threading.Lock()
    acked: set[int] = set()
    ids = iter(range(10**9))
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                with lock:
                    tid = next(ids)
                s, d = rng.sample(range(ACCOUNTS), 2)
                amount = rng.randint(1, 50)

                def transfer(tx: kvstore.Transaction, s: int = s, d: int = d, amount: int = amount, tid: int = tid) -> None:
                    a = int(tx.get(acct(s)))
                    b = int(tx.get(acct(d)))
                    tx.put(acct(s), b"%d" % (a - amount))
                    tx.put(acct(d), b"%d" % (b + amount))
                    tx.put(b"xfer-%08d" % tid, b"%d,%d,%d" % (s, d, amount))
                    if rng.random() < 0.05:
                        tx.put(b"pad-%08d" % tid, rng.randbytes(rng.choice([300, 3000])))

                try:
                    db.run(transfer, retries=50)
                except kvstore.ConflictError:
                    continue
                with lock:
                    acked.add(tid)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    backups: list[tuple[str, set[int], dict]] = []
    try:
        time.sleep(0.3)
        for n in range(4):
            with lock:
                before = set(acked)
            dest = str(tmp_path / f"backup-{n}")
            result = db.backup(dest)
            backups.append((dest, before, result))
            time.sleep(0.15)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not errors, errors
    assert db.stats()["checkpoints"] >= 2, "no checkpoint ran during the backups"
    live_balances, live_markers = read_bank(db)
    check_consistent(live_balances, live_markers, "source")
    assert acked <= set(live_markers)
    db.close()

    sizes = []
    for dest, before, result in backups:
        assert result["dest"] == dest and result["pages"] > 0
        assert not os.path.exists(os.path.join(dest, "LOCK")) or os.path.getsize(os.path.join(dest, "LOCK")) == 0
        with kvstore.open(dest, create=False) as copy:
            report = copy.check()
            assert report["ok"]
            assert copy.prepared() == []
            balances, markers = read_bank(copy)
        where = f"backup {dest}"
        check_consistent(balances, markers, where)
        missing = before - set(markers)
        assert not missing, f"{where}: {len(missing)} transfers acknowledged before backup() are missing: {sorted(missing)[:5]}"
        unknown = set(markers) - set(live_markers)
        assert not unknown, f"{where}: holds transfers the source never committed: {sorted(unknown)[:5]}"
        for tid, t in markers.items():
            assert live_markers[tid] == t
        sizes.append(len(markers))
    assert sizes == sorted(sizes), f"later backups hold fewer transfers: {sizes}"
    assert sizes[0] > 0 and sizes[-1] > sizes[0], f"the writers made no progress during the backups: {sizes}"


def test_backup_destination_rules(tmp_path):
    db = kvstore.open(str(tmp_path / "db"))
    db.put(b"k", b"v")
    # a missing destination, with missing parents, is created
    made = tmp_path / "a" / "b" / "copy"
    db.backup(made)  # a PathLike
    # an existing empty directory is used
    (tmp_path / "empty").mkdir()
    db.backup(str(tmp_path / "empty"))
    # a non-empty directory is refused and left alone
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError):
        db.backup(str(full))
    assert os.listdir(full) == ["precious.txt"] and (full / "precious.txt").read_text() == "keep me"
    # so is an earlier backup (not empty either)
    with pytest.raises(ValueError):
        db.backup(str(made))
    # and a path that is a file
    plain = tmp_path / "plain"
    plain.write_bytes(b"data")
    with pytest.raises(ValueError):
        db.backup(str(plain))
    assert plain.read_bytes() == b"data"
    # the source itself is not empty
    with pytest.raises(ValueError):
        db.backup(str(tmp_path / "db"))
    db.put(b"after", b"1")
    db.close()
    for dest in (made, tmp_path / "empty"):
        with kvstore.open(dest, create=False) as copy:
            assert dict(copy.scan()) == {b"k": b"v"}
            assert copy.check()["ok"]


def test_backup_into_a_directory_inside_the_database_is_refused(tmp_path):
    path = str(tmp_path / "db")
    db = kvstore.open(path)
    db.put(b"k", b"v")
    try:
        with pytest.raises(ValueError):
            db.backup(os.path.join(path, "copy"))
    finally:
        db.close()
    with kvstore.open(path, create=False) as again:  # the source must stay usable either way
        assert again.get(b"k") == b"v"


@pytest.mark.parametrize("checkpoint_first", [False, True], ids=["prepare-in-log", "prepare-before-checkpoint"])
def test_backup_keeps_prepared_transactions_in_doubt(tmp_path, checkpoint_first):
    src = str(tmp_path / "src")
    dest = str(tmp_path / "copy")
    db = kvstore.open(src, checkpoint_interval=3600)
    db.put(b"a", b"1")
    db.put(b"b", b"1")
    tx = db.begin()
    tx.put(b"a", b"2")
    tx.put(b"new", b"prepared")
    tx.prepare(b"gid-backup")
    active = db.begin()  # unfinished, not prepared: absent from the copy
    active.put(b"b", b"uncommitted")
    active.put(b"ghost", b"x" * 10000)
    if checkpoint_first:
        db.checkpoint()  # the PREPARE record is now below the copy's checkpoint
    db.backup(dest)
    # the source carries on: resolve both there
    db.commit_prepared(b"gid-backup")
    active.commit()
    assert db.get(b"a") == b"2" and db.get(b"ghost") is not None
    db.close()

    with kvstore.open(dest, create=False) as copy:
        assert copy.prepared() == [b"gid-backup"]
        assert copy.stats()["prepared_transactions"] == 1
        assert dict(copy.scan()) == {b"a": b"1", b"b": b"1"}, "in-doubt or uncommitted writes are visible in the copy"
        with pytest.raises(kvstore.ConflictError):
            with copy.transaction() as other:
                other.put(b"a", b"intruder")  # still protected in the copy
        assert copy.check()["ok"]
    # in doubt across a reopen of the copy too, then resolved there independently
    with kvstore.open(dest, create=False) as copy:
        assert copy.prepared() == [b"gid-backup"]
        copy.rollback_prepared(b"gid-backup")
        assert dict(copy.scan()) == {b"a": b"1", b"b": b"1"}
    with kvstore.open(src, create=False) as again:
        assert again.get(b"a") == b"2" and again.get(b"new") == b"prepared" and again.prepared() == []


@pytest.mark.parametrize("where", ["in-log", "in-pages"])
def test_backup_with_a_5_mib_value(tmp_path, where):
    src = str(tmp_path / "src")
    dest = str(tmp_path / "copy")
    big = random.Random(5).randbytes(5 * 2**20)
    with kvstore.open(src, checkpoint_interval=3600) as db:
        db.put(b"big", big)
        db.put(b"small", b"s")
        if where == "in-pages":
            db.checkpoint()
        tx = db.begin()
        tx.put(b"big", b"replaced, not committed")
        result = db.backup(dest)
        tx.rollback()
        if where == "in-pages":  # copied as overflow pages
            assert result["pages"] >= 5 * 2**20 // 4096
        else:  # copied as log records, replayed when the copy opens
            assert result["wal_bytes"] >= 5 * 2**20
    with kvstore.open(dest, create=False) as copy:
        assert copy.get(b"big") == big
        assert copy.get(b"small") == b"s"
        report = copy.check()
        assert report["overflow_pages"] >= 5 * 2**20 // 4096
    with kvstore.open(src, create=False) as db:
        assert db.get(b"big") == big


def test_backup_of_a_backup_and_the_copy_is_independent(tmp_path):
    src, one, two = (str(tmp_path / n) for n in ("src", "one", "two"))
    with kvstore.open(src) as db:
        with db.transaction() as tx:
            for i in range(500):
                tx.put(b"k%03d" % i, b"v%d" % i)
        db.backup(one)
        db.put(b"only-in-src", b"1")
    with kvstore.open(one, create=False) as copy:
        copy.put(b"only-in-one", b"1")
        copy.backup(two)
    with kvstore.open(two, create=False) as c2:
        data = dict(c2.scan())
        assert len(data) == 501 and data[b"only-in-one"] == b"1" and b"only-in-src" not in data
    with kvstore.open(src, create=False) as db:
        assert db.get(b"only-in-one") is None and db.get(b"only-in-src") == b"1"
