"""`adrec job`: run the batch job, or package it for spark-submit on a cluster."""

from __future__ import annotations

import argparse
import pathlib
import sys
import zipfile

from adrec.cli import UsageError
from adrec.core import settings
from adrec.core.redis_conn import RedisSettings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("job", help="run the Spark batch job")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    run = actions.add_parser(
        "run",
        help="ingest, train, build and publish a new data version",
        description="Runs every stage and publishes a new version atomically. Every option "
        "can also be set through the environment variable shown in its help.",
    )
    from adrec.jobs.config import JobConfig

    settings.add_flags(JobConfig, run)
    settings.add_flags(RedisSettings, run)
    run.add_argument("--report-json", type=pathlib.Path,
                     help="also write the quality report to this file")
    run.set_defaults(handler=_run)

    package = actions.add_parser(
        "package", help="zip the adrec package for spark-submit --py-files on a cluster"
    )
    package.add_argument("--out", type=pathlib.Path, default=pathlib.Path("dist/adrec.zip"))
    package.set_defaults(handler=_package)


def _run(args: argparse.Namespace) -> int:
    from adrec.jobs.config import JobConfig

    try:
        config = settings.load(JobConfig, flags=args)
        redis_settings = settings.load(RedisSettings, flags=args)
    except settings.SettingsError as exc:
        raise UsageError(str(exc)) from None
    from adrec.jobs.pipeline import JobInputError, run_job

    try:
        result = run_job(config, redis_settings)
    except JobInputError as exc:
        raise UsageError(str(exc)) from None
    if args.report_json:
        args.report_json.write_text(result.report_json())
    print(result.report_text())
    return 0


def _package(args: argparse.Namespace) -> int:
    import adrec
    import adrec.jobs
    import adrec.services

    roots = {
        "adrec": pathlib.Path(adrec.__file__).parent,
        "adrec/jobs": pathlib.Path(adrec.jobs.__file__).parent,
        "adrec/services": pathlib.Path(adrec.services.__file__).parent,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.out, "w", zipfile.ZIP_DEFLATED) as archive:
        for prefix, root in roots.items():
            for source in sorted(root.rglob("*.py")):
                relative = source.relative_to(root)
                if prefix == "adrec" and relative.parts[0] in ("jobs", "services"):
                    continue
                archive.write(source, f"{prefix}/{relative.as_posix()}")
    print(f"wrote {args.out}; pass it to spark-submit with --py-files", file=sys.stderr)
    return 0
