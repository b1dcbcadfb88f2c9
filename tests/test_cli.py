"""The command line, run as a user runs it: ``python -m kvstore ...`` in a
subprocess (SPEC: "Command line"; kvstore/cli.py's exit statuses).

* 0 on success; 1 when something failed (a missing key, a damaged store, a
  database that cannot be opened), with exactly one line on stderr and never
  a traceback; 2 on bad usage, with the usage on stderr.
* Every subcommand: stat (text and --json), check (good, damaged page,
  damaged log segment, torn tail), get/put/delete, scan options, dump | load
  (binary data, several MB through a pipe, streaming, all or nothing),
  backup, checkpoint, --help with an example, --version, bench --quick --json.
  ``torture`` is tested elsewhere; only its argument checks are here.

``kvstore bench --quick --json --keys 2000 --repetitions 1`` takes about 20
s, so it starts in the background with this module and is collected by the
last test; set KVSTORE_SKIP_BENCH=1 to leave it out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import time
import tracemalloc

import pytest

import kvstore
import kvstore.cli
from pages.format import PAGE_HEADER, PageType

PS = 4096
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Python >= 3.11: do not put the working directory on sys.path, so no stray
#: file there (a wal.py, say) can shadow the packages.
ENV = {**os.environ, "PYTHONSAFEPATH": "1"}
SUBCOMMANDS = ["stat", "check", "get", "put", "delete", "scan", "dump", "load", "backup", "checkpoint", "torture", "bench"]
STAT_FIELDS = [
    "commits", "aborts", "conflicts", "checkpoints", "last_checkpoint_seconds", "wal_bytes", "pages", "cache_hits",
    "cache_misses", "recovery_seconds", "active_transactions", "page_size", "tree_depth", "wal_segments",
    "last_checkpoint_lsn",
]


def kv(*args: str | bytes, input: str | bytes | None = None, cwd: str | os.PathLike | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m kvstore ARGS`` (text mode unless ``input`` is bytes)."""
    text = not isinstance(input, bytes)
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        input=input,
        capture_output=True,
        text=text,
        timeout=timeout,
        cwd=cwd or ROOT, env=ENV,
    )


def kv_many(calls: list[tuple[list[str], str | None]], cwd: str | os.PathLike | None = None,
            timeout: float = 90) -> list[subprocess.CompletedProcess]:
    """Run several ``python -m kvstore`` commands at once (each starts in
    about half a second, mostly imports); return their results in order."""
    procs = [
        (args, inp, subprocess.Popen([sys.executable, "-m", "kvstore", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=cwd or ROOT, env=ENV))
        for args, inp in calls
    ]
    results = []
    for args, inp, proc in procs:
        try:
            out, err = proc.communicate(inp or "", timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}: stderr={r.stderr!r}"
    assert not r.stderr, r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess, *fragments: str, partial_output: bool = False) -> str:
    """Exit status 1, exactly one line on stderr, no traceback, nothing on
    stdout (unless ``partial_output``: a streaming command that failed midway)."""
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, f"{r.args}: exit {r.returncode}, expected 1: stderr={err!r}"
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"{r.args}: expected exactly one line on stderr, got {err!r}"
    if not partial_output:
        assert not r.stdout, f"{r.args}: stdout should be empty on failure: {r.stdout[:300]!r}"
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    return err


def usage_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, f"exit {r.returncode}, expected 2: {r.stderr!r}"
    assert "usage:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not r.stdout
    return r.stderr


def make_db(path: str, items: dict[bytes, bytes] | None = None, **kw) -> None:
    with kvstore.open(path, **kw) as db:
        with db.transaction() as tx:
            for k, v in (items or {}).items():
                tx.put(k, v)


def contents(path: str) -> dict[bytes, bytes]:
    with kvstore.open(path, create=False) as db:
        return dict(db.scan())


