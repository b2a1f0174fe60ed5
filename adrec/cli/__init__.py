"""The ``adrec`` command line: one entry point for data, job, publish, serve, recommend, events,
ads.

Each command group lives in its own module exposing ``add_parser(subparsers)``; the
group's heavy imports (pyspark, grpc) happen inside its handlers, so ``adrec --help``
stays fast and the services image, without the `job` extra, runs every command that
does not need the batch job's packages.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import redis

COMMAND_GROUPS = (
    "data",
    "job",
    "publish",
    "serve",
    "recommend",
    "events",
    "ads",
    "stream",
    "demo",
)
#: Packages of the `job` extra, which the services image does not carry.
JOB_PACKAGES = ("pyspark", "pandas", "pyarrow", "sklearn", "matplotlib")


class _Parser(argparse.ArgumentParser):
    """Refuses the arguments it does not know itself, with its own usage.

    argparse leaves a subcommand's unknown arguments to the top-level parser, whose usage
    (`adrec [-h] COMMAND ...`) says nothing about the subcommand's flags. Subparsers are
    made of their parent's class, so every level of `adrec` refuses its own.
    """

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        parsed, unknown = super().parse_known_args(*args, **kwargs)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adrec", description="Real-time ad recommendation: batch job, Redis, gRPC services."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        module = importlib.import_module(f"adrec.cli.{group}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"adrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except redis.ConnectionError as exc:
        print(f"adrec {args.command}: error: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        # The commands that take a Redis URL name it themselves; this keeps any other
        # Redis failure to one line as well.
        print(f"adrec {args.command}: error: Redis failed: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in JOB_PACKAGES:
            raise
        print(
            f"adrec {args.command}: error: this command needs the batch job's packages "
            f"({exc.name} is not installed): pip install 'adrec[job]', or use the job image",
            file=sys.stderr,
        )
        return 2


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit code 2."""


if __name__ == "__main__":
    sys.exit(main())
