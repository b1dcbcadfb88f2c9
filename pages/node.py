"""B+tree nodes: the decoded (in-memory) types, their bytes, and redo ops.

The buffer pool holds these objects, not bytes, so a hot read never re-parses
a page.  ``encode()``/``decode()`` convert to and from a page body (the bytes
after the page header of ``pages.format``).

Leaf body::

    u16 count, then count cells:
    u16 key_len | u8 flags | u64 txid | u64 undo | u32 vlen | key | value
    flags bit 0: delete mark (MVCC tombstone)
    flags bit 1: the value is an overflow reference, vlen = 21:
                 u64 first overflow page | u32 stored length |
                 u32 value length | u8 lz4-compressed | u32 crc32c of the value

Internal body::

    u16 count (keys), u64 child[0], then count times: u16 key_len | key | u64 child
    child[i] holds keys k with key[i-1] <= k < key[i]

Overflow body: ``u64 next page (0 = last) | data``.

A cell is the tuple ``(flags, txid, undo, value)`` where ``value`` is bytes,
or an ``OverflowRef`` when flag bit 1 is set.

Redo ops (``Op``, written to disk inside log records: never renumber) name a
page and a change to it; ``apply_op`` replays one on a node.  Each is
deterministic given the node, so replaying the log over an older image
repeats history exactly.
"""

from __future__ import annotations

import enum
import struct
from bisect import bisect_left, bisect_right
from typing import NamedTuple, Protocol

from pages.format import PAGE_HEADER_SIZE, PageType

FLAG_DELETED = 0x01
FLAG_OVERFLOW = 0x02

_CELL = struct.Struct("<HBQQI")  # key_len flags txid undo vlen
CELL_OVERHEAD = _CELL.size  # 23
assert CELL_OVERHEAD == 23
_OVF_REF = struct.Struct("<QIIBI")
OVF_REF_SIZE = _OVF_REF.size  # 21
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


class OverflowRef(NamedTuple):
    """Where a large value lives: a chain of overflow pages."""

    first: int  # first overflow page
    stored: int  # bytes stored in the chain
    length: int  # length of the value
    compressed: int  # 1 if the chain holds lz4.block output
    crc: int  # crc32c of the value


Value = bytes | OverflowRef
Cell = tuple[int, int, int, Value]  # (flags, txid, undo, value)
PageOp = tuple[int, int, bytes]  # (page id, Op, data): one redo op


def cell_size(key: bytes, cell: Cell) -> int:
    v = cell[3]
    return CELL_OVERHEAD + len(key) + (OVF_REF_SIZE if v.__class__ is OverflowRef else len(v))


def encode_cell(key: bytes, cell: Cell) -> bytes:
    flags, txid, undo, v = cell
    if isinstance(v, OverflowRef):
        vb = _OVF_REF.pack(*v)
        flags |= FLAG_OVERFLOW
    else:
        vb = v
        flags &= ~FLAG_OVERFLOW
    return _CELL.pack(len(key), flags, txid, undo, len(vb)) + key + vb


def decode_cell(buf: bytes, pos: int) -> tuple[bytes, Cell, int]:
    """(key, cell, next position)."""
    klen, flags, txid, undo, vlen = _CELL.unpack_from(buf, pos)
    pos += CELL_OVERHEAD
    key = buf[pos : pos + klen]
    pos += klen
    vb = buf[pos : pos + vlen]
    pos += vlen
    v: Value = OverflowRef(*_OVF_REF.unpack(vb)) if flags & FLAG_OVERFLOW else vb
    return key, (flags & ~FLAG_OVERFLOW, txid, undo, v), pos


