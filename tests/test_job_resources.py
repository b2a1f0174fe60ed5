"""The job at scale: its memory sizing, its one-line out-of-memory error, its heartbeat."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adrec.core.settings import SettingsError, load
from jobs.config import JobConfig
from jobs.main import memory_problem
from jobs.progress import Progress, SparkWork, spark_work
from jobs.spark import local_heap, machine_memory_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_auto_memory_is_sized_from_the_machine_and_explicit_sizes_stay():
    megabytes = int(local_heap("auto").removesuffix("m"))
    machine = machine_memory_bytes() >> 20
    assert 1024 <= megabytes < machine
    assert abs(megabytes - 0.4 * machine) <= 1 or megabytes == 1024
    assert local_heap("6g") == "6g"
    assert load(JobConfig, env={"ADREC_JOB_DATA": "d"}).local_memory == "auto"


def test_a_heap_spark_cannot_start_with_is_refused_by_name():
    with pytest.raises(SettingsError, match=r"ADREC_JOB_LOCAL_MEMORY.*at least 512m"):
        load(JobConfig, env={"ADREC_JOB_DATA": "d", "ADREC_JOB_LOCAL_MEMORY": "300m"})


def test_only_memory_failures_are_explained_as_memory():
    config = JobConfig(data="d", local_memory="6g")
    assert memory_problem(ValueError("bad row"), config) is None
    from py4j.java_gateway import GatewayClient, GatewayParameters, GatewayProperty, JavaObject
    from py4j.protocol import Py4JError, Py4JJavaError

    # The gateway failing under a call, rather than a Java exception, means the JVM is gone.
    gone = memory_problem(Py4JError("An error occurred while calling o56.collectToPython"), config)
    assert gone is not None and gone.startswith("the Spark JVM stopped")
    # A Java exception whose text can no longer be fetched: the JVM went away after raising.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client = GatewayClient(
        gateway_parameters=GatewayParameters(port=closed_port),
        gateway_property=GatewayProperty(False, None),
    )
    raised = Py4JJavaError(
        "An error occurred while calling o56.collectToPython", JavaObject("o1", client)
    )
    unreadable = memory_problem(raised, config)
    assert unreadable is not None and unreadable.startswith("the Spark JVM stopped")
    assert memory_problem(ConnectionRefusedError(111, "Connection refused"), config) == (
        "the Spark JVM stopped, most often because it ran out of memory (local heap 6g); "
        "raise ADREC_JOB_LOCAL_MEMORY (--job-local-memory, a size such as 16g) or, under "
        "spark-submit, --driver-memory and --executor-memory"
    )


# A task that needs far more than a 600 MB heap: one array of 200M longs.
OUT_OF_MEMORY_SCRIPT = """
from pyspark.sql import functions as F
from jobs.config import JobConfig
from jobs.main import memory_problem, without_py4j_tracebacks
from jobs.spark import build_session

# As the job's run does: py4j logs a traceback when the JVM dies under a call.
without_py4j_tracebacks()
spark = build_session("local[2]", local_memory="600m", conf={"spark.ui.enabled": "false"})
huge = F.sequence(F.lit(0), F.lit(200_000_000) + F.col("id"))
try:
    spark.range(2).repartition(2).select(F.size(F.array_distinct(huge))).collect()
except Exception as exc:
    print("PROBLEM:", memory_problem(exc, JobConfig(data="d", local_memory="600m")))
    print("RAISED:", type(exc).__name__)
    try:
        print("TEXT:", str(exc)[:2000].replace("\\n", " | "))
    except Exception as unreadable:
        print("TEXT unreadable:", type(unreadable).__name__)
"""


@pytest.mark.spark
def test_a_spark_out_of_memory_is_one_line_naming_the_setting_without_a_stack_trace(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    problem = [line for line in run.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problem) == 1, run.stdout + run.stderr
    assert "the Spark JVM" in problem[0] and "local heap 600m" in problem[0], run.stdout
    assert "raise ADREC_JOB_LOCAL_MEMORY" in problem[0]
    # The JVM's own log says what happened in single lines, never a trace.
    assert "OutOfMemoryError" in run.stderr
    assert "\tat " not in run.stderr and "Traceback" not in run.stderr


def test_the_heartbeat_reports_driver_work_when_no_spark_stage_runs():
    stream = io.StringIO()
    progress = Progress(("ingest",), stream=stream, work=lambda: [], interval=0.2)
    with progress.stage("ingest"):
        time.sleep(0.7)
    beats = [line for line in stream.getvalue().splitlines() if "so far" in line]
    assert len(beats) >= 2
    assert all("ingest:" in line and "no Spark tasks running" in line for line in beats)


def test_the_heartbeat_estimates_what_is_left_from_the_rate_so_far(monkeypatch):
    clock = iter([100.0, 160.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    progress = Progress(
        ("ingest",), stream=io.StringIO(), work=lambda: [SparkWork(7, done=30, total=120)]
    )
    progress._running(100.0)  # first seen at 100 s, 30 tasks done 60 s later
    line = progress.heartbeat_line("ingest", start=40.0)
    assert line.strip() == ("ingest: 2m00s so far; Spark stage 7: 30/120 tasks, about 3m00s left")


@pytest.mark.spark
def test_the_heartbeat_counts_the_tasks_of_a_running_spark_stage(spark):
    stream = io.StringIO()
    progress = Progress(
        ("ingest",), stream=stream, work=spark_work(spark.sparkContext), interval=0.5
    )

    def slow(row: int) -> int:
        time.sleep(0.4)
        return row

    with progress.stage("ingest"):
        spark.sparkContext.parallelize(range(12), 12).map(slow).count()
    beats = [line for line in stream.getvalue().splitlines() if "Spark stage" in line]
    assert beats, stream.getvalue()
    assert all("/12 tasks" in line for line in beats)
    assert any("left" in line for line in beats)
