"""`adrec stream`: run the stream job that folds reported events into real-time state."""

from __future__ import annotations

import argparse
import sys

from adrec.cli import UsageError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from jobs.stream import main as stream_main

    parser = subparsers.add_parser("stream", help="run the Spark stream job on reported events")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="read the event log and keep real-time interest and counts in Redis",
        description="Runs a Structured Streaming query until stopped (Ctrl-C or SIGTERM). "
        "Every option can also be set through the environment variable shown in its help.",
    )
    stream_main.add_run_flags(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from jobs.stream import main as stream_main

    try:
        return stream_main.run(args)
    except stream_main.StreamUsageError as exc:
        raise UsageError(str(exc)) from None
    except stream_main.StreamFailedError as exc:
        print(f"adrec stream: error: {exc}", file=sys.stderr)
        return 1
