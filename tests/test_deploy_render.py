"""Every overlay under deploy/overlays renders, validates and holds together.

Built-in objects validate against the Kubernetes schemas (strict: unknown fields fail);
custom resources (Prometheus Operator, Spark Operator) are checked structurally; every
ConfigMap, Secret, volume claim and ServiceAccount an object names exists.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from deploy_helpers import CUSTOM_KINDS, OVERLAYS, deployment, executor_template

#: Oldest Kubernetes the manifests target (native `sleep` preStop hooks), and the newest
#: the validator knows, so a field removed since 1.30 fails as well.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())

EXPECTED_KINDS = {
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "PersistentVolumeClaim",
    "ServiceMonitor",
    "PrometheusRule",
}
OVERLAY_KINDS = {
    "dev": EXPECTED_KINDS | {"Namespace", "Secret", "CronJob", "Job"},
    "prod": EXPECTED_KINDS | {"CronJob"},
    "prod-spark-operator": EXPECTED_KINDS | {"ScheduledSparkApplication"},
}
#: Secrets created out of band (never in the repository): the prod Redis password and CA,
#: and the batch job's Spark secret.
PROD_SECRETS = {"adrec-redis", "adrec-spark-auth"}
EXTERNAL_SECRETS = {"dev": set(), "prod": PROD_SECRETS, "prod-spark-operator": PROD_SECRETS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_the_expected_kinds(rendered, overlay):
    kinds = {obj["kind"] for obj in rendered[overlay]}
    assert kinds == OVERLAY_KINDS[overlay]
    names = [(obj["kind"], obj["metadata"]["name"]) for obj in rendered[overlay]]
    assert len(names) == len(set(names)), "an object is rendered twice"
    namespaces = {
        obj["metadata"].get("namespace") for obj in rendered[overlay] if obj["kind"] != "Namespace"
    }
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
