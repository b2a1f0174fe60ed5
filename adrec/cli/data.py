"""`adrec data`: generate synthetic data sets and inspect data sets with the Spark loaders."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from adrec.cli import UsageError

PRESET_NAMES = ("tiny", "small", "medium", "full", "real")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "data",
        help="generate synthetic data, inspect data files",
        description="Generate the synthetic data set, or check a data set with the loaders.",
    )
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    generate = commands.add_parser(
        "generate",
        help="write the four CSV files, the click-truth side file and a manifest",
        description="Write raw_sample.csv, ad_feature.csv, user_profile.csv, behavior_log.csv "
        "in the published format, raw_sample_truth.csv and manifest.json.",
    )
    generate.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        required=True,
        help="data set size: tiny (tests), small (demo), medium, full (the real data's "
        "counts, 100M behaviour rows), real (full with the real log's 723M behaviour rows)",
    )
    generate.add_argument(
        "--seed",
        type=int,
        default=1,
        help="random seed (default 1); the same preset and seed give identical files",
    )
    generate.add_argument("--out", type=Path, required=True, help="output directory")
    generate.add_argument(
        "--force", action="store_true", help="write into a directory that already has files"
    )
    generate.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="threads drawing rows (does not change the output; default: %(default)s)",
    )
    generate.add_argument("--quiet", action="store_true", help="no progress lines")
    generate.set_defaults(handler=_generate)

    inspect = commands.add_parser(
        "inspect",
        help="load a data set with the Spark loaders and report rejected rows",
        description="Run the loaders over the four files and print row counts and rejected "
        "rows per file and reason.",
    )
    inspect.add_argument(
        "source", metavar="DIR_OR_URI", help="directory or URI prefix holding the four files"
    )
    inspect.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        dest="data_format",
        help="file format (default csv)",
    )
    inspect.add_argument("--master", default="local[*]", help="Spark master (default local[*])")
    inspect.set_defaults(handler=_inspect)

    convert = commands.add_parser(
        "convert",
        help="copy a CSV data set to Parquet, the job's other input format",
        description="Load the four CSV files with the job's loaders and write their clean "
        "rows as Parquet (typed columns named as in the CSV header) for "
        "ADREC_JOB_INPUT_FORMAT=parquet; rejected rows are counted and left out.",
    )
    convert.add_argument(
        "source", metavar="DIR_OR_URI", help="directory or URI prefix holding the four CSV files"
    )
    convert.add_argument("--out", required=True, help="directory or URI prefix to write to")
    convert.add_argument("--master", default="", help="Spark master (default local[*])")
    convert.set_defaults(handler=_convert)


def _generate(args: argparse.Namespace) -> int:
    from adrec.synthetic import generate

    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(
            f"--out {out} is not empty; pass --force to overwrite the generated files in it"
        )
    result = generate(args.preset, args.seed, out, workers=args.workers, progress=not args.quiet)
    files = result.manifest["files"]
    for name, info in files.items():
        print(f"{out / name}: {info['rows']:,} rows")
    print(
        f"mean click probability {result.manifest['clicks']['mean_click_probability']:.4f}, "
        f"manifest {out / 'manifest.json'}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if "://" not in args.source and not Path(args.source).is_dir():
        raise UsageError(f"DIR_OR_URI {args.source} is not a directory")

    from pyspark.sql import SparkSession

    from adrec.core.dataset import TABLES
    from jobs.ingest import IngestError, dataset_path, load_table

    existing = SparkSession.getActiveSession()
    spark = existing or (
        SparkSession.builder.master(args.master)
        .appName("adrec-data-inspect")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    if existing is None:
        spark.sparkContext.setLogLevel("ERROR")
    failures = 0
    try:
        for table in TABLES.values():
            path = dataset_path(args.source, table, args.data_format)
            try:
                result = load_table(spark, table, path, data_format=args.data_format)
            except IngestError as exc:
                failures += 1
                print(f"{table.name}: error: {exc}", file=sys.stderr)
                continue
            print("\n".join(result.report_lines()))
    finally:
        if existing is None:
            spark.stop()
    return 1 if failures else 0


def _convert(args: argparse.Namespace) -> int:
    if "://" not in args.source and not Path(args.source).is_dir():
        raise UsageError(f"DIR_OR_URI {args.source} is not a directory")
    if "://" not in args.out and Path(args.out).resolve() == Path(args.source).resolve():
        raise UsageError("--out must differ from the source folder")

    from pyspark.sql import SparkSession

    from adrec.core.dataset import TABLES
    from jobs.ingest import IngestError, dataset_path, load_table, write_published_parquet
    from jobs.spark import build_session

    existing = SparkSession.getActiveSession()
    spark = existing or build_session(
        args.master or None, "adrec-data-convert", {"spark.ui.enabled": "false"}
    )
    staging = f"{args.out.rstrip('/')}/.staging"
    try:
        for table in TABLES.values():
            try:
                result = load_table(spark, table, dataset_path(args.source, table), staging=staging)
            except IngestError as exc:
                raise UsageError(str(exc)) from None
            target = dataset_path(args.out, table, "parquet")
            write_published_parquet(result, table, target)
            print("\n".join(result.report_lines()))
            print(f"  -> {target}: {result.clean_rows:,} rows")
    finally:
        if existing is None:
            spark.stop()
    _remove_local_tree(staging)
    return 0


def _remove_local_tree(path: str) -> None:
    import shutil

    if "://" not in path or path.startswith("file://"):
        shutil.rmtree(path.removeprefix("file://"), ignore_errors=True)