class LeafNode:
    """A leaf: sorted keys and their cells."""

    __slots__ = ("keys", "cells", "size", "page_lsn")
    ptype = PageType.LEAF

    def __init__(self, keys: list[bytes] | None = None, cells: list[Cell] | None = None, page_lsn: int = 0) -> None:
        self.keys = keys if keys is not None else []
        self.cells = cells if cells is not None else []
        self.page_lsn = page_lsn
        self.size = 2 + sum(cell_size(k, c) for k, c in zip(self.keys, self.cells, strict=True))

    @classmethod
    def sized(cls, keys: list[bytes], cells: list[Cell], size: int) -> LeafNode:
        """A leaf whose encoded size the caller has counted already (a
        split's pieces, a run's merged leaf): ``__init__`` without the pass
        over the cells."""
        node = cls.__new__(cls)
        node.keys, node.cells, node.page_lsn, node.size = keys, cells, 0, size
        return node

    def encode(self) -> bytes:
        # encode_cell inlined: this runs for every page a checkpoint writes
        pack, ref_pack = _CELL.pack, _OVF_REF.pack
        parts = [_U16.pack(len(self.keys))]
        append = parts.append
        for k, (flags, txid, undo, v) in zip(self.keys, self.cells, strict=True):
            if v.__class__ is OverflowRef:
                vb = ref_pack(*v)
                flags |= FLAG_OVERFLOW
            else:
                vb = v  # type: ignore[assignment]  # not an OverflowRef, so bytes
                flags &= ~FLAG_OVERFLOW
            append(pack(len(k), flags, txid, undo, len(vb)))
            append(k)
            append(vb)
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes, page_lsn: int = 0) -> LeafNode:
        # decode_cell inlined: this runs for every page read from disk
        (n,) = _U16.unpack_from(body)
        pos = 2
        keys: list[bytes] = []
        cells: list[Cell] = []
        add_key, add_cell = keys.append, cells.append
        unpack = _CELL.unpack_from
        for _ in range(n):
            klen, flags, txid, undo, vlen = unpack(body, pos)
            start = pos + CELL_OVERHEAD
            end = start + klen
            add_key(body[start:end])
            pos = end + vlen
            if flags & FLAG_OVERFLOW:
                add_cell((flags & ~FLAG_OVERFLOW, txid, undo, OverflowRef(*_OVF_REF.unpack(body[end:pos]))))
            else:
                add_cell((flags, txid, undo, body[end:pos]))
        node = cls.__new__(cls)
        node.keys, node.cells, node.page_lsn = keys, cells, page_lsn
        node.size = pos  # the encoding's length: 2 + the cells' sizes, as __init__ counts them
        return node

    def put(self, key: bytes, cell: Cell) -> None:
        keys = self.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            self.size += cell_size(key, cell) - cell_size(key, self.cells[i])
            self.cells[i] = cell
        else:
            keys.insert(i, key)
            self.cells.insert(i, cell)
            self.size += cell_size(key, cell)

    def remove(self, key: bytes) -> None:
        i = bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            self.size -= cell_size(key, self.cells[i])
            del self.keys[i]
            del self.cells[i]

    def cut(self, n: int) -> None:
        """Keep the first ``n`` entries."""
        del self.keys[n:]
        del self.cells[n:]
        self.size = 2 + sum(cell_size(k, c) for k, c in zip(self.keys, self.cells, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeafNode) and self.keys == other.keys and self.cells == other.cells

    def __repr__(self) -> str:
        return f"LeafNode({len(self.keys)} keys, {self.size} bytes, lsn {self.page_lsn})"


class InternalNode:
    """An internal node: ``len(children) == len(keys) + 1``."""

    __slots__ = ("keys", "children", "size", "page_lsn")
    ptype = PageType.INTERNAL

    def __init__(self, keys: list[bytes], children: list[int], page_lsn: int = 0) -> None:
        self.keys = keys
        self.children = children
        self.page_lsn = page_lsn
        self.size = 10 + sum(10 + len(k) for k in keys)

    @classmethod
    def sized(cls, keys: list[bytes], children: list[int], size: int) -> InternalNode:
        """A node whose encoded size the caller has counted already (a copy,
        a split's halves): ``__init__`` without the pass over the keys."""
        node = cls.__new__(cls)
        node.keys, node.children, node.page_lsn, node.size = keys, children, 0, size
        return node

    def encode(self) -> bytes:
        parts = [_U16.pack(len(self.keys)), _U64.pack(self.children[0])]
        for k, c in zip(self.keys, self.children[1:], strict=True):
            parts.append(_U16.pack(len(k)) + k + _U64.pack(c))
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes, page_lsn: int = 0) -> InternalNode:
        (n,) = _U16.unpack_from(body)
        (c0,) = _U64.unpack_from(body, 2)
        pos = 10
        keys: list[bytes] = []
        children: list[int] = [c0]
        for _ in range(n):
            (kl,) = _U16.unpack_from(body, pos)
            pos += 2
            keys.append(body[pos : pos + kl])
            pos += kl
            children.append(_U64.unpack_from(body, pos)[0])
            pos += 8
        return cls(keys, children, page_lsn)

    def child_index(self, key: bytes) -> int:
        return bisect_right(self.keys, key)

    def insert(self, index: int, key: bytes, child: int) -> None:
        """Insert separator ``key`` at ``index`` with ``child`` to its right."""
        self.keys.insert(index, key)
        self.children.insert(index + 1, child)
        self.size += 10 + len(key)

    def remove(self, index: int) -> None:
        """Remove separator ``index`` and the child to its right."""
        self.size -= 10 + len(self.keys[index])
        del self.keys[index]
        del self.children[index + 1]

    def set_key(self, index: int, key: bytes) -> None:
        self.size += len(key) - len(self.keys[index])
        self.keys[index] = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InternalNode) and self.keys == other.keys and self.children == other.children

    def __repr__(self) -> str:
        return f"InternalNode({len(self.keys)} keys, lsn {self.page_lsn})"


