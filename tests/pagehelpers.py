"""Shared builders and checkers for the page-layer tests (tests/test_pages_*.py).

Builders make a small ``PageStore`` on a ``FaultFS`` (tiny 512-byte pages and
a cache of a few pages force deep trees, splits, merges, eviction and steal).
Checkers read a store back *independently* of the code under test where they
can: ``parse_image`` decodes a page file's bytes with nothing but the byte
layout documented in ``pages.format``, so invariant tests (P1-P4 of
``pages.pagefile``) do not trust the page file's own bookkeeping.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from pages.faultfs import FaultFS
from pages.format import (
    META_SIZE,
    PAGE_HEADER,
    PAGE_HEADER_SIZE,
    PT_ENTRY,
    Meta,
    PageType,
    decode_page,
    pt_fanout,
)
from pages.node import InternalNode, LeafNode, OverflowNode, OverflowRef
from pages.pagefile import page_file_path
from pages.rollback_segment import UndoHeader, UndoPage
from pages.store import PageStore
from wal.errors import CorruptionError
from wal.log import WriteAheadLog

D = "/db"
PAGES = page_file_path(D)
DB_ID = bytes.fromhex("6b7673746f72652d70616765732d3031")

#: ``check_store`` demands the quarter-page fill of ``BTree._check``.  (Set to
#: True to tolerate only an "under-full" complaint and run the other checks,
#: should a fill bug need to be parked behind a strict xfail again.)
TOLERATE_UNDERFULL = False


# --- building ---------------------------------------------------------------------


def new_fs(seed: int = 0) -> FaultFS:
    return FaultFS(seed=seed, dirs=[D])


def fs_with(files: dict[str, bytes], seed: int = 0) -> FaultFS:
    """A FaultFS whose /db durably holds exactly ``files`` (path -> bytes)."""
    fs = new_fs(seed)
    for path, data in files.items():
        f = fs.create(path)
        if data:
            f.pwrite(0, data)
        f.fsync()
        f.close()
    return fs


def new_store(fs: Any = None, d: str = D, page_size: int = 512, cache_pages: int = 16) -> tuple[Any, WriteAheadLog, PageStore]:
    """(fs, wal, store): a fresh store with tiny pages and a tiny cache."""
    fs = fs if fs is not None else new_fs()
    wal = WriteAheadLog.open(fs, d, DB_ID)
    st = PageStore.create(fs, d, DB_ID, wal, page_size=page_size, cache_size=cache_pages * page_size, min_page_size=512)
    return fs, wal, st


class NoLog:
    """Stands in for the WAL when a test opens an image *without* redo: any
    use of it (a page write needing the log, a redo) fails the test."""

    durable_lsn = 0
    end_lsn = 0

    def flush(self, lsn: int) -> None:
        raise AssertionError(f"opening an image without redo wrote a page (flush of the log to {lsn})")

    def append(self, *a: Any, **k: Any) -> int:
        raise AssertionError("opening an image without redo logged a change")

    def records(self, *a: Any, **k: Any) -> Iterator[Any]:
        raise AssertionError("redo was run on a store opened without a log")


def open_image(fs: Any, d: str = D, cache_pages: int = 16, page_size: int = 512) -> PageStore:
    """The durable image of the page file in ``d``, opened without redo."""
    return PageStore.open(fs, d, NoLog(), cache_size=cache_pages * page_size)  # type: ignore[arg-type]


def value_bytes(size: int, kind: int, seed: int) -> bytes:
    """Deterministic value bytes: kind 0 random, 1 compressible, 2 zeros."""
    if kind == 0:
        return random.Random(seed).randbytes(size)
    if kind == 1:
        unit = random.Random(seed).randbytes(7)
        return (unit * (size // 7 + 1))[:size]
    return bytes(size)


def flip_bit(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def replace_at(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


# --- a deterministic workload with a model -------------------------------------------


class Workload:
    """A seeded random sequence of B+tree and rollback-segment changes, with a
    flip every ``flip_every`` steps, and the model of what the store holds.

    Changes: insert, replace and delete (values from 0 bytes to overflow
    chains of several pages), a delete of every other key now and then (merges,
    root collapses), undo-record appends and frees of old undo pages.
    ``before_flip(state)`` and ``after_flip(state)`` see the model the flip
    makes durable; ``state()`` is (key -> value, [undo record tuples]).

    ``fuzzy=n`` flips the way the fuzzy checkpoint does, through the page
    file's three phases, and runs ``n`` more steps while the flip is in flight
    twice: inside phase 2 just before the meta is written (from the failpoint
    ``pages.before_meta_write``) and between phases 2 and 3.  Those changes
    are not part of the image the flip makes durable.
    """

    def __init__(
        self,
        seed: int,
        steps: int = 200,
        flip_every: int = 60,
        max_key: int = 40,
        big: int = 3000,
        grow: float = 0.0,
        fuzzy: int = 0,
    ) -> None:
        self.seed, self.steps, self.flip_every, self.max_key, self.big = seed, steps, flip_every, max_key, big
        self.grow = grow  # added to the share of inserts (deeper trees)
        self.fuzzy = fuzzy
        self.model: dict[bytes, bytes] = {}
        self.undo: list[tuple] = []
        self.flips = 0
        self._rng = random.Random(seed)
        self._n = 0  # steps run so far, in flight or not

    def state(self) -> tuple[dict[bytes, bytes], list[tuple]]:
        return dict(self.model), list(self.undo)

    def step(self, st: PageStore) -> None:
        """One random change, applied to the store and the model."""
        from pages.rollback_segment import encode_undo

        rng, model, undo = self._rng, self.model, self.undo
        i = self._n
        txid = i + 1
        self._n += 1
        r = rng.random() - self.grow
        if r < 0.55 or len(model) < 4:
            if model and rng.random() < 0.3:
                key = rng.choice(sorted(model))
            else:
                key = rng.randbytes(rng.randint(1, self.max_key))
            size = rng.choice([0, 5, 20, 60, 100, 250, self.big])
            value = value_bytes(size, rng.randrange(3), self.seed * 100003 + i)
            st.tree.put(key, value, txid)
            model[key] = value
        elif r < 0.70:
            key = rng.choice(sorted(model))
            st.tree.delete(key)
            del model[key]
        elif r < 0.715 and len(model) > 30:
            for key in sorted(model)[::2]:
                st.tree.delete(key)
                del model[key]
        elif r < 0.93:
            key = rng.randbytes(rng.randint(1, 30))
            value = None if rng.random() < 0.2 else rng.randbytes(rng.randint(0, 120))
            flags = 1 if value is None else 0
            rec = encode_undo(txid, txid - 1, txid // 2, txid * 3, 0, key, value)
            ptr = st.undo.append(rec)
            undo.append((ptr, txid, txid - 1, txid // 2, txid * 3, flags, key, value))
        else:
            cutoff = txid - rng.randint(0, 40)
            pages = st.undo.pages()
            freed = st.undo.free_pages_before(lambda page, lid: page.newest_txid(lid) >= cutoff)
            gone = set(pages[:freed])
            undo[:] = [u for u in undo if u[0] >> 16 not in gone]

    def run(self, st: PageStore, wal: Any, before_flip: Any = None, after_flip: Any = None, after_step: Any = None) -> None:
        for i in range(self.steps):
            self.step(st)
            if after_step:
                after_step(i)
            if (i + 1) % self.flip_every == 0:
                state = self.state()
                if before_flip:
                    before_flip(state)
                if self.fuzzy:
                    self.fuzzy_flip(st, wal)
                else:
                    st.flip(wal.end_lsn)
                self.flips += 1
                if after_flip:
                    after_flip(state)

    def fuzzy_flip(self, st: PageStore, wal: Any) -> None:
        from wal import failpoints

        def in_flight() -> None:
            for _ in range(self.fuzzy):
                self.step(st)

        pf = st.pagefile
        st.pool.write_dirty()
        flip = pf.begin_flip()
        app = st.app_area()
        checkpoint_lsn = wal.end_lsn
        failpoints.arm("pages.before_meta_write", in_flight, times=1)
        try:
            pf.flip_io(flip, checkpoint_lsn, app)
        except BaseException:
            pf.abort_flip(flip)
            raise
        finally:
            failpoints.disarm("pages.before_meta_write")
        in_flight()
        pf.complete_flip(flip)


# --- reading back -------------------------------------------------------------------


def contents(st: PageStore) -> dict[bytes, bytes]:
    """key -> value of the whole tree, values read in full (overflow chains
    followed and checked)."""
    tree = st.tree
    return {k: tree.read_value(c) for k, c in tree.scan()}


def undo_contents(st: PageStore) -> list[tuple]:
    """Every undo record of the rollback segment, oldest page first."""
    out = []
    for lid in st.undo.pages():
        page = st.pool.get(lid)
        out.extend(tuple(r) for r in page.records(lid))
    return out


def state_of(st: PageStore) -> tuple[dict[bytes, bytes], list[tuple]]:
    return contents(st), undo_contents(st)


def check_tree(st: PageStore, fill: bool = True) -> dict[str, Any]:
    """Walk the B+tree and the rollback segment without trusting their own
    checks: key order, separator bounds, equal leaf depth, node sizes equal
    their encoded length and fit the page, overflow chains hold exactly the
    stored bytes, no page is reachable twice, and every allocated page is
    reachable (no leak).  ``fill`` also demands the quarter-page fill."""
    tree, pool, pf = st.tree, st.pool, st.pagefile
    seen: set[int] = set()
    leaf_depths: set[int] = set()
    counts = {"leaves": 0, "internal": 0, "keys": 0, "overflow_pages": 0, "undo_pages": 0}

    def visit(lid: int) -> Any:
        assert lid not in seen, f"page {lid} is reachable twice"
        assert pf.is_allocated(lid), f"page {lid} is reachable but not allocated"
        seen.add(lid)
        return pool.get(lid)

    def walk(lid: int, lo: bytes | None, hi: bytes | None, depth: int) -> None:
        node = visit(lid)
        assert node.__class__ in (LeafNode, InternalNode), f"page {lid} in the tree is a {type(node).__name__}"
        body = node.encode()
        assert node.size == len(body), f"page {lid}: size {node.size} != encoded {len(body)}"
        assert len(body) <= tree.capacity, f"page {lid} over-full"
        if fill and lid != tree.root:
            assert node.size >= tree.min_fill, f"page {lid} under-full"
        keys = node.keys
        assert all(a < b for a, b in pairwise(keys)), f"page {lid}: keys out of order"
        assert all(1 <= len(k) <= 1024 for k in keys), f"page {lid}: bad key length"
        if keys:
            assert lo is None or keys[0] >= lo, f"page {lid}: key below its bound"
            assert hi is None or keys[-1] < hi, f"page {lid}: key above its bound"
        if node.__class__ is LeafNode:
            counts["leaves"] += 1
            counts["keys"] += len(keys)
            leaf_depths.add(depth)
            for c in node.cells:
                v = c[3]
                if v.__class__ is OverflowRef:
                    got, n, nxt = 0, 0, v.first
                    while nxt:
                        ov = visit(nxt)
                        assert ov.__class__ is OverflowNode, f"page {nxt} in a chain is not an overflow page"
                        got += len(ov.data)
                        n += 1
                        nxt = ov.next
                    assert got == v.stored, f"chain at {v.first}: {got} bytes, expected {v.stored}"
                    counts["overflow_pages"] += n
            return
        counts["internal"] += 1
        assert len(node.children) == len(keys) + 1
        assert lid == tree.root or keys, f"page {lid}: internal node without keys"
        bounds = [lo, *keys, hi]
        for i, child in enumerate(node.children):
            walk(child, bounds[i], bounds[i + 1], depth + 1)

    # No begin_op: reads need no pins (a node object stays valid after its
    # frame is evicted), and pinning a whole big tree makes eviction quadratic.
    walk(tree.root, None, None, 1)
    hdr = visit(st.undo.header)
    assert hdr.__class__ is UndoHeader
    lid, last = hdr.head, 0
    while lid:
        page = visit(lid)
        assert page.__class__ is UndoPage, f"page {lid} in the undo chain is not an undo page"
        page.records(lid)  # every record decodes
        counts["undo_pages"] += 1
        last, lid = lid, page.next
    assert last == hdr.tail, "undo chain does not end at the header's tail"
    assert len(leaf_depths) == 1, f"leaves at different depths: {leaf_depths}"
    allocated = {lid for lid in range(1, pf.nlids) if pf.is_allocated(lid)}
    assert allocated == seen, f"pages allocated but unreachable (leaked): {sorted(allocated - seen)[:10]}"
    counts["depth"] = leaf_depths.pop()
    return counts


def check_store(st: PageStore) -> dict[str, Any]:
    """Every ``_check()`` of the store plus ``check_tree``; reads every page
    (so every checksum is verified)."""
    st.pagefile._check()
    try:
        st._check()
    except AssertionError as e:
        if not (TOLERATE_UNDERFULL and "under-full" in str(e)):
            raise
        st.pagefile._check()
        st.undo._check()
    counts = check_tree(st, fill=not TOLERATE_UNDERFULL)
    st.pages()  # every allocated page reads back and decodes
    return counts


# --- the page file's bytes, decoded independently ---------------------------------------


@dataclass
class Image:
    """One meta's image of a page file, decoded from bytes."""

    meta: Meta
    meta_slot: int
    pages: dict[int, tuple[int, int]] = field(default_factory=dict)  # lid -> (slot, crc)
    pt_slots: set[int] = field(default_factory=set)

    @property
    def slots(self) -> set[int]:
        """Every slot this image references, its meta slot included."""
        return {s for s, _ in self.pages.values()} | self.pt_slots | {self.meta_slot}


