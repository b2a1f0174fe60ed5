"""Checks that stop a run before it publishes damaged input.

A truncated download or a file of junk loads without error, row by row: every bad row is
counted and skipped. These checks look at the whole table instead. A file whose rejected
share is above ``ADREC_JOB_MAX_REJECTED_SHARE``, or a table with a larger share fewer
clean rows than the active version was built from (``ADREC_JOB_MAX_ROW_DROP``), stops
the run before anything is written, naming the file, the counts and the setting.

A local input folder that is missing, or lacks one of the four files, stops the run
before Spark starts (:func:`local_input_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adrec.core.dataset import TABLES, Format
from adrec.core.settings import specs
from jobs.config import JobConfig


def local_input_problem(data: str, data_format: Format) -> str | None:
    """What is wrong with a local input folder, or None; URIs other than file: are left to
    Spark, which alone can read them."""
    uri = urlparse(data)
    if uri.scheme not in ("", "file"):
        return None
    spec = specs(JobConfig)["data"]
    folder = Path(uri.path if uri.scheme else data)
    named = f"{spec.env} ({spec.aliases[0]}) {data}"
    if not folder.exists():
        return f"{named}: no such folder"
    if not folder.is_dir():
        return f"{named}: not a folder"
    expected = [table.file_name(data_format) for table in TABLES.values()]
    missing = [name for name in expected if not (folder / name).exists()]
    if missing:
        writer = "adrec data generate" if data_format == "csv" else "adrec data convert"
        return (
            f"{named}: missing {', '.join(missing)} (the job reads {', '.join(expected)}; "
            f"{writer} writes them)"
        )
    return None


def _setting(name: str, value: float) -> str:
    spec = specs(JobConfig)[name]
    return f"{spec.env}={value:g} ({spec.flag})"


def rejected_share_problems(tables: Mapping[str, Mapping[str, Any]], max_share: float) -> list[str]:
    """One line per table whose rejected rows exceed ``max_share`` of its rows.

    ``tables`` is the ingest report: per table ``rows``, ``clean``, ``rejected`` (per
    reason) and ``source``.
    """
    problems = []
    for name, counts in tables.items():
        rows, clean = int(counts["rows"]), int(counts["clean"])
        rejected = rows - clean
        if rows and rejected / rows > max_share:
            reasons = ", ".join(f"{reason} {n:,}" for reason, n in counts["rejected"].items())
            problems.append(
                f"{name}: {counts['source']}: {rejected:,} of {rows:,} rows rejected "
                f"({rejected / rows:.2%}; {reasons}), more than "
                f"{_setting('max_rejected_share', max_share)} allows"
            )
    return problems


def row_drop_problems(
    tables: Mapping[str, Mapping[str, Any]],
    previous: Mapping[str, int],
    previous_version: str,
    max_drop: float,
) -> list[str]:
    """One line per table with more than ``max_drop`` fewer clean rows than ``previous``."""
    problems = []
    for name, counts in tables.items():
        before = int(previous.get(name, 0))
        now = int(counts["clean"])
        if before and (before - now) / before > max_drop:
            problems.append(
                f"{name}: {counts['source']}: {now:,} clean rows, {(before - now) / before:.1%} "
                f"fewer than the {before:,} active version {previous_version} was built from; "
                f"{_setting('max_row_drop', max_drop)} allows {max_drop:.0%}"
            )
    return problems
