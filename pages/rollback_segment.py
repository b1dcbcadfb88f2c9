"""Rollback segment storage: undo records in undo pages, addressed by pointer.

The rollback segment holds the earlier versions of keys (for snapshot reads)
and what a transaction must restore (for rollback).  It is a chain of undo
pages, oldest (head) to newest (tail); records are appended at the tail and
whole pages are freed from the head once nothing needs them.  A fixed header
page, whose id lives in the meta, names head and tail.  Every change is a
logged page op, like the B+tree's.

Undo page body::

    u64 next page (0 = none) | records, back to back

Undo record (at byte ``offset`` of the body of page ``lid``; its pointer is
``lid << 16 | offset``, never 0)::

    u32 length of what follows | u64 txid | u64 txn prev (the same
    transaction's previous undo record) | u64 prev writer | u64 prev undo (the
    key's older version) | u8 flags | u16 key_len | key | u32 vlen | value

    flags bit 0: the key was absent before (no previous version)
    flags bit 1: the previous version was a delete mark
    flags bit 2: value is an overflow reference (pages.node.OverflowRef)
    flags bit 3: undone -- a rollback restored this previous version, so
                 purge must not free its value
    flags bit 4: the change wrote a value, not a delete mark, so purge has
                 no mark to look for (a record without it may have)

Header page body: ``u64 head | u64 tail``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from pages import redo
from pages.buffer_pool import BufferPool
from pages.format import PageType
from pages.node import OVF_REF_SIZE, Op, OverflowRef, PageOp, Value, body_capacity, op_image
from pages.pagefile import PageFile
from wal.errors import CorruptionError

ABSENT = 0x01
WAS_DELETED = 0x02
_OVERFLOW = 0x04
UNDONE = 0x08  # set by rollback (UNDO_MARK): the change was undone, its value restored
WROTE_VALUE = 0x10  # the change wrote a value (no delete mark for purge to remove)
_TXN_PREV_AT = 12  # offset of txn_prev within a record
_FREES_PER_RECORD = 4096  # undo pages freed per log record by a purge
_FLAGS_AT = 36  # offset of the flags byte within a record

_REC = struct.Struct("<IQQQQBH")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LEN_TXID = struct.Struct("<IQ")  # a record's length and txid, its first fields
_KLEN = struct.Struct("<H")
_KLEN_AT = 37  # offset of the key length within a record (after the flags byte)
_OVF = struct.Struct("<QIIBI")
_HEADER = struct.Struct("<QQ")

LogOps = Callable[[list[PageOp]], int]  # append a record of page ops, return its LSN


class UndoRecord(NamedTuple):
    """A decoded undo record.  ``value`` is bytes, an OverflowRef, or None
    when the key was absent."""

    ptr: int
    txid: int
    txn_prev: int
    prev_writer: int
    prev_undo: int
    flags: int
    key: bytes
    value: Value | None


def encode_undo(txid: int, txn_prev: int, prev_writer: int, prev_undo: int, flags: int, key: bytes, value: Value | None) -> bytes:
    if value is None:
        vb = b""
        flags |= ABSENT
    elif isinstance(value, OverflowRef):
        vb = _OVF.pack(*value)
        flags |= _OVERFLOW
    else:
        vb = value
    body = _REC.pack(0, txid, txn_prev, prev_writer, prev_undo, flags, len(key))[4:] + key + _U32.pack(len(vb)) + vb
    return _U32.pack(len(body)) + body


class UndoPage:
    __slots__ = ("next", "data", "page_lsn", "_scanned", "_newest")
    ptype = PageType.UNDO

    def __init__(self, next_: int = 0, data: bytes = b"", page_lsn: int = 0) -> None:
        self.next = next_
        self.data = bytearray(data)
        self.page_lsn = page_lsn
        # newest_txid's memo: the highest txid in data[:_scanned], whose
        # framing it has checked (records are only appended after that; an
        # UNDO_APPEND that cuts below it resets it)
        self._scanned = 0
        self._newest = 0

    @property
    def size(self) -> int:
        return 8 + len(self.data)

    def encode(self) -> bytes:
        return _U64.pack(self.next) + bytes(self.data)

    @classmethod
    def decode(cls, body: bytes, page_lsn: int = 0) -> UndoPage:
        return cls(_U64.unpack_from(body)[0], body[8:], page_lsn)

    def records(self, lid: int) -> list[UndoRecord]:
        out: list[UndoRecord] = []
        pos, data = 0, self.data
        while pos < len(data):
            rec = _decode_at(data, pos, lid)
            out.append(rec)
            pos += 4 + _U32.unpack_from(data, pos)[0]
        return out

    def newest_txid(self, lid: int) -> int:
        """The highest transaction id among the page's records (0 for none),
        from their headers and length fields alone.  Raises CorruptionError,
        as ``records`` does, if a record runs past the page or its lengths
        disagree.  Only the records appended since the last call are read:
        purge asks again about the page it stopped at every time it runs."""
        data = self.data
        n = len(data)
        pos, newest = self._scanned, self._newest
        if pos == n:
            return newest
        if pos > n:  # cut (an UNDO_APPEND's redo): read it all again
            pos = newest = 0
        unpack, klen_at, u32 = _LEN_TXID.unpack_from, _KLEN.unpack_from, _U32.unpack_from
        while pos < n:
            where = f"undo page {lid} offset {pos}"
            if pos + _REC.size > n:
                raise CorruptionError(where, "undo record header runs past the page")
            length, txid = unpack(data, pos)
            end = pos + 4 + length
            if end > n:
                raise CorruptionError(where, "undo record runs past the page")
            p = pos + _REC.size + klen_at(data, pos + _KLEN_AT)[0]
            if p + 4 > end or p + 4 + u32(data, p)[0] != end:
                raise CorruptionError(where, "undo record length does not match its fields")
            if txid > newest:
                newest = txid
            pos = end
        self._scanned, self._newest = n, newest
        return newest

    def purge_work(self, lid: int) -> list[UndoRecord]:
        """The records purge acts on, decoded: those not undone that wrote a
        delete mark (which purge may remove) or hold an overflow value (whose
        pages purge frees).  The others are read no further than their
        flags.  Call ``newest_txid`` first: it checks the records' framing."""
        out: list[UndoRecord] = []
        data = self.data
        n = len(data)
        unpack = _U32.unpack_from
        pos = 0
        while pos < n:
            flags = data[pos + _FLAGS_AT]
            if not flags & UNDONE and (not flags & WROTE_VALUE or flags & _OVERFLOW):
                out.append(_decode_at(data, pos, lid))
            pos += 4 + unpack(data, pos)[0]
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UndoPage) and (self.next, self.data) == (other.next, other.data)


