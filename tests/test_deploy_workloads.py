"""The Deployments and job pods of every overlay, checked against the code.

Security contexts, resources, ports and gRPC probes, autoscalers and disruption budgets;
ports, probes and env var names are compared with what the code reads (settings classes,
default ports), never with copies.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_helpers import (
    FIXED_REPLICAS,
    IMAGE_UID,
    OVERLAYS,
    SERVICE_PORTS,
    config_maps,
    container_env,
    deployment,
    named,
    of_kind,
    pod_specs,
)

from adrec.core.redis_conn import RedisSettings
from adrec.core.settings import env_names, load
from jobs.config import JobConfig
from services.runtime.health import LIVENESS_SERVICE_NAME
from services.runtime.settings import DEFAULT_METRICS_PORT, SETTINGS, service_env_names

#: Env vars of the job pods that are not adrec settings: the pod's own identity (downward
#: API) and the spark-submit sizing expanded into the CronJob's arguments.
JOB_DEPLOY_ONLY_ENV = {
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_IP",
    "SUBMIT_IMAGE",
    "SUBMIT_DRIVER_MEMORY",
    "SUBMIT_EXECUTOR_INSTANCES",
    "SUBMIT_EXECUTOR_CORES",
    "SUBMIT_EXECUTOR_MEMORY",
    "SUBMIT_EXECUTOR_MEMORY_OVERHEAD",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_on_a_read_only_root_without_privileges(rendered, overlay):
    specs = list(pod_specs(rendered[overlay]))
    for ssa in of_kind(rendered[overlay], "ScheduledSparkApplication"):
        for role in ("driver", "executor"):
            part = ssa["spec"]["template"][role]
            specs.append(
                (
                    f"ScheduledSparkApplication {role}",
                    {
                        "securityContext": part["podSecurityContext"],
                        "containers": [{"name": role, "securityContext": part["securityContext"]}],
                    },
                )
            )
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
        spec["containers"][0]
        for where, spec in pod_specs(objects)
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
    env = container_env(
        deployment(objects, "ranking")["spec"]["template"]["spec"]["containers"][0],
        config_maps(objects),
    )
    if overlay == "dev":
        assert env["REDIS_URL"].startswith("redis://adrec-redis:6379")
        assert "REDIS_TLS_CA_FILE" not in env
        redis_pod = named(objects, "Deployment", "adrec-redis")["spec"]["template"]["spec"]
        image = redis_pod["containers"][0]["image"]
        assert re.fullmatch(r"redis:\d+\.\d+\.\d+-\w+", image), f"unpinned {image}"
        assert named(objects, "Service", "adrec-redis")
        return
    assert env["REDIS_URL"].startswith("rediss://")
    assert not any(
        obj["kind"] == "Deployment" and "redis" in obj["metadata"]["name"] for obj in objects
    ), "prod uses an external Redis"
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
def test_autoscalers_and_disruption_budgets_target_the_deployments(rendered, overlay):
    objects = rendered[overlay]
    services = {f"adrec-{name}" for name in SERVICE_PORTS if name not in FIXED_REPLICAS}
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas} == services
    for name in FIXED_REPLICAS:
        replicas = deployment(objects, name)["spec"]["replicas"]
        if overlay == "dev":
            assert replicas == 1, f"adrec-{name}: one replica in dev, as for every service"
        else:
            assert replicas >= 2, f"adrec-{name}: one pod is not highly available"
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        named(objects, "Deployment", target["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        if overlay != "dev":
            assert hpa["spec"]["minReplicas"] >= 2, "one pod per service is not highly available"
        assert "replicas" not in named(objects, "Deployment", target["name"])["spec"], (
            "the autoscaler owns the replica count"
        )
    pdbs = of_kind(objects, "PodDisruptionBudget")
    assert len(pdbs) == len(SERVICE_PORTS)
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        matching = [
            d["metadata"]["name"]
            for d in of_kind(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matching == [pdb["metadata"]["name"]], pdb["metadata"]["name"]
        assert pdb["spec"]["maxUnavailable"] == 1
