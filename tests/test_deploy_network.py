"""Networking of every overlay: headless Services for client-side balancing, and
NetworkPolicies that let only the gateway reach recall and ranking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    OVERLAYS,
    SERVICE_PORTS,
    config_maps,
    container_env,
    deployment,
    executor_template,
    named,
    of_kind,
)


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


def _selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> set[str]:
    """Names of the Deployments whose pods match `selector`."""
    return {
        d["metadata"]["name"]
        for d in of_kind(objects, "Deployment")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    }


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
    clients = [
        obj["spec"]["template"]["metadata"]["labels"]
        for obj in of_kind(objects, "Deployment")
        if obj["metadata"]["name"] != "adrec-redis"
    ]
    clients.append(
        named(objects, "CronJob", "adrec-job")["spec"]["jobTemplate"]["spec"]["template"][
            "metadata"
        ]["labels"]
    )
    clients.append(executor_template(objects)["metadata"]["labels"])
    for labels in clients:
        assert labels.get("app.kubernetes.io/part-of") == "adrec", labels
