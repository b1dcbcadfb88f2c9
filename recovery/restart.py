"""Restart after a crash: analysis, redo, undo (ARIES).

The page file's meta names the checkpoint LSN; the log holds a
CHECKPOINT_BEGIN record there with the transaction table at that moment
(``recovery.checkpointer``).  Restart:

1. **Analysis** reads the log forward from the checkpoint and rebuilds the
   table of unfinished transactions: for each, the head of its undo chain
   (the undo pointer of its last TXN_WRITE, or the undo-next of its last
   CLR), its last LSN, and its global id if it prepared.  COMMIT and ABORT
   remove a transaction.  A CLR after PREPARE means rollback_prepared had
   begun: the transaction is no longer in doubt, and undo finishes it.  The largest transaction id seen sets the next one.
2. **Redo** repeats history from the checkpoint LSN: every record carrying
   page ops (PAGE_REDO, TXN_WRITE, CLR) is applied where page LSN < record
   LSN (``pages.redo``).  Losers' changes are redone too.  Redo needs
   nothing from analysis, so both ride one pass over the log.  Its cost is
   the log's records plus one read (and, at the checkpoint that follows, one
   write) of each distinct page the log names -- never the whole database.
3. **Undo** rolls back every loser -- unfinished and not prepared -- through
   its undo chain, writing a CLR per step (``recovery.undo``), then ABORT.
   Prepared transactions stay in doubt with their versions in place.

A crash during restart leaves a log whose analysis resumes each rollback at
its last CLR's undo-next, so restarting any number of times ends in the same
state.  The caller checkpoints after restart.

CHECKPOINT_BEGIN payload: ``u64 next txid | u32 n | n x (u64 txid | u64
last undo | u64 last LSN | u16 gid length | gid)``; gid length 0xFFFF means
not prepared.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pages.node import PageOp
from pages.rollback_segment import RollbackSegment  # noqa: F401 - documents the dependency
from recovery.undo import clr_undo_next, rollback_chain
from wal.errors import CorruptionError
from wal.format import NO_LSN, RecordType

_HEAD = struct.Struct("<QI")
_ENTRY = struct.Struct("<QQQH")
_U64 = struct.Struct("<Q")
_NOT_PREPARED = 0xFFFF


def encode_checkpoint(table: dict[int, tuple[int, int, bytes | None]], next_txid: int) -> bytes:
    """The CHECKPOINT_BEGIN payload for ``{txid: (last undo, last LSN, gid)}``."""
    parts = [_HEAD.pack(next_txid, len(table))]
    for txid, (undo, lsn, gid) in sorted(table.items()):
        parts.append(_ENTRY.pack(txid, undo, lsn, _NOT_PREPARED if gid is None else len(gid)))
        if gid is not None:
            parts.append(gid)
    return b"".join(parts)


def decode_checkpoint(payload: bytes, where: str) -> tuple[int, dict[int, list[Any]]]:
    try:
        next_txid, n = _HEAD.unpack_from(payload)
        pos = _HEAD.size
        table: dict[int, list[Any]] = {}
        for _ in range(n):
            txid, undo, lsn, glen = _ENTRY.unpack_from(payload, pos)
            pos += _ENTRY.size
            gid = None
            if glen != _NOT_PREPARED:
                gid = payload[pos : pos + glen]
                pos += glen
            table[txid] = [undo, lsn, gid]
    except struct.error as e:
        raise CorruptionError(where, f"checkpoint record does not decode: {e}") from None
    return next_txid, table


@dataclass
class RestartReport:
    records_scanned: int = 0
    ops_redone: int = 0
    pages_redone: int = 0  # distinct pages redo looked at: what restart costs beyond the log
    undone: int = 0
    max_txid: int = 0
    seconds: float = 0.0
    prepared: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recovery_records_scanned": self.records_scanned,
            "recovery_ops_redone": self.ops_redone,
            "recovery_pages_redone": self.pages_redone,
            "recovery_transactions_undone": self.undone,
            "recovery_transactions_in_doubt": len(self.prepared),
        }


AppendClr = Callable[..., int]  # (txid, undo_next, ops, prev_lsn) -> LSN


class Analysis:
    """ARIES analysis, fed the log's records in order from the checkpoint:
    the table of unfinished transactions ``{txid: [last undo, last LSN,
    gid]}``, the largest txid seen, and how many records after the checkpoint
    are work (all but CHECKPOINT_END -- zero after a clean close)."""

    def __init__(self, next_txid: int, table: dict[int, list[Any]]) -> None:
        self.table = table
        self.max_txid = next_txid - 1
        self.scanned = 0

    def see(self, rec: Any) -> None:
        rtype = rec.type
        if rtype == RecordType.CHECKPOINT_END:
            return  # the end of a checkpoint is no work to redo (a clean close leaves only it)
        self.scanned += 1
        txid = rec.txid
        if not txid:
            return
        if txid > self.max_txid:
            self.max_txid = txid
        table = self.table
        if rtype == RecordType.TXN_WRITE:
            entry = table.setdefault(txid, [0, NO_LSN, None])
            entry[0], entry[1] = _U64.unpack_from(rec.payload)[0], rec.lsn
        elif rtype == RecordType.CLR:
            entry = table.setdefault(txid, [0, NO_LSN, None])
            entry[0], entry[1] = clr_undo_next(rec.payload), rec.lsn
            entry[2] = None  # a rollback after PREPARE is the decision to abort: finish it
        elif rtype == RecordType.PREPARE:
            entry = table.setdefault(txid, [0, NO_LSN, None])
            entry[1], entry[2] = rec.lsn, bytes(rec.payload)
        elif rtype in (RecordType.COMMIT, RecordType.ABORT):
            table.pop(txid, None)


def begin_analysis(wal: Any, checkpoint_lsn: int) -> tuple[Iterator[Any], Analysis]:
    """The log's records after the checkpoint record at ``checkpoint_lsn``,
    and an Analysis seeded from that record.  Raises CorruptionError if the
    checkpoint record is not where the meta says."""
    records = wal.records(checkpoint_lsn)
    first = next(records, None)
    where = f"log at checkpoint LSN {checkpoint_lsn}"
    if first is None or first.lsn != checkpoint_lsn or first.type != RecordType.CHECKPOINT_BEGIN:
        raise CorruptionError(where, "the checkpoint record the page file names is not there")
    return records, Analysis(*decode_checkpoint(first.payload, where))


def restart(store: Any, wal: Any, append_clr: AppendClr) -> RestartReport:
    """Bring the durable image up to date with the log and undo the losers.
    Caller holds whatever latch protects ``store``."""
    started = time.monotonic()
    report = RestartReport()
    records, analysis = begin_analysis(wal, store.pagefile.meta.checkpoint_lsn)
    # Analysis and redo in one pass over the log: redo repeats history
    # whatever analysis finds, and the log was validated when it was opened.
    redone = store.redo_records(records, analysis.see)
    report.ops_redone, report.pages_redone = redone["ops_applied"], redone["pages_redone"]
    report.max_txid, report.records_scanned = analysis.max_txid, analysis.scanned
    for txid, (last_undo, last_lsn, gid) in sorted(analysis.table.items()):
        if gid is not None:
            report.prepared[txid] = (last_undo, last_lsn, gid)
            continue
        chain = [last_lsn]

        def clr(tx: int, undo_next: int, ops: list[PageOp], _chain: list[int] = chain) -> int:
            lsn = append_clr(tx, undo_next, ops, _chain[0])
            _chain[0] = lsn
            return lsn

        rollback_chain(store, txid, last_undo, 0, clr)
        wal.append(RecordType.ABORT, txid, b"", chain[0])
        report.undone += 1
    report.seconds = time.monotonic() - started
    return report