def file_digests(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


# --- bench, started in the background -------------------------------------------------------

_bench: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _bench_in_background(request, tmp_path_factory):
    """Start ``kvstore bench --quick --json`` with the module when its test is
    selected, so its 15-25 s (mostly fsync waits) overlap the other tests."""
    wanted = not os.environ.get("KVSTORE_SKIP_BENCH") and any(
        item.name == "test_bench_quick_json" and item.module.__name__ == __name__ for item in request.session.items
    )
    if wanted:
        d = tmp_path_factory.mktemp("bench")
        _bench["stderr"] = open(d / "stderr.txt", "w+")
        _bench["started"] = time.monotonic()
        _bench["proc"] = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "bench", "--quick", "--json", "--keys", "2000", "--repetitions", "1"],
            stdout=subprocess.PIPE, stderr=_bench["stderr"], text=True, cwd=d, env=ENV,
        )
    yield
    proc = _bench.get("proc")
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        _bench["stderr"].close()
        _bench.clear()


# --- get / put / delete -----------------------------------------------------------------------


def test_put_get_delete(tmp_path):
    db = str(tmp_path / "db")
    one_line_error(kv("put", db, "greeting", "hello"), "no database")  # put does not create by default
    assert not os.path.exists(db)
    ok(kv("put", db, "greeting", "hello", "--create"))
    ok(kv("put", db, "grüße", "héllo wörld"))
    assert ok(kv("get", db, "greeting")).stdout == "hello\n"
    assert ok(kv("get", db, "grüße")).stdout == "héllo wörld\n"
    ok(kv("put", db, "greeting", "again"))
    assert ok(kv("get", db, "greeting")).stdout == "again\n"
    ok(kv("delete", db, "greeting"))
    one_line_error(kv("get", db, "greeting"), "greeting", "not found")
    one_line_error(kv("delete", db, "greeting"), "greeting", "not found")
    assert contents(db) == {"grüße".encode(): "héllo wörld".encode()}


def test_get_prints_empty_and_binary_values(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"empty": b"", b"bin": b"a\xffb\x00c", b"nl": b"two\nlines"})
    assert ok(kv("get", db, "empty")).stdout == "\n"
    assert ok(kv("get", db, "bin")).stdout == "a\\xffb\x00c\n"  # bytes that are not UTF-8 are escaped
    assert ok(kv("get", db, "nl")).stdout == "two\nlines\n"


def test_key_that_is_not_utf8_on_the_command_line_is_a_one_line_error(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"k": b"v"})
    r = subprocess.run([sys.executable, "-m", "kvstore", "get", db.encode(), b"\xff"], capture_output=True,
                       timeout=60, cwd=tmp_path, env=ENV)
    one_line_error(r)


# --- stat ---------------------------------------------------------------------------------------


def test_stat_text_and_json(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"k%04d" % i: b"v" * 100 for i in range(500)})
    r = ok(kv("stat", db, "--json"))
    assert r.stdout.count("\n") == 1
    stats = json.loads(r.stdout)
    for field in STAT_FIELDS:
        assert field in stats, f"stat --json lacks {field!r}"
        assert isinstance(stats[field], (int, float)) and not isinstance(stats[field], bool), (field, stats[field])
    assert stats["page_size"] == PS
    assert stats["tree_depth"] == 2
    assert stats["pages"] >= 3
    assert stats["wal_segments"] >= 1
    assert stats["path"] == os.path.abspath(db)
    assert set(stats["files"]) == set(os.listdir(db)) and "pages.db" in stats["files"]

    text = ok(kv("stat", db)).stdout
    for field in STAT_FIELDS:
        assert re.search(rf"^{field}\s+\S", text, re.M), f"stat text lacks a line for {field!r}:\n{text}"
    assert re.search(r"^files:$", text, re.M)
    assert re.search(r"^\s+pages\.db\s+\d+ bytes$", text, re.M)
    assert re.search(r"^\s+wal-\S+\s+\d+ bytes$", text, re.M)


# --- check ------------------------------------------------------------------------------------


