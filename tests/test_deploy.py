"""The deployment under deploy/: images, kustomize overlays, monitoring, checked against the code.

Every overlay is rendered with `kubectl kustomize`; every built-in object validates against
the Kubernetes schemas (strict: unknown fields fail); custom resources (Prometheus Operator,
Spark Operator) are checked structurally. Ports, probes and env var names are compared
with what the code reads (settings classes, default ports), never with copies. The metric
names in the alert rules and the Grafana dashboard are compared with what the real
services export, scraped from their /metrics endpoints after real Recommend calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from grpc_helpers import loopback_channel
from prometheus_client.parser import text_string_to_metric_families
from service_data import PIDS, path, publish_version, recommend, run, service_settings

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core.redis_conn import RedisSettings
from adrec.core.settings import env_names, load
from jobs.config import JobConfig
from services.process import serving
from services.runtime.health import LIVENESS_SERVICE_NAME
from services.runtime.metrics import GRPC_CODE_NAMES
from services.runtime.settings import (
    DEFAULT_GATEWAY_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_RANKING_PORT,
    DEFAULT_RECALL_PORT,
    SETTINGS,
    service_env_names,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGES = DEPLOY / "images"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

#: Oldest Kubernetes the manifests target (native `sleep` preStop hooks), and the newest
#: the validator knows, so a field removed since 1.30 fails as well.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())

OVERLAYS = ("dev", "prod", "prod-spark-operator")
SERVICE_PORTS = {
    "recall": DEFAULT_RECALL_PORT,
    "ranking": DEFAULT_RANKING_PORT,
    "gateway": DEFAULT_GATEWAY_PORT,
}
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScheduledSparkApplication": "sparkoperator.k8s.io/v1beta2",
}
EXPECTED_KINDS = {
    "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
    "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
    "ServiceMonitor", "PrometheusRule",
}
OVERLAY_KINDS = {
    "dev": EXPECTED_KINDS | {"Namespace", "Secret", "CronJob", "Job"},
    "prod": EXPECTED_KINDS | {"CronJob"},
    "prod-spark-operator": EXPECTED_KINDS | {"ScheduledSparkApplication"},
}
#: Secrets created out of band (never in the repository): the prod Redis password and CA.
EXTERNAL_SECRETS = {"dev": set(), "prod": {"adrec-redis"}, "prod-spark-operator": {"adrec-redis"}}

#: Env vars of the job pods that are not adrec settings: the pod's own identity (downward
#: API) and the spark-submit sizing expanded into the CronJob's arguments.
JOB_DEPLOY_ONLY_ENV = {"POD_NAME", "POD_NAMESPACE", "POD_IP", "SUBMIT_IMAGE",
                       "SUBMIT_DRIVER_MEMORY", "SUBMIT_EXECUTOR_INSTANCES",
                       "SUBMIT_EXECUTOR_CORES", "SUBMIT_EXECUTOR_MEMORY",
                       "SUBMIT_EXECUTOR_MEMORY_OVERHEAD"}
JOB_MAIN = "local:///opt/jobs/main.py"

#: Metrics in the rules that no adrec service exports, and who does.
EXTERNAL_METRICS = {
    "up": "Prometheus, per scrape target",
    "kube_cronjob_status_last_successful_time": "kube-state-metrics",
}
#: Labels Prometheus (Operator) puts on every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
JOBS = {f"adrec-{name}": name for name in SERVICE_PORTS}
IMAGE_UID = 10001


# ------------------------------------------------------------------------------ rendering


def kustomize(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/: "
                    "https://kubernetes.io/docs/tasks/tools/", pytrace=False)
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(overlay) for overlay in OVERLAYS}


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


# ------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_the_expected_kinds(rendered, overlay):
    kinds = {obj["kind"] for obj in rendered[overlay]}
    assert kinds == OVERLAY_KINDS[overlay]
    names = [(obj["kind"], obj["metadata"]["name"]) for obj in rendered[overlay]]
    assert len(names) == len(set(names)), "an object is rendered twice"
    namespaces = {obj["metadata"].get("namespace") for obj in rendered[overlay]
                  if obj["kind"] != "Namespace"}
    assert namespaces == {"adrec-dev" if overlay == "dev" else "adrec"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_in_objects_validate_strictly_against_the_kubernetes_schemas(rendered, overlay):
    objects = list(rendered[overlay])
    template = executor_template(rendered[overlay])
    if template is not None:
        objects.append(template)
    validated = 0
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            assert obj["apiVersion"] == CUSTOM_KINDS[obj["kind"]]
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        validated += 1
    assert validated >= 20


def test_the_validator_rejects_unknown_fields(rendered):
    """The schema check is not vacuous: a misspelt field fails it."""
    broken = json.loads(json.dumps(deployment(rendered["prod"], "recall")))
    probe = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["serviceName"] = probe["grpc"].pop("service", "")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# ------------------------------------------------------------------------------ pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_on_a_read_only_root_without_privileges(rendered, overlay):
    specs = list(pod_specs(rendered[overlay]))
    for ssa in of_kind(rendered[overlay], "ScheduledSparkApplication"):
        for role in ("driver", "executor"):
            part = ssa["spec"]["template"][role]
            specs.append((f"ScheduledSparkApplication {role}", {
                "securityContext": part["podSecurityContext"],
                "containers": [{"name": role, "securityContext": part["securityContext"]}],
            }))
    assert len(specs) >= 4
    for where, spec in specs:
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("runAsUser", 0) > 0, where
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container.get("securityContext", {})
            label = f"{where} container {container['name']}"
            assert context.get("allowPrivilegeEscalation") is False, label
            assert context.get("readOnlyRootFilesystem") is True, label
            assert context.get("privileged", False) is False, label
            assert context.get("capabilities", {}).get("drop") == ["ALL"], label


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_adrec_container_has_requests_and_limits_and_a_writable_tmp(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]):
        if where == "executor pod template":
            continue  # Spark sets the executors' resources from spark.executor.*
        for container in spec["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (where, kind)
            if container.get("image", "").startswith("redis:"):
                continue
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: the read-only image needs /tmp mounted"
        if where.startswith("Deployment/adrec-") and "redis" not in where:
            assert spec["serviceAccountName"] == "adrec-services"
            assert spec["automountServiceAccountToken"] is False, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_images_user(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]):
        images = {c.get("image", "adrec") for c in spec["containers"]}
        if any(image.startswith("redis:") for image in images):
            continue
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID, where
        assert spec["securityContext"]["runAsGroup"] == IMAGE_UID, where


# ------------------------------------------------------------------------------ services


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICE_PORTS)
def test_ports_and_grpc_probes_match_the_settings_defaults(rendered, overlay, service):
    objects = rendered[overlay]
    port = SERVICE_PORTS[service]
    spec = deployment(objects, service)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["serve", service]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port, "metrics": DEFAULT_METRICS_PORT}

    env = container_env(container, config_maps(objects))
    assert int(env[f"ADREC_{service.upper()}_PORT"]) == port
    assert int(env.get("ADREC_METRICS_PORT", DEFAULT_METRICS_PORT)) == DEFAULT_METRICS_PORT

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    # Readiness asks for the server's overall status, which follows Redis and the data;
    # liveness for the name that stays SERVING while the process runs, so a Redis outage
    # takes pods out of rotation without restarting them.
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE_NAME

    # Draining must finish inside the grace period, after the preStop pause.
    drain = float(env.get("ADREC_DRAIN_SECONDS", 20))
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pause + drain

    svc = named(objects, "Service", f"adrec-{service}")
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert svc_ports == {"grpc": (port, "grpc"), "metrics": (DEFAULT_METRICS_PORT, "metrics")}
    template_labels = deployment(objects, service)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= template_labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_reaches_recall_and_ranking_through_headless_services(rendered, overlay):
    objects = rendered[overlay]
    gateway = deployment(objects, "gateway")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(gateway, config_maps(objects))
    for service in ("recall", "ranking"):
        svc = named(objects, "Service", f"adrec-{service}")
        assert svc["spec"]["clusterIP"] == "None", f"adrec-{service} must be headless"
        # dns:/// makes gRPC resolve every pod address; round_robin spreads the calls.
        target = env[f"ADREC_{service.upper()}_ADDRESS"]
        assert target == f"dns:///adrec-{service}:{SERVICE_PORTS[service]}"
    assert named(objects, "Service", "adrec-gateway-headless")["spec"]["clusterIP"] == "None"


def test_the_gateway_channel_balances_round_robin():
    """The client side of the headless Services (services/gateway)."""
    from services.gateway.service import downstream_channel

    source = Path(downstream_channel.__code__.co_filename).read_text()
    assert '"round_robin"' in source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_var_is_a_setting_of_the_process_and_loads(rendered, overlay):
    objects = rendered[overlay]
    maps = config_maps(objects)
    for service in SERVICE_PORTS:
        (container,) = deployment(objects, service)["spec"]["template"]["spec"]["containers"]
        env = container_env(container, maps)
        unknown = set(env) - set(service_env_names(service))
        assert not unknown, f"adrec-{service} sets env vars it does not read: {unknown}"
        # The values load as `adrec serve` would load them at start.
        plain = {name: value for name, value in env.items() if value != "<ref>"}
        load(SETTINGS[service], env=plain)
        load(RedisSettings, env=plain)
        assert "REDIS_URL" in env and "REDIS_PASSWORD" in env

    job_settings = set(env_names(JobConfig)) | set(env_names(RedisSettings))
    job_containers = [
        spec["containers"][0] for where, spec in pod_specs(objects)
        if where.startswith(("CronJob/", "Job/"))
    ]
    for ssa in of_kind(objects, "ScheduledSparkApplication"):
        job_containers.append({"name": "ssa-driver", **ssa["spec"]["template"]["driver"]})
    assert job_containers
    for container in job_containers:
        env = container_env(container, maps)
        unknown = set(env) - job_settings - JOB_DEPLOY_ONLY_ENV
        assert not unknown, f"{container['name']} sets env vars it does not read: {unknown}"
        plain = {name: value for name, value in env.items() if value != "<ref>"}
        load(JobConfig, env=plain)
        load(RedisSettings, env=plain)
        # Kubernetes leaves an undefined $(VAR) in the arguments as it is.
        for arg in container.get("args", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                assert var in env, f"{container['name']} argument {arg!r} uses unset ${var}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_settings_per_overlay(rendered, overlay):
    objects = rendered[overlay]
    env = container_env(deployment(objects, "ranking")["spec"]["template"]["spec"]
                        ["containers"][0], config_maps(objects))
    if overlay == "dev":
        assert env["REDIS_URL"].startswith("redis://adrec-redis:6379")
        assert "REDIS_TLS_CA_FILE" not in env
        redis_pod = named(objects, "Deployment", "adrec-redis")["spec"]["template"]["spec"]
        image = redis_pod["containers"][0]["image"]
        assert re.fullmatch(r"redis:\d+\.\d+\.\d+-\w+", image), f"unpinned {image}"
        assert named(objects, "Service", "adrec-redis")
        return
    assert env["REDIS_URL"].startswith("rediss://")
    assert not any(obj["kind"] == "Deployment" and "redis" in obj["metadata"]["name"]
                   for obj in objects), "prod uses an external Redis"
    ca_file = Path(env["REDIS_TLS_CA_FILE"])
    for where, spec in pod_specs(objects):
        if where == "executor pod template":
            continue
        container = spec["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts.get("redis-tls") == str(ca_file.parent), where
        secret = volumes["redis-tls"]["secret"]
        assert secret["secretName"] == "adrec-redis"
        assert {"key": "ca.crt", "path": ca_file.name} in secret["items"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves(rendered, overlay):
    objects = rendered[overlay]
    present = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    external = {("Secret", name) for name in EXTERNAL_SECRETS[overlay]}

    def check(kind: str, name: str, where: str) -> None:
        assert (kind, name) in present | external, f"{where}: no {kind} {name}"

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("configMapRef", "configMapKeyRef"):
                    check("ConfigMap", value["name"], where)
                elif key in ("secretRef", "secretKeyRef"):
                    check("Secret", value["name"], where)
                elif key == "configMap" and isinstance(value, dict) and "name" in value:
                    check("ConfigMap", value["name"], where)
                elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                    check("Secret", value["secretName"], where)
                elif key == "persistentVolumeClaim":
                    check("PersistentVolumeClaim", value["claimName"], where)
                elif key in ("serviceAccountName", "serviceAccount") and isinstance(value, str):
                    check("ServiceAccount", value, where)
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for obj in objects:
        walk(obj.get("spec", {}), f"{obj['kind']}/{obj['metadata']['name']}")
    template = executor_template(objects)
    if template is not None:
        walk(template["spec"], "executor pod template")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_disruption_budgets_target_the_deployments(rendered, overlay):
    objects = rendered[overlay]
    services = {f"adrec-{name}" for name in SERVICE_PORTS}
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas} == services
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        named(objects, "Deployment", target["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        if overlay != "dev":
            assert hpa["spec"]["minReplicas"] >= 2, "one pod per service is not highly available"
        assert "replicas" not in named(objects, "Deployment", target["name"])["spec"], \
            "the autoscaler owns the replica count"
    pdbs = of_kind(objects, "PodDisruptionBudget")
    assert len(pdbs) == 3
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        matching = [d["metadata"]["name"] for d in of_kind(objects, "Deployment")
                    if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matching == [pdb["metadata"]["name"]], pdb["metadata"]["name"]
        assert pdb["spec"]["maxUnavailable"] == 1


def _selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> set[str]:
    """Names of the Deployments whose pods match `selector`."""
    return {d["metadata"]["name"] for d in of_kind(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_gateway_reach_recall_and_ranking(rendered, overlay):
    objects = rendered[overlay]
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    for service in ("recall", "ranking"):
        spec = policies[f"adrec-{service}"]
        assert _selected(objects, spec["podSelector"]["matchLabels"]) == {f"adrec-{service}"}
        assert spec["policyTypes"] == ["Ingress"]
        by_port = {rule["ports"][0]["port"]: rule["from"] for rule in spec["ingress"]}
        assert set(by_port) == {"grpc", "metrics"}
        (grpc_peer,) = by_port["grpc"]
        assert set(grpc_peer) == {"podSelector"}, "gRPC only from pods of this namespace"
        assert _selected(objects, grpc_peer["podSelector"]["matchLabels"]) == {"adrec-gateway"}
        (metrics_peer,) = by_port["metrics"]
        assert set(metrics_peer) == {"namespaceSelector"}
    gateway = policies["adrec-gateway"]
    assert _selected(objects, gateway["podSelector"]["matchLabels"]) == {"adrec-gateway"}
    assert {rule["ports"][0]["port"] for rule in gateway["ingress"]} == {"grpc", "metrics"}

    if overlay != "dev":
        assert "adrec-redis" not in policies
        return
    spec = policies["adrec-redis"]
    assert _selected(objects, spec["podSelector"]["matchLabels"]) == {"adrec-redis"}
    ((rule),) = spec["ingress"]
    ((peer),) = rule["from"]
    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "adrec"}}}
    # ... which every Redis client carries: the services, the job's driver and executors.
    clients = [obj["spec"]["template"]["metadata"]["labels"]
               for obj in of_kind(objects, "Deployment")
               if obj["metadata"]["name"] != "adrec-redis"]
    clients.append(named(objects, "CronJob", "adrec-job")["spec"]["jobTemplate"]["spec"]
                   ["template"]["metadata"]["labels"])
    clients.append(executor_template(objects)["metadata"]["labels"])
    for labels in clients:
        assert labels.get("app.kubernetes.io/part-of") == "adrec", labels


# ------------------------------------------------------------------------------ the job


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_cronjob_runs_spark_submit_in_kubernetes_mode(rendered, overlay):
    objects = rendered[overlay]
    cron = named(objects, "CronJob", "adrec-job")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (driver,) = pod["containers"]
    args = driver["args"]
    assert args[0] == "spark-submit"
    options = dict(zip(args[1::2], args[2::2], strict=False))
    assert options["--master"] == "k8s://https://kubernetes.default.svc"
    assert options["--deploy-mode"] == "client"
    main = args.index(JOB_MAIN)
    confs = dict(conf.split("=", 1) for flag, conf in itertools.pairwise(args[:main])
                 if flag == "--conf")
    assert confs["spark.kubernetes.container.image"] == "$(SUBMIT_IMAGE)"
    image_env = next(var for var in driver["env"] if var["name"] == "SUBMIT_IMAGE")
    assert image_env["value"] == driver["image"], "executors must run the driver's image"
    assert confs["spark.kubernetes.namespace"] == "$(POD_NAMESPACE)"
    assert confs["spark.kubernetes.authenticate.driver.serviceAccountName"] == \
        pod["serviceAccountName"] == "adrec-job"
    assert confs["spark.kubernetes.driver.pod.name"] == "$(POD_NAME)"
    assert confs["spark.driver.host"] == "$(POD_IP)"
    for key in ("spark.executor.instances", "spark.executor.memory", "spark.executor.cores"):
        assert key in confs
    template_path = Path(confs["spark.kubernetes.executor.podTemplateFile"])
    mounts = {m["mountPath"]: m["name"] for m in driver["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    template_volume = volumes[mounts[str(template_path.parent)]]
    template_cm = named(objects, "ConfigMap", template_volume["configMap"]["name"])
    assert template_path.name in template_cm["data"]
    app_args = args[main + 1:]
    assert app_args == ["--data", "$(ADREC_JOB_DATA)", "--redis", "$(REDIS_URL)"]
    if overlay == "prod":
        assert confs["spark.kubernetes.executor.secrets.adrec-redis"] == "/etc/adrec/redis-tls"

    # RBAC: the driver's ServiceAccount may manage its executors.
    binding = named(objects, "RoleBinding", "adrec-job-spark")
    assert {"kind": "ServiceAccount", "name": "adrec-job"} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]]
    role = named(objects, "Role", binding["roleRef"]["name"])
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"]
               for verb in rule["verbs"]}
    for resource in ("pods", "services", "configmaps"):
        for verb in ("create", "get", "list", "watch", "delete"):
            assert (resource, verb) in granted, (resource, verb)


def test_the_spark_operator_variant_replaces_the_cronjob(rendered):
    objects = rendered["prod-spark-operator"]
    assert not of_kind(objects, "CronJob")
    ssa = named(objects, "ScheduledSparkApplication", "adrec-job")
    spec = ssa["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["schedule"] == named(rendered["prod"], "CronJob", "adrec-job")["spec"]["schedule"]
    template = spec["template"]
    for field in ("type", "sparkVersion", "mainApplicationFile", "driver", "executor"):
        assert field in template, f"required by the SparkApplication CRD: {field}"
    assert template["type"] == "Python" and template["mode"] == "cluster"
    assert template["mainApplicationFile"] == JOB_MAIN
    job_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["job"]
    assert f"pyspark=={template['sparkVersion']}" in job_extra, "the image's Spark version"
    prod_job_image = named(rendered["prod"], "CronJob", "adrec-job")["spec"]["jobTemplate"][
        "spec"]["template"]["spec"]["containers"][0]["image"]
    assert template["image"] == prod_job_image
    assert template["driver"]["serviceAccount"] == "adrec-job"
    assert template["executor"]["instances"] >= 1


# ------------------------------------------------------------------------------ monitoring


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_scrape_each_services_metrics_port_once(rendered, overlay):
    objects = rendered[overlay]
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {f"adrec-{s}" for s in SERVICE_PORTS}
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        scraped = [svc for svc in of_kind(objects, "Service")
                   if selector.items() <= svc["metadata"]["labels"].items()
                   and endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}]
        # The target's job label is the Service name, which the rules select on.
        assert [svc["metadata"]["name"] for svc in scraped] == [monitor["metadata"]["name"]]
        (port,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert port["port"] == DEFAULT_METRICS_PORT


def rule_groups() -> list[dict[str, Any]]:
    rule = yaml.safe_load((DEPLOY / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == CUSTOM_KINDS["PrometheusRule"] and rule["kind"] == "PrometheusRule"
    return rule["spec"]["groups"]


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())


def dashboard_queries() -> list[str]:
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            queries.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard()["panels"])
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            # Grafana's label_values(<selector>, <label>): the selector is PromQL.
            selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)",
                                           query["query"]).groups()
            assert label in TARGET_LABELS, f"variable {variable['name']}: label {label}"
            queries.append(selector)
    return queries


def test_alert_rules_are_well_formed_and_have_runbooks():
    docs = OPERATIONS_DOC.read_text().lower()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) >= 8
    wanted = {"AdrecGrpcErrorRatioHigh", "AdrecLatencyP99High", "AdrecFallbackRateHigh",
              "AdrecDataVersionStale", "AdrecRedisUnreachable"}
    assert wanted <= set(names)
    for rule in alerts():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        assert rule["expr"].strip()
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {anchor}" in docs, f"docs/operations.md has no runbook for {rule['alert']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_ships_as_a_grafana_sidecar_configmap(rendered, overlay):
    (cm,) = [cm for cm in of_kind(rendered[overlay], "ConfigMap")
             if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    (content,) = cm["data"].values()
    assert json.loads(content) == dashboard()
    assert dashboard()["uid"] and dashboard()["panels"]


# PromQL, just enough to find metric names and label matchers.
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                    "or", "unless", "bool", "offset"}
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def promql_selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of every vector selector in `expr`."""
    found = [(name, _MATCHER.findall(body))
             for name, body in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr)]
    bare = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        word, rest = match.group(), bare[match.end():].lstrip()
        if rest.startswith("(") or word in _PROMQL_KEYWORDS:
            continue  # a function, an aggregation or an operator
        if word not in {name for name, _ in found}:
            found.append((word, []))
    return found