def read_metas(data: bytes, page_size: int) -> list[tuple[int, Meta]]:
    """The valid metas of a page file's bytes: [(slot, Meta)]."""
    out = []
    for slot in (0, 1):
        try:
            out.append((slot, Meta.decode(data[slot * page_size : slot * page_size + META_SIZE], f"meta {slot}")))
        except CorruptionError:
            pass
    return out


def image_from(data: bytes, page_size: int, meta: Meta, meta_slot: int, verify_pages: bool = True) -> Image:
    """Walk ``meta``'s page table in ``data``; every page-table page and (with
    ``verify_pages``) every page must pass the validity rule.  Raises
    CorruptionError otherwise."""
    img = Image(meta, meta_slot)
    fanout = pt_fanout(page_size)

    def slot_bytes(slot: int) -> bytes:
        return data[slot * page_size : (slot + 1) * page_size]

    def walk(level: int, index: int, slot: int, crc: int) -> None:
        lid = (1 << 60) | (level << 52) | index
        ptype, _lsn, body = decode_page(slot_bytes(slot), lid, crc, f"pt page {level}/{index} at slot {slot}")
        assert ptype == PageType.PAGE_TABLE
        img.pt_slots.add(slot)
        for i in range(len(body) // PT_ENTRY.size):
            s, c = PT_ENTRY.unpack_from(body, i * PT_ENTRY.size)
            child = index * fanout + i
            if not s:
                continue
            if level == 0:
                if 0 < child < meta.nlids:
                    img.pages[child] = (s, c)
            else:
                walk(level - 1, child, s, c)

    if meta.pt_depth:
        walk(meta.pt_depth - 1, 0, meta.pt_root, meta.pt_root_crc)
    if verify_pages:
        for lid, (slot, crc) in img.pages.items():
            decode_page(slot_bytes(slot), lid, crc, f"page {lid} at slot {slot}")
    return img


def newest_image(data: bytes, page_size: int, verify_pages: bool = False) -> Image | None:
    """The image of the valid meta with the highest generation, or None."""
    metas = read_metas(data, page_size)
    if not metas:
        return None
    slot, meta = max(metas, key=lambda t: t[1].generation)
    return image_from(data, page_size, meta, slot, verify_pages)


def page_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(crc, type, page LSN, logical id, body length) of a page's bytes."""
    return PAGE_HEADER.unpack_from(data)


__all__ = [
    "D", "PAGES", "DB_ID", "PAGE_HEADER_SIZE", "new_fs", "fs_with", "new_store", "open_image", "NoLog",
    "value_bytes", "flip_bit", "replace_at", "contents", "undo_contents", "state_of", "check_tree",
    "check_store", "Workload", "Image", "read_metas", "image_from", "newest_image", "page_header",
]
