"""Rendering deploy/ with `kubectl kustomize`, and finding objects, pods and env in the result;
the alert rules of the PrometheusRule.

Shared by the test_deploy_* modules; the `rendered` fixture (conftest.py) renders each
overlay once per session.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.stream.config import StreamConfig
from services.runtime.settings import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_EVENTS_PORT,
    DEFAULT_GATEWAY_PORT,
    DEFAULT_RANKING_PORT,
    DEFAULT_RECALL_PORT,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_RULE = DEPLOY / "monitoring" / "prometheusrule.yaml"

OVERLAYS = ("dev", "prod", "prod-spark-operator")
SERVICE_PORTS = {
    "recall": DEFAULT_RECALL_PORT,
    "ranking": DEFAULT_RANKING_PORT,
    "gateway": DEFAULT_GATEWAY_PORT,
    "events": DEFAULT_EVENTS_PORT,
    "admin": DEFAULT_ADMIN_PORT,
}
#: Services with a fixed replica count instead of a HorizontalPodAutoscaler: operator
#: traffic, a few calls at a time, gives CPU nothing to scale on.
FIXED_REPLICAS = {"admin"}
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScheduledSparkApplication": "sparkoperator.k8s.io/v1beta2",
}

JOB_MAIN = "local:///opt/adrec/jobs/main.py"
IMAGE_UID = 10001

#: The stream job's /metrics port: the default of ADREC_STREAM_METRICS_PORT.
STREAM_METRICS_PORT: int = next(
    field.default for field in dataclasses.fields(StreamConfig) if field.name == "metrics_port"
)


def kustomize(overlay: str) -> list[dict[str, Any]]:
    return kustomize_dir(DEPLOY / "overlays" / overlay)


def kustomize_dir(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from the kustomization in `directory`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl (with its built-in kustomize) is needed to render deploy/: "
            "https://kubernetes.io/docs/tasks/tools/",
            pytrace=False,
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rule_groups() -> list[dict[str, Any]]:
    """The rule groups of the PrometheusRule, as a plain Prometheus rule file holds them."""
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == CUSTOM_KINDS["PrometheusRule"] and rule["kind"] == "PrometheusRule"
    return rule["spec"]["groups"]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def deployment(objects: list[dict[str, Any]], service: str) -> dict[str, Any]:
    return named(objects, "Deployment", f"adrec-{service}")


def config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {cm["metadata"]["name"]: cm.get("data", {}) for cm in of_kind(objects, "ConfigMap")}


def executor_template(objects: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Spark executor pod template the CronJob mounts, parsed from its ConfigMap."""
    for cm in of_kind(objects, "ConfigMap"):
        if "executor-pod-template.yaml" in cm.get("data", {}):
            return yaml.safe_load(cm["data"]["executor-pod-template.yaml"])
    return None


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the overlay creates, executors included."""
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield where, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    template = executor_template(objects)
    if template is not None:
        yield "executor pod template", template["spec"]


def container_env(container: dict[str, Any], maps: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it; Secret and field refs as '<ref>'."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"{container['name']}: only ConfigMaps may feed envFrom"
        env.update(maps[ref["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<ref>")
    return env
