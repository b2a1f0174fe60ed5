"""The SparkSession the job runs in: local by default, any master through spark-submit."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pyspark.sql import DataFrame, Row, SparkSession

DEFAULT_CONF = {
    # Timestamps are Unix seconds; day boundaries are computed explicitly in China time.
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
    "spark.ui.showConsoleProgress": "false",
}


LOG_CONFIG = Path(__file__).with_name("log4j2.properties")

#: Share of the memory a local run's JVM heap takes under ``auto``: the Python workers
#: (one per core), the driver's own Python and the page cache the Parquet scratch
#: files live in need the rest.
AUTO_HEAP_SHARE = 0.4
MIN_AUTO_HEAP_MB = 1024
# cgroup v2, then v1: a container's memory limit.
_CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory_bytes() -> int:
    """Physical memory, or the container's limit when a cgroup sets a lower one."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in _CGROUP_LIMIT_FILES:
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            return min(physical, int(raw))
    return physical


def local_heap(setting: str) -> str:
    """The JVM heap of a local run: the setting itself, or ``auto`` sized from the machine."""
    if setting != "auto":
        return setting
    megabytes = int(machine_memory_bytes() * AUTO_HEAP_SHARE) // (1 << 20)
    return f"{max(MIN_AUTO_HEAP_MB, megabytes)}m"


def build_session(
    master: str | None = None,
    app_name: str = "adrec-job",
    conf: Mapping[str, str] | None = None,
    local_memory: str = "auto",
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
        builder = builder.config("spark.driver.memory", local_heap(local_memory))
        builder = builder.config(
            "spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{LOG_CONFIG}"
        )
    for key, value in {**DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    if not local and not session.sparkContext.getConf().contains(SHUFFLE_PARTITIONS):
        session.conf.set(SHUFFLE_PARTITIONS, str(cluster_shuffle_partitions(session)))
    return session


SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"


def cluster_shuffle_partitions(session: SparkSession) -> int:
    """Four per core the application may use, when the submitter chose no number.

    Spark's default of 200 makes each ALS and L-BFGS iteration 200 tasks, most of them
    empty on all but the largest data. Executors register after the session starts, so
    the cores come from ``spark.cores.max`` (standalone, ``--total-executor-cores``) or
    the executors requested, not from what has registered so far.
    """
    conf = session.sparkContext.getConf()
    requested = int(conf.get("spark.cores.max", "0")) or int(
        conf.get("spark.executor.instances", "0")
    ) * int(conf.get("spark.executor.cores", "1"))
    return 4 * max(requested, session.sparkContext.defaultParallelism, 2)


def aggregate_row(aggregate: DataFrame) -> Row:
    """The one row of a global aggregation (``agg`` without ``groupBy``)."""
    row = aggregate.first()
    # Spark returns a row even for empty input, so a missing one is a Spark bug.
    if row is None:
        raise RuntimeError(f"global aggregation of {aggregate.columns} returned no row")
    return row


def path_exists(spark: SparkSession, path: str) -> bool:
    """Whether a file or folder exists at any URI the session reads (local, hdfs:, s3a:)."""
    context = spark.sparkContext
    jvm = context._jvm
    if jvm is None:
        raise RuntimeError("the Spark driver has no JVM gateway")
    jvm_path = jvm.org.apache.hadoop.fs.Path(path)
    return bool(jvm_path.getFileSystem(context._jsc.hadoopConfiguration()).exists(jvm_path))
