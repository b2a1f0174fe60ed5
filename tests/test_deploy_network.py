"""Networking of every overlay: headless Services for client-side balancing, and
NetworkPolicies that deny everything but the flows adrec needs; the job's RBAC.

The policy checks read the rendered overlays the way the API server evaluates policies:
a pod is governed in a direction by every policy whose podSelector matches its labels and
whose policyTypes name that direction, and a connection passes when any of their rules
admits it. Each check is a function of the rendered objects, so that
`test_each_check_fails_on_a_broken_overlay` can show it fails once the overlay is broken.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
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
from test_deploy_render import K8S_VERSIONS

from services.runtime.settings import DEFAULT_METRICS_PORT

Objects = list[dict[str, Any]]

#: The label an operator puts on the namespaces whose pods may call the gateway.
GATEWAY_CLIENT_LABEL = "adrec-gateway-client"
GATEWAY_CLIENTS = {"namespaceSelector": {"matchLabels": {GATEWAY_CLIENT_LABEL: "true"}}}
#: The label an operator puts on the namespaces whose pods may call the admin service.
ADMIN_CLIENT_LABEL = "adrec-admin-client"
ADMIN_CLIENTS = {"namespaceSelector": {"matchLabels": {ADMIN_CLIENT_LABEL: "true"}}}
#: Prometheus as the Prometheus Operator labels its pods, in the `monitoring` namespace.
SCRAPER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
CLUSTER_DNS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
#: Where the API server's endpoints listen (kubeadm-style clusters, managed clusters).
KUBE_API_PORTS = {443, 6443}
JOB_COMPONENTS = {"job-driver", "job-executor"}

#: What the Spark driver does through the API: its executor pods and their conf ConfigMap.
JOB_RESOURCES = {"pods", "configmaps"}
JOB_VERBS = {"get", "list", "watch", "create", "delete", "deletecollection"}
#: Spark settings that keep the driver from calling the API for what the Role leaves out.
JOB_SPARK_CONF = {
    "spark.kubernetes.driver.service.deleteOnTermination": "false",
    "spark.kubernetes.driver.ownPersistentVolumeClaim": "false",
}


# --- reading the rendered objects -------------------------------------------------------


def pod_templates(objects: Objects) -> Iterator[tuple[str, dict[str, str], dict[str, Any]]]:
    """(where, labels, pod spec or {}) of every pod the overlay makes, Spark's included."""
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            template = obj["spec"]["template"]
            yield where, template["metadata"].get("labels", {}), template["spec"]
        elif obj["kind"] == "CronJob":
            template = obj["spec"]["jobTemplate"]["spec"]["template"]
            yield where, template["metadata"].get("labels", {}), template["spec"]
        elif obj["kind"] == "ScheduledSparkApplication":
            for role in ("driver", "executor"):
                yield f"{where} {role}", obj["spec"]["template"][role].get("labels", {}), {}
    template = executor_template(objects)
    if template is not None:
        yield "executor pod template", template["metadata"].get("labels", {}), template["spec"]


def workload_pods(objects: Objects) -> dict[str, dict[str, str]]:
    """Labels of the long-lived and scheduled pods: Deployments, the job's driver and
    executors. (The dev overlay's one-off data Job needs no network at all.)"""
    return {
        where: labels for where, labels, _ in pod_templates(objects) if not where.startswith("Job/")
    }


def job_pods(objects: Objects) -> dict[str, dict[str, str]]:
    pods = {
        where: labels
        for where, labels, _ in pod_templates(objects)
        if labels.get("app.kubernetes.io/component") in JOB_COMPONENTS
    }
    assert {labels["app.kubernetes.io/component"] for labels in pods.values()} == JOB_COMPONENTS
    return pods