class OverflowNode:
    """A page of a large value's chain."""

    __slots__ = ("next", "data", "page_lsn")
    ptype = PageType.OVERFLOW

    def __init__(self, next_: int, data: bytes, page_lsn: int = 0) -> None:
        self.next = next_
        self.data = data
        self.page_lsn = page_lsn

    @property
    def size(self) -> int:
        return 8 + len(self.data)

    def encode(self) -> bytes:
        return _U64.pack(self.next) + self.data

    @classmethod
    def decode(cls, body: bytes, page_lsn: int = 0) -> OverflowNode:
        return cls(_U64.unpack_from(body)[0], body[8:], page_lsn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OverflowNode) and (self.next, self.data) == (other.next, other.data)


TreeNode = LeafNode | InternalNode
Node = LeafNode | InternalNode | OverflowNode  # what decode_node returns


class PageContent(Protocol):
    """Any decoded page the buffer pool holds: a B+tree node here, or an undo
    page (``pages.rollback_segment``); ``op_image`` writes one as an IMAGE op."""

    @property
    def ptype(self) -> PageType: ...

    def encode(self) -> bytes: ...


def body_capacity(page_size: int) -> int:
    return page_size - PAGE_HEADER_SIZE


# --- redo ops -----------------------------------------------------------------


class Op(enum.IntEnum):
    """Page operations inside log records.  Written to disk: never renumber."""

    LEAF_PUT = 1  # key, cell
    LEAF_DEL = 2  # key
    IMAGE = 3  # page type, body: the page's whole new content
    LEAF_CUT = 4  # keep the first n entries
    INT_INSERT = 5  # index, key, child
    INT_REMOVE = 6  # index
    FREE = 7  # the page is released
    INT_SETKEY = 8  # index, key
    UNDO_APPEND = 9  # rollback segment: offset, bytes (pages.rollback_segment)
    UNDO_SETNEXT = 10  # rollback segment: next page id
    UNDO_MARK = 11  # rollback segment: mark the record at an offset as undone


_OPHDR = struct.Struct("<QBI")  # lid, op, length
_U16U16 = struct.Struct("<HH")


def pack_ops(ops: list[PageOp]) -> bytes:
    """Serialise [(page id, Op, data), ...] as a log record payload."""
    parts = [_U16.pack(len(ops))]
    for lid, op, data in ops:
        parts.append(_OPHDR.pack(lid, op, len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack_ops(payload: bytes) -> list[PageOp]:
    (n,) = _U16.unpack_from(payload)
    pos = 2
    ops: list[PageOp] = []
    for _ in range(n):
        lid, op, length = _OPHDR.unpack_from(payload, pos)
        pos += _OPHDR.size
        ops.append((lid, op, payload[pos : pos + length]))
        pos += length
    return ops


def op_leaf_put(key: bytes, cell: Cell) -> bytes:
    return encode_cell(key, cell)


def op_leaf_del(key: bytes) -> bytes:
    return key


def op_image(node: PageContent) -> bytes:
    return bytes([node.ptype]) + node.encode()


def op_index_key(index: int, key: bytes, child: int | None = None) -> bytes:
    tail = _U64.pack(child) if child is not None else b""
    return _U16U16.pack(index, len(key)) + key + tail


def decode_node(ptype: int, body: bytes, page_lsn: int = 0) -> Node:
    """The decoded node for a page body of type ``ptype``."""
    if ptype == PageType.LEAF:
        return LeafNode.decode(body, page_lsn)
    if ptype == PageType.INTERNAL:
        return InternalNode.decode(body, page_lsn)
    if ptype == PageType.OVERFLOW:
        return OverflowNode.decode(body, page_lsn)
    raise ValueError(f"no B+tree node type {ptype}")


def apply_tree_op(node: Node | None, op: int, data: bytes) -> Node | None:
    """Apply a B+tree redo op to ``node`` (None if the page has no content);
    return the node (a new object for IMAGE).

    Raises ValueError for an op that is not a B+tree op, or that does not fit
    the node (a leaf op on an internal node, any op but IMAGE on None).
    """
    if op == Op.IMAGE:
        return decode_node(data[0], data[1:])
    if op in (Op.LEAF_PUT, Op.LEAF_DEL, Op.LEAF_CUT):
        if not isinstance(node, LeafNode):
            raise ValueError(f"leaf op {op} on {node!r}")
        if op == Op.LEAF_PUT:
            key, cell, _ = decode_cell(data, 0)
            node.put(key, cell)
        elif op == Op.LEAF_DEL:
            node.remove(data)
        else:
            node.cut(_U16.unpack_from(data)[0])
    elif op in (Op.INT_INSERT, Op.INT_SETKEY, Op.INT_REMOVE):
        if not isinstance(node, InternalNode):
            raise ValueError(f"internal node op {op} on {node!r}")
        index, klen = _U16U16.unpack_from(data)
        key = data[4 : 4 + klen]
        if op == Op.INT_INSERT:
            node.insert(index, key, _U64.unpack_from(data, 4 + klen)[0])
        elif op == Op.INT_SETKEY:
            node.set_key(index, key)
        else:
            node.remove(index)
    else:
        raise ValueError(f"not a B+tree op: {op}")
    return node
