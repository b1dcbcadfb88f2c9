"""Tests of the list-append cycle checker (tests/elle.py): a hand-written
history for each anomaly class is caught and named, clean histories (serial
ones, and snapshot-isolation ones from an in-memory model) report nothing
their level forbids, and the Elle JSON export round-trips.

Histories are written with small helpers: ``txn(id, *ops)`` where an op is
``a(k, v)`` (append), ``r(k, [..])`` (read) or ``s(lo, hi, {k: [..]})``
(scan); times default to one shared window [0, 10], i.e. all concurrent, so
no real-time edge appears unless a test asks for one.
"""

from __future__ import annotations

import json
import random

import pytest
from elle import (
    ALLOWED,
    FAIL,
    INFO,
    OK,
    UNDONE_PROCESS,
    Recorder,
    Txn,
    check,
    from_elle,
    load_elle,
    to_elle,
    write_elle,
)


def a(k, v):
    return ("append", k, v)


def r(k, values):
    return ("r", k, values)


def s(lo, hi, found):
    return ("scan", (lo, hi), found)


def txn(id, *ops, type=OK, start=0, end=10, process=None, undone=()):
    return Txn(id, id if process is None else process, type, start, end, list(ops), list(undone))


def final(id, reads, start=100):
    """A last reader after everything: reveals every key's full order."""
    return txn(id, *(r(k, v) for k, v in reads.items()), start=start, end=start + 1)


def names(history):
    return check(history).names()


# --- clean histories --------------------------------------------------------------------------------------


def test_an_empty_history_is_clean():
    result = check([])
    assert result.anomalies == [] and result.edges == {}


def test_a_serial_history_reports_nothing():
    h = [
        txn(1, a("x", 1), a("y", 1), start=0, end=1),
        txn(2, r("x", [1]), a("x", 2), r("x", [1, 2]), start=2, end=3),
        txn(3, r("y", [1]), r("z", None), s("x", "z", {"x": [1, 2], "y": [1]}), start=4, end=5),
        txn(4, a("z", 4), type=FAIL, start=6, end=7),
        txn(5, r("z", None), a("y", 5), start=8, end=9),
        final(6, {"x": [1, 2], "y": [1, 5], "z": []}),
    ]
    result = check(h)
    assert result.anomalies == [], result.report()
    assert result.edges["ww"] >= 2 and result.edges["wr"] >= 3 and result.edges["rt"] >= 4
    for level in ALLOWED:
        assert result.forbidden(level) == []


def _serial_model_history(seed: int, n: int, keys: int) -> list[Txn]:
    """Transactions run one after another against a dict; some abort, some
    roll back to a savepoint.  Serializable (and strict) by construction."""
    rng = random.Random(seed)
    state: dict[int, list] = {}
    values = iter(range(1, 10**9))
    h = []
    for i in range(n):
        t = Txn(i, process=rng.randrange(4), type=OK, start=10 * i)
        local = {k: list(v) for k, v in state.items()}

        def run_ops(t, local, count):  # local is passed, not captured: rollback_to rebinds it
            for _ in range(count):
                k = rng.randrange(keys)
                roll = rng.random()
                if roll < 0.4:
                    v = next(values)
                    local.setdefault(k, []).append(v)
                    t.append(k, v)
                elif roll < 0.8:
                    t.read(k, local.get(k))
                else:
                    lo = rng.randrange(keys)
                    hi = rng.randrange(lo, keys + 1)
                    t.scan(lo, hi, {k: v for k, v in local.items() if lo <= k < hi and v})

        run_ops(t, local, rng.randrange(1, 5))
        if rng.random() < 0.2:  # a savepoint, some work, rollback_to it
            mark, saved = t.savepoint(), {k: list(v) for k, v in local.items()}
            run_ops(t, local, rng.randrange(1, 3))
            t.rollback_to(mark)
            local = saved
            run_ops(t, local, rng.randrange(0, 2))
        if rng.random() < 0.15:
            t.type = FAIL
        else:
            state = local
        t.end = 10 * i + 5
        h.append(t)
    h.append(Txn(n, 9, OK, 10 * n, 10 * n + 1, [("r", k, state.get(k)) for k in range(keys)]))
    return h