class UndoHeader:
    __slots__ = ("head", "tail", "page_lsn")
    ptype = PageType.UNDO_HEADER

    def __init__(self, head: int = 0, tail: int = 0, page_lsn: int = 0) -> None:
        self.head, self.tail, self.page_lsn = head, tail, page_lsn

    size = 16

    def encode(self) -> bytes:
        return _HEADER.pack(self.head, self.tail)

    @classmethod
    def decode(cls, body: bytes, page_lsn: int = 0) -> UndoHeader:
        head, tail = _HEADER.unpack_from(body)
        return cls(head, tail, page_lsn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UndoHeader) and (self.head, self.tail) == (other.head, other.tail)


def _decode_at(data: bytes | bytearray, pos: int, lid: int) -> UndoRecord:
    where = f"undo page {lid} offset {pos}"
    if pos + _REC.size > len(data):
        raise CorruptionError(where, "undo record header runs past the page")
    length, txid, txn_prev, prev_writer, prev_undo, flags, klen = _REC.unpack_from(data, pos)
    end = pos + 4 + length
    if end > len(data):
        raise CorruptionError(where, "undo record runs past the page")
    p = pos + _REC.size
    key = bytes(data[p : p + klen])
    p += klen
    if p + 4 > end:  # a damaged key length (unpacking past the page raised struct.error)
        raise CorruptionError(where, "undo record length does not match its fields")
    (vlen,) = _U32.unpack_from(data, p)
    p += 4
    vb = bytes(data[p : p + vlen])
    if p + vlen != end:
        raise CorruptionError(where, "undo record length does not match its fields")
    value: Value | None = None if flags & ABSENT else OverflowRef(*_OVF.unpack(vb)) if flags & _OVERFLOW else vb
    return UndoRecord((lid << 16) | pos, txid, txn_prev, prev_writer, prev_undo, flags & ~_OVERFLOW, key, value)


def apply_undo_op(node: UndoPage, op: int, data: bytes) -> UndoPage:
    """Redo of a rollback-segment op on an undo page."""
    if op == Op.UNDO_APPEND:
        (offset,) = _U32.unpack_from(data)
        rec = data[4:]
        del node.data[offset:]
        node.data += rec
        if offset < node._scanned:  # the memo covered what was cut
            node._scanned = node._newest = 0
    elif op == Op.UNDO_SETNEXT:
        node.next = _U64.unpack_from(data)[0]
    elif op == Op.UNDO_MARK:
        node.data[_U32.unpack_from(data)[0] + _FLAGS_AT] |= UNDONE
    else:
        raise ValueError(f"not a rollback segment op: {op}")
    return node