def test_check_a_good_store(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"k%04d" % i: b"v" * 100 for i in range(500)} | {b"big": random.Random(1).randbytes(20000)})
    r = ok(kv("check", db))
    assert r.stdout.startswith("ok: ") and r.stdout.count("\n") == 1
    assert "501 keys" in r.stdout
    report = json.loads(ok(kv("check", db, "--json")).stdout)
    assert report["ok"] is True and report["keys"] == 501 and report["overflow_pages"] >= 4


def _live_slots(data: bytes) -> dict[int, int]:
    """{slot: logical id} of the pages the newest valid meta references
    (decoded from pages.format's documented layout)."""
    from pages.format import META_SIZE, PAGE_HEADER_SIZE, PT_ENTRY, Meta, pt_fanout
    from wal.errors import CorruptionError

    metas = []
    for slot in (0, 1):
        try:
            metas.append(Meta.decode(data[slot * PS : slot * PS + META_SIZE], "meta"))
        except CorruptionError:
            pass
    meta = max(metas, key=lambda m: m.generation)
    fanout = pt_fanout(PS)
    out: dict[int, int] = {}

    def walk(level: int, index: int, slot: int) -> None:
        length = PAGE_HEADER.unpack_from(data, slot * PS)[4]
        body = data[slot * PS + PAGE_HEADER_SIZE : slot * PS + PAGE_HEADER_SIZE + length]
        for i in range(len(body) // PT_ENTRY.size):
            s = PT_ENTRY.unpack_from(body, i * PT_ENTRY.size)[0]
            child = index * fanout + i
            if s and level == 0 and 0 < child < meta.nlids:
                out[s] = child
            elif s and level:
                walk(level - 1, child, s)

    if meta.pt_depth:
        walk(meta.pt_depth - 1, 0, meta.pt_root)
    return out


def damage_page_holding(db: str, needle: bytes, ptype: PageType = PageType.LEAF) -> int:
    """Flip one byte of ``needle`` inside the live page of type ``ptype``
    that holds it; return that page's logical id."""
    path = os.path.join(db, "pages.db")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    live = _live_slots(bytes(data))
    hits = []
    at = data.find(needle)
    while at >= 0:
        if at // PS in live and PAGE_HEADER.unpack_from(data, at // PS * PS)[1] == ptype:
            hits.append(at)
        at = data.find(needle, at + 1)
    assert len(hits) == 1, f"{needle!r} is in {len(hits)} live {ptype.name} pages"
    data[hits[0] + len(needle) // 2] ^= 0x08
    with open(path, "r+b") as f:
        f.write(data)
    slot = hits[0] // PS
    lid = PAGE_HEADER.unpack_from(data, slot * PS)[3]
    assert lid == live[slot]
    return lid


def test_check_a_damaged_page_exits_1_naming_it(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"key-%05d" % i: b"value-%05d" % i for i in range(2000)})
    lid = damage_page_holding(db, b"key-01234")
    err = one_line_error(kv("check", db), "DAMAGED", f"page {lid} ")
    assert "pages.db" in err
    # the other commands that read it fail the same way, never printing a wrong value
    one_line_error(kv("get", db, "key-01234"), f"page {lid} ")
    # scan and dump stream: what they printed before the damaged page is right
    r = kv("scan", db)
    one_line_error(r, f"page {lid} ", partial_output=True)
    lines = r.stdout.splitlines()
    assert lines == [f"key-{i:05d}\tvalue-{i:05d}" for i in range(len(lines))] and len(lines) < 1234
    r = kv("dump", db)
    one_line_error(r, f"page {lid} ", partial_output=True)
    lines = r.stdout.splitlines()
    for i, line in enumerate(lines):
        item = json.loads(line)
        assert base64.b64decode(item["key"]) == b"key-%05d" % i
        assert base64.b64decode(item["value"]) == b"value-%05d" % i
    assert len(lines) < 1234
    assert ok(kv("get", db, "key-00000")).stdout == "value-00000\n"  # elsewhere still readable


def test_check_of_a_damaged_store_changes_nothing_on_disk(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"key-%05d" % i: b"value-%05d" % i for i in range(2000)})
    damage_page_holding(db, b"key-01234")
    before = file_digests(db)
    one_line_error(kv("check", db), "DAMAGED")
    assert file_digests(db) == before, "kvstore check wrote to a damaged store"


