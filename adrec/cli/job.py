"""`adrec job`: not implemented yet."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("job", help="(job: not implemented yet)")
    parser.set_defaults(handler=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    print("adrec job is not implemented yet", file=sys.stderr)
    return 3