def test_promql_parsing_finds_names_and_matchers():
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{job=~"x|y", '
            'c!="d"}[5m]))) / on (job) group_left b_total > 0.5 and time() - c_info')
    assert promql_selectors(expr) == [
        ("a_seconds_bucket", [("job", "=~", "x|y"), ("c", "!=", "d")]),
        ("b_total", []), ("c_info", []),
    ]


def known_label_values() -> dict[str, set[str]]:
    """Values the services can put on the labels the rules and dashboard filter on."""

    def enum(name: str, prefix: str) -> set[str]:
        values = getattr(gateway_pb2, name).keys()
        return {v.removeprefix(prefix).lower() for v in values if not v.endswith("UNSPECIFIED")}

    return {
        "reason": enum("DegradationReason", "DEGRADATION_REASON_"),
        "path": enum("ServingPath", "SERVING_PATH_"),
        "mode": enum("RecommendMode", "RECOMMEND_MODE_"),
        "grpc_code": set(GRPC_CODE_NAMES.values()),
        "job": set(JOBS),
    }


def regex_expansions(regex: str) -> list[str]:
    """Every branch of a regex's alternations: `(a|b)_x|c` -> ["a_x", "b_x", "c"]."""
    group = re.search(r"\(([^()]*)\)", regex)
    if group is not None:
        return [expansion for option in group.group(1).split("|")
                for expansion in regex_expansions(
                    regex[:group.start()] + option + regex[group.end():])]
    return regex.split("|")


