"""The ``kvstore`` command line (``python -m kvstore``).

Exit status: 0 on success, 1 when something failed (a damaged store, a missing
key, a violation found by torture, a database that cannot be opened), 2 on bad
usage.  Errors are one line on stderr, never a traceback for a user mistake.
Keys and values on the command line are UTF-8; output escapes bytes that are
not valid UTF-8 as ``\\xNN``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import kvstore
from kvstore.transaction import check_key, check_value
from pages.fs import OsFileSystem
from wal.errors import ClosedError, CorruptionError, DatabaseLockedError, Error

_fs = OsFileSystem()  # even the CLI's look at the directory goes through the seam


class UserError(Exception):
    """A failure to report as one line, with exit status 1."""


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def _open_existing(path: str, **kw: Any) -> kvstore.Database:
    if not _fs.exists(path):
        raise UserError(f"no database at {path!r}")
    if not _fs.is_dir(path):
        raise UserError(f"{path!r} is not a directory, so it is not a database")
    if not _fs.exists(os.path.join(path, "pages.db")):
        raise UserError(f"{path!r} is not a kvstore database (it has no pages.db)")
    return kvstore.open(path, create=False, **kw)


# --- subcommands -----------------------------------------------------------------


def cmd_stat(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.path) as db:
        stats = db.stats()
    stats["path"] = os.path.abspath(args.path)
    stats["files"] = {name: _size(os.path.join(args.path, name)) for name in _fs.listdir(args.path)}
    if args.json:
        out.write(json.dumps(stats, sort_keys=True) + "\n")
        return 0
    width = max(len(k) for k in stats)
    for key in sorted(stats):
        if key == "files":
            continue
        out.write(f"{key:<{width}}  {stats[key]}\n")
    out.write("files:\n")
    for name, size in stats["files"].items():
        out.write(f"  {name:<28} {size:>12} bytes\n")
    return 0


def _size(path: str) -> int:
    f = _fs.open(path)
    try:
        return f.size()
    finally:
        f.close()


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    try:
        with _open_existing(args.path) as db:
            report = db.check()
    except CorruptionError as e:
        sys.stderr.write(f"kvstore check: DAMAGED: {e}\n")
        return 1
    if args.json:
        out.write(json.dumps(report, sort_keys=True) + "\n")
    else:
        out.write(
            f"ok: {report['pages_checked']} pages, {report['keys']} keys in {report['leaves']} leaves "
            f"(depth {report['tree_depth']}), {report['overflow_pages']} overflow pages, "
            f"{report['undo_records']} undo records in {report['undo_pages']} pages, "
            f"{report['wal_records']} log records in {report['wal_segments']} segments\n"
        )
    return 0


def cmd_get(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.path) as db:
        value = db.get(args.key.encode())
    if value is None:
        raise UserError(f"key {args.key!r} not found")
    out.write(_text(value) + "\n")
    return 0


def cmd_put(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.path) if not args.create else kvstore.open(args.path) as db:
        db.put(args.key.encode(), args.value.encode())
    return 0


def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.path) as db:
        existed = db.delete(args.key.encode())
    if not existed:
        raise UserError(f"key {args.key!r} not found")
    return 0


def cmd_scan(args: argparse.Namespace, out: TextIO) -> int:
    start = args.start.encode() if args.start is not None else None
    stop = args.stop.encode() if args.stop is not None else None
    with _open_existing(args.path) as db:
        for n, (key, value) in enumerate(db.scan(start, stop, reverse=args.reverse)):
            if args.limit is not None and n >= args.limit:
                break
            out.write(f"{_text(key)}\t{_text(value)}\n")
    return 0


def cmd_dump(args: argparse.Namespace, out: TextIO) -> int:
    b64 = base64.b64encode
    with _open_existing(args.path) as db:
        for key, value in db.scan():  # streams: one leaf at a time
            out.write(f'{{"key": "{b64(key).decode()}", "value": "{b64(value).decode()}"}}\n')
    return 0


def cmd_load(args: argparse.Namespace, out: TextIO, inp: TextIO) -> int:
    """All or nothing: one transaction, so a bad line changes nothing (and a
    database this command created is removed again)."""
    existed = _fs.exists(args.path)
    created = not existed or not _fs.listdir(args.path)
    db = kvstore.open(args.path) if created else _open_existing(args.path)
    try:
        return _load_into(db, out, inp)
    except BaseException:
        if created:
            _remove_store(args.path, remove_dir=not existed)
        raise


def _remove_store(path: str, remove_dir: bool) -> None:
    for name in _fs.listdir(path):
        _fs.remove(os.path.join(path, name))
    if remove_dir:
        _fs.rmdir(path)


_LOAD_BATCH = 10_000  # pairs per tx.put_many: a leaf at a time, in bounded memory


def _load_into(db: kvstore.Database, out: TextIO, inp: TextIO) -> int:
    count = 0
    batch: list[tuple[bytes, bytes]] = []
    with db:
        tx = db.begin()
        try:
            for lineno, line in enumerate(inp, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    key = base64.b64decode(item["key"], validate=True)
                    value = base64.b64decode(item["value"], validate=True)
                except (ValueError, KeyError, TypeError, binascii.Error) as e:
                    raise UserError(f"line {lineno}: expected {{\"key\": base64, \"value\": base64}}: {e}") from None
                try:
                    batch.append((check_key(key), check_value(value)))
                except (ValueError, TypeError) as e:
                    raise UserError(f"line {lineno}: {e}") from None
                count += 1
                if len(batch) == _LOAD_BATCH:
                    tx.put_many(batch)
                    batch = []
            tx.put_many(batch)
            tx.commit()
        except BaseException:
            if tx.state == "active":
                tx.rollback()
            raise
    out.write(f"loaded {count} keys\n")
    return 0


def cmd_backup(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.path) as db:
        try:
            result = db.backup(args.dest)
        except ValueError as e:
            raise UserError(str(e)) from None
    out.write(f"backup of {args.path} written to {result['dest']}: {result['pages']} pages, {result['wal_bytes']} bytes of log\n")
    return 0


def cmd_checkpoint(args: argparse.Namespace, out: TextIO) -> int:
    with _open_existing(args.path) as db:
        result = db.checkpoint()
    out.write(
        f"checkpoint at LSN {result['lsn']}: {result['pages_written']} pages written, "
        f"{result['wal_bytes_truncated']} log bytes removed, {result['seconds']:.3f} s\n"
    )
    return 0


def cmd_torture(args: argparse.Namespace, out: TextIO) -> int:
    from kvstore import torture

    return torture.run(
        args.path,
        seconds=args.seconds,
        threads=args.threads,
        seed=args.seed,
        crash_every=args.crash_every,
        json_output=args.json,
        out=out,
    )


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from kvstore import benchmark

    return benchmark.run(quick=args.quick, json_output=args.json, out=out, keys=args.keys, repetitions=args.repetitions)


# --- the parser -------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="kvstore: a transactional embedded key-value store.",
        epilog="example:\n  kvstore put /tmp/db greeting hello && kvstore get /tmp/db greeting",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvstore {kvstore.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_: str, example: str, fn: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=fn)
        return p

    p = add("stat", "show statistics and the file layout", "kvstore stat /tmp/db --json", cmd_stat)
    p.add_argument("path", help="database directory")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")

    p = add("check", "verify every page, structure and log record; exit status 1 on damage", "kvstore check /tmp/db", cmd_check)
    p.add_argument("path", help="database directory")
    p.add_argument("--json", action="store_true", help="the report as JSON")

    p = add("get", "print the value of a key (exit status 1 if it is missing)", "kvstore get /tmp/db greeting", cmd_get)
    p.add_argument("path", help="database directory")
    p.add_argument("key")

    p = add("put", "set a key in a transaction of its own", "kvstore put /tmp/db greeting hello", cmd_put)
    p.add_argument("path", help="database directory")
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--create", action="store_true", help="create the database if it does not exist")

    p = add("delete", "delete a key (exit status 1 if it was missing)", "kvstore delete /tmp/db greeting", cmd_delete)
    p.add_argument("path", help="database directory")
    p.add_argument("key")

    p = add("scan", "print key<TAB>value lines in key order", "kvstore scan /tmp/db --start a --stop m --limit 10", cmd_scan)
    p.add_argument("path", help="database directory")
    p.add_argument("--start", help="first key (inclusive)")
    p.add_argument("--stop", help="end key (exclusive)")
    p.add_argument("--limit", type=_int_at_least(0), help="at most this many pairs")
    p.add_argument("--reverse", action="store_true", help="descending order")

    p = add("dump", "write every pair as JSON lines with base64 keys and values", "kvstore dump /tmp/db > backup.jsonl", cmd_dump)
    p.add_argument("path", help="database directory")

    p = add("load", "read JSON lines (as dump writes) from stdin, in one transaction", "kvstore load /tmp/db < backup.jsonl", cmd_load)
    p.add_argument("path", help="database directory (created if missing or empty)")

    p = add("backup", "write a consistent copy while the database stays usable", "kvstore backup /tmp/db /tmp/db-copy", cmd_backup)
    p.add_argument("path", help="database directory")
    p.add_argument("dest", help="destination directory (must not exist, or be empty)")

    p = add("checkpoint", "run a checkpoint now and truncate the log", "kvstore checkpoint /tmp/db", cmd_checkpoint)
    p.add_argument("path", help="database directory")

    p = add(
        "torture",
        "run random transactions in a child process, kill it with SIGKILL, reopen, check every invariant",
        "kvstore torture /tmp/torture-db --seconds 60 --threads 4 --seed 1",
        cmd_torture,
    )
    p.add_argument("path", help="database directory (created if missing)")
    p.add_argument("--seconds", type=_positive_float, default=60.0, help="stop after this long (default 60)")
    p.add_argument("--threads", type=_int_at_least(1), default=4, help="writer threads in the child (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random decisions (default 0)")
    p.add_argument("--crash-every", type=_positive_float, default=1.0, help="mean seconds between kills (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    p = add("bench", "measure kvstore against sqlite3 on named workloads", "kvstore bench --quick", cmd_bench)
    p.add_argument("--quick", action="store_true", help="a short run (about 2 minutes)")
    p.add_argument("--json", action="store_true", help="results as JSON")
    p.add_argument("--keys", type=_int_at_least(1000), help="keys in the loaded store (default 100,000)")
    p.add_argument("--repetitions", type=_int_at_least(1), help="repetitions (default 13; 7 with --quick)")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None, inp: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    fn: Callable[..., int] = args.fn  # set by add() in build_parser
    try:
        if fn is cmd_load:
            return cmd_load(args, out, inp or sys.stdin)
        return fn(args, out)
    except UserError as e:
        sys.stderr.write(f"kvstore {args.command}: {e}\n")
        return 1
    except DatabaseLockedError as e:
        sys.stderr.write(f"kvstore {args.command}: {e}\n")
        return 1
    except CorruptionError as e:
        sys.stderr.write(f"kvstore {args.command}: DAMAGED: {e}\n")
        return 1
    except (Error, ClosedError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        sys.stderr.write(f"kvstore {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"kvstore {args.command}: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0  # e.g. `kvstore scan ... | head`


if __name__ == "__main__":
    sys.exit(main())