def service_pods(objects: Objects, service: str) -> tuple[dict[str, str], dict[str, Any]]:
    template = deployment(objects, service)["spec"]["template"]
    return template["metadata"]["labels"], template["spec"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector applied to `labels` ({} selects everything)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In":
            held = key in labels and labels[key] in expression["values"]
        elif operator == "NotIn":
            held = labels.get(key) not in expression["values"]
        else:
            held = (key in labels) == (operator == "Exists")
        if not held:
            return False
    return True


def policies(objects: Objects) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}


def policy_types(spec: dict[str, Any]) -> list[str]:
    """policyTypes as the API server defaults it."""
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def is_default_deny(spec: dict[str, Any]) -> bool:
    return spec["podSelector"] == {}


def governing(objects: Objects, labels: dict[str, str], direction: str) -> list[str]:
    """Policies other than the default-deny that govern these pods in `direction`."""
    return [
        name
        for name, spec in policies(objects).items()
        if not is_default_deny(spec)
        and direction in policy_types(spec)
        and matches(spec["podSelector"], labels)
    ]


def rules(objects: Objects, labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    """Every rule that admits traffic of these pods in `direction` ("Ingress"/"Egress")."""
    key = direction.lower()
    return [
        rule
        for name, spec in policies(objects).items()
        if direction in policy_types(spec) and matches(spec["podSelector"], labels)
        for rule in spec.get(key, [])
    ]


def peers(rule: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    return rule.get("from" if direction == "Ingress" else "to") or []


def local_pods(objects: Objects, peer: dict[str, Any]) -> set[str]:
    """The overlay's pods a peer of this namespace (a bare podSelector) admits."""
    assert set(peer) == {"podSelector"}, f"not a peer of this namespace only: {peer}"
    return {
        where for where, labels, _ in pod_templates(objects) if matches(peer["podSelector"], labels)
    }


def container_port(pod_spec: dict[str, Any], port: int | str) -> int:
    """A rule's port on the pods it admits traffic to: named ports by the containers."""
    if isinstance(port, int):
        return port
    found = [
        p["containerPort"]
        for c in pod_spec["containers"]
        for p in c.get("ports", [])
        if p.get("name") == port
    ]
    assert len(found) == 1, f"named port {port!r} is not one container port: {found}"
    return found[0]


def redis_port(objects: Objects) -> int:
    """The port of REDIS_URL, as every Redis client of the overlay gets it."""
    gateway = deployment(objects, "gateway")["spec"]["template"]["spec"]["containers"][0]
    url = container_env(gateway, config_maps(objects))["REDIS_URL"]
    return urlsplit(url).port or 6379


# --- the checks ----------------------------------------------------------------------------


def check_default_deny(objects: Objects) -> None:
    denials = [spec for spec in policies(objects).values() if is_default_deny(spec)]
    assert len(denials) == 1, "one policy selects every pod of the namespace"
    (spec,) = denials
    assert set(policy_types(spec)) == {"Ingress", "Egress"}, "it denies both directions"
    assert not spec.get("ingress") and not spec.get("egress"), "and allows nothing itself"


def check_every_workload_has_its_own_policies(objects: Objects) -> None:
    pods = workload_pods(objects)
    components = {labels.get("app.kubernetes.io/component") for labels in pods.values()}
    assert {*SERVICE_PORTS, "stream", *JOB_COMPONENTS} <= components
    for where, labels in pods.items():
        for direction in ("Ingress", "Egress"):
            assert governing(objects, labels, direction), (
                f"{where}: no policy but the default-deny states its {direction.lower()}"
            )


def check_gateway_ingress(objects: Objects, service: str = "gateway") -> None:
    """The gateway, and the event intake, admit the labelled ad-server namespaces and the
    scraper, each on its own port only."""
    labels, pod_spec = service_pods(objects, service)
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in rules(objects, labels, "Ingress"):
        sources = peers(rule, "Ingress")
        assert sources, f"a {service} rule without `from` admits every source: {rule}"
        assert rule.get("ports"), f"a {service} rule without ports opens every port: {rule}"
        for peer in sources:
            assert "ipBlock" not in peer, f"addresses instead of labelled callers: {peer}"
            for selector in ("namespaceSelector", "podSelector"):
                if selector in peer:
                    assert peer[selector], f"an empty {selector} admits all of them: {peer}"
        for port in rule["ports"]:
            by_port.setdefault(container_port(pod_spec, port["port"]), []).extend(sources)
    assert by_port == {
        SERVICE_PORTS[service]: [GATEWAY_CLIENTS],
        DEFAULT_METRICS_PORT: [SCRAPER],
    }, f"adrec-{service}"


def check_events_ingress(objects: Objects) -> None:
    check_gateway_ingress(objects, "events")


def check_admin_ingress(objects: Objects) -> None:
    """The admin service admits the operators' labelled namespaces on its gRPC port and the
    scraper on the metrics port; no peer that lets the ad servers reach the gateway."""
    labels, pod_spec = service_pods(objects, "admin")
    gateway_labels, gateway_spec = service_pods(objects, "gateway")
    gateway_callers = [
        peer
        for rule in rules(objects, gateway_labels, "Ingress")
        for port in rule.get("ports", [])
        if container_port(gateway_spec, port["port"]) == SERVICE_PORTS["gateway"]
        for peer in peers(rule, "Ingress")
    ]
    assert gateway_callers, "adrec-gateway admits no caller to compare with"
    # A namespace of ad servers, labelled as the gateway's policy asks and nothing more.
    ad_servers = {"kubernetes.io/metadata.name": "ad-server", GATEWAY_CLIENT_LABEL: "true"}
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in rules(objects, labels, "Ingress"):
        sources = peers(rule, "Ingress")
        assert sources, f"an adrec-admin rule without `from` admits every source: {rule}"
        assert rule.get("ports"), f"an adrec-admin rule without ports opens every port: {rule}"
        for peer in sources:
            assert "ipBlock" not in peer, f"addresses instead of labelled callers: {peer}"
            assert peer.get("namespaceSelector"), f"adrec-admin admits pods by label only: {peer}"
            assert peer not in gateway_callers, f"adrec-admin admits the gateway's callers: {peer}"
            assert not matches(peer["namespaceSelector"], ad_servers), (
                f"adrec-admin admits the ad servers' namespaces: {peer}"
            )
        for port in rule["ports"]:
            by_port.setdefault(container_port(pod_spec, port["port"]), []).extend(sources)
    assert by_port == {
        SERVICE_PORTS["admin"]: [ADMIN_CLIENTS],
        DEFAULT_METRICS_PORT: [SCRAPER],
    }, "adrec-admin"


def check_backends_admit_only_the_gateway_and_the_scraper(objects: Objects) -> None:
    gateway = {"Deployment/adrec-gateway"}
    for service in ("recall", "ranking"):
        labels, pod_spec = service_pods(objects, service)
        by_port: dict[int, list[Any]] = {}
        for rule in rules(objects, labels, "Ingress"):
            sources = peers(rule, "Ingress")
            assert sources and rule.get("ports"), f"adrec-{service}: an open rule {rule}"
            for port in rule["ports"]:
                admitted = by_port.setdefault(container_port(pod_spec, port["port"]), [])
                admitted.extend(
                    "scraper" if peer == SCRAPER else local_pods(objects, peer) for peer in sources
                )
        assert by_port == {
            SERVICE_PORTS[service]: [gateway],
            DEFAULT_METRICS_PORT: ["scraper"],
        }, f"adrec-{service}"


def _redis_rule(objects: Objects, rule: dict[str, Any]) -> bool:
    if rule.get("ports") != [{"port": redis_port(objects), "protocol": "TCP"}]:
        return False
    targets = peers(rule, "Egress")
    if "adrec-redis" in {d["metadata"]["name"] for d in of_kind(objects, "Deployment")}:
        return bool(targets) and all(
            local_pods(objects, peer) == {"Deployment/adrec-redis"} for peer in targets
        )
    # An external Redis: its addresses are the site's to add (docs/operations.md).
    return all(set(peer) == {"ipBlock"} for peer in targets)


def _dns_rule(rule: dict[str, Any]) -> bool:
    return peers(rule, "Egress") == [CLUSTER_DNS] and rule.get("ports") == DNS_PORTS


def check_services_dial_only_redis_dns_and_downstreams(objects: Objects) -> None:
    downstreams = {
        service: ({f"Deployment/adrec-{service}"}, [{"port": port, "protocol": "TCP"}])
        for service, port in SERVICE_PORTS.items()
    }
    for service in SERVICE_PORTS:
        labels, _ = service_pods(objects, service)
        kinds = []
        for rule in rules(objects, labels, "Egress"):
            if _redis_rule(objects, rule):
                kinds.append("redis")
            elif _dns_rule(rule):
                kinds.append("dns")
            else:
                targets = peers(rule, "Egress")
                assert targets, f"adrec-{service} may dial anywhere: {rule}"
                admitted = set().union(*(local_pods(objects, peer) for peer in targets))
                called = [
                    name
                    for name, (pods, ports) in downstreams.items()
                    if admitted == pods and rule.get("ports") == ports
                ]
                assert called, f"adrec-{service} may dial out beyond its needs: {rule}"
                kinds.extend(called)
        expected = ["dns", "redis", *(["recall", "ranking"] if service == "gateway" else [])]
        assert sorted(kinds) == sorted(expected), f"adrec-{service}: {kinds}"


def check_stream_admits_only_the_scraper(objects: Objects) -> None:
    """The stream job is scraped and called by no one: one rule, the scraper on the
    metrics port."""
    labels, pod_spec = service_pods(objects, "stream")
    admitted = []
    for rule in rules(objects, labels, "Ingress"):
        assert peers(rule, "Ingress") == [SCRAPER], f"adrec-stream admits more: {rule}"
        assert rule.get("ports"), f"adrec-stream: a rule without ports opens every port: {rule}"
        admitted.extend(container_port(pod_spec, port["port"]) for port in rule["ports"])
    (metrics,) = [p for c in pod_spec["containers"] for p in c["ports"] if p["name"] == "metrics"]
    assert admitted == [metrics["containerPort"]], f"adrec-stream: {admitted}"


def check_stream_dials_only_redis_and_dns(objects: Objects) -> None:
    labels, _ = service_pods(objects, "stream")
    kinds = []
    for rule in rules(objects, labels, "Egress"):
        if _redis_rule(objects, rule):
            kinds.append("redis")
        elif _dns_rule(rule):
            kinds.append("dns")
        else:
            raise AssertionError(f"adrec-stream may dial out beyond Redis and DNS: {rule}")
    assert sorted(kinds) == ["dns", "redis"], f"adrec-stream: {kinds}"


def check_job_pods_are_fenced(objects: Objects) -> None:
    pods = job_pods(objects)
    for where, labels in pods.items():
        for rule in rules(objects, labels, "Ingress"):
            sources = peers(rule, "Ingress")
            assert sources, f"{where}: a rule without `from` opens the driver RPC and UI"
            for peer in sources:
                assert local_pods(objects, peer) == set(pods), f"{where} admits {peer}"
        kinds = set()
        for rule in rules(objects, labels, "Egress"):
            targets = peers(rule, "Egress")
            if _redis_rule(objects, rule):
                kinds.add("redis")
            elif _dns_rule(rule):
                kinds.add("dns")
            elif targets and all(local_pods(objects, peer) == set(pods) for peer in targets):
                kinds.add("job")
            else:
                ports = {port["port"] for port in rule.get("ports", [])}
                assert not targets and ports and ports <= KUBE_API_PORTS, (
                    f"{where} may dial out beyond its needs: {rule}"
                )
                kinds.add("kube-api")
        driver = labels["app.kubernetes.io/component"] == "job-driver"
        # Only the driver creates pods; the executors never talk to the API.
        assert kinds == {"redis", "dns", "job", *(["kube-api"] if driver else [])}, where


def check_job_role(objects: Objects) -> None:
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    binding = named(objects, "RoleBinding", "adrec-job-spark")
    assert binding["roleRef"]["kind"] == "Role"
    (role,) = of_kind(objects, "Role")
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], rule
        assert "*" not in rule["resources"] and "*" not in rule["verbs"], rule
        assert "resourceNames" not in rule, rule
        granted |= {(r, v) for r in rule["resources"] for v in rule["verbs"]}
    resources = {r for r, _ in granted}
    verbs = {v for _, v in granted}
    assert resources <= JOB_RESOURCES, f"more than the driver needs: {resources - JOB_RESOURCES}"
    assert verbs <= JOB_VERBS, f"more than the driver needs: {verbs - JOB_VERBS}"
    # Spark calls the API for Services and claims unless told there are none of its own.
    for cron in of_kind(objects, "CronJob"):
        args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
        for key, value in JOB_SPARK_CONF.items():
            assert f"{key}={value}" in args, key
    for app in of_kind(objects, "ScheduledSparkApplication"):
        assert JOB_SPARK_CONF.items() <= app["spec"]["template"]["sparkConf"].items()


CHECKS: dict[str, Callable[[Objects], None]] = {
    "default_deny": check_default_deny,
    "own_policies": check_every_workload_has_its_own_policies,
    "gateway_ingress": check_gateway_ingress,
    "events_ingress": check_events_ingress,
    "admin_ingress": check_admin_ingress,
    "backend_ingress": check_backends_admit_only_the_gateway_and_the_scraper,
    "service_egress": check_services_dial_only_redis_dns_and_downstreams,
    "stream_ingress": check_stream_admits_only_the_scraper,
    "stream_egress": check_stream_dials_only_redis_and_dns,
    "job_fence": check_job_pods_are_fenced,
    "job_role": check_job_role,
}


# --- tests ---------------------------------------------------------------------------------


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
def test_the_namespace_denies_all_traffic_by_default(rendered, overlay):
    check_default_deny(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_pod_has_ingress_and_egress_policies_of_its_own(rendered, overlay):
    check_every_workload_has_its_own_policies(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_admits_only_labelled_namespaces_and_the_scraper(rendered, overlay):
    check_gateway_ingress(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_event_intake_admits_only_labelled_namespaces_and_the_scraper(rendered, overlay):
    check_events_ingress(rendered[overlay])


def test_the_dev_namespace_is_a_gateway_client_with_its_own_client_pods(rendered):
    """In dev, client pods of the namespace (labelled) may call the gateway and the event
    intake, and nothing else."""
    objects = rendered["dev"]
    namespace = named(objects, "Namespace", "adrec-dev")
    assert namespace["metadata"]["labels"][GATEWAY_CLIENT_LABEL] == "true"
    client = {GATEWAY_CLIENT_LABEL: "true"}
    kinds = []
    for rule in rules(objects, client, "Egress"):
        if _dns_rule(rule):
            kinds.append("dns")
        else:
            (target,) = peers(rule, "Egress")
            (service,) = [
                name
                for name in ("gateway", "events")
                if local_pods(objects, target) == {f"Deployment/adrec-{name}"}
            ]
            assert rule["ports"] == [{"port": SERVICE_PORTS[service], "protocol": "TCP"}]
            kinds.append(service)
    assert sorted(kinds) == ["dns", "events", "gateway"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_admin_service_admits_only_operator_namespaces_and_the_scraper(rendered, overlay):
    check_admin_ingress(rendered[overlay])


def test_the_dev_namespace_is_an_admin_client_with_its_own_client_pods(rendered):
    """In dev, client pods of the namespace labelled for the admin service may call it
    (and DNS) and nothing else, and the gateway's client pods may not call it."""
    objects = rendered["dev"]
    namespace = named(objects, "Namespace", "adrec-dev")
    assert namespace["metadata"]["labels"][ADMIN_CLIENT_LABEL] == "true"
    admin = {"Deployment/adrec-admin"}
    kinds = []
    for rule in rules(objects, {ADMIN_CLIENT_LABEL: "true"}, "Egress"):
        if _dns_rule(rule):
            kinds.append("dns")
        else:
            (target,) = peers(rule, "Egress")
            assert local_pods(objects, target) == admin, rule
            assert rule["ports"] == [{"port": SERVICE_PORTS["admin"], "protocol": "TCP"}]
            kinds.append("admin")
    assert sorted(kinds) == ["admin", "dns"]
    for rule in rules(objects, {GATEWAY_CLIENT_LABEL: "true"}, "Egress"):
        for target in peers(rule, "Egress"):
            if "podSelector" in target and "namespaceSelector" not in target:
                assert not local_pods(objects, target) & admin, rule


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_recall_and_ranking_admit_only_the_gateway_and_the_scraper(rendered, overlay):
    check_backends_admit_only_the_gateway_and_the_scraper(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_dial_out_only_to_redis_dns_and_their_downstreams(rendered, overlay):
    check_services_dial_only_redis_dns_and_downstreams(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_stream_job_admits_only_the_scraper_and_dials_only_redis_and_dns(rendered, overlay):
    check_stream_admits_only_the_scraper(rendered[overlay])
    check_stream_dials_only_redis_and_dns(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_job_pods_talk_only_to_each_other_redis_dns_and_the_api(rendered, overlay):
    check_job_pods_are_fenced(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_job_role_grants_only_what_spark_on_kubernetes_needs(rendered, overlay):
    check_job_role(rendered[overlay])


def test_the_dev_redis_admits_only_adrec_pods_and_dials_nothing(rendered):
    objects = rendered["dev"]
    spec = policies(objects)["adrec-redis"]
    redis = deployment(objects, "redis")["spec"]["template"]["metadata"]["labels"]
    assert matches(spec["podSelector"], redis)
    assert set(policy_types(spec)) == {"Ingress", "Egress"} and not spec.get("egress")
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "adrec"}}}
    # ... which every Redis client carries: the services, the job's driver and executors.
    for where, labels in workload_pods(objects).items():
        if where != "Deployment/adrec-redis":
            assert matches(peer["podSelector"], labels), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_and_rbac_validate_strictly_against_the_kubernetes_schemas(rendered, overlay):
    """As test_deploy_render validates every built-in object, for the objects checked here."""
    kinds = {"NetworkPolicy", "Role", "RoleBinding", "ServiceAccount", "Namespace"}
    checked = [obj for obj in rendered[overlay] if obj["kind"] in kinds]
    assert len(of_kind(checked, "NetworkPolicy")) >= 8
    for obj in checked:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def _policy(objects: Objects, name: str) -> dict[str, Any]:
    return named(objects, "NetworkPolicy", name)["spec"]


def _drop_policy(name: str) -> Callable[[Objects], None]:
    def breaks(objects: Objects) -> None:
        objects.remove(named(objects, "NetworkPolicy", name))

    return breaks


def _open_gateway_to_all_namespaces(objects: Objects) -> None:
    _policy(objects, "adrec-gateway")["ingress"][0]["from"] = [{"namespaceSelector": {}}]


def _open_events_to_every_port(objects: Objects) -> None:
    del _policy(objects, "adrec-events")["ingress"][0]["ports"]


def _open_admin_to_the_gateway_callers(objects: Objects) -> None:
    _policy(objects, "adrec-admin")["ingress"][0]["from"].append(GATEWAY_CLIENTS)


def _open_admin_to_all_namespaces(objects: Objects) -> None:
    _policy(objects, "adrec-admin")["ingress"][0]["from"] = [{"namespaceSelector": {}}]


def _open_admin_to_every_port(objects: Objects) -> None:
    del _policy(objects, "adrec-admin")["ingress"][0]["ports"]


def _open_admin_grpc_to_the_scraper(objects: Objects) -> None:
    _policy(objects, "adrec-admin")["ingress"][1]["ports"].append({"port": "grpc"})


def _admit_anyone_to_recall_metrics(objects: Objects) -> None:
    del _policy(objects, "adrec-recall")["ingress"][1]["from"]


def _let_ranking_dial_anywhere(objects: Objects) -> None:
    spec = _policy(objects, "adrec-ranking")
    spec["policyTypes"].append("Egress")
    spec["egress"] = [{}]


def _open_stream_metrics_to_all(objects: Objects) -> None:
    del _policy(objects, "adrec-stream")["ingress"][0]["from"]


def _open_the_stream_spark_ui(objects: Objects) -> None:
    _policy(objects, "adrec-stream")["ingress"].append(
        {"from": [SCRAPER], "ports": [{"port": 4040}]}
    )


def _let_the_stream_dial_anywhere(objects: Objects) -> None:
    spec = _policy(objects, "adrec-stream")
    spec["policyTypes"].append("Egress")
    spec["egress"] = [{}]


def _open_the_spark_ui(objects: Objects) -> None:
    _policy(objects, "adrec-job")["ingress"].append({"ports": [{"port": 4040}]})


def _let_executors_reach_the_api(objects: Objects) -> None:
    selector = _policy(objects, "adrec-job-driver-kube-api")["podSelector"]["matchLabels"]
    selector["app.kubernetes.io/component"] = "job-executor"


def _grant_any_verb(objects: Objects) -> None:
    of_kind(objects, "Role")[0]["rules"][0]["verbs"] = ["*"]


def _grant_services(objects: Objects) -> None:
    of_kind(objects, "Role")[0]["rules"].append(
        {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "delete"]}
    )


BREAKAGES: dict[str, tuple[str, Callable[[Objects], None]]] = {
    "no default-deny": ("default_deny", _drop_policy("adrec-default-deny")),
    "no job policy": ("own_policies", _drop_policy("adrec-job")),
    "no gateway policy": ("own_policies", _drop_policy("adrec-gateway")),
    "gateway open to all namespaces": ("gateway_ingress", _open_gateway_to_all_namespaces),
    "no events policy": ("own_policies", _drop_policy("adrec-events")),
    "events open on every port": ("events_ingress", _open_events_to_every_port),
    "no admin policy": ("own_policies", _drop_policy("adrec-admin")),
    "admin open to the gateway's callers": ("admin_ingress", _open_admin_to_the_gateway_callers),
    "admin open to all namespaces": ("admin_ingress", _open_admin_to_all_namespaces),
    "admin gRPC open to the scraper": ("admin_ingress", _open_admin_grpc_to_the_scraper),
    "admin open on every port": ("admin_ingress", _open_admin_to_every_port),
    "recall metrics open": ("backend_ingress", _admit_anyone_to_recall_metrics),
    "ranking dials anywhere": ("service_egress", _let_ranking_dial_anywhere),
    "no DNS": ("service_egress", _drop_policy("adrec-dns")),
    "no stream policy": ("own_policies", _drop_policy("adrec-stream")),
    "stream metrics open to all": ("stream_ingress", _open_stream_metrics_to_all),
    "stream Spark UI open": ("stream_ingress", _open_the_stream_spark_ui),
    "stream dials anywhere": ("stream_egress", _let_the_stream_dial_anywhere),
    "stream without Redis": ("stream_egress", _drop_policy("adrec-redis-egress")),
    "Spark UI open": ("job_fence", _open_the_spark_ui),
    "executors reach the API": ("job_fence", _let_executors_reach_the_api),
    "wildcard verbs": ("job_role", _grant_any_verb),
    "services granted": ("job_role", _grant_services),
}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_check_fails_on_a_broken_overlay(rendered, overlay, breakage):
    check, breaks = BREAKAGES[breakage]
    CHECKS[check](rendered[overlay])
    broken = copy.deepcopy(rendered[overlay])
    breaks(broken)
    with pytest.raises(AssertionError):
        CHECKS[check](broken)
