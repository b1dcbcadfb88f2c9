"""Quickstart: write records to kvstore's write-ahead log, crash-free reopen,
read them back.  (The key-value API arrives with the store; this shows the
layer it stands on.)"""

import tempfile
import uuid

from pages.fs import OsFileSystem
from wal import RecordType, WriteAheadLog

directory = tempfile.mkdtemp(prefix="kvstore-quickstart-")
db_id = uuid.uuid4().bytes
log = WriteAheadLog.open(OsFileSystem(), directory, db_id)
for i in range(3):
    lsn = log.append(RecordType.NOOP, txid=i + 1, payload=f"record {i}".encode())
log.flush(lsn)  # returns once everything up to lsn is on stable storage
log.close()

log = WriteAheadLog.open(OsFileSystem(), directory, db_id)
for record in log.records():
    print(f"LSN {record.lsn:4d}  txid {record.txid}  {record.payload.decode()}")
log.close()
