"""The documented cluster command on a real Spark standalone cluster, not local mode.

A master and two one-core workers run on loopback; the job goes in through spark-submit
with the `adrec job package` zip as --py-files and a --job-work-dir, as docs/job.md
shows. The driver then runs apart from the executors, each executor in its own JVM
started by a worker: state that exists only in the driver, or a closure that works only
inside one local JVM, fails here. The executors' Python sees no editable install of
adrec, so a module the zip lacks fails here too. The version the run publishes is then
served by the real services over loopback gRPC.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from grpc_helpers import loopback_channel
from service_data import path, reasons, recommend, run, running_stack
from spark_cluster import (
    SPARK_SUBMIT,
    StandaloneCluster,
    Submitted,
    bare_executor_python,
    executor_logs,
    run_bounded,
    standalone_cluster,
)

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.cli import main
from adrec.core import keys, store
from adrec.core.dataset import PIDS, USER_PROFILE
from adrec.core.features import FULL
from adrec.core.redis_server import PrivateRedis, private_redis
from jobs.config import STAGES
from jobs.offline import OFFLINE_PID

# Set by hand: the conftest marks tests by the JVM fixtures they use, and this one starts
# its JVMs itself.
pytestmark = [pytest.mark.spark, pytest.mark.job]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Far above a normal run (three minutes on tiny, on two busy cores).
SUBMIT_TIMEOUT = 600
#: The driver stops its executors as it exits; the workers report them finished shortly after.
SETTLE_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class ClusterRun:
    cluster: StandaloneCluster
    redis: PrivateRedis
    result: Submitted
    work_dir: pathlib.Path
    data_dir: pathlib.Path

    @property
    def reported_version(self) -> str | None:
        match = re.search(r"^adrec job report: version (v\d+)", self.result.stdout, re.M)
        return match.group(1) if match else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail(
            "Java 17 is required for Spark tests (apt-get install openjdk-17-jre-headless)",
            pytrace=False,
        )
    with standalone_cluster(tmp_path_factory.mktemp("spark-cluster"), workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_run(
    cluster: StandaloneCluster, tiny_data: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterRun]:
    """The docs/job.md cluster command, once, into a private redis-server."""
    base = tmp_path_factory.mktemp("cluster-job")
    package = base / "adrec.zip"
    assert main(["job", "package", "--out", str(package)]) == 0
    work_dir = base / "shared"
    with private_redis() as server:
        command = [
            str(SPARK_SUBMIT),
            "--master",
            cluster.url,
            "--driver-memory",
            "1g",
            "--executor-memory",
            "1g",
            "--total-executor-cores",
            "2",
            "--py-files",
            str(package),
            str(REPO_ROOT / "jobs" / "main.py"),
            "--data",
            str(tiny_data),
            "--redis",
            server.url,
            "--job-work-dir",
            str(work_dir),
        ]
        env = {**cluster.env, "PYSPARK_PYTHON": str(bare_executor_python(base))}
        # Run from outside the repository: nothing may depend on the driver's folder.
        result = run_bounded(
            command, env, cwd=base, timeout=SUBMIT_TIMEOUT, log_prefix=base / "submit"
        )
        if result.returncode != 0:
            pytest.fail(
                f"spark-submit on the cluster failed ({result.returncode}):\n"
                f"{result.stderr[-6000:]}\n{_executor_failures(cluster)}",
                pytrace=False,
            )
        yield ClusterRun(cluster, server, result, work_dir, tiny_data)


@pytest.fixture
def client(cluster_run: ClusterRun) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(cluster_run.redis.url)
    yield connection
    connection.close()


def test_the_job_ran_on_executors_of_both_workers(cluster_run: ClusterRun) -> None:
    cluster = cluster_run.cluster
    app, executors = _settled_app(cluster)
    assert app["name"] == "adrec-job"
    assert app["state"] == "FINISHED"
    assert sorted(len(found) for found in executors.values()) == [1, 1]

    for worker in cluster.workers:
        logs = executor_logs(worker, app["id"])
        assert len(logs) == 1, f"{worker.name}: executor folders of {app['id']}: {logs}"
        # An executor that registered but got no work would pass the checks above
        # (spark_cluster.LOG4J2_PROPERTIES keeps these lines in its log).
        ran = logs[0].read_text(errors="replace").count("Running task")
        assert ran > 0, f"the executor on {worker.name} ran no task"

    # The scratch data went to the shared folder named on the command line.
    assert (cluster_run.work_dir / "recall_lists.parquet" / "_SUCCESS").is_file()


def test_a_complete_version_became_active(cluster_run: ClusterRun, client: redis.Redis) -> None:
    version = store.active_version(client)
    assert version is not None
    assert version == cluster_run.reported_version
    meta = store.read_meta(client, version)
    assert meta is not None
    content = meta.content
    assert content.stages == STAGES[:-1]
    assert content.feature_spec_id == FULL.spec_id
    assert content.offline_pid == OFFLINE_PID
    assert content.counts.recall_lists > 1000
    assert content.counts.offline_lists == content.counts.recall_lists
    assert content.report["config"]["work_dir"] == str(cluster_run.work_dir)
    auc = content.model_metrics["auc"]
    assert auc is not None and 0.5 < auc <= 1.0
    for family in (keys.ADS, keys.CATE_FACTORS, keys.MODEL):
        assert client.exists(family.key(version))
    assert client.smembers(keys.PENDING_VERSIONS) == set()


def test_the_published_version_serves_ranked_ads(
    cluster_run: ClusterRun, client: redis.Redis
) -> None:
    version = store.active_version(client)
    assert version is not None
    users = _profile_users_with_recall(cluster_run.data_dir, client, version, count=5)
    assert len(users) == 5

    async def scenario() -> None:
        async with (
            running_stack(cluster_run.redis.url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            for user in users:
                recall_list = store.read_recall_list(client, version, user)
                assert recall_list is not None
                recall = set(recall_list.tolist())
                for pid in PIDS:
                    answer = await recommend(channel, user_id=user, pid=pid, count=10)
                    assert path(answer) == "REALTIME_RANKED", reasons(answer)
                    assert answer.data_version == version
                    assert len(answer.ads) == 10
                    ctrs = [float(ad.ctr) for ad in answer.ads]
                    assert ctrs == sorted(ctrs, reverse=True)
                    assert min(ctrs) > 0 and max(ctrs) < 1
                    assert {ad.ad_id for ad in answer.ads} <= recall

                offline = await recommend(
                    channel,
                    user_id=user,
                    pid=PIDS[0],
                    count=10,
                    mode=gateway_pb2.RECOMMEND_MODE_OFFLINE,
                )
                assert path(offline) == "OFFLINE_RANKED"
                stored = store.read_offline_list(client, version, user)
                assert stored is not None
                stored_ids, _ = stored
                assert [ad.ad_id for ad in offline.ads] == stored_ids[:10].tolist()

    run(scenario, timeout=60)


def _settled_app(
    cluster: StandaloneCluster,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """This private master's one application, and each worker's finished executors of it.

    The driver is gone once spark-submit returns, but the master and the workers learn
    of it asynchronously: wait until they all have.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        state = cluster.master.state()
        apps = state.get("completedapps", [])
        executors: dict[str, list[dict[str, Any]]] = {}
        if len(apps) == 1 and not state.get("activeapps"):
            for worker in cluster.workers:
                executors[worker.name] = [
                    e
                    for e in worker.state().get("finishedexecutors", [])
                    if e.get("appid") == apps[0]["id"]
                ]
            if all(executors.values()):
                return dict(apps[0]), executors
        assert time.monotonic() < deadline, (
            f"the cluster did not settle: master {state}, workers' executors {executors}"
        )
        time.sleep(0.5)


def _profile_users_with_recall(
    data_dir: pathlib.Path, client: redis.Redis, version: str, count: int
) -> list[int]:
    """The first `count` users of the data's user_profile file who have a recall list."""
    users: list[int] = []
    with (data_dir / USER_PROFILE.csv_file).open(newline="") as profiles:
        for row in csv.DictReader(profiles):
            user = int(row[USER_PROFILE.columns[0].source])
            if client.exists(keys.RECALL.key(version, user)):
                users.append(user)
                if len(users) == count:
                    break
    return users


def _executor_failures(cluster: StandaloneCluster) -> str:
    """The executors' stderr tails and the daemons' logs, for a failed submit."""
    parts = []
    for worker in cluster.workers:
        for log in sorted(worker.work_dir.glob("*/*/stderr")):
            text = log.read_text(errors="replace")
            errors = [line for line in text.splitlines() if "ERROR" in line or "Error" in line]
            parts.append(f"--- {log}:\n" + "\n".join(errors[-20:] or text.splitlines()[-20:]))
    return "\n".join(parts) + "\n" + cluster.diagnostics()
