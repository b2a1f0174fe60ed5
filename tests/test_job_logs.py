"""The job's own output is not buried under Spark's start-up log: spark-submit is pointed at
jobs/log4j2.properties, by the documented command and by the job image's entrypoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_DOC = REPO_ROOT / "docs" / "job.md"
ENTRYPOINT = REPO_ROOT / "deploy" / "images" / "spark-entrypoint.sh"
DOCKERFILE = REPO_ROOT / "deploy" / "images" / "job.Dockerfile"
#: What the documented spark-submit commands pass, relative to the repository root.
LOG_OPTION = '--driver-java-options "-Dlog4j2.configurationFile=file:jobs/log4j2.properties"'
#: Where the job image keeps the file, next to its main.py.
IMAGE_LOG_CONFIG = "/opt/adrec/jobs/log4j2.properties"
#: Lines Spark prints under its default log4j profile.
SPARK_CHATTER = re.compile(r"\bINFO\b|log4j profile|NativeCodeLoader")


def test_every_documented_spark_submit_command_passes_the_log_configuration():
    text = JOB_DOC.read_text()
    commands = re.findall(r"spark-submit --master.*?jobs/main\.py", text, flags=re.DOTALL)
    assert len(commands) == 2
    for command in commands:
        assert LOG_OPTION in " ".join(command.replace("\\\n", " ").split()), command


@pytest.mark.spark
@pytest.mark.job
def test_the_documented_spark_submit_prints_no_spark_info_lines(tiny_data, redis_url):
    """The local command of docs/job.md on `tiny`, ingest only: one JVM start."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local[1]",
            "--driver-java-options",
            "-Dlog4j2.configurationFile=file:jobs/log4j2.properties",
            "--conf",
            "spark.ui.enabled=false",
            "jobs/main.py",
            "--data",
            str(tiny_data),
            "--redis",
            redis_url,
            "--stages",
            "ingest",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # spark-submit hands the job's own stderr (its progress) to stdout.
    lines = result.stdout.splitlines()
    assert lines[0] == "[1/1] ingest ..."
    assert any(line.startswith("[1/1] ingest done in ") for line in lines)
    assert "adrec job report" in result.stdout
    chatter = [line for line in (*lines, *result.stderr.splitlines()) if SPARK_CHATTER.search(line)]
    assert chatter == [], "\n".join(chatter[:20])
    # The JVM itself warns of the incubator module Spark adds, before any log configuration
    # is read; nothing else reaches stderr.
    others = [
        line
        for line in result.stderr.splitlines()
        if not line.startswith("WARNING: Using incubator modules")
    ]
    assert others == []


def test_the_job_image_points_every_spark_submit_at_the_log_configuration(tmp_path):
    assert f"COPY jobs/log4j2.properties {IMAGE_LOG_CONFIG}" in DOCKERFILE.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tini").write_text(
        '#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n'
    )
    # Stands in for spark-submit: prints the JVM options spark-submit would start with.
    (bin_dir / "spark-submit").write_text('#!/bin/sh\nprintf "%s\\n" "$SPARK_SUBMIT_OPTS"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    spark_home = tmp_path / "spark"
    (spark_home / "bin").mkdir(parents=True)
    os.symlink(bin_dir / "spark-submit", spark_home / "bin" / "spark-submit")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SPARK_HOME": str(spark_home)}

    def options(*args: str, **extra: str) -> str:
        result = subprocess.run(
            ["bash", str(ENTRYPOINT), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout.strip()

    expected = f"-Dlog4j2.configurationFile=file:{IMAGE_LOG_CONFIG}"
    # The CronJob's spark-submit (run as given) and a driver pod's (cluster mode).
    assert options("spark-submit", "--version") == expected
    assert options("driver", "app.py", SPARK_DRIVER_BIND_ADDRESS="10.0.0.5") == expected
    # Options already set are kept, after the job's.
    assert options("spark-submit", SPARK_SUBMIT_OPTS="-Dx=1") == f"{expected} -Dx=1"
