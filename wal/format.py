"""Bytes of the write-ahead log: segment headers and records.

The log is one logical byte stream; a record's LSN is the position of its
first byte in that stream.  The stream is stored in segment files named
``wal-<first LSN as 16 hex digits>.log``.  Each file starts with a 64-byte
segment header; the bytes after it are the stream from ``first_lsn`` on, so
the byte at file offset ``o`` has LSN ``first_lsn + o - 64``.  A record never
spans two segments.

Segment header (64 bytes, little-endian)::

    offset size type   meaning
    ------ ---- ------ ------------------------------------------------
         0    8 bytes  magic b"kvsWAL\\r\\n"
         8    4 u32    format version (1)
        12    4 u32    header size (64)
        16   16 bytes  database id (uuid bytes, from the page file's meta)
        32    8 u64    first LSN of this segment
        40   20 zeros  reserved
        60    4 u32    crc32c of bytes 0..59

Record (36-byte header + payload)::

    +--------+-------+------+-------+--------+--------+----------+-------------+---------+
    | crc32c | magic | type | flags | length |  txid  | prev_lsn | durable_lsn | payload |
    |  u32   |  u16  |  u8  |  u8   |  u32   |  u64   |   u64    |     u64     | length  |
    +--------+-------+------+-------+--------+--------+----------+-------------+---------+
    0        4       6      7       8        12       20         28            36

    crc32c   checksum of (payload, then the record's own LSN as u64, then
             bytes 4..35 of the header); mixing in the LSN means a record
             copied to another place (a misdirected write, a recycled
             segment) fails its checksum
    magic    0x574B ("KW"); lets the reader find candidate records after damage
    type     RecordType, below
    flags    bit 0: payload is lz4-compressed (block format with size prefix)
    length   bytes of payload as stored (after compression)
    txid     transaction id (0 for records of no transaction)
    prev_lsn LSN of the previous record of the same transaction (NO_LSN: none)
    durable_lsn
             how far the log was known durable (fsynced) when this record was
             written: every byte below it was on stable storage

Validity rule: a record at LSN x is valid when its header lies within the
segment, its magic and type are known, its payload lies within the segment and
the checksum matches.  The first invalid record ends the readable log.  If
it and every byte after it to the end of the file are zero, it is the
*preallocated end*: the writer extends the segment it writes with zeros
ahead of its records (``wal.writer``, L7), and a record is never all zeros
(its magic is not).  That is the clean end of the log and is kept.
Otherwise it is a *torn tail* (cut off on open, with everything after it)
unless something proves it was durable: a later valid record whose
``durable_lsn`` exceeds x, or a later segment (a segment is cut to its
records and fsynced before the next one is created).  Then it is *damage*,
and open raises CorruptionError without writing; zeros are damage there too.

Worked example of a segment file being written (``sync="full"``)::

    [header 64][record A][record B][zeros ...............]   end of log: B's end
    [header 64][record A][rec|zeros .....................]   torn tail: cut at A's end
    [header 64][zeros ...][record C][zeros ..............]   torn tail, unless C's
                                                             durable_lsn proves the
                                                             zeros were a durable record
"""

from __future__ import annotations

import enum
import re
import struct
from typing import NamedTuple

import crc32c
import lz4.block  # type: ignore[import-untyped]  # lz4 ships neither type hints nor stubs

from wal.errors import CorruptionError

# --- segment header ---------------------------------------------------------

SEGMENT_MAGIC = b"kvsWAL\r\n"
FORMAT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sII16sQ20x")
SEGMENT_HEADER_SIZE = 64
assert SEGMENT_HEADER.size + 4 == SEGMENT_HEADER_SIZE

_SEGMENT_NAME = re.compile(r"^wal-([0-9a-f]{16})\.log$")


def segment_name(first_lsn: int) -> str:
    """File name of the segment starting at ``first_lsn``.

    >>> segment_name(4096)
    'wal-0000000000001000.log'
    """
    return f"wal-{first_lsn:016x}.log"


def parse_segment_name(name: str) -> int | None:
    """The first LSN a segment file name states, or None for other names.

    >>> parse_segment_name('wal-0000000000001000.log')
    4096
    >>> parse_segment_name('pages.db') is None
    True
    """
    m = _SEGMENT_NAME.match(name)
    return int(m.group(1), 16) if m else None


def encode_segment_header(db_id: bytes, first_lsn: int) -> bytes:
    body = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER_SIZE, db_id, first_lsn)
    return body + struct.pack("<I", crc32c.crc32c(body))