def matcher_values_are_known(op: str, value: str, known: set[str]) -> bool:
    """A literal names a known value; every branch of a regex matches one."""
    if op in ("=", "!="):
        return value in known
    return all(any(re.fullmatch(branch, candidate) for candidate in known)
               for branch in regex_expansions(value))


def test_label_value_checks_catch_typos():
    known = {"recall_unavailable", "ranking_deadline_exceeded", "no_recall_set"}
    assert matcher_values_are_known("=~", "(recall|ranking)_.*", known)
    assert matcher_values_are_known("!~", "no_recall_set|recall_unavailable", known)
    assert not matcher_values_are_known("!~", "no_recall_set|recal_unavailable", known)
    assert not matcher_values_are_known("=~", "(recal|ranking)_.*", known)
    assert not matcher_values_are_known("=", "no_recall_sets", known)


# ------------------------------------------------------------------------------ live metrics


def scrape(port: int) -> dict[str, set[str] | None]:
    """Sample name -> label names (None: declared, no sample yet) of one /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    exported: dict[str, set[str] | None] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count")}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            exported.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = exported.get(sample.name) or set()
            exported[sample.name] = labels | set(sample.labels)
    return exported


@pytest.fixture(scope="module")
def exported_metrics(redis_server) -> Iterator[dict[str, dict[str, set[str] | None]]]:
    """What each of the three services, run as in the Deployments, exports after traffic."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    data = publish_version(client, users=30, ads=1000, categories=20)
    client.close()
    redis_settings = RedisSettings(url=redis_server.url)
    scraped: dict[str, dict[str, set[str] | None]] = {}

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stacks:
            recall = await stacks.enter_async_context(
                serving("recall", service_settings("recall"), redis_settings))
            ranking = await stacks.enter_async_context(
                serving("ranking", service_settings("ranking"), redis_settings))
            gateway = await stacks.enter_async_context(serving("gateway", service_settings(
                "gateway",
                ADREC_RECALL_ADDRESS=f"127.0.0.1:{recall.services['recall'].port}",
                ADREC_RANKING_ADDRESS=f"127.0.0.1:{ranking.services['ranking'].port}",
            ), redis_settings))
            async with loopback_channel(gateway.services["gateway"].port) as channel:
                ranked = await recommend(channel, user_id=data.users_with_factors[0],
                                         pid=PIDS[0], count=10)
                assert path(ranked) == "REALTIME_RANKED"
                # A user without a recall set: the popular fallback, counted by reason.
                popular = await recommend(channel, user_id=data.users_without_recall[0],
                                          pid=PIDS[1], count=10)
                assert path(popular) == "POPULAR"
            for name, stack in (("recall", recall), ("ranking", ranking),
                                ("gateway", gateway)):
                scraped[name] = await asyncio.to_thread(scrape, stack.metrics_port)

    run(scenario, timeout=60)
    yield scraped
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()


