"""The measuring harness of ``kvstore bench`` (kvstore/benchmark.py) and of
bench/peers.py, at tiny sizes: that ratios are formed within a repetition,
that slices interleave and only their work is timed, that the 8-thread
workloads report per-thread counts, that every participant's answers are
checked, the JSON schema, and that nothing is left on disk.

These tests measure nothing worth keeping; the measurements are
``kvstore bench`` and bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import types

import pytest

from kvstore import benchmark as kb

TINY = kb.Config.tiny()


@pytest.fixture(scope="module")
def peers():
    module = kb.load_extras()
    assert module is not None, "bench/peers.py should be found from the source checkout"
    return module


# --- the scheduler -----------------------------------------------------------------------------


def test_ratios_are_formed_within_each_repetition_not_from_medians():
    # Three repetitions on a machine whose speed swings: kvstore is 2x, 0.5x,
    # then 4x sqlite3.  The median of the per-repetition ratios is 2; the
    # ratio of the median rates would be 400 / 100 = 4.
    got = kb._Collected(rates={"w": {"kvstore": [100.0, 1000.0, 400.0], "sqlite3": [50.0, 2000.0, 100.0]}})
    w = kb.Workload("w", "a workload", "ops/s", kb._read_random)
    row = kb._row(w, got, [kb.KvstoreStore, kb.SqliteStore])
    assert row["ratios"]["sqlite3"]["each"] == [2.0, 0.5, 4.0]
    assert (row["ratio_median"], row["ratio_min"], row["ratio_max"]) == (2.0, 0.5, 4.0)
    assert row["kvstore_ops_per_s"] == 400.0 and row["sqlite3_ops_per_s"] == 100.0


def test_interleave_shuffles_slices_and_times_only_the_slices():
    log: list[str] = []

    def job(name: str, setup_s: float):
        time.sleep(setup_s)  # setup: not timed
        yield None
        try:
            while True:
                log.append(name)
                time.sleep(0.002)
                yield 1
        finally:
            time.sleep(setup_s)  # teardown: not timed

    tallies = kb.interleave({"a": lambda: job("a", 0.15), "b": lambda: job("b", 0.0)}, 20, random.Random(3))
    assert sorted(log) == ["a"] * 20 + ["b"] * 20
    rounds = [log[i : i + 2] for i in range(0, 40, 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds), "each round runs one slice of every job"
    assert {tuple(r) for r in rounds} == {("a", "b"), ("b", "a")}, "the order within a round is shuffled"
    assert tallies["a"].ops == tallies["b"].ops == 20
    for t in tallies.values():  # 20 slices of ~2 ms; a's setup and teardown (0.3 s) not counted
        assert 0.04 <= t.seconds < 0.2, t.seconds


def test_a_step_can_time_part_of_its_slice_and_split_by_thread():
    def job():
        yield None
        while True:
            time.sleep(0.01)
            yield kb.Step(6, 0.5, [1, 2, 3])

    t = kb.interleave({"x": job}, 3, random.Random(0))
    assert (t["x"].ops, t["x"].seconds, t["x"].per_thread) == (18, 1.5, [3, 6, 9])
    assert t["x"].rate == 12.0


def test_crew_counts_each_threads_work_inside_the_window():
    done = []
    active = threading.Semaphore(0)

    def work(i: int) -> None:
        time.sleep(0.001 * (i + 1))  # thread i is i+1 times slower
        active.release()

    crew = kb.Crew(4, work, done=done.append)
    try:
        step = crew.slice(0.1)
    finally:
        crew.close()
    assert len(step.per_thread) == 4 and sum(step.per_thread) == step.ops
    assert 0.1 <= step.seconds < 0.5
    assert all(c > 0 for c in step.per_thread)
    assert step.per_thread[0] > step.per_thread[3], step.per_thread
    assert sorted(done) == [0, 1, 2, 3], "every thread reports done when the crew closes"


def test_crew_raises_a_workers_error():
    def work(i: int) -> None:
        if i == 1:
            raise OSError("disk on fire")
        time.sleep(0.001)

    crew = kb.Crew(3, work)
    try:
        with pytest.raises(OSError, match="disk on fire"):
            crew.slice(0.02)
    finally:
        crew.close()


# --- a whole run, tiny -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, peers):
    root = tmp_path_factory.mktemp("bench")
    report = kb.measure(TINY.__class__.tiny(root=str(root)), extras=peers)
    report["_root"] = str(root)
    return report


def test_the_report_is_json_with_every_workload_and_field(tiny_report):
    report = json.loads(json.dumps({k: v for k, v in tiny_report.items() if k != "_root"}))
    assert [r["key"] for r in report["results"]] == [w.key for w in kb.WORKLOADS]
    assert report["config"]["repetitions"] == TINY.repetitions
    assert report["versions"]["kvstore"] and report["versions"]["sqlite3"] and report["versions"]["python"]
    for r in report["results"]:
        assert r["repetitions"] == TINY.repetitions
        for field in ("ratio_median", "ratio_min", "ratio_max", "kvstore_ops_per_s", "sqlite3_ops_per_s"):
            assert isinstance(r[field], float) and r[field] > 0, (r["key"], field)
        assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
        for name, s in r["rates"].items():
            assert len(s["each"]) == TINY.repetitions and s["min"] <= s["median"] <= s["max"], (r["key"], name)
        for other, s in r["ratios"].items():  # each ratio is kvstore's rate over the other's, per repetition
            expect = [a / b for a, b in zip(r["rates"]["kvstore"]["each"], r["rates"][other]["each"], strict=True)]
            assert s["each"] == pytest.approx(expect), (r["key"], other)
    for name, info in report["loads"].items():
        assert info["keys"] == TINY.keys and info["bytes"] > 0 and info["bytes_over_raw"] > 0, name
    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == len(kb.TARGETS)
    assert all(t["held"] in (True, False) and isinstance(t["value"], float) for t in targets.values())


def test_eight_thread_commits_report_per_thread_counts_for_every_store(tiny_report):
    row = next(r for r in tiny_report["results"] if r["key"] == "commit_full_8")
    stores = [n for n in tiny_report["versions"] if n != "python"]
    assert set(stores) <= set(row["per_thread"])
    for name, per_rep in row["per_thread"].items():
        assert len(per_rep) == TINY.repetitions
        assert all(len(counts) == kb.THREADS for counts in per_rep), name
        assert row["per_thread_total"][name] == [sum(c) for c in zip(*per_rep, strict=True)]
        total = row["per_thread_total"][name]
        share = row["slowest_thread_share"][name]
        assert share == pytest.approx(min(total) / (sum(total) / len(total)))
    assert sum(row["per_thread_total"]["kvstore"]) > 0


def test_probes_and_floors_run_beside_their_workloads(tiny_report, peers):
    rows = {r["key"]: r for r in tiny_report["results"]}
    for w in kb.WORKLOADS:
        for p in w.beside:
            assert p in rows[w.key]["rates"], (w.key, p)
            assert rows[w.key]["rates"][p]["median"] > 0
    assert "floor_bisect" not in rows["scan_1000"]["rates"]
    if peers.diskcache is not None:  # diskcache has no range scan: left out of that workload only
        assert "diskcache" in rows["read_random"]["rates"] and "diskcache" not in rows["scan_1000"]["rates"]
    if peers.lmdb is not None:
        assert all("lmdb" in r["rates"] for r in rows.values())


def test_a_run_leaves_nothing_on_disk(tiny_report):
    assert os.listdir(tiny_report["_root"]) == []


def test_the_text_report_names_every_workload_and_target(tiny_report):
    text = kb.format_report(tiny_report)
    for w in kb.WORKLOADS:
        assert w.name in text
    for t in tiny_report["targets"]:
        assert t["target"] in text
    assert "commits per thread" in text


def test_the_markdown_tables_have_a_row_per_workload(tiny_report, peers):
    md = peers.format_markdown(tiny_report)
    for w in kb.WORKLOADS:
        assert sum(line.startswith(f"| {w.name} |") for line in md.splitlines()) == 1, w.name


# --- every participant's answers are checked -------------------------------------------------------


class _LosesKeys(kb.KvstoreStore):
    name = "loses-keys"

    def get_many(self, keys):
        return super().get_many(keys) - 1


class _ShortScans(kb.KvstoreStore):
    name = "short-scans"

    def scan(self, start, n):
        return super().scan(start, n - 1)


@pytest.mark.parametrize("store, workload", [(_LosesKeys, "read_random"), (_ShortScans, "scan_1000"), (_LosesKeys, "reopen")])
def test_a_store_that_answers_wrong_fails_the_run(tmp_path, store, workload):
    extras = types.SimpleNamespace(STORES=[store], PROBES={}, describe_machine=dict)
    with pytest.raises(AssertionError, match=store.name):
        kb.measure(kb.Config.tiny(root=str(tmp_path), keys=1_500, repetitions=1), extras=extras, only=[workload])
    assert os.listdir(tmp_path) == []


def test_unknown_workload_names_are_refused():
    with pytest.raises(ValueError, match="unknown workloads"):
        kb.measure(TINY, extras=None, only=["fill_sideways"])


def test_without_bench_peers_the_run_says_what_it_left_out(tmp_path):
    report = kb.measure(kb.Config.tiny(root=str(tmp_path), keys=1_500, repetitions=1), extras=None, only=["fill_random"])
    assert set(report["results"][0]["rates"]) == {"kvstore", "sqlite3"}
    assert "bench/peers.py" in " ".join(report["unavailable"].values())


# --- the studies of bench/peers.py, tiny ------------------------------------------------------------


def test_restart_study_replays_the_log_it_wrote(tmp_path, peers):
    (res,) = peers.restart([1], str(tmp_path), keys=2_000, rounds=1, progress=None)
    assert res["wal_mib"] >= 1.0
    assert res["records_scanned"] > 0 and res["ops_redone"] > 0
    assert res["mib_per_s"] == pytest.approx(res["wal_mib"] / res["open_seconds_median"])
    assert os.listdir(tmp_path) == []


def test_scale_study_reports_rss_depth_and_get_costs(tmp_path, peers):
    (res,) = peers.scale([3_000], str(tmp_path), progress=None, reps=1, slice_s=0.005)
    assert res["keys"] == 3_000 and res["tree_depth"] >= 1
    assert res["peak_rss_during_load"] >= res["rss_before_load"] > 0
    for k in ("load_kvstore_keys_per_s", "load_sqlite3_keys_per_s", "get_us_kvstore", "get_us_sqlite3", "get_us_floor_bisect"):
        assert res[k] > 0, k
    assert res["load_ratio_min"] <= res["load_ratio_median"] <= res["load_ratio_max"]
    assert os.listdir(tmp_path) == []