def _store_with_several_log_segments(tmp_path) -> str:
    """A store left by a process that died without closing, with >= 3 log
    segments after its checkpoint (every commit fsynced: sync="full")."""
    db = str(tmp_path / "db")
    child = (
        "import os, random, sys, kvstore\n"
        "db = kvstore.open(sys.argv[1], checkpoint_wal_bytes=1 << 20, checkpoint_interval=3600)\n"
        "rng = random.Random(1)\n"
        "for t in range(45):\n"
        "    with db.transaction() as tx:\n"
        "        for j in range(10):\n"
        "            tx.put(b'k%03d-%d' % (t, j), rng.randbytes(2000))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", child, db], check=True, timeout=60, cwd=tmp_path, env=ENV)
    return db


def test_check_a_damaged_log_segment_in_the_middle(tmp_path):
    db = _store_with_several_log_segments(tmp_path)
    segs = sorted(n for n in os.listdir(db) if "wal" in n)
    assert len(segs) >= 3, segs
    victim = segs[len(segs) // 2]
    with open(os.path.join(db, victim), "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x40]))
    before = file_digests(db)
    one_line_error(kv("check", db), "DAMAGED", victim)
    one_line_error(kv("get", db, "k000-0"), victim)
    assert file_digests(db) == before, "a refused open changed files"


def test_check_a_torn_log_tail_is_not_damage(tmp_path):
    """A bad last record that no later record proves durable is a torn tail:
    open cuts it off and the check passes (SPEC guarantee 4)."""
    db = _store_with_several_log_segments(tmp_path)
    segs = sorted(n for n in os.listdir(db) if "wal" in n)
    last = os.path.join(db, segs[-1])
    with open(last, "r+b") as f:
        end = len(f.read().rstrip(b"\0"))  # the records end where the preallocated zeros begin
        f.truncate(end - 100)  # the last record is torn
    r = kv("check", db)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") <= 1  # at most a warning that the tail was cut
    data = contents(db)
    assert b"k043-9" in data and b"k044-0" not in data  # the torn last transaction is gone, the rest is there


# --- scan -------------------------------------------------------------------------------------


SCAN_CASES = [
    ([], "abcdefghij"),
    (["--start", "c"], "cdefghij"),
    (["--stop", "c"], "ab"),
    (["--start", "c", "--stop", "g"], "cdef"),
    (["--start", "cc", "--stop", "gg"], "defg"),
    (["--limit", "3"], "abc"),
    (["--limit", "0"], ""),
    (["--limit", "100"], "abcdefghij"),
    (["--reverse"], "jihgfedcba"),
    (["--reverse", "--limit", "2"], "ji"),
    (["--start", "c", "--stop", "g", "--reverse"], "fedc"),
    (["--start", "c", "--stop", "g", "--reverse", "--limit", "3"], "fed"),
    (["--start", "x"], ""),
    (["--start", "g", "--stop", "c"], ""),
]


def test_scan_start_stop_limit_reverse(tmp_path):
    import shutil

    db = str(tmp_path / "db")
    make_db(db, {k.encode(): k.upper().encode() for k in "abcdefghij"})
    copies = []  # one copy per run, so the runs can go at once (each opens its store)
    for n in range(len(SCAN_CASES)):
        copies.append(str(tmp_path / f"copy{n}"))
        shutil.copytree(db, copies[-1])
    results = kv_many([(["scan", c, *opts], None) for c, (opts, _) in zip(copies, SCAN_CASES, strict=True)])
    for (opts, expect), r in zip(SCAN_CASES, results, strict=True):
        ok(r)
        assert r.stdout == "".join(f"{k}\t{k.upper()}\n" for k in expect), f"scan {' '.join(opts)}: {r.stdout!r}"
    empty = str(tmp_path / "empty")
    make_db(empty)
    assert ok(kv("scan", empty)).stdout == ""


def test_scan_into_a_closed_pipe_exits_quietly(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"k%06d" % i: b"v" * 50 for i in range(20000)})
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "scan", db], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=ENV)
    first = proc.stdout.readline()
    proc.stdout.close()  # like `kvstore scan ... | head -1`
    _, err = proc.communicate(timeout=60)
    assert first == b"k000000\t" + b"v" * 50 + b"\n"
    assert proc.returncode == 0 and b"Traceback" not in err and b"Error" not in err, err


