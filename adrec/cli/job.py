"""`adrec job`: run the batch job, or package it for spark-submit on a cluster."""

from __future__ import annotations

import argparse
import pathlib
import sys
import zipfile

from adrec.cli import UsageError

#: The import packages a Spark executor needs, zipped by `adrec job package`.
JOB_IMPORT_PACKAGES = ("adrec", "jobs")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from jobs import main as job_main

    parser = subparsers.add_parser("job", help="run the Spark batch job")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    run = actions.add_parser(
        "run",
        help="ingest, train, build and publish a new data version",
        description="Runs every stage and publishes a new version atomically. Every option "
        "can also be set through the environment variable shown in its help.",
    )
    job_main.add_run_flags(run)
    run.set_defaults(handler=_run)

    package = actions.add_parser(
        "package", help="zip the adrec and jobs packages for spark-submit --py-files"
    )
    package.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("dist/adrec.zip"),
        help="the zip to write (default: %(default)s)",
    )
    package.set_defaults(handler=_package)


def _run(args: argparse.Namespace) -> int:
    from jobs import main as job_main

    try:
        return job_main.run(args)
    except job_main.JobUsageError as exc:
        raise UsageError(str(exc)) from None
    except (job_main.JobRefusedError, job_main.JobResourceError) as exc:
        print(f"adrec job: error: {exc}", file=sys.stderr)
        return 1


def _package(args: argparse.Namespace) -> int:
    import importlib

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in JOB_IMPORT_PACKAGES:
            init_file = importlib.import_module(name).__file__
            # Namespace packages have no __init__.py, hence no file to zip the package from.
            if init_file is None:
                raise RuntimeError(f"{name} is not installed as a regular package")
            root = pathlib.Path(init_file).parent
            for source in sorted(root.rglob("*.py")):
                archive.write(source, f"{name}/{source.relative_to(root).as_posix()}")
    print(f"wrote {args.out}; pass it to spark-submit with --py-files", file=sys.stderr)
    return 0
