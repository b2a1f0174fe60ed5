"""The SparkSession the job runs in: local by default, any master through spark-submit."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from pyspark.sql import DataFrame, Row, SparkSession

DEFAULT_CONF = {
    # Timestamps are Unix seconds; day boundaries are computed explicitly in China time.
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
    "spark.ui.showConsoleProgress": "false",
}


def build_session(
    master: str | None = None,
    app_name: str = "adrec-job",
    conf: Mapping[str, str] | None = None,
    local_memory: str = "4g",
) -> SparkSession:
    """Get or create the session.

    Under ``spark-submit`` the master comes from the submit command and ``master`` is
    left unset; run directly, the job defaults to ``local[*]``.
    """
    builder = SparkSession.builder.appName(app_name)
    # spark-submit starts the JVM first and hands the Python driver its gateway port.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if master or not submitted:
        builder = builder.master(master or "local[*]")
    local = (master or "local").startswith("local") and not submitted
    if local:
        # Local workers must run this interpreter: it is the one with adrec installed
        # (a bare `python3` from PATH may be another environment entirely).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # Spark's default of 200 shuffle partitions makes every iterative step (ALS, LR)
        # schedule hundreds of tiny tasks per iteration on a laptop.
        builder = builder.config("spark.sql.shuffle.partitions", str(4 * (os.cpu_count() or 2)))
        # Driver and executors share this one JVM; its heap is fixed when it starts.
        builder = builder.config("spark.driver.memory", local_memory)
    for key, value in {**DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def aggregate_row(aggregate: DataFrame) -> Row:
    """The one row of a global aggregation (``agg`` without ``groupBy``)."""
    row = aggregate.first()
    # Spark returns a row even for empty input, so a missing one is a Spark bug.
    if row is None:
        raise RuntimeError(f"global aggregation of {aggregate.columns} returned no row")
    return row