# --- dump and load ----------------------------------------------------------------------------


def test_dump_load_round_trip_with_binary_keys_and_values(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    rng = random.Random(2)
    items = {bytes([i]): bytes([255 - i]) * (i % 7) for i in range(256)}  # every byte value, empty values
    items[b"\n\t\"\\{}"] = b"\x00\r\n"
    items[b"k" * 1024] = b"longest key"
    items[b"big"] = rng.randbytes(70000)
    items["ünïcode".encode()] = "välüe".encode()
    make_db(src, items)
    dump = ok(kv("dump", src)).stdout
    lines = dump.splitlines()
    assert len(lines) == len(items)
    first = json.loads(lines[0])
    assert set(first) == {"key", "value"} and base64.b64decode(first["key"]) == b"\x00"
    r = ok(kv("load", dst, input=dump))
    assert r.stdout == f"loaded {len(items)} keys\n"
    assert contents(dst) == items
    # dump of the copy is identical, and loading into an existing store merges
    assert ok(kv("dump", dst)).stdout == dump
    make_db(str(tmp_path / "merge"), {b"\x00": b"replaced", b"zzz-only-here": b"1"})
    ok(kv("load", str(tmp_path / "merge"), input=dump))
    assert contents(str(tmp_path / "merge")) == items | {b"zzz-only-here": b"1"}


def test_dump_load_through_a_pipe_with_a_store_of_several_megabytes(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    rng = random.Random(3)
    items = {b"key-%06d" % i: rng.randbytes(rng.choice([100, 1500, 3000])) for i in range(4000)}
    items[b"huge"] = rng.randbytes(2 * 2**20)
    assert sum(map(len, items.values())) > 7 * 2**20
    with kvstore.open(src, checkpoint_wal_bytes=1 << 20) as db:
        keys = list(items)
        for start in range(0, len(keys), 500):
            with db.transaction() as tx:
                for k in keys[start : start + 500]:
                    tx.put(k, items[k])
    # kvstore dump SRC | kvstore load DST
    dump = subprocess.Popen([sys.executable, "-m", "kvstore", "dump", src], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=ENV)
    load = subprocess.run([sys.executable, "-m", "kvstore", "load", dst], stdin=dump.stdout, capture_output=True,
                          timeout=120, cwd=tmp_path, env=ENV)
    dump.stdout.close()
    _, dump_err = dump.communicate(timeout=120)
    assert dump.returncode == 0 and not dump_err, dump_err
    assert load.returncode == 0 and not load.stderr, load.stderr
    assert load.stdout == f"loaded {len(items)} keys\n".encode()
    assert contents(dst) == items


def test_dump_streams_in_bounded_memory(tmp_path, monkeypatch):
    """dump writes pair by pair from the scan: with a 1 MiB cache its peak
    memory stays far below the 8 MB it dumps (the CLI's main, in process)."""
    src = str(tmp_path / "src")
    rng = random.Random(4)
    with kvstore.open(src, checkpoint_wal_bytes=1 << 20) as db:  # small log segments: open reads little
        for start in range(0, 4000, 500):
            with db.transaction() as tx:
                for i in range(start, start + 500):
                    tx.put(b"key-%06d" % i, rng.randbytes(2000))

    class Counter(io.TextIOBase):
        chars = lines = 0

        def write(self, s: str) -> int:
            self.chars += len(s)
            self.lines += s.count("\n")
            return len(s)

    monkeypatch.setattr(kvstore, "open", functools.partial(kvstore.open, cache_size=1 << 20))
    out = Counter()
    tracemalloc.start()
    try:
        rc = kvstore.cli.main(["dump", src], out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n[dump] peak traced memory {peak / 2**20:.2f} MiB for {out.chars / 2**20:.1f} MiB of output")
    assert rc == 0 and out.lines == 4000 and out.chars > 10 * 2**20
    assert peak < 4 * 2**20, f"dump held {peak / 2**20:.1f} MiB at its peak for 8 MB of data: it does not stream"


BAD_LINES = {
    "not-json": "this is not json\n",
    "bad-base64": '{"key": "!!!", "value": "dg=="}\n',
    "missing-value": '{"key": "aw=="}\n',
    "not-an-object": '["aw==", "dg=="]\n',
    "empty-key": '{"key": "", "value": "dg=="}\n',
    "number": '{"key": 5, "value": "dg=="}\n',
}


@pytest.mark.parametrize("bad", list(BAD_LINES))
def test_load_of_a_malformed_line_exits_1_and_changes_nothing(tmp_path, bad):
    db = str(tmp_path / "db")
    make_db(db, {b"a": b"1", b"b": b"2"})
    before = contents(db)
    good = "".join(
        json.dumps({"key": base64.b64encode(k).decode(), "value": base64.b64encode(v).decode()}) + "\n"
        for k, v in [(b"a", b"changed"), (b"new1", b"x"), (b"new2", b"y")]
    )
    err = one_line_error(kv("load", db, input=good + BAD_LINES[bad] + good), "line 4")
    assert "Traceback" not in err
    assert contents(db) == before, "a failed load changed the store"


def test_failed_load_into_a_new_path_creates_nothing(tmp_path):
    p = str(tmp_path / "new")
    one_line_error(kv("load", p, input="this is not json\n"), "line 1")
    assert not os.path.exists(p), f"a failed load left {os.listdir(p)} behind"


def test_keys_out_of_range_on_the_command_line_are_one_line_errors(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"k": b"v"})
    for r in kv_many([(["put", db, "", "v"], None), (["put", str(tmp_path / "db2"), "k" * 1025, "v", "--create"], None)]):
        one_line_error(r, "key must be 1 to 1024 bytes")
    assert contents(db) == {b"k": b"v"}


def test_commands_respect_an_in_doubt_transaction(tmp_path):
    """A prepared transaction's writes stay invisible to dump/get and its keys
    protected from put/delete/load, which fail with one line and change nothing."""
    db = str(tmp_path / "db")
    with kvstore.open(db) as h:
        h.put(b"a", b"1")
        h.put(b"b", b"2")
        tx = h.begin()
        tx.put(b"a", b"in doubt")
        tx.put(b"c", b"in doubt")
        tx.prepare(b"gid-cli")
    assert ok(kv("get", db, "a")).stdout == "1\n"
    one_line_error(kv("get", db, "c"), "not found")
    stats = json.loads(ok(kv("stat", db, "--json")).stdout)
    assert stats["prepared_transactions"] == 1
    dump = ok(kv("dump", db)).stdout
    assert [base64.b64decode(json.loads(line)["key"]) for line in dump.splitlines()] == [b"a", b"b"]
    one_line_error(kv("put", db, "a", "x"), "conflict")
    one_line_error(kv("delete", db, "a"), "conflict")
    load = "".join(json.dumps({"key": base64.b64encode(k).decode(), "value": "eA=="}) + "\n" for k in (b"b", b"c"))
    one_line_error(kv("load", db, input=load), "conflict")
    assert ok(kv("check", db)).stdout.startswith("ok: ")
    with kvstore.open(db) as h:
        assert h.prepared() == [b"gid-cli"]
        assert dict(h.scan()) == {b"a": b"1", b"b": b"2"}
        h.commit_prepared(b"gid-cli")
        assert dict(h.scan()) == {b"a": b"in doubt", b"b": b"2", b"c": b"in doubt"}


# --- backup and checkpoint ------------------------------------------------------------------


def test_backup(tmp_path):
    db = str(tmp_path / "db")
    items = {b"k%04d" % i: b"v%d" % i for i in range(1000)} | {b"big": random.Random(5).randbytes(50000)}
    make_db(db, items)
    dest = str(tmp_path / "copy")
    r = ok(kv("backup", db, dest))
    assert r.stdout.startswith(f"backup of {db} written to {dest}:") and r.stdout.count("\n") == 1
    assert contents(dest) == items
    assert ok(kv("check", dest)).stdout.startswith("ok: ")
    # an empty destination directory is fine; a non-empty one is refused and untouched
    (tmp_path / "empty").mkdir()
    ok(kv("backup", db, str(tmp_path / "empty")))
    before = file_digests(dest)
    one_line_error(kv("backup", db, dest), "not empty")
    assert file_digests(dest) == before
    (tmp_path / "file").write_text("x")
    one_line_error(kv("backup", db, str(tmp_path / "file")))
    assert (tmp_path / "file").read_text() == "x"
    one_line_error(kv("backup", str(tmp_path / "missing"), str(tmp_path / "copy2")), "no database")
    assert not os.path.exists(tmp_path / "copy2")


def test_checkpoint_prints_the_lsn(tmp_path):
    db = str(tmp_path / "db")
    make_db(db, {b"a": b"1"})
    pattern = re.compile(r"^checkpoint at LSN (\d+): (\d+) pages written, (\d+) log bytes removed, [\d.]+ s\n$")
    m1 = pattern.match(ok(kv("checkpoint", db)).stdout)
    assert m1, "unexpected checkpoint output"
    ok(kv("put", db, "b", "2"))
    m2 = pattern.match(ok(kv("checkpoint", db)).stdout)
    assert m2 and int(m2.group(1)) > int(m1.group(1))
    assert contents(db) == {b"a": b"1", b"b": b"2"}


# --- help, version, usage ---------------------------------------------------------------------


def test_help_of_every_subcommand_shows_an_example():
    subs = [None] + SUBCOMMANDS
    results = kv_many([(["--help"] if sub is None else [sub, "--help"], None) for sub in subs])
    for sub, r in zip(subs, results, strict=True):
        ok(r)
        assert "usage: kvstore" in r.stdout
        lines = r.stdout.splitlines()
        assert "example:" in lines, f"no 'example:' line in the help of {sub}"
        example = lines[lines.index("example:") + 1].strip()
        assert example.startswith("kvstore " + (sub or "")), example


def test_top_level_help_lists_every_subcommand():
    out = ok(kv("--help")).stdout
    for sub in SUBCOMMANDS:
        assert re.search(rf"^\s+{sub}\s", out, re.M), f"{sub} missing from kvstore --help"


def test_version():
    r = ok(kv("--version"))
    assert r.stdout == f"kvstore {kvstore.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", kvstore.__version__)


WRONG_USAGE = [
    [],
    ["nope"],
    ["get"],
    ["get", "DB"],
    ["put", "DB", "k"],
    ["backup", "DB"],
    ["scan", "DB", "--limit", "-1"],
    ["scan", "DB", "--limit", "many"],
    ["scan", "DB", "--bogus"],
    ["torture", "DB", "--seconds", "0"],
    ["torture", "DB", "--seconds", "-5"],
    ["torture", "DB", "--threads", "0"],
    ["torture", "DB", "--crash-every", "0"],
    ["stat", "DB", "extra"],
    ["bench", "--quick", "extra"],
    ["bench", "--repetitions", "0"],
    ["bench", "--keys", "10"],
]


def test_wrong_usage_exits_2_with_usage(tmp_path):
    db = str(tmp_path / "db")
    calls = [([db if a == "DB" else a for a in args], None) for args in WRONG_USAGE]
    for r in kv_many(calls):
        usage_error(r)
    assert not os.path.exists(db), "bad usage created the database"


# --- user mistakes: one line, exit 1 ------------------------------------------------------------

COMMANDS = {
    "stat": lambda p: ["stat", p],
    "stat-json": lambda p: ["stat", p, "--json"],
    "check": lambda p: ["check", p],
    "get": lambda p: ["get", p, "k"],
    "put": lambda p: ["put", p, "k", "v"],
    "delete": lambda p: ["delete", p, "k"],
    "scan": lambda p: ["scan", p],
    "dump": lambda p: ["dump", p],
    "backup": lambda p: ["backup", p, p + "-copy"],
    "checkpoint": lambda p: ["checkpoint", p],
}


@pytest.mark.parametrize("kind", ["missing", "file", "not-a-database"])
def test_a_path_that_is_not_a_database_is_a_one_line_error(tmp_path, kind):
    p = str(tmp_path / "target")
    if kind == "file":
        with open(p, "w") as f:
            f.write("just a file\n")
    elif kind == "not-a-database":
        os.mkdir(p)
        with open(os.path.join(p, "notes.txt"), "w") as f:
            f.write("mine\n")
    before = sorted(os.listdir(tmp_path))
    for r in kv_many([(args(p), None) for args in COMMANDS.values()]):
        one_line_error(r, "target")
    assert sorted(os.listdir(tmp_path)) == before, "a failed command created files"
    if kind == "not-a-database":
        assert os.listdir(p) == ["notes.txt"]


@pytest.mark.parametrize("kind", ["file", "not-a-database"])
def test_load_into_a_path_that_is_not_a_database_is_a_one_line_error(tmp_path, kind):
    p = str(tmp_path / "target")
    if kind == "file":
        with open(p, "w") as f:
            f.write("just a file\n")
    else:
        os.mkdir(p)
        with open(os.path.join(p, "notes.txt"), "w") as f:
            f.write("mine\n")
    one_line_error(kv("load", p, input='{"key": "aw==", "value": "dg=="}\n'), "target")


def test_a_locked_database_is_a_one_line_error(tmp_path):
    p = str(tmp_path / "db")
    held = kvstore.open(p)  # this process holds the lock
    try:
        held.put(b"k", b"v")
        calls = [(args(p), None) for args in COMMANDS.values()] + [(["load", p], '{"key": "aw==", "value": "dg=="}\n')]
        for (args, _), r in zip(calls, kv_many(calls), strict=True):
            err = one_line_error(r, "already open")
            assert err.startswith(f"kvstore {args[0]}: "), err
        assert held.get(b"k") == b"v"  # and the holder is undisturbed
        held.put(b"k2", b"v2")
    finally:
        held.close()
    assert not os.path.exists(p + "-copy")
    assert ok(kv("get", p, "k2")).stdout == "v2\n"


# --- bench (started in the background by the fixture above) -----------------------------------


@pytest.mark.skipif(bool(os.environ.get("KVSTORE_SKIP_BENCH")), reason="KVSTORE_SKIP_BENCH is set")
def test_bench_quick_json():
    proc = _bench["proc"]
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    elapsed = time.monotonic() - _bench["started"]
    _bench["stderr"].seek(0)
    err = _bench["stderr"].read()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    report = json.loads(out)
    results = report["results"]
    assert len(results) >= 3
    names = [r["workload"] for r in results]
    assert len(set(names)) == len(names)
    for r in results:
        for field in ("ratio_median", "ratio_min", "ratio_max", "kvstore_ops_per_s", "sqlite3_ops_per_s"):
            assert isinstance(r[field], (int, float)) and r[field] > 0, (r["workload"], field, r.get(field))
        assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    print(f"\n[bench] kvstore bench --quick --json: {len(results)} workloads in {elapsed:.1f} s (in the background)")