def test_services_export_the_standard_grpc_metrics(exported_metrics):
    for service, metrics in exported_metrics.items():
        for name in ("grpc_server_started_total", "grpc_server_handled_total",
                     "grpc_server_handling_seconds_bucket"):
            assert name in metrics, (service, name)
        assert {"grpc_type", "grpc_service", "grpc_method", "grpc_code"} <= \
            metrics["grpc_server_handled_total"]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_in_the_alerts_and_dashboard_is_exported(exported_metrics, source):
    queries = ([rule["expr"] for rule in alerts()] if source == "alerts"
               else dashboard_queries())
    known_values = known_label_values()
    checked = set()
    for expr in queries:
        for metric, matchers in promql_selectors(expr):
            if metric in EXTERNAL_METRICS:
                continue
            job_matchers = [(op, value) for label, op, value in matchers if label == "job"]
            services = {
                service for job, service in JOBS.items()
                if all((re.fullmatch(value, job) is not None) == (op in ("=", "=~"))
                       for op, value in job_matchers)
            }
            assert services, f"{metric}: its job matchers select no adrec service\n{expr}"
            exporters = {s for s in services if metric in exported_metrics[s]}
            assert exporters, (
                f"{metric} (in the {source}) is exported by none of {sorted(services)}\n{expr}")
            labels = set().union(*(exported_metrics[s][metric] or set() for s in exporters))
            for label, op, value in matchers:
                if labels:
                    assert label in labels | TARGET_LABELS, f"{metric} has no label {label}"
                if label in known_values:
                    assert matcher_values_are_known(op, value, known_values[label]), \
                        f"{metric}{{{label}}}: {value!r} matches no value the services emit"
            checked.add(metric)
    assert len(checked) >= (8 if source == "alerts" else 12), checked


