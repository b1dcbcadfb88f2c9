"""Reading the log: finding its valid end on open, and iterating records.

``inspect_log`` reads every segment of a log directory without writing and
decides where the log ends.  It keeps the three cases of ``wal.format``'s
validity rule apart:

* **Preallocated end** (the clean end of the log): the last segment's
  records are followed by nothing but zeros, up to the end of the file --
  the space the writer preallocated and had not yet used (L7 of
  ``wal.writer``).  Nothing is cut: the writer goes on over the zeros.
  Zeros are never a record (its magic is not zero); a torn record followed
  by zeros is not all zeros, and is the next case.
* **Torn tail** (a power cut tore, dropped or reordered unsynced writes): the
  first bad record of the *last* segment, when no later valid record states a
  durable LSN beyond it and the caller knows of nothing durable beyond it.
  The returned ``LogState.cut`` says how to cut it off; ``WriteAheadLog.open``
  carries that out.  A last segment whose header never became durable (the
  file is no longer than a header) is a torn creation and is removed.
* **Damage** (the record had been durable): a bad record -- zeros included --
  in a segment that is followed by another one (segments are cut to their
  records and fsynced before the next is created, invariant L2 of
  ``wal.writer``) or below the caller's durable LSN, a bad record that a
  later record proves durable, a bad header on a segment with records, a
  foreign, renamed, overlapping or missing segment.  ``inspect_log`` raises
  CorruptionError naming the file and LSN; nothing has been written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from wal.errors import CorruptionError
from wal.format import (
    SEGMENT_HEADER_SIZE,
    Record,
    decode_record,
    decode_segment_header,
    find_next_candidate,
    parse_segment_name,
)


@dataclass
class Segment:
    """One segment file: its path, the LSN range it holds ``[first, end)``."""

    path: str
    first_lsn: int
    end_lsn: int


@dataclass
class LogState:
    """What ``inspect_log`` found: the valid segments, the end of the log,
    and the cuts that remove a torn tail (``("truncate", path, size)`` or
    ``("remove", path)``), in the order they must be made."""

    segments: list[Segment] = field(default_factory=list)
    end_lsn: int = 0
    cut: list[tuple[Any, ...]] = field(default_factory=list)
    torn_lsn: int | None = None  # LSN of the torn record, if one was cut
    zero_tail: int = 0  # bytes of preallocated zeros after the last record (not cut)

    @property
    def first_lsn(self) -> int | None:
        return self.segments[0].first_lsn if self.segments else None


def segment_files(fs: Any, directory: str) -> list[tuple[int, str]]:
    """(first LSN, path) of the segment files in ``directory``, in LSN order."""
    found = []
    for name in fs.listdir(directory):
        lsn = parse_segment_name(name)
        if lsn is not None:
            found.append((lsn, os.path.join(directory, name)))
    found.sort()
    return found


def _read_all(fs: Any, path: str) -> bytes:
    f = fs.open(path)
    try:
        data: bytes = f.pread(0, f.size())
        return data
    finally:
        f.close()


def inspect_log(fs: Any, directory: str, db_id: bytes, *, known_durable: int = 0) -> LogState:
    """Validate the log in ``directory`` and find its end, writing nothing.

    ``known_durable`` is an LSN the caller knows was durable (the checkpoint
    LSN in the page file's meta): a bad record below it is damage, not a torn
    tail.  Raises CorruptionError on damage (see the module docstring).

    Cost: reads every segment once.
    """
    state = LogState()
    files = segment_files(fs, directory)
    for i, (name_lsn, path) in enumerate(files):
        last = i == len(files) - 1
        data = _read_all(fs, path)
        try:
            seg_db, first = decode_segment_header(data, path)
        except CorruptionError:
            if last and len(data) <= SEGMENT_HEADER_SIZE and name_lsn >= known_durable:
                # Torn creation: the header was never durable, so no record
                # was ever written after it (L3 of wal.writer).
                state.cut.append(("remove", path))
                break
            raise
        if seg_db != db_id:
            raise CorruptionError(path, f"segment belongs to another database (id {seg_db.hex()}, expected {db_id.hex()})")
        if first != name_lsn:
            raise CorruptionError(path, f"header says first LSN {first} but the name says {name_lsn}: renamed or swapped segment")
        if state.segments:
            prev_end = state.segments[-1].end_lsn
            if first < prev_end:
                raise CorruptionError(path, f"segment starts at LSN {first}, inside the previous one (ends at {prev_end}): stale segment")
            if first > prev_end:
                raise CorruptionError(path, f"log has a gap: LSN {prev_end}..{first} is missing (a segment was deleted)")
        lsn, pos = first, SEGMENT_HEADER_SIZE
        size = len(data)
        while pos < size:
            rec = decode_record(data, pos, lsn)
            if rec is None:
                break
            pos += rec.size
            lsn += rec.size
        if pos < size:
            where = f"{path} at LSN {lsn} (offset {pos})"
            # Branch 1 -- damage: something proves the bad record was durable.
            if not last:
                raise CorruptionError(where, "bad record in a segment that was synced before the next one was created")
            if lsn < known_durable:
                raise CorruptionError(where, f"bad record below the checkpoint LSN {known_durable}, which was durable")
            if _all_zeros(data, pos):
                # Branch 3 -- the preallocated end: zeros up to the end of the
                # file are space the writer had not used yet (L7); keep them.
                state.zero_tail = size - pos
            else:
                proof = _find_durability_proof(data, pos, first, lsn)
                if proof is not None:
                    raise CorruptionError(
                        where,
                        f"bad record was durable: the valid record at LSN {proof.lsn} states the log was durable to {proof.durable_lsn}",
                    )
                # Branch 2 -- torn tail: the unsynced end of the log; cut it off.
                state.cut.append(("truncate", path, pos))
                state.torn_lsn = lsn
        state.segments.append(Segment(path, first, lsn))
    state.end_lsn = state.segments[-1].end_lsn if state.segments else 0
    if state.segments and state.end_lsn < known_durable:
        raise CorruptionError(directory, f"log ends at LSN {state.end_lsn}, before the durable LSN {known_durable}")
    return state


def _all_zeros(data: bytes, pos: int) -> bool:
    """Whether ``data[pos:]`` is all zero bytes (without copying it)."""
    return data.count(0, pos) == len(data) - pos


def _find_durability_proof(data: bytes, bad_pos: int, first_lsn: int, bad_lsn: int) -> Record | None:
    """A valid record after the bad one whose durable LSN covers it, or None."""
    pos = bad_pos
    while True:
        pos = find_next_candidate(data, pos + 1)
        if pos < 0:
            return None
        rec = decode_record(data, pos, first_lsn + pos - SEGMENT_HEADER_SIZE)
        if rec is not None and rec.durable_lsn > bad_lsn:
            return rec


def read_segment_records(data: bytes, path: str, first_lsn: int, start_lsn: int, end_lsn: int) -> Iterator[Record]:
    """Records of one segment's bytes from ``start_lsn`` up to ``end_lsn``.

    Raises CorruptionError if a record in that range does not decode: the range
    was validated (or written) before, so this is damage since.
    """
    pos = SEGMENT_HEADER_SIZE + start_lsn - first_lsn
    lsn = start_lsn
    while lsn < end_lsn:
        rec = decode_record(data, pos, lsn)
        if rec is None:
            raise CorruptionError(f"{path} at LSN {lsn}", "record fails its checksum or framing")
        yield rec
        pos += rec.size
        lsn += rec.size