@pytest.mark.parametrize("seed", range(5))
def test_random_serial_histories_report_nothing(seed):
    h = _serial_model_history(seed, 400, 6)
    result = check(h)
    assert result.anomalies == [], result.report()
    assert result.edges.get("rw", 0) > 0 and result.edges.get("rw-p", 0) > 0  # reads did see old versions


def _snapshot_model_history(seed: int, n: int, keys: int, first_updater_wins: bool = True) -> list[Txn]:
    """Snapshot isolation in memory: each transaction reads the state
    committed when it began plus its own appends and, at commit, writes
    each list it appended to as it saw it (read-modify-write, as the store's
    workload does).  First updater wins aborts it when someone else committed
    one of its keys since it began; without that rule, appends get lost."""
    rng = random.Random(seed)
    values = iter(range(1, 10**9))
    spans = []
    for _ in range(n):
        start = rng.randrange(n * 10)
        spans.append((start, start + rng.randrange(1, 60)))
    events = sorted([(s_, 1, i) for i, (s_, _) in enumerate(spans)] + [(e, 0, i) for i, (_, e) in enumerate(spans)])
    committed: dict[int, list] = {}
    last_commit: dict[int, int] = {}  # key -> time of the last commit that wrote it
    snapshots = {}
    h: list[Txn] = [Txn(i, i, INFO, s_, e) for i, (s_, e) in enumerate(spans)]  # a process each: they overlap
    for time_, kind, i in events:
        t = h[i]
        if kind == 1:
            snapshots[i] = {k: list(v) for k, v in committed.items()}
            continue
        local = snapshots.pop(i)
        written = set()
        for _ in range(rng.randrange(1, 5)):
            k = min(rng.randrange(keys), rng.randrange(keys))  # skewed towards low keys
            roll = rng.random()
            if roll < 0.45:
                v = next(values)
                local.setdefault(k, []).append(v)
                t.append(k, v)
                written.add(k)
            elif roll < 0.85:
                t.read(k, local.get(k))
            else:
                t.scan(k, k + 2, {x: v for x, v in local.items() if k <= x < k + 2 and v})
        if first_updater_wins and any(last_commit.get(k, -1) > t.start for k in written):
            t.type = FAIL
            continue
        t.type = OK
        for k in written:
            committed[k] = local[k]
            last_commit[k] = time_
    end = max(e for _, e in spans) + 1
    h.append(Txn(n, 99, OK, end, end + 1, [("r", k, committed.get(k)) for k in range(keys)]))
    return h


@pytest.mark.parametrize("seed", range(6))
def test_snapshot_model_histories_show_only_what_snapshot_allows(seed):
    result = check(_snapshot_model_history(seed, 300, 5))
    assert result.forbidden("snapshot") == [], result.report(result.forbidden("snapshot"))


def test_snapshot_model_histories_do_show_write_skew():
    # the checker is not blind to what snapshot allows: over a few seeds the
    # model produces G2-item / G2 cycles, and serializable forbids them
    found = set()
    for seed in range(6):
        result = check(_snapshot_model_history(seed, 300, 5))
        found |= result.names()
        assert result.forbidden("serializable") == result.anomalies
    assert found & {"G2-item", "G2-item-realtime"}, found


@pytest.mark.parametrize("seed", range(3))
def test_snapshot_model_without_first_updater_wins_is_caught(seed):
    result = check(_snapshot_model_history(seed, 300, 5, first_updater_wins=False))
    caught = result.forbidden("snapshot")
    assert caught, result.report()
    assert result.names() & {"lost-append", "incompatible-order", "lost-update"}


# --- each anomaly class --------------------------------------------------------------------------------------


def test_g0_write_cycle():
    h = [
        txn(1, a("x", 1), a("y", 1)),
        txn(2, a("x", 2), a("y", 2)),
        final(3, {"x": [1, 2], "y": [2, 1]}),
    ]
    result = check(h)
    assert result.names() == {"G0"}, result.report()
    (g0,) = result.anomalies
    assert set(g0.txns) == {1, 2} and "-ww x->" in g0.text and "-ww y->" in g0.text
    assert result.forbidden("snapshot") == result.anomalies


def test_g1a_aborted_read():
    h = [txn(1, a("x", 1), type=FAIL), txn(2, r("x", [1]))]
    result = check(h)
    assert result.names() == {"G1a"}
    assert result.anomalies[0].txns == (1, 2)


