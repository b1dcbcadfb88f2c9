"""tx.put_many: a batch of puts written a leaf at a time.

It must be indistinguishable from the same puts one by one -- in what every
snapshot sees, in rollback and savepoints, in conflicts, after a reopen and
after a crash (the crash enumeration has a put_many workload:
tests/test_reliability_crash.py, ``bulk_put_many``) -- while writing one log
record per run of keys that share a leaf and leaving full leaves behind an
ascending run.
"""

from __future__ import annotations

import random

import pytest

import kvstore
from kvstore import ConflictError, TransactionError


def blob(rng: random.Random, lo: int, hi: int) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def contents(db: kvstore.Database) -> dict[bytes, bytes]:
    return dict(db.scan())


def test_put_many_matches_the_same_puts_one_by_one(tmp_path):
    """Random batches (new keys, updates, keys deleted earlier, duplicates
    within a batch, a few values big enough for overflow pages) against a
    model, with a structural check after every commit and a reopen at the
    end."""
    rng = random.Random(7)
    db = kvstore.open(tmp_path / "db", cache_size=64 * 4096)
    model: dict[bytes, bytes] = {}
    pool = [b"k%05d" % i for i in range(3000)]
    for round_ in range(12):
        with db.transaction() as tx:
            for key in rng.sample(sorted(model), min(len(model), 40)):
                tx.delete(key)
                del model[key]
            batch = []
            for _ in range(rng.randint(1, 600)):
                key = rng.choice(pool)
                value = blob(rng, 3000, 9000) if rng.random() < 0.01 else blob(rng, 0, 300)
                batch.append((key, value))
                model[key] = value  # a later pair for the same key wins
            tx.put_many(batch)
            assert all(tx.get(k) == v for k, v in batch if model[k] == v)
        assert db.check()["ok"], f"round {round_}"
        assert contents(db) == model, f"round {round_}"
    db.close()
    with kvstore.open(tmp_path / "db") as db:
        assert contents(db) == model
        assert db.check()["ok"]


def test_put_many_is_invisible_to_older_snapshots_and_undone_by_rollback(tmp_path):
    db = kvstore.open(tmp_path / "db")
    before = {b"a%03d" % i: b"old%d" % i for i in range(0, 400, 2)}
    with db.transaction() as tx:
        tx.put_many(before.items())
    reader = db.begin(readonly=True)
    batch = {b"a%03d" % i: b"new%d" % i for i in range(400)}  # half updates, half inserts
    tx = db.begin()
    tx.put_many(batch.items())
    assert dict(tx.scan()) == batch
    assert dict(reader.scan()) == before and contents(db) == before
    tx.rollback()
    assert contents(db) == before and dict(reader.scan()) == before
    assert db.check()["ok"]

    tx = db.begin()
    tx.put_many(batch.items())
    tx.commit()
    assert dict(reader.scan()) == before, "an older snapshot saw a committed put_many"
    assert contents(db) == batch
    reader.commit()
    db.close()


def test_rollback_to_a_savepoint_undoes_only_the_batches_after_it(tmp_path):
    db = kvstore.open(tmp_path / "db")
    tx = db.begin()
    first = {b"x%04d" % i: b"1" * 50 for i in range(500)}
    tx.put_many(first.items())
    sp = tx.savepoint()
    tx.put_many((b"x%04d" % i, b"2" * 90) for i in range(250, 1000))
    tx.rollback_to(sp)
    assert dict(tx.scan()) == first
    tx.put_many([(b"x0001", b"three")])
    tx.commit()
    assert contents(db) == {**first, b"x0001": b"three"}
    assert db.check()["ok"]
    db.close()


def test_a_conflict_anywhere_in_the_batch_rolls_the_transaction_back_before_writing(tmp_path):
    db = kvstore.open(tmp_path / "db")
    db.put(b"m050", b"original")
    holder = db.begin()
    holder.put(b"m050", b"held")
    tx = db.begin()
    tx.put(b"early", b"1")
    with pytest.raises(ConflictError) as err:
        tx.put_many((b"m%03d" % i, b"v") for i in range(100))
    assert err.value.key == b"m050"
    assert tx.finished
    holder.rollback()
    assert contents(db) == {b"m050": b"original"}, "a batch that conflicted left writes behind"
    assert db.check()["ok"]
    db.close()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ((b"ok", "not bytes"), TypeError),
        ((b"", b"v"), ValueError),
        ((b"k" * 1025, b"v"), ValueError),
        ((b"k",), TypeError),
        (b"kv", TypeError),
    ],
)
def test_a_bad_pair_raises_and_writes_nothing(tmp_path, bad, error):
    db = kvstore.open(tmp_path / "db")
    tx = db.begin()
    with pytest.raises(error):
        tx.put_many([(b"good1", b"1"), bad, (b"good2", b"2")])
    assert tx.get(b"good1") is None, "a rejected batch wrote its first pairs"
    tx.put_many([])
    tx.commit()
    assert contents(db) == {}
    db.close()


def test_put_many_in_a_read_only_or_finished_transaction_raises(tmp_path):
    db = kvstore.open(tmp_path / "db")
    ro = db.begin(readonly=True)
    with pytest.raises(TransactionError):
        ro.put_many([(b"a", b"1")])
    tx = db.begin()
    tx.commit()
    with pytest.raises(TransactionError):
        tx.put_many([(b"a", b"1")])
    db.close()


def test_an_ascending_bulk_load_leaves_full_leaves_and_one_record_per_run(tmp_path):
    """100-byte values, 16-byte keys: a leaf of a 4 KiB page holds 29 such
    cells.  Put one by one, random keys leave leaves about 69% full; a
    put_many of the same keys sorts them and packs each leaf."""
    rng = random.Random(3)
    items = [(rng.randbytes(16), rng.randbytes(100)) for _ in range(6000)]
    db = kvstore.open(tmp_path / "db")
    records_before = db._wal.end_lsn
    with db.transaction() as tx:
        tx.put_many(items)
    log_bytes = db._wal.end_lsn - records_before
    counts = db.check()
    cell = 23 + 16 + 100
    fill = counts["keys"] * cell / (counts["leaves"] * (4096 - 32))
    assert fill > 0.9, f"leaves only {fill:.0%} full after an ascending bulk load"
    stats = db.stats()
    db.close()

    one_by_one = kvstore.open(tmp_path / "db2")
    start = one_by_one._wal.end_lsn
    with one_by_one.transaction() as tx:
        for k, v in items:
            tx.put(k, v)
    assert one_by_one.check()["leaves"] > counts["leaves"] * 1.25
    assert one_by_one._wal.end_lsn - start > log_bytes, "put_many wrote more log than the puts one by one"
    one_by_one.close()
    assert stats["commits"] == 1
