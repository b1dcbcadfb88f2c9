"""Bytes of the page file: page headers, meta pages, page-table pages.

The page file is an array of ``page_size`` slots (4096..65536, a power of two,
chosen at creation).  Slots 0 and 1 hold the two meta pages; every other slot
holds a page or is free.

Page header (32 bytes, little-endian), at the start of every non-meta slot::

    offset size type  meaning
    ------ ---- ----- --------------------------------------------------
         0    4 u32   crc32c of bytes 4..page_size-1, seeded with the
                      logical id (a page in the wrong place fails it)
         4    1 u8    PageType
         5    3 zeros reserved
         8    8 u64   page LSN: the LSN of the last log record applied
        16    8 u64   logical id
        24    4 u32   length of the body that follows (bytes)
        28    4 zeros reserved
        32    .       body (node, undo page, overflow or page-table bytes)

Validity rule: a page read for logical id L from slot S is valid when its
crc matches, its stored logical id is L, and its crc equals the crc the page
table holds for L (so a stale copy of the right page -- a lost write -- and
a good page in the wrong slot -- a misdirected write -- are both caught).

Meta page (slot 0 or 1; only the first 256 bytes are used)::

    offset size type  meaning
         0    4 u32   crc32c of bytes 4..255
         4    4 bytes magic b"KVSP"
         8    4 u32   format version (1)
        12    4 u32   page size
        16    8 u64   generation (the valid meta with the highest wins)
        24   16 bytes database id
        40    8 u64   checkpoint LSN: redo starts here
        48    4 u32   page-table root slot
        52    4 u32   page-table root crc
        56    4 u32   page-table depth (levels of page-table pages)
        60    4 u32   one past the highest slot the image references
        64    8 u64   logical ids in use (highest id + 1)
        72  184 bytes application area: roots and counters of the layers
                      above (B+tree root, rollback segment, next txid, ...)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import crc32c

from wal import canary
from wal.errors import CorruptionError

MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 65536


class PageType(enum.IntEnum):
    """Page types.  Written to disk: never renumber."""

    FREE = 0
    LEAF = 1
    INTERNAL = 2
    OVERFLOW = 3
    UNDO = 4
    PAGE_TABLE = 5
    UNDO_HEADER = 6


PAGE_HEADER = struct.Struct("<IB3xQQI4x")
PAGE_HEADER_SIZE = 32
assert PAGE_HEADER.size == PAGE_HEADER_SIZE
_BODY_OFFSET = PAGE_HEADER_SIZE


#: Smallest page size tests may use to force deep trees (never the public API).
TEST_MIN_PAGE_SIZE = 512


def check_page_size(page_size: object, minimum: int = MIN_PAGE_SIZE) -> int:
    """Return ``page_size`` if it is a power of two in 4096..65536.

    >>> check_page_size(8192)
    8192
    >>> check_page_size(5000)
    Traceback (most recent call last):
    ValueError: page_size must be a power of two from 4096 to 65536, not 5000
    """
    if (
        not isinstance(page_size, int)
        or isinstance(page_size, bool)
        or not minimum <= page_size <= MAX_PAGE_SIZE
        or page_size & (page_size - 1)
    ):
        raise ValueError(f"page_size must be a power of two from {minimum} to 65536, not {page_size!r}")
    return page_size


def encode_page(page_size: int, ptype: int, page_lsn: int, lid: int, body: bytes) -> tuple[bytes, int]:
    """Frame ``body`` as a full page; return (page bytes, crc)."""
    if len(body) > page_size - PAGE_HEADER_SIZE:
        raise ValueError(f"page body of {len(body)} bytes does not fit a {page_size}-byte page")
    head = PAGE_HEADER.pack(0, ptype, page_lsn, lid, len(body))
    pad = page_size - PAGE_HEADER_SIZE - len(body)
    rest = head[4:] + body + bytes(pad)
    crc = crc32c.crc32c(rest, lid & 0xFFFFFFFF)
    return struct.pack("<I", crc) + rest, crc


def decode_page(data: bytes, lid: int, expect_crc: int | None, where: str) -> tuple[int, int, bytes]:
    """Check a page read for logical id ``lid``; return (type, page LSN, body).

    Raises CorruptionError naming ``where`` (the page and slot) on a checksum
    mismatch, a wrong logical id, or a crc other than the page table's.
    """
    if len(data) < PAGE_HEADER_SIZE:
        raise CorruptionError(where, f"short page: {len(data)} bytes")
    crc, ptype, page_lsn, stored_lid, length = PAGE_HEADER.unpack_from(data)
    if crc32c.crc32c(data[4:], lid & 0xFFFFFFFF) != crc and not canary.skip_checksum:
        raise CorruptionError(where, "page checksum mismatch (torn, bit-flipped or misplaced page)")
    if stored_lid != lid:
        raise CorruptionError(where, f"slot holds logical page {stored_lid}, expected {lid} (misdirected write)")
    if expect_crc is not None and crc != expect_crc and not canary.skip_checksum:
        raise CorruptionError(where, "page is a valid but different version than the page table records (lost write)")
    if length > len(data) - PAGE_HEADER_SIZE:
        raise CorruptionError(where, f"body length {length} exceeds the page")
    return ptype, page_lsn, data[_BODY_OFFSET : _BODY_OFFSET + length]


# --- meta pages ---------------------------------------------------------------

META_MAGIC = b"KVSP"
META_VERSION = 1
META = struct.Struct("<4sII Q 16s Q III I Q 184s")
META_SIZE = 256
assert 4 + META.size == META_SIZE
APP_AREA_SIZE = 184


@dataclass
class Meta:
    """A decoded meta page."""

    page_size: int
    generation: int
    db_id: bytes
    checkpoint_lsn: int
    pt_root: int
    pt_root_crc: int
    pt_depth: int
    nslots: int
    nlids: int
    app: bytes = bytes(APP_AREA_SIZE)

    def encode(self) -> bytes:
        if len(self.app) > APP_AREA_SIZE:
            raise ValueError(f"meta application area is {len(self.app)} bytes, the limit is {APP_AREA_SIZE}")
        body = META.pack(
            META_MAGIC,
            META_VERSION,
            self.page_size,
            self.generation,
            self.db_id,
            self.checkpoint_lsn,
            self.pt_root,
            self.pt_root_crc,
            self.pt_depth,
            self.nslots,
            self.nlids,
            self.app.ljust(APP_AREA_SIZE, b"\0"),
        )
        return struct.pack("<I", crc32c.crc32c(body)) + body

    @classmethod
    def decode(cls, data: bytes, where: str) -> Meta:
        """Raises CorruptionError naming ``where`` if the meta is not valid."""
        if len(data) < META_SIZE:
            raise CorruptionError(where, f"meta page is {len(data)} bytes")
        (crc,) = struct.unpack_from("<I", data)
        if crc32c.crc32c(data[4:META_SIZE]) != crc:
            raise CorruptionError(where, "meta page checksum mismatch")
        magic, version, page_size, gen, db_id, ckpt, root, root_crc, depth, nslots, nlids, app = META.unpack_from(data, 4)
        if magic != META_MAGIC:
            raise CorruptionError(where, "not a kvstore page file (bad magic)")
        if version != META_VERSION:
            raise CorruptionError(where, f"unsupported page file format version {version}")
        return cls(page_size, gen, db_id, ckpt, root, root_crc, depth, nslots, nlids, app)


# --- page-table pages -----------------------------------------------------------

PT_ENTRY = struct.Struct("<II")  # slot, crc; slot 0 means "no page"
PT_ENTRY_SIZE = 8


def pt_fanout(page_size: int) -> int:
    """Entries per page-table page."""
    return (page_size - PAGE_HEADER_SIZE) // PT_ENTRY_SIZE