def decode_segment_header(data: bytes, where: str) -> tuple[bytes, int]:
    """Return (database id, first LSN) of a segment header.

    Raises CorruptionError naming ``where`` if the header is short, has a bad
    magic, version or checksum.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptionError(where, f"segment header is {len(data)} bytes, expected {SEGMENT_HEADER_SIZE}")
    body = data[: SEGMENT_HEADER_SIZE - 4]
    (crc,) = struct.unpack_from("<I", data, SEGMENT_HEADER_SIZE - 4)
    if crc32c.crc32c(body) != crc:
        raise CorruptionError(where, "segment header checksum mismatch")
    magic, version, size, db_id, first_lsn = SEGMENT_HEADER.unpack(body)
    if magic != SEGMENT_MAGIC:
        raise CorruptionError(where, "not a kvstore WAL segment (bad magic)")
    if version != FORMAT_VERSION or size != SEGMENT_HEADER_SIZE:
        raise CorruptionError(where, f"unsupported WAL format version {version}")
    return db_id, first_lsn


# --- records ----------------------------------------------------------------


class RecordType(enum.IntEnum):
    """Log record types.  Written to disk: never renumber."""

    # transactions (kvstore); 1 is reserved (was BEGIN, never written)
    COMMIT = 2
    ABORT = 3  # rollback finished: every change undone by CLRs
    PREPARE = 4
    CLR = 5  # compensation: redo of an undo step: u64 undo-next, then page ops
    # pages (physiological redo of page changes); 17-20 reserved, never written
    PAGE_REDO = 16
    TXN_WRITE = 21  # a transaction's write: u64 undo pointer, then page ops
    # recovery
    CHECKPOINT_BEGIN = 32
    CHECKPOINT_END = 33
    # the log itself
    NOOP = 48  # padding / tests


RECORD_MAGIC = 0x574B
RECORD_HEADER = struct.Struct("<HBBIQQQ")  # magic .. durable_lsn, after the crc
RECORD_HEADER_SIZE = 36
assert 4 + RECORD_HEADER.size == RECORD_HEADER_SIZE
_LSN = struct.Struct("<Q")
_CRC = struct.Struct("<I")

FLAG_LZ4 = 0x01
KNOWN_FLAGS = FLAG_LZ4
KNOWN_TYPES = frozenset(int(t) for t in RecordType)

#: LSN value meaning "no record" (e.g. prev_lsn of a transaction's first record).
NO_LSN = 0xFFFF_FFFF_FFFF_FFFF
#: Payloads at least this long are lz4-compressed when that saves space.
COMPRESS_THRESHOLD = 512
#: Largest payload accepted (a 64 MiB value plus its key and framing).
MAX_PAYLOAD = 80 * 2**20


class Record(NamedTuple):
    """A decoded log record.  ``size`` is its length in the log, so the next
    record starts at ``lsn + size``."""

    lsn: int
    type: int
    txid: int
    prev_lsn: int
    durable_lsn: int
    payload: bytes
    size: int

    @property
    def end(self) -> int:
        return self.lsn + self.size


def prepare_payload(payload: bytes, threshold: int = COMPRESS_THRESHOLD) -> tuple[bytes, int, int]:
    """Compress ``payload`` if that pays; return (stored bytes, flags, crc of them).

    This is the part of encoding that does not depend on the LSN, so a writer
    can do it before it takes its lock.
    """
    flags = 0
    if len(payload) >= threshold:
        packed: bytes = lz4.block.compress(payload)
        if len(packed) < len(payload) - len(payload) // 16:
            payload, flags = packed, FLAG_LZ4
    return payload, flags, crc32c.crc32c(payload)


def encode_record(
    lsn: int,
    rtype: int,
    txid: int,
    prev_lsn: int,
    durable_lsn: int,
    stored: bytes,
    flags: int,
    payload_crc: int,
) -> bytes:
    """Frame a prepared payload as a record at ``lsn``.

    >>> stored, flags, pcrc = prepare_payload(b"hello")
    >>> rec = encode_record(100, RecordType.NOOP, 7, NO_LSN, 64, stored, flags, pcrc)
    >>> decode_record(rec, 0, 100).payload
    b'hello'
    """
    header = RECORD_HEADER.pack(RECORD_MAGIC, rtype, flags, len(stored), txid, prev_lsn, durable_lsn)
    crc = crc32c.crc32c(header, crc32c.crc32c(_LSN.pack(lsn), payload_crc))
    return b"".join((_CRC.pack(crc), header, stored))


def decode_record(buf: bytes | memoryview, offset: int, lsn: int) -> Record | None:
    """Decode the record at ``buf[offset:]`` whose LSN is ``lsn``.

    Returns None if no valid record is there (see the validity rule above):
    a short header, bad magic, unknown type or flags, a payload running past
    the end of ``buf``, or a checksum mismatch.
    """
    end_header = offset + RECORD_HEADER_SIZE
    if end_header > len(buf):
        return None
    (crc,) = _CRC.unpack_from(buf, offset)
    magic, rtype, flags, length, txid, prev_lsn, durable_lsn = RECORD_HEADER.unpack_from(buf, offset + 4)
    if magic != RECORD_MAGIC or rtype not in KNOWN_TYPES or flags & ~KNOWN_FLAGS or length > MAX_PAYLOAD:
        return None
    end = end_header + length
    if end > len(buf):
        return None
    stored = bytes(buf[end_header:end])
    check = crc32c.crc32c(
        bytes(buf[offset + 4 : end_header]), crc32c.crc32c(_LSN.pack(lsn), crc32c.crc32c(stored))
    )
    if check != crc:
        return None
    if flags & FLAG_LZ4:
        try:
            payload: bytes = lz4.block.decompress(stored)
        except Exception:  # lz4 raises its own error types; a good crc makes this near impossible
            return None
    else:
        payload = stored
    return Record(lsn, rtype, txid, prev_lsn, durable_lsn, payload, end - offset)


_MAGIC_BYTES = struct.pack("<H", RECORD_MAGIC)


def find_next_candidate(buf: bytes, start: int) -> int:
    """Offset of the next place at or after ``start`` that could hold a record
    (its magic matches), or -1.  Used to look past damage for proof that it
    was durable."""
    pos = buf.find(_MAGIC_BYTES, max(start, 0) + 4)
    return pos - 4 if pos >= 0 else -1