def test_g1a_read_of_an_append_rolled_back_to_a_savepoint():
    h = [
        txn(1, a("x", 2), undone=[a("x", 1), r("x", [1])]),  # committed, but the append of 1 was undone
        txn(2, r("x", [1])),
        final(3, {"x": [2]}),
    ]
    assert "G1a" in names(h)


def test_an_undone_append_nobody_saw_is_fine():
    h = [
        txn(1, r("x", None), a("x", 2), r("x", [2]), undone=[a("x", 1), r("x", [1])], start=0, end=1),
        final(2, {"x": [2]}),
    ]
    assert names(h) == set()


def test_g1b_intermediate_read():
    h = [
        txn(1, a("x", 1), a("x", 2)),
        txn(2, r("x", [1])),
        final(3, {"x": [1, 2]}),
    ]
    assert "G1b" in names(h)


def test_g1c_circular_information_flow():
    h = [
        txn(1, a("x", 1), r("y", [1])),
        txn(2, a("y", 1), r("x", [1])),
    ]
    result = check(h)
    assert result.names() == {"G1c"}, result.report()
    assert "-wr" in result.anomalies[0].text


def test_g_single_read_skew():
    h = [
        txn(1, r("x", None), r("y", [2])),
        txn(2, a("x", 2), a("y", 2)),
        final(3, {"x": [2], "y": [2]}),
    ]
    result = check(h)
    assert result.names() == {"G-single"}, result.report()
    assert result.forbidden("snapshot") and result.forbidden("serializable")


def test_g_nonadjacent():
    # T1 -rw a-> T2 -wr b-> T3 -rw c-> T4 -wr d-> T1: two rw edges, never adjacent
    h = [
        txn(1, r("a", None), r("d", [4])),
        txn(2, a("a", 2), a("b", 2)),
        txn(3, r("b", [2]), r("c", None)),
        txn(4, a("c", 4), a("d", 4)),
        final(5, {"a": [2], "c": [4]}),
    ]
    result = check(h)
    assert result.names() == {"G-nonadjacent"}, result.report()
    assert result.forbidden("snapshot"), "snapshot isolation forbids non-adjacent rw cycles"


def test_g2_item_write_skew():
    h = [
        txn(1, r("x", None), r("y", None), a("x", 1)),
        txn(2, r("x", None), r("y", None), a("y", 2)),
        final(3, {"x": [1], "y": [2]}),
    ]
    result = check(h)
    assert result.names() == {"G2-item"}, result.report()
    assert result.forbidden("snapshot") == [] and result.forbidden("serializable") == result.anomalies


def test_g2_predicate_write_skew_through_scans():
    h = [
        txn(1, s("a", "c", {}), a("a", 1)),
        txn(2, s("a", "c", {}), a("b", 2)),
        final(3, {"a": [1], "b": [2]}),
    ]
    result = check(h)
    assert result.names() == {"G2"}, result.report()
    assert "rw-p" in result.anomalies[0].text
    assert result.forbidden("snapshot") == [] and result.forbidden("serializable")


def test_a_cycle_with_an_item_rw_edge_is_g2_item_not_g2():
    h = [
        txn(1, s("a", "c", {}), r("b", None), a("a", 1)),  # b both scanned and read: an item edge
        txn(2, r("a", None), a("b", 2)),
        final(3, {"a": [1], "b": [2]}),
    ]
    assert names(h) == {"G2-item"}


def test_a_cycle_that_needs_a_predicate_edge_is_g2():
    h = [
        txn(1, s("a", "c", {}), a("a", 1)),
        txn(2, r("a", None), a("b", 2)),
        final(3, {"a": [1], "b": [2]}),
    ]
    assert names(h) == {"G2"}


def test_g1c_realtime_future_read():
    # T1 finished before T2 began, yet read T2's append
    h = [txn(1, r("x", [2]), start=0, end=1), txn(2, a("x", 2), start=5, end=6)]
    result = check(h)
    assert result.names() == {"G1c-realtime"}, result.report()
    assert "-rt->" in result.anomalies[0].text