class RollbackSegment:
    """The undo pages of one database, rooted at the header page ``header``."""

    def __init__(self, pool: BufferPool, pagefile: PageFile, log_ops: LogOps, header: int) -> None:
        self.pool = pool
        self.pagefile = pagefile
        self._log = log_ops
        self.header = header
        self.capacity = body_capacity(pagefile.page_size) - 8
        self.max_record = self.capacity  # every record fits an empty page
        self._pages_added = 0  # since take_pages_added() was last called

    @classmethod
    def create(cls, pool: BufferPool, pagefile: PageFile, log_ops: LogOps) -> RollbackSegment:
        header = pagefile.allocate()
        first = pagefile.allocate()
        pool.begin_op()
        try:
            redo.apply_live(
                pool,
                pagefile,
                log_ops,
                [(first, Op.IMAGE, op_image(UndoPage())), (header, Op.IMAGE, op_image(UndoHeader(first, first)))],
            )
        finally:
            pool.end_op()
        return cls(pool, pagefile, log_ops, header)

    def plan_append(self, record: bytes, ops: list[PageOp]) -> int:
        """Add the ops that append ``record`` (from ``encode_undo``) to
        ``ops``; return the record's pointer.  The caller logs and applies
        ``ops`` (``pages.redo.apply_live``), usually with the B+tree change the
        record belongs to, in one log record."""
        if len(record) > self.max_record:
            raise ValueError(f"undo record of {len(record)} bytes exceeds an undo page ({self.max_record})")
        hdr: UndoHeader = self.pool.get(self.header)
        tail: UndoPage = self.pool.get(hdr.tail)
        pending = sum(len(d) - 4 for lid, op, d in ops if lid == hdr.tail and op == Op.UNDO_APPEND)
        offset = len(tail.data) + pending
        if offset + len(record) <= self.capacity:
            ops.append((hdr.tail, Op.UNDO_APPEND, _U32.pack(offset) + record))
            return (hdr.tail << 16) | offset
        new = self.pagefile.allocate()
        self._pages_added += 1
        ops.append((new, Op.IMAGE, op_image(UndoPage(0, record))))
        ops.append((hdr.tail, Op.UNDO_SETNEXT, _U64.pack(new)))
        ops.append((self.header, Op.IMAGE, op_image(UndoHeader(hdr.head, new))))
        return new << 16

    def tail_room(self, length: int) -> tuple[int, UndoPage] | None:
        """(page id, page) of the tail page if a record of ``length`` bytes
        fits after its records, else None (``plan_append`` would open a
        page).  For a caller that appends one record in place of
        ``plan_append``: it logs ``Op.UNDO_APPEND`` at ``len(page.data)``,
        then applies it.  Caller has begun a pool operation."""
        tail_lid = self.pool.get(self.header).tail
        tail: UndoPage = self.pool.get(tail_lid)
        if len(tail.data) + length <= self.capacity:
            return tail_lid, tail
        return None

    def plan_append_many(self, records: list[bytes], ops: list[PageOp], chain: int) -> list[int]:
        """``plan_append`` for several records of one transaction in one ops
        list (a run of puts); return their pointers.  The records are linked
        into the transaction's chain as they are placed: the first one's
        ``txn_prev`` becomes ``chain``, each later one's the pointer before
        it.  What goes to the current tail page is one UNDO_APPEND; a page
        this plan opens is written whole (an IMAGE, chained by next
        pointers), and the header once, at the end."""
        for record in records:
            if len(record) > self.max_record:
                raise ValueError(f"undo record of {len(record)} bytes exceeds an undo page ({self.max_record})")
        hdr: UndoHeader = self.pool.get(self.header)
        tail_lid = hdr.tail
        tail: UndoPage = self.pool.get(tail_lid)
        pending = sum(len(d) - 4 for lid, op, d in ops if lid == tail_lid and op == Op.UNDO_APPEND)
        first_offset = offset = len(tail.data) + pending
        cap = self.capacity
        data = bytearray()  # what this plan puts on page tail_lid, from first_offset on
        opened = False  # whether tail_lid is a page this plan opened
        ptrs: list[int] = []
        for record in records:
            if offset + len(record) > cap:
                new = self.pagefile.allocate()
                self._pages_added += 1
                if opened:
                    ops.append((tail_lid, Op.IMAGE, op_image(UndoPage(new, bytes(data)))))
                else:
                    if data:
                        ops.append((tail_lid, Op.UNDO_APPEND, _U32.pack(first_offset) + data))
                    ops.append((tail_lid, Op.UNDO_SETNEXT, _U64.pack(new)))
                tail_lid, offset, data, opened = new, 0, bytearray(), True
            ptr = (tail_lid << 16) | offset
            ptrs.append(ptr)
            at = len(data)
            data += record
            _U64.pack_into(data, at + _TXN_PREV_AT, chain)
            chain = ptr
            offset += len(record)
        if opened:
            ops.append((tail_lid, Op.IMAGE, op_image(UndoPage(0, bytes(data)))))
            ops.append((self.header, Op.IMAGE, op_image(UndoHeader(hdr.head, tail_lid))))
        elif data:
            ops.append((tail_lid, Op.UNDO_APPEND, _U32.pack(first_offset) + data))
        return ptrs

    @staticmethod
    def plan_mark_undone(ptr: int, ops: list[PageOp]) -> None:
        """Add the op that marks the record at ``ptr`` undone."""
        ops.append((ptr >> 16, Op.UNDO_MARK, _U32.pack(ptr & 0xFFFF)))

    def append(self, record: bytes) -> int:
        """Append ``record``, logged; return its pointer."""
        self.pool.begin_op()
        try:
            ops: list[PageOp] = []
            ptr = self.plan_append(record, ops)
            redo.apply_live(self.pool, self.pagefile, self._log, ops)
            return ptr
        finally:
            self.pool.end_op()

    def take_pages_added(self) -> int:
        """Undo pages added since the last call (sizes purge's budget)."""
        n, self._pages_added = self._pages_added, 0
        return n

    def read(self, ptr: int) -> UndoRecord:
        """The undo record at ``ptr``.  Raises CorruptionError if it is damaged
        or the page is not an undo page; ValueError for a null pointer."""
        if not ptr:
            raise ValueError("null undo pointer")
        lid, offset = ptr >> 16, ptr & 0xFFFF
        node = self.pool.get(lid)
        if not isinstance(node, UndoPage):
            raise CorruptionError(f"undo pointer {ptr:#x}", f"page {lid} is not an undo page")
        return _decode_at(node.data, offset, lid)

    def pages(self) -> list[int]:
        """The undo page ids, oldest first."""
        hdr: UndoHeader = self.pool.get(self.header)
        out: list[int] = []
        lid = hdr.head
        while lid:
            out.append(lid)
            lid = self.pool.get(lid).next
        return out

    def free_pages_before(self, keep: Callable[[UndoPage, int], bool]) -> int:
        """Free whole pages from the head while ``keep(page, page id)`` is
        false; the tail page always stays.  Returns pages freed (logged).
        ``keep`` reads what it needs of the page (``records``, or the cheaper
        ``newest_txid`` and ``purge_work``).

        The pages are read without caching them (``BufferPool.peek``) and
        outside a pool operation, which would pin every page it touches until
        it ends: pages read only to be freed would push the working set out.
        The frees are logged in records of at most ``_FREES_PER_RECORD`` ops
        (a record's op count is 16 bits), each moving the head past its pages.
        """
        hdr: UndoHeader = self.pool.get(self.header)
        head = hdr.head
        lids: list[int] = []
        while head != hdr.tail:
            page: UndoPage = self.pool.peek(head)
            if keep(page, head):
                break
            lids.append(head)
            head = page.next
        for start in range(0, len(lids), _FREES_PER_RECORD):
            chunk = lids[start : start + _FREES_PER_RECORD]
            new_head = lids[start + len(chunk)] if start + len(chunk) < len(lids) else head
            self.pool.begin_op()
            try:
                tail = self.pool.get(self.header).tail
                ops: list[PageOp] = [(lid, Op.FREE, b"") for lid in chunk]
                ops.append((self.header, Op.IMAGE, op_image(UndoHeader(new_head, tail))))
                redo.apply_live(self.pool, self.pagefile, self._log, ops)
            finally:
                self.pool.end_op()
        return len(lids)

    def _check(self) -> int:
        """Raise on a broken chain or undecodable record; return records seen."""
        n = 0
        hdr = self.pool.get(self.header)
        seen: set[int] = set()
        lid = hdr.head
        last = 0
        while lid:
            assert lid not in seen, f"undo page {lid} appears twice in the chain"
            seen.add(lid)
            page = self.pool.get(lid)
            assert page.__class__ is UndoPage, f"page {lid} in the undo chain is not an undo page"
            n += len(page.records(lid))
            last, lid = lid, page.next
        assert last == hdr.tail, f"undo chain ends at {last}, header says tail {hdr.tail}"
        return n


__all__ = ["RollbackSegment", "UndoRecord", "UndoPage", "UndoHeader", "encode_undo", "ABSENT", "WAS_DELETED", "UNDONE", "OVF_REF_SIZE"]
