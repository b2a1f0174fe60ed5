"""Shared fixtures: a private redis-server (and, from redis_fixtures, a Redis Cluster and a
TLS server), a local SparkSession, the batch job's published data, the rendered deploy
overlays; and the markers of the tests that need a JVM.

Everything here is a real component; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest
import redis
from deploy_helpers import OVERLAYS, kustomize
from redis_fixtures import any_redis, redis_cluster, redis_target, redis_tls  # noqa: F401

from adrec.core.redis_server import INSTALL_HINT, PrivateRedis, private_redis

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Fixtures that start a JVM, and the markers every test using one gets, whether it asks for
#: the fixture itself or through another: a new test cannot forget them.
JVM_FIXTURES = {
    "spark": ("spark",),
    "published_tiny": ("spark", "job"),
}
#: JAVA_HOME while a test without the spark marker runs. Spark's launcher runs
#: $JAVA_HOME/bin/java, which does not exist here, so a test that starts Spark some other
#: way (a CLI command, a job in a subprocess) fails and shows this name in its output.
NO_JAVA_HOME = "/nonexistent/java-is-for-tests-marked-spark"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, markers in JVM_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    if item.get_closest_marker(marker) is None:
                        item.add_marker(marker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if item.get_closest_marker("spark") is not None:
        return (yield)
    # Around set-up too, so fixtures of wider scope first built for this test are covered.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAVA_HOME", NO_JAVA_HOME)
        return (yield)


@pytest.fixture(scope="session")
def redis_server() -> PrivateRedis:
    if shutil.which("redis-server") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with private_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> str:
    """URL of the private server, flushed before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def spark():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail(
            "Java 17 is required for Spark tests (apt-get install openjdk-17-jre-headless)",
            pytrace=False,
        )
    from jobs.spark import build_session

    session = build_session(
        "local[2]",
        "adrec-tests",
        {
            "spark.sql.shuffle.partitions": "2",
            "spark.default.parallelism": "2",
            "spark.ui.enabled": "false",
            "spark.driver.memory": "2g",
        },
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@dataclasses.dataclass(frozen=True)
class PublishedData:
    """The synthetic `tiny` data set, published by the real job into its own redis-server."""

    data_dir: pathlib.Path
    redis: PrivateRedis
    version: str
    report: dict
    #: Where the job wrote the report (--report-json), its pictures beside it.
    report_path: pathlib.Path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
    from adrec.synthetic import generate

    out = tmp_path_factory.mktemp("tiny")
    generate("tiny", 7, out, progress=False)
    return out


@pytest.fixture(scope="session")
def published_tiny(tiny_data, tmp_path_factory) -> PublishedData:
    """Runs the documented spark-submit command once for the whole test session."""
    report_path = tmp_path_factory.mktemp("report") / "report.json"
    with private_redis() as server:
        env = {
            **os.environ,
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
        }
        command = [
            str(pathlib.Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local[2]",
            "--conf",
            "spark.sql.shuffle.partitions=2",
            "--conf",
            "spark.ui.enabled=false",
            str(REPO_ROOT / "jobs" / "main.py"),
            "--data",
            str(tiny_data),
            "--redis",
            server.url,
            "--report-json",
            str(report_path),
        ]
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        if result.returncode != 0:
            pytest.fail(
                f"spark-submit job failed ({result.returncode}):\n{result.stderr[-4000:]}",
                pytrace=False,
            )
        report = json.loads(report_path.read_text())
        yield PublishedData(tiny_data, server, report["version"], report, report_path)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each overlay under deploy/overlays as `kubectl kustomize` renders it, once per session."""
    return {overlay: kustomize(overlay) for overlay in OVERLAYS}