def test_g_single_realtime_stale_read_and_lost_append():
    h = [
        txn(1, a("x", 1), start=0, end=1),
        txn(2, r("x", None), start=5, end=6),  # began after T1 committed, did not see it
        final(3, {"x": [1]}),
    ]
    assert names(h) == {"G-single-realtime", "lost-append"}


def test_g2_item_realtime_is_allowed_under_snapshot_only():
    # T1 -rw-> T2 -rw-> T3 -rt-> T1: the read-only anomaly's shape
    h = [
        txn(2, r("x", None), a("y", 2), start=0, end=20),
        txn(3, a("x", 3), start=1, end=2),
        txn(1, r("y", None), start=5, end=6),
        final(4, {"x": [3], "y": [2]}),
    ]
    result = check(h)
    assert result.names() == {"G2-item-realtime"}, result.report()
    assert result.forbidden("snapshot") == [] and result.forbidden("serializable")


def test_incompatible_order():
    h = [
        txn(1, a("x", 1)),
        txn(2, a("x", 2)),
        txn(3, r("x", [1, 2])),
        txn(4, r("x", [2, 1])),
    ]
    assert "incompatible-order" in names(h)


def test_lost_append():
    h = [
        txn(1, r("x", None), a("x", 1), start=0, end=1),
        txn(2, r("x", None), a("x", 2), start=0, end=3),
        final(3, {"x": [2]}),  # 1 is gone
    ]
    result = check(h)
    assert {"lost-append", "lost-update"} <= result.names(), result.report()
    assert result.forbidden("snapshot")


def test_lost_update_even_when_both_appends_survive():
    h = [
        txn(1, r("x", [0]), a("x", 1)),
        txn(2, r("x", [0]), a("x", 2)),
        txn(0, a("x", 0), start=-5, end=-4),
        final(3, {"x": [0, 1, 2]}),
    ]
    assert names(h) == {"lost-update", "G-single"}  # T1 -ww-> T2 -rw-> T1


def test_duplicate_elements_garbage_reads_and_duplicate_appends():
    h = [txn(1, a("x", 1)), txn(2, r("x", [1, 1])), txn(3, r("y", [7])), txn(4, a("z", 1), a("z", 1))]
    assert {"duplicate-elements", "garbage-read", "duplicate-append"} <= names(h)


def test_internal_inconsistency():
    h = [
        txn(1, r("x", None), a("x", 1), r("x", [])),  # forgot its own append
        txn(2, a("y", 2), r("y", [5])),  # its own append is not at the end
        txn(5, a("y", 5)),
    ]
    bad = [x for x in check(h).anomalies if x.name == "internal"]
    assert sorted(x.txns for x in bad) == [(1,), (2,)]


def test_failed_and_unknown_transactions_reads_are_not_judged():
    h = [
        txn(1, a("x", 1), type=FAIL),
        txn(2, r("x", [1]), type=FAIL),
        txn(3, r("x", [9]), type=INFO, end=None),
    ]
    assert names(h) == set()


def test_an_unknown_transactions_observed_append_counts_as_committed():
    h = [txn(1, a("x", 1), type=INFO, end=None), txn(2, r("x", [1]))]
    assert names(h) == set()


def test_real_time_edges_link_only_the_latest_finishers():
    # a chain of five: four edges, not ten; two overlapping then one after: two
    chain = [txn(i, r("x", None), start=10 * i, end=10 * i + 5) for i in range(5)]
    assert check(chain).edges["rt"] == 4
    overlap = [txn(0, r("x", None), start=0, end=10), txn(1, r("x", None), start=5, end=15), txn(2, r("x", None), start=20, end=30)]
    assert check(overlap).edges["rt"] == 2
    touching = [txn(0, r("x", None), start=0, end=10), txn(1, r("x", None), start=10, end=20)]
    assert "rt" not in check(touching).edges  # equal times are not "before"


def test_forbidden_rejects_an_unknown_level():
    with pytest.raises(ValueError):
        check([]).forbidden("read committed")


def test_report_names_the_cycle_and_the_transactions():
    h = [txn(1, r("x", None), r("y", [2])), txn(2, a("x", 2), a("y", 2)), final(3, {"x": [2], "y": [2]})]
    text = check(h).report()
    assert "G-single: T1 -rw x-> T2 -wr y-> T1" in text or "G-single: T2 -wr y-> T1 -rw x-> T2" in text
    assert "T2 (process 2, ok" in text