# ------------------------------------------------------------------------------ images


def dockerfile_stages(name: str) -> list[dict[str, Any]]:
    """Each stage of a Dockerfile: its FROM image, alias and instructions (continuations joined)."""
    text = (IMAGES / name).read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            parts = rest.split()
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"image": parts[0], "alias": alias, "steps": []})
        else:
            stages[-1]["steps"].append((instruction.upper(), rest))
    return stages


def dockerignore_admits(path: str) -> bool:
    """Whether the build context keeps `path`: the last .dockerignore pattern matching it
    or one of its parent folders decides, `!` re-including."""
    kept = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            kept = negate
    return kept


@pytest.mark.parametrize("name", ["services.Dockerfile", "job.Dockerfile"])
def test_dockerfiles_pin_their_bases_and_run_as_non_root(name):
    stages = dockerfile_stages(name)
    aliases = {stage["alias"] for stage in stages}
    for stage in stages:
        image = stage["image"]
        assert image not in aliases
        assert re.search(r":\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$", image), \
            f"{name}: {image} is not pinned to an exact version"
    final = stages[-1]
    users = [rest for instruction, rest in final["steps"] if instruction == "USER"]
    assert users, f"{name}: the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid == gid == str(IMAGE_UID), "numeric, so Kubernetes can check runAsNonRoot"
    python_tag = re.search(r"python:(\d+\.\d+)\.", final["image"]).group(1)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={python_tag}"


