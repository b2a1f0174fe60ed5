"""The batch job's entry point: `adrec job run` and spark-submit both land here.

    spark-submit --master local[2] jobs/main.py --data DIR --redis URL

On a cluster, add ``--py-files adrec.zip`` (from `adrec job package`) unless the
executors' image has adrec installed, and set ``--job-work-dir`` to shared storage.
It imports neither the command line nor grpc: the Spark driver loads only the job.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import redis

from adrec.core import settings
from adrec.core.catalog import LockLostError, PublishLockedError
from adrec.core.redis_conn import RedisSettings
from jobs.config import JobConfig


class JobUsageError(Exception):
    """Bad settings or input files: one clear line, exit code 2."""


class JobRefusedError(Exception):
    """The job stopped without publishing because another run holds or took the catalog:
    one clear line, exit code 1, the previous version still serving."""


class JobResourceError(Exception):
    """Spark ran out of memory: one line naming the setting to raise, exit code 1."""


_OUT_OF_MEMORY = ("OutOfMemoryError", "Java heap space", "GC overhead limit exceeded")
_JVM_GONE = (
    "SparkContext was shut down",
    "stopped SparkContext",
    "Answer from Java side is empty",
)


def memory_problem(exc: BaseException, config: JobConfig) -> str | None:
    """The line to print when ``exc`` means Spark's JVM ran out of memory, else None.

    A task's OutOfMemoryError reaches Python as a Py4JJavaError naming it; in local mode
    the JVM may exit at once instead, and Python then only loses its connection to it.
    """
    from py4j.protocol import Py4JError, Py4JJavaError  # noqa: PLC0415 - with pyspark

    # A Java exception's text is fetched from the JVM: when that fails, the JVM is gone
    # (it exited on the OOM between raising and our reading).
    unreadable = False
    try:
        text = str(exc)
    except Exception:
        text, unreadable = "", True
    # A Py4JError that is not a Java exception means the gateway itself failed: the JVM
    # went away under the call (after its uncaught-exception handler exited on the OOM).
    died = (
        unreadable
        or isinstance(exc, ConnectionError)
        or (isinstance(exc, Py4JError) and not isinstance(exc, Py4JJavaError))
        or any(marker in text for marker in _JVM_GONE)
    )
    if not died and not any(marker in text for marker in _OUT_OF_MEMORY):
        return None
    from jobs.spark import local_heap  # noqa: PLC0415 - with pyspark

    memory = settings.specs(JobConfig)["local_memory"]
    what = "ran out of memory" if not died else "stopped, most often because it ran out of memory"
    return (
        f"the Spark JVM {what} (local heap {local_heap(config.local_memory)}); raise "
        f"{memory.env} ({memory.flag}, a size such as 16g) or, under spark-submit, "
        "--driver-memory and --executor-memory"
    )


class _WithoutTraceback(logging.Filter):
    """py4j logs a full traceback when the JVM goes away; the job says why in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("py4j") or "py4j" in record.pathname:
            record.exc_info = None
            record.exc_text = None
        return True


def without_py4j_tracebacks() -> None:
    """Keep py4j's tracebacks (logged when the JVM dies under a call) out of the output."""
    for logger in (logging.getLogger(), logging.getLogger("py4j")):
        logger.addFilter(_WithoutTraceback())


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Every job setting and Redis setting as a flag, plus where to write the report."""
    settings.add_flags(JobConfig, parser)
    settings.add_flags(RedisSettings, parser)
    parser.add_argument(
        "--report-json",
        type=pathlib.Path,
        help="also write the quality report to this file, and its ROC and reliability "
        "pictures (roc.png, reliability.png, report.html) next to it",
    )


def run(args: argparse.Namespace) -> int:
    """Run the job with the parsed flags (env vars fill the rest); prints the report."""
    try:
        config = settings.load(JobConfig, flags=args)
        redis_settings = settings.load(RedisSettings, flags=args)
    except settings.SettingsError as exc:
        raise JobUsageError(str(exc)) from None
    from jobs.pipeline import JobInputError, run_job  # noqa: PLC0415 - pyspark after validation

    without_py4j_tracebacks()
    try:
        result = run_job(config, redis_settings)
    except JobInputError as exc:
        raise JobUsageError(str(exc)) from None
    except (PublishLockedError, LockLostError) as exc:
        raise JobRefusedError(str(exc)) from None
    except Exception as exc:
        problem = memory_problem(exc, config)
        if problem is None:
            raise
        raise JobResourceError(problem) from None
    if args.report_json:
        args.report_json.write_text(result.report_json())
        if ctr := result.report.get("ctr"):
            # Matplotlib only when pictures are wanted.
            from jobs.plots import write_report_plots  # noqa: PLC0415

            write_report_plots(args.report_json.parent, ctr)
    print(result.report_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/main.py", description="Run the adrec batch job and publish a new version."
    )
    add_run_flags(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except JobUsageError as exc:
        print(f"adrec job: error: {exc}", file=sys.stderr)
        return 2
    except (JobRefusedError, JobResourceError) as exc:
        print(f"adrec job: error: {exc}", file=sys.stderr)
        return 1
    except redis.ConnectionError as exc:
        print(f"adrec job: error: cannot reach Redis: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