# --- the recorder and Elle's JSON ---------------------------------------------------------------------------


def test_recorder_times_each_attempt():
    ticks = iter(range(100))
    rec = Recorder(clock=lambda: next(ticks))
    t = rec.begin(process=3)
    t.append("x", 1)
    mark = t.savepoint()
    t.read("x", [1])
    t.rollback_to(mark)
    rec.finish(t, OK)
    assert (t.id, t.process, t.start, t.end, t.type) == (0, 3, 0, 1, OK)
    assert t.ops == [("append", "x", 1)] and t.undone == [("r", "x", [1])]


def test_elle_export_has_elles_shape(tmp_path):
    h = [
        txn(1, a(1, 1), r(2, None), start=100, end=110, process=0),
        txn(2, r(1, [1]), s(1, 3, {1: [1]}), start=120, end=130, process=0, undone=[a(2, 9)]),
        txn(3, a(2, 5), type=FAIL, start=105, end=125, process=1),
    ]
    path = tmp_path / "history.json"
    write_elle(h, path)
    ops = json.loads(path.read_text())
    assert [op["index"] for op in ops] == list(range(len(ops)))
    assert [op["time"] for op in ops] == sorted(op["time"] for op in ops) and ops[0]["time"] == 0
    for op in ops:
        assert op["f"] == "txn" and op["type"] in ("invoke", "ok", "fail", "info")
        assert all(isinstance(m, list) and m[0] in ("append", "r") for m in op["value"])
    first_invoke, first_done = ops[0], next(op for op in ops if op["txn"] == 1 and op["type"] == "ok")
    assert first_invoke["value"] == [["append", 1, 1], ["r", 2, None]]
    assert first_done["value"] == [["append", 1, 1], ["r", 2, []]]
    t2 = next(op for op in ops if op["txn"] == 2 and op["type"] == "ok")
    assert t2["value"] == [["r", 1, [1]], ["r", 1, [1]], ["r", 2, []]]  # the scan, read by read
    undone = [op for op in ops if op["process"] == UNDONE_PROCESS]
    assert [op["type"] for op in undone] == ["invoke", "fail"] and undone[1]["value"] == [["append", 2, 9]]
    per_process: dict = {}
    for op in ops:  # each process: invoke, completion, invoke, completion, ...
        per_process.setdefault(op["process"], []).append(op["type"] == "invoke")
    for seq in per_process.values():
        assert seq == [True, False] * (len(seq) // 2)


@pytest.mark.parametrize(
    "history",
    [
        [txn(1, a("x", 1), a("y", 1)), txn(2, a("x", 2), a("y", 2)), final(3, {"x": [1, 2], "y": [2, 1]})],
        [txn(1, a("x", 1), type=FAIL), txn(2, r("x", [1]))],
        [txn(1, r("x", None), r("y", [2])), txn(2, a("x", 2), a("y", 2)), final(3, {"x": [2], "y": [2]})],
        [txn(1, a("x", 1), start=0, end=1), txn(2, r("x", None), start=5, end=6), final(3, {"x": [1]})],
        [txn(1, r("x", None), a("x", 1), undone=[a("y", 3)]), txn(2, r("y", [3])), final(3, {"x": [1]})],
    ],
    ids=["G0", "G1a", "G-single", "realtime", "undone"],
)
def test_elle_round_trip_finds_the_same_anomalies(tmp_path, history):
    path = tmp_path / "h.json"
    write_elle(history, path)
    loaded = load_elle(path)
    assert check(loaded).names() == check(history).names()
    assert from_elle(to_elle(history)) and len(loaded) == len(history) + sum(1 for t in history if t.undone)


def test_elle_round_trip_of_a_model_history(tmp_path):
    h = _snapshot_model_history(1, 200, 4)
    path = tmp_path / "h.json"
    write_elle(h, path)
    loaded = check(load_elle(path))
    original = check(h)
    # scans come back as point reads, so a predicate cycle (G2) may come back as G2-item
    rename = {"G2": "G2-item", "G2-realtime": "G2-item-realtime"}
    assert {rename.get(n, n) for n in loaded.names()} == {rename.get(n, n) for n in original.names()}
    assert sum(1 for t in load_elle(path) if t.type == OK) == original.count(OK)