@pytest.mark.parametrize("name", ["services.Dockerfile", "job.Dockerfile"])
def test_dockerfiles_copy_only_files_that_exist_and_reach_the_context(name):
    copied = 0
    for stage in dockerfile_stages(name):
        for instruction, rest in stage["steps"]:
            if instruction not in ("COPY", "ADD"):
                continue
            args = [arg for arg in rest.split() if not arg.startswith("--")]
            if "--from=" in rest:
                continue
            for source in args[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file"
                assert dockerignore_admits(source), f"{name}: .dockerignore drops {source}"
                copied += 1
    assert copied >= 4
    for dropped in (".venv", ".git", "node_modules", "tests/conftest.py", "deploy/base"):
        assert not dockerignore_admits(dropped), f"{dropped} would enter the build context"


def test_the_services_image_has_no_java_or_spark():
    stages = dockerfile_stages("services.Dockerfile")
    text = json.dumps(stages).lower()
    for word in ("pyspark", "java", "jdk", "jre", "temurin", "spark-submit", "[job]"):
        assert word not in text, f"services image mentions {word}"
    installs = [rest for instruction, rest in stages[-1]["steps"]
                if instruction == "RUN" and "install" in rest]
    assert any(re.search(r"--find-links /wheels adrec(\s|$)", rest) for rest in installs)


def test_the_job_image_has_java_17_spark_and_the_entry_point():
    stages = dockerfile_stages("job.Dockerfile")
    assert any(re.match(r"eclipse-temurin:17\.", stage["image"]) for stage in stages)
    steps = stages[-1]["steps"]
    text = " ".join(rest for _, rest in steps)
    assert "'adrec[job]'" in text
    env = " ".join(rest for instruction, rest in steps if instruction == "ENV")
    python_tag = re.search(r"python:(\d+\.\d+)\.", stages[-1]["image"]).group(1)
    assert f"SPARK_HOME=/opt/venv/lib/python{python_tag}/site-packages/pyspark" in env
    copies = [rest.split() for instruction, rest in steps if instruction == "COPY"]
    assert ["jobs/main.py", JOB_MAIN.removeprefix("local://")] in copies
    (entrypoint,) = [json.loads(rest) for instruction, rest in steps if instruction == "ENTRYPOINT"]
    assert any(copy[-1] == entrypoint[0] and copy[-2] == "deploy/images/spark-entrypoint.sh"
               for copy in copies)


def _fake_tools(tmp_path: Path) -> dict[str, str]:
    """tini, java and spark-submit stand-ins that print the command they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tini").write_text(
        '#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    for tool in ("java", "spark-submit"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" {tool} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    spark_home = tmp_path / "spark"
    (spark_home / "bin").mkdir(parents=True)
    os.symlink(bin_dir / "spark-submit", spark_home / "bin" / "spark-submit")
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "SPARK_HOME": str(spark_home),
            "JAVA_HOME": str(tmp_path)}


def test_the_job_entrypoint_starts_executors_drivers_and_commands(tmp_path):
    """deploy/images/spark-entrypoint.sh against Spark's executor pod contract."""
    env = _fake_tools(tmp_path)
    entrypoint = str(IMAGES / "spark-entrypoint.sh")

    def run_entrypoint(*args: str, **extra: str) -> list[str]:
        result = subprocess.run(["bash", entrypoint, *args], env={**env, **extra},
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    executor = run_entrypoint(
        "executor", SPARK_EXECUTOR_MEMORY="3g", SPARK_DRIVER_URL="spark://driver:7078",
        SPARK_EXECUTOR_ID="4", SPARK_EXECUTOR_CORES="2", SPARK_APPLICATION_ID="spark-1",
        SPARK_EXECUTOR_POD_IP="10.0.0.9", SPARK_RESOURCE_PROFILE_ID="0",
        SPARK_EXECUTOR_POD_NAME="adrec-job-exec-4", SPARK_JAVA_OPT_0="-Dx=1",
        SPARK_JAVA_OPT_1="--add-opens=java.base/java.lang=ALL-UNNAMED",
    )
    assert executor[0] == "java"
    assert executor[1:5] == ["-Dx=1", "--add-opens=java.base/java.lang=ALL-UNNAMED",
                             "-Xms3g", "-Xmx3g"]
    classpath = executor[executor.index("-cp") + 1]
    assert f"{env['SPARK_HOME']}/jars/*" in classpath.split(":")
    main = executor.index("org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend")
    flags = dict(zip(executor[main + 1::2], executor[main + 2::2], strict=True))
    assert flags == {"--driver-url": "spark://driver:7078", "--executor-id": "4",
                     "--cores": "2", "--app-id": "spark-1", "--hostname": "10.0.0.9",
                     "--resourceProfileId": "0", "--podName": "adrec-job-exec-4"}

    driver = run_entrypoint("driver", "--properties-file", "/opt/spark/conf/spark.properties",
                            JOB_MAIN, SPARK_DRIVER_BIND_ADDRESS="10.0.0.5")
    assert driver[0] == "spark-submit"
    assert driver[1:7] == ["--conf", "spark.driver.bindAddress=10.0.0.5", "--conf",
                           "spark.executorEnv.SPARK_DRIVER_POD_IP=10.0.0.5",
                           "--deploy-mode", "client"]
    assert driver[-1] == JOB_MAIN

    assert run_entrypoint("spark-submit", "--version") == ["spark-submit", "--version"]
