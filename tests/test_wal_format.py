"""Tests of wal.format: the bytes of WAL records and segment headers.

Guarantee 4 of SPEC.md rests on this module: a torn or bit-flipped record must
fail its checksum, so that the reader (wal.reader) can never return wrong
bytes.  These tests check the encoding alone; test_wal_log.py checks the same
records through the whole log (append, flush, reopen, records).
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wal.errors import CorruptionError
from wal.format import (
    COMPRESS_THRESHOLD,
    FLAG_LZ4,
    NO_LSN,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    RecordType,
    decode_record,
    decode_segment_header,
    encode_record,
    encode_segment_header,
    find_next_candidate,
    parse_segment_name,
    prepare_payload,
    segment_name,
)

DB_ID = bytes(range(16))
U64 = st.integers(0, 2**64 - 1)


@st.composite
def payloads(draw) -> bytes:
    """Payloads from empty to ~200 KB: small random ones, large random
    (incompressible) ones and large repetitive (compressible) ones.  Large
    payloads are built from a drawn seed, so hypothesis stays fast."""
    kind = draw(st.sampled_from(["small", "random", "repetitive", "edge"]))
    if kind == "small":
        return draw(st.binary(max_size=700))
    if kind == "edge":  # sizes around the compression threshold
        size = draw(st.integers(COMPRESS_THRESHOLD - 2, COMPRESS_THRESHOLD + 2))
        return draw(st.sampled_from([b"a", b"ab", b"\x00"])) * size
    size = draw(st.integers(0, 200_000))
    if kind == "random":
        return random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    unit = draw(st.binary(min_size=1, max_size=24))
    return (unit * (size // len(unit) + 1))[:size]


def encode(lsn, rtype, txid, prev_lsn, durable_lsn, payload, threshold=COMPRESS_THRESHOLD) -> bytes:
    stored, flags, pcrc = prepare_payload(payload, threshold)
    return encode_record(lsn, rtype, txid, prev_lsn, durable_lsn, stored, flags, pcrc)


# -- round trips ----------------------------------------------------------------


@given(
    payload=payloads(),
    rtype=st.sampled_from(list(RecordType)),
    txid=U64,
    prev_lsn=st.one_of(st.just(NO_LSN), U64),
    durable_lsn=U64,
    lsn=st.integers(0, 2**63),
    prefix=st.binary(max_size=40),
)
def test_record_round_trips_through_encode_and_decode(payload, rtype, txid, prev_lsn, durable_lsn, lsn, prefix):
    rec = encode(lsn, rtype, txid, prev_lsn, durable_lsn, payload)
    buf = prefix + rec + b"trailing bytes are not the record's"
    got = decode_record(buf, len(prefix), lsn)
    assert got is not None
    assert (got.lsn, got.type, got.txid, got.prev_lsn, got.durable_lsn, got.payload) == (
        lsn, rtype, txid, prev_lsn, durable_lsn, payload,
    )
    assert got.size == len(rec) and got.end == lsn + len(rec)
    assert isinstance(got.payload, bytes)
    flags = rec[7]
    assert flags in (0, FLAG_LZ4)
    if flags & FLAG_LZ4:  # compression is used only when it saves space
        assert len(payload) >= COMPRESS_THRESHOLD and len(rec) < RECORD_HEADER_SIZE + len(payload)
    else:
        assert len(rec) == RECORD_HEADER_SIZE + len(payload)


def test_repetitive_payload_is_compressed_and_random_one_is_not():
    big = b"abcd" * 10_000
    assert encode(0, RecordType.PAGE_REDO, 1, NO_LSN, 0, big)[7] == FLAG_LZ4
    noise = random.Random(1).randbytes(10_000)
    assert encode(0, RecordType.PAGE_REDO, 1, NO_LSN, 0, noise)[7] == 0
    short = b"a" * (COMPRESS_THRESHOLD - 1)
    assert encode(0, RecordType.PAGE_REDO, 1, NO_LSN, 0, short)[7] == 0


def test_record_header_layout_matches_the_documented_table():
    rec = encode(1000, RecordType.COMMIT, 0x0102030405060708, 0x1111, 0x2222, b"xyz")
    crc, magic, rtype, flags, length, txid, prev, durable = struct.unpack_from("<IHBBIQQQ", rec)
    assert (magic, rtype, flags, length, txid, prev, durable) == (
        RECORD_MAGIC, RecordType.COMMIT, 0, 3, 0x0102030405060708, 0x1111, 0x2222,
    )
    assert rec[RECORD_HEADER_SIZE:] == b"xyz"


# -- the checksum catches every single-bit flip ------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"a small record", b"compressible " * 60],
    ids=["empty", "small", "compressed"],
)
def test_every_single_bit_flip_fails_the_checksum(payload):
    """Exhaustively: no single flipped bit anywhere in a record (crc, header,
    payload) decodes; so a flipped bit is never silently returned (SPEC 4)."""
    lsn = 4242
    rec = encode(lsn, RecordType.PAGE_REDO, 77, 1234, 4000, payload)
    assert decode_record(rec, 0, lsn) is not None
    for bit in range(len(rec) * 8):
        damaged = bytearray(rec)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert decode_record(bytes(damaged), 0, lsn) is None, f"flip of bit {bit} went undetected"


def test_record_decoded_at_another_lsn_fails_its_checksum():
    """The LSN is mixed into the crc: a record copied to another place (a
    misdirected write, a recycled segment) does not decode there."""
    rec = encode(8192, RecordType.COMMIT, 5, NO_LSN, 0, b"payload")
    assert decode_record(rec, 0, 8192) is not None
    for other in (0, 8191, 8193, 8192 + 2**32):
        assert decode_record(rec, 0, other) is None


@pytest.mark.parametrize("cut", [0, 1, 4, RECORD_HEADER_SIZE - 1, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 9])
def test_truncated_record_does_not_decode(cut):
    rec = encode(0, RecordType.NOOP, 1, NO_LSN, 0, b"0123456789")
    assert decode_record(rec[:cut], 0, 0) is None


def test_unknown_type_or_flags_does_not_decode_even_with_a_good_crc():
    import crc32c

    def forge(rtype, flags, payload=b"p"):
        header = struct.pack("<HBBIQQQ", RECORD_MAGIC, rtype, flags, len(payload), 1, NO_LSN, 0)
        crc = crc32c.crc32c(header, value=crc32c.crc32c(struct.pack("<Q", 0), value=crc32c.crc32c(payload)))
        return struct.pack("<I", crc) + header + payload

    assert decode_record(forge(RecordType.NOOP, 0), 0, 0) is not None  # the forgery is right
    assert decode_record(forge(99, 0), 0, 0) is None
    assert decode_record(forge(RecordType.NOOP, 0x80), 0, 0) is None
    # flagged lz4 but not lz4 data: a good crc, yet decode refuses it
    assert decode_record(forge(RecordType.NOOP, FLAG_LZ4, b"\xff\xff\xff\x7fnot lz4"), 0, 0) is None


def test_find_next_candidate_finds_the_following_record_after_garbage():
    a = encode(0, RecordType.NOOP, 1, NO_LSN, 0, b"first")
    b = encode(len(a) + 10, RecordType.NOOP, 1, NO_LSN, 0, b"second")
    buf = a + b"\x00" * 10 + b
    assert find_next_candidate(buf, 1) == len(a) + 10
    assert find_next_candidate(buf, len(a) + 11) == -1


def test_record_type_codes_are_never_renumbered():
    """RecordType is written to disk: these numbers are the format.  New
    types may be added; existing ones keep their codes, and no two share one."""
    written = {
        "COMMIT": 2, "ABORT": 3, "PREPARE": 4, "CLR": 5, "PAGE_REDO": 16, "TXN_WRITE": 21,
        "CHECKPOINT_BEGIN": 32, "CHECKPOINT_END": 33, "NOOP": 48,
    }
    assert {name: int(RecordType[name]) for name in written} == written
    assert len(RecordType.__members__) == len(RecordType)  # no aliases: codes are unique
    assert all(0 < t <= 255 for t in RecordType)  # a u8 on disk


# -- segment headers and names -----------------------------------------------------


@given(first_lsn=U64, db_id=st.binary(min_size=16, max_size=16))
def test_segment_header_round_trips(first_lsn, db_id):
    header = encode_segment_header(db_id, first_lsn)
    assert len(header) == SEGMENT_HEADER_SIZE
    assert decode_segment_header(header + b"records follow", "seg") == (db_id, first_lsn)


def test_every_single_bit_flip_of_a_segment_header_is_refused():
    header = encode_segment_header(DB_ID, 4096)
    for bit in range(SEGMENT_HEADER_SIZE * 8):
        damaged = bytearray(header)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptionError):
            decode_segment_header(bytes(damaged), "seg")


def test_short_segment_header_raises_naming_the_file():
    with pytest.raises(CorruptionError, match="expected 64") as info:
        decode_segment_header(encode_segment_header(DB_ID, 0)[:63], "/db/wal-x.log")
    assert info.value.where == "/db/wal-x.log"


def test_wrong_magic_or_version_with_a_good_crc_is_refused():
    import crc32c

    def forge(magic, version):
        body = struct.pack("<8sII16sQ20x", magic, version, SEGMENT_HEADER_SIZE, DB_ID, 0)
        return body + struct.pack("<I", crc32c.crc32c(body))

    assert decode_segment_header(forge(b"kvsWAL\r\n", 1), "s") == (DB_ID, 0)
    with pytest.raises(CorruptionError, match="magic"):
        decode_segment_header(forge(b"SQLite f", 1), "s")
    with pytest.raises(CorruptionError, match="version"):
        decode_segment_header(forge(b"kvsWAL\r\n", 2), "s")


@given(U64)
def test_segment_name_round_trips_and_sorts_by_lsn(lsn):
    name = segment_name(lsn)
    assert parse_segment_name(name) == lsn
    assert "wal" in name  # SPEC: WAL files' names contain "wal"
    if lsn:
        assert segment_name(lsn - 1) < name


@pytest.mark.parametrize(
    "name",
    ["pages.db", "wal-0000000000001000.log.tmp", "wal-000000000000100.log", "wal-000000000000100G.log",
     "WAL-0000000000001000.log", "wal-0000000000001000.LOG", "xwal-0000000000001000.log"],
)
def test_other_file_names_are_not_segments(name):
    assert parse_segment_name(name) is None
