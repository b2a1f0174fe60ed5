"""The stream job in every overlay: one pod on its checkpoint volume, locked down like the
others, probed on its metrics port, configured with settings the job reads; its image's
entrypoint; and its alerts' unit tests, which must fail once a rule is broken.

NetworkPolicies: test_deploy_network.py; the ServiceMonitor and the metric names in the
alerts and the dashboard: test_deploy_monitoring.py; the Redis CA in prod:
test_deploy_workloads.py (every pod).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    IMAGE_UID,
    OVERLAYS,
    STREAM_METRICS_PORT,
    config_maps,
    container_env,
    deployment,
    named,
    of_kind,
    pod_specs,
    rule_groups,
)
from test_deploy_alerts import RULE_TESTS, RULES_FILE, promtool
from test_deploy_images import IMAGES, _fake_tools

from adrec.core.redis_conn import RedisSettings
from adrec.core.settings import env_names, load
from jobs.stream.config import StreamConfig

CHECKPOINT_CLAIM = "adrec-stream-checkpoint"
#: Env vars of the stream pod that are Spark's, not adrec settings.
SPARK_ENV = {"SPARK_LOCAL_IP"}
ARGS = ["adrec", "stream", "run"]


def stream(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, its one container) of the stream Deployment."""
    spec = deployment(objects, "stream")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def stream_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return container_env(stream(objects)[1], config_maps(objects))


def quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (3Gi, 512Mi) or a JVM size (1536m, 1g) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGkmg]i?)?", value).groups()
    power = "kmg".index(unit[0].lower()) + 1 if unit else 0
    return int(number) * 1024**power


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_stream_job_is_one_pod_replaced_only_after_the_old_one_stopped(rendered, overlay):
    objects = rendered[overlay]
    spec = deployment(objects, "stream")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "a rolling update would run two at once"
    assert "adrec-stream" not in {
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in of_kind(objects, "HorizontalPodAutoscaler")
    }
    labels = spec["template"]["metadata"]["labels"]
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert not selector.items() <= labels.items(), "a PDB on one pod blocks every drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_checkpoint_is_a_folder_of_its_own_read_write_once_claim(rendered, overlay):
    objects = rendered[overlay]
    spec, container = stream(objects)
    claims = {
        volume["name"]: volume["persistentVolumeClaim"]["claimName"]
        for volume in spec["volumes"]
        if "persistentVolumeClaim" in volume
    }
    (volume_name,) = [name for name, claim in claims.items() if claim == CHECKPOINT_CLAIM]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume_name]
    assert not mount.get("readOnly", False)
    checkpoint = PurePosixPath(stream_env(objects)["ADREC_STREAM_CHECKPOINT"])
    mount_path = PurePosixPath(mount["mountPath"])
    assert checkpoint.is_relative_to(mount_path) and checkpoint != mount_path, (
        "a folder inside the claim, not its root (lost+found)"
    )
    claim = named(objects, "PersistentVolumeClaim", CHECKPOINT_CLAIM)["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert quantity_bytes(claim["resources"]["requests"]["storage"]) >= 1024**3
    # No other pod mounts the checkpoint.
    for where, other in pod_specs(objects):
        if where != "Deployment/adrec-stream":
            mounted = {
                v["persistentVolumeClaim"]["claimName"]
                for v in other.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            assert CHECKPOINT_CLAIM not in mounted, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_stream_pod_runs_the_job_image_locked_down_with_an_exec_tmp(rendered, overlay):
    objects = rendered[overlay]
    spec, container = stream(objects)
    assert container["args"] == ARGS
    job_images = {
        c["image"]
        for where, pod in pod_specs(objects)
        if where.startswith("CronJob/")
        for c in pod["containers"]
    } | {ssa["spec"]["template"]["image"] for ssa in of_kind(objects, "ScheduledSparkApplication")}
    assert job_images == {container["image"]}, "the image with Spark and Java"
    assert spec["serviceAccountName"] == "adrec-services"
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == IMAGE_UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # Spark unpacks native libraries (RocksDB, snappy) to /tmp and loads them from there:
    # an emptyDir on disk allows exec.
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert set(volumes[tmp["name"]]) == {"name", "emptyDir"}
    assert volumes[tmp["name"]]["emptyDir"].get("medium", "") == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_and_liveness_probes_ask_the_metrics_endpoint(rendered, overlay):
    objects = rendered[overlay]
    _, container = stream(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": STREAM_METRICS_PORT}
    assert int(stream_env(objects)["ADREC_STREAM_METRICS_PORT"]) == STREAM_METRICS_PORT
    for probe in ("startupProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/metrics", probe
        assert ports[check["port"]] == STREAM_METRICS_PORT, probe
    # The JVM starts before /metrics does: minutes of grace, then a minute of silence
    # restarts the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
    # No readiness: nothing routes requests to the job.
    assert "readinessProbe" not in container
    svc = named(objects, "Service", "adrec-stream")
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("metrics", STREAM_METRICS_PORT, "metrics")
    ]
    labels = deployment(objects, "stream")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_stream_env_is_settings_of_the_job_that_load_and_fit_the_container(rendered, overlay):
    objects = rendered[overlay]
    _, container = stream(objects)
    env = stream_env(objects)
    known = set(env_names(StreamConfig)) | set(env_names(RedisSettings)) | SPARK_ENV
    assert not set(env) - known, f"adrec-stream sets env vars it does not read: {set(env) - known}"
    assert "REDIS_URL" in env and "REDIS_PASSWORD" in env
    plain = {name: value for name, value in env.items() if value != "<ref>"}
    config = load(StreamConfig, env=plain)
    load(RedisSettings, env=plain)
    assert config.source == "redis"
    # One task thread per CPU of the limit; the heap at most half the memory limit, the
    # rest being the JVM's own, RocksDB's and the Python processes'.
    threads = re.fullmatch(r"local\[(\d+)\]", config.master)
    assert threads is not None, config.master
    limits = container["resources"]["limits"]
    assert int(threads.group(1)) == int(limits["cpu"])
    assert 2 * quantity_bytes(config.local_memory) <= quantity_bytes(limits["memory"])
    assert quantity_bytes(container["resources"]["requests"]["memory"]) == quantity_bytes(
        limits["memory"]
    ), "a JVM with a fixed heap: request what it will use"


def test_the_job_image_entrypoint_runs_the_stream_command_as_given(tmp_path):
    env = _fake_tools(tmp_path)
    adrec = tmp_path / "bin" / "adrec"
    adrec.write_text('#!/bin/sh\nprintf "%s\\n" adrec "$@" "$SPARK_SUBMIT_OPTS"\n')
    adrec.chmod(0o755)
    result = subprocess.run(
        ["bash", str(IMAGES / "spark-entrypoint.sh"), *ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    *command, submit_opts = result.stdout.splitlines()
    assert command == ARGS
    # The JVM pyspark starts gets the job's log configuration too.
    assert "-Dlog4j2.configurationFile=file:/opt/adrec/jobs/log4j2.properties" in submit_opts


# ------------------------------------------------------------ the alerts' tests have teeth

STREAM_RULE_TESTS = RULE_TESTS / "stream.yaml"


def _first(separator: str) -> Callable[[str], str]:
    return lambda expr: expr.split(separator)[0]


def _last(separator: str) -> Callable[[str], str]:
    return lambda expr: expr.split(separator)[-1]


BROKEN_RULES: dict[str, tuple[str, Callable[[str], str]]] = {
    "lag without the recent-batch condition": ("AdrecStreamLagHigh", _first("and on")),
    "lag threshold raised": ("AdrecStreamLagHigh", lambda expr: expr.replace("> 30", "> 60")),
    "stalled without the events condition": ("AdrecStreamStalled", _first("and on")),
    "stalled without the batch age": ("AdrecStreamStalled", _last("and on (namespace)")),
    "down without the missing-target branch": ("AdrecStreamDown", _first("\nor\n")),
    "down without the failed-scrape branch": ("AdrecStreamDown", _last("\nor\n")),
}


def promtool_on(groups: list[dict[str, Any]], directory: Any) -> subprocess.CompletedProcess[str]:
    rules = directory / RULES_FILE
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(STREAM_RULE_TESTS, directory / STREAM_RULE_TESTS.name)
    return promtool("test", "rules", STREAM_RULE_TESTS.name, cwd=directory)


@pytest.mark.parametrize("breakage", BROKEN_RULES)
def test_the_stream_alert_tests_fail_on_a_broken_rule(tmp_path, breakage):
    alert, breaks = BROKEN_RULES[breakage]
    groups = rule_groups()
    intact = promtool_on(groups, tmp_path / "intact")
    assert intact.returncode == 0, intact.stdout + intact.stderr
    broken = copy.deepcopy(groups)
    (rule,) = [r for group in broken for r in group["rules"] if r.get("alert") == alert]
    changed = breaks(rule["expr"]).strip()
    assert changed and changed != rule["expr"].strip(), f"{breakage}: nothing changed"
    rule["expr"] = changed + "\n"
    result = promtool_on(broken, tmp_path / "broken")
    assert result.returncode != 0, f"{breakage}: promtool still passes\n{result.stdout}"
