"""Monitoring: ServiceMonitors, the PrometheusRule and the Grafana dashboard.

The metric names in the alert rules and the dashboard are compared with what the real
services export, scraped from their /metrics endpoints after real Recommend calls, and with
what the stream job's metrics export.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from deploy_helpers import (
    DEPLOY,
    OVERLAYS,
    REPO,
    SERVICE_PORTS,
    STREAM_METRICS_PORT,
    kustomize_dir,
    of_kind,
    rule_groups,
)
from grpc_helpers import loopback_channel
from prometheus_client.parser import text_string_to_metric_families
from service_data import PIDS, path, publish_version, recommend, run, service_settings

from adrec.api.admin.v1 import admin_service_pb2, admin_service_pb2_grpc
from adrec.api.events.v1 import event_service_pb2, event_service_pb2_grpc
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core.redis_conn import RedisSettings
from jobs.stream.main import StreamMetrics
from services.process import serving
from services.runtime.metrics import GRPC_CODE_NAMES
from services.runtime.settings import DEFAULT_METRICS_PORT

OPERATIONS_DOC = REPO / "docs" / "operations.md"

#: Metrics in the rules that no adrec service exports, and who does.
EXTERNAL_METRICS = {
    "up": "Prometheus, per scrape target",
    "kube_cronjob_created": "kube-state-metrics",
    "kube_cronjob_status_last_successful_time": "kube-state-metrics",
    "kube_deployment_created": "kube-state-metrics",
    "kube_pod_completion_time": "kube-state-metrics",
    "kube_pod_status_phase": "kube-state-metrics",
    "kube_pod_container_status_waiting_reason": "kube-state-metrics",
}
#: Labels Prometheus (Operator) puts on every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
JOBS = {f"adrec-{name}": name for name in (*SERVICE_PORTS, "stream")}
#: The /metrics port of each scrape target's Service.
METRICS_PORTS = {
    **{f"adrec-{name}": DEFAULT_METRICS_PORT for name in SERVICE_PORTS},
    "adrec-stream": STREAM_METRICS_PORT,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_scrape_each_services_metrics_port_once(rendered, overlay):
    objects = rendered[overlay]
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == set(METRICS_PORTS)
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        scraped = [
            svc
            for svc in of_kind(objects, "Service")
            if selector.items() <= svc["metadata"]["labels"].items()
            and endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
        ]
        # The target's job label is the Service name, which the rules select on.
        assert [svc["metadata"]["name"] for svc in scraped] == [monitor["metadata"]["name"]]
        (port,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert port["port"] == METRICS_PORTS[monitor["metadata"]["name"]]


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
            selector, label = re.fullmatch(
                r"label_values\((.*),\s*(\w+)\)", query["query"]
            ).groups()
            assert label in TARGET_LABELS, f"variable {variable['name']}: label {label}"
            queries.append(selector)
    return queries


def test_alert_rules_are_well_formed_and_have_runbooks():
    text = OPERATIONS_DOC.read_text()
    docs = text.lower()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) >= 8
    wanted = {
        "AdrecGrpcErrorRatioHigh",
        "AdrecLatencyP99High",
        "AdrecFallbackRateHigh",
        "AdrecDataVersionStale",
        "AdrecRedisUnreachable",
    }
    assert wanted <= set(names)
    bases = set()
    for rule in alerts():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        assert rule["expr"].strip()
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        # Alertmanager and Grafana link runbook_url as it is: an absolute URL, the anchor
        # of the alert's section of docs/operations.md.
        base, anchor = rule["annotations"]["runbook_url"].split("#", 1)
        assert f"### {anchor}" in docs, f"docs/operations.md has no runbook for {rule['alert']}"
        bases.add(base)
    (base,) = bases
    assert re.fullmatch(r"https://[a-z0-9.-]+/\S+/docs/operations\.md", base), base
    assert f"`{base}`" in text, "docs/operations.md names the runbook base and how to change it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_ships_as_a_grafana_sidecar_configmap(rendered, overlay):
    (cm,) = [
        cm
        for cm in of_kind(rendered[overlay], "ConfigMap")
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    (content,) = cm["data"].values()
    assert json.loads(content) == dashboard()
    assert dashboard()["uid"] and dashboard()["panels"]


# PromQL, just enough to find metric names and label matchers.
_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def promql_selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of every vector selector in `expr`."""
    found = [
        (name, _MATCHER.findall(body))
        for name, body in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr)
    ]
    bare = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        word, rest = match.group(), bare[match.end() :].lstrip()
        if rest.startswith("(") or word in _PROMQL_KEYWORDS:
            continue  # a function, an aggregation or an operator
        if word not in {name for name, _ in found}:
            found.append((word, []))
    return found


def test_promql_parsing_finds_names_and_matchers():
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{job=~"x|y", '
        'c!="d"}[5m]))) / on (job) group_left b_total > 0.5 and time() - c_info'
    )
    assert promql_selectors(expr) == [
        ("a_seconds_bucket", [("job", "=~", "x|y"), ("c", "!=", "d")]),
        ("b_total", []),
        ("c_info", []),
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
        return [
            expansion
            for option in group.group(1).split("|")
            for expansion in regex_expansions(
                regex[: group.start()] + option + regex[group.end() :]
            )
        ]
    return regex.split("|")


def matcher_values_are_known(op: str, value: str, known: set[str]) -> bool:
    """A literal names a known value; every branch of a regex matches one."""
    if op in ("=", "!="):
        return value in known
    return all(
        any(re.fullmatch(branch, candidate) for candidate in known)
        for branch in regex_expansions(value)
    )


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
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            exported.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = exported.get(sample.name) or set()
            exported[sample.name] = labels | set(sample.labels)
    return exported


@pytest.fixture(scope="module")
def exported_metrics(redis_server) -> Iterator[dict[str, dict[str, set[str] | None]]]:
    """What each service, run as in the Deployments, exports after traffic."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    data = publish_version(client, users=30, ads=1000, categories=20)
    client.close()
    redis_settings = RedisSettings(url=redis_server.url)
    scraped: dict[str, dict[str, set[str] | None]] = {}

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stacks:
            recall = await stacks.enter_async_context(
                serving("recall", service_settings("recall"), redis_settings)
            )
            ranking = await stacks.enter_async_context(
                serving("ranking", service_settings("ranking"), redis_settings)
            )
            gateway = await stacks.enter_async_context(
                serving(
                    "gateway",
                    service_settings(
                        "gateway",
                        ADREC_RECALL_ADDRESS=f"127.0.0.1:{recall.services['recall'].port}",
                        ADREC_RANKING_ADDRESS=f"127.0.0.1:{ranking.services['ranking'].port}",
                    ),
                    redis_settings,
                )
            )
            async with loopback_channel(gateway.services["gateway"].port) as channel:
                ranked = await recommend(
                    channel, user_id=data.users_with_factors[0], pid=PIDS[0], count=10
                )
                assert path(ranked) == "REALTIME_RANKED"
                # A user without a recall set: the popular fallback, counted by reason.
                popular = await recommend(
                    channel, user_id=data.users_without_recall[0], pid=PIDS[1], count=10
                )
                assert path(popular) == "POPULAR"
            events = await stacks.enter_async_context(
                serving("events", service_settings("events"), redis_settings)
            )
            async with loopback_channel(events.services["events"].port) as channel:
                stub = event_service_pb2_grpc.EventServiceStub(channel)
                click = event_service_pb2.Click(ad_id=int(data.ads["adgroup_id"][0]), pid=PIDS[0])
                await stub.ReportEvents(
                    event_service_pb2.ReportEventsRequest(
                        events=[
                            event_service_pb2.Event(
                                event_id="e1", user_id=1, time=int(time.time()), click=click
                            )
                        ]
                    ),
                    timeout=10,
                )
            admin = await stacks.enter_async_context(
                serving("admin", service_settings("admin"), redis_settings)
            )
            async with loopback_channel(admin.services["admin"].port) as channel:
                await admin_service_pb2_grpc.AdminServiceStub(channel).ListAdStates(
                    admin_service_pb2.ListAdStatesRequest(), timeout=10
                )
            stacks_by_name = {
                "recall": recall,
                "ranking": ranking,
                "gateway": gateway,
                "events": events,
                "admin": admin,
            }
            for name, stack in stacks_by_name.items():
                scraped[name] = await asyncio.to_thread(scrape, stack.metrics_port)

    run(scenario, timeout=60)
    yield scraped
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()


@pytest.fixture(scope="module")
def all_exported(exported_metrics) -> Iterator[dict[str, dict[str, set[str] | None]]]:
    """The services' metrics and the stream job's: its StreamMetrics, served as the job
    serves them (its series exist from the start, so no Spark is needed to see them)."""
    from prometheus_client import start_http_server

    stream = StreamMetrics(0)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=stream.registry)
    try:
        yield {**exported_metrics, "stream": scrape(server.server_port)}
    finally:
        server.shutdown()


def test_services_export_the_standard_grpc_metrics(exported_metrics):
    grpc_labels = {"grpc_type", "grpc_service", "grpc_method"}
    for service, metrics in exported_metrics.items():
        for name in (
            "grpc_server_started_total",
            "grpc_server_handled_total",
            "grpc_server_handling_seconds_bucket",
            "grpc_server_msg_received_total",
            "grpc_server_msg_sent_total",
        ):
            assert name in metrics, (service, name)
        assert metrics["grpc_server_handled_total"] == {*grpc_labels, "grpc_code"}
        assert metrics["grpc_server_msg_received_total"] == grpc_labels
        assert metrics["grpc_server_msg_sent_total"] == grpc_labels
    # The gateway's calls to recall and ranking, from its side.
    gateway = exported_metrics["gateway"]
    assert gateway["grpc_client_started_total"] == grpc_labels
    assert gateway["grpc_client_handled_total"] == {*grpc_labels, "grpc_code"}
    assert gateway["grpc_client_handling_seconds_bucket"] == {*grpc_labels, "le"}
    # Recall calls no one: the family is declared, without a series.
    assert exported_metrics["recall"]["grpc_client_started_total"] is None


def test_no_series_carries_a_label_prometheus_sets_on_the_target(all_exported):
    """A label of the target's (`service`, `pod`, `job`, ...) on a series would be renamed
    `exported_<label>` at the scrape (honorLabels is off), and the rules would miss it."""
    for service, metrics in all_exported.items():
        for name, labels in metrics.items():
            assert not (labels or set()) & TARGET_LABELS, (service, name, labels)
    assert all_exported["gateway"]["adrec_fallbacks_total"] == {"adrec_service", "reason"}
    assert all_exported["stream"]["adrec_stream_clicks_total"] == {
        "pid",
        "serving_path",
        "model_version",
    }


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_in_the_alerts_and_dashboard_is_exported(all_exported, source):
    queries = [rule["expr"] for rule in alerts()] if source == "alerts" else dashboard_queries()
    known_values = known_label_values()
    checked = set()
    for expr in queries:
        for metric, matchers in promql_selectors(expr):
            if metric in EXTERNAL_METRICS:
                continue
            job_matchers = [(op, value) for label, op, value in matchers if label == "job"]
            services = {
                service
                for job, service in JOBS.items()
                if all(
                    (re.fullmatch(value, job) is not None) == (op in ("=", "=~"))
                    for op, value in job_matchers
                )
            }
            assert services, f"{metric}: its job matchers select no adrec service\n{expr}"
            exporters = {s for s in services if metric in all_exported[s]}
            assert exporters, (
                f"{metric} (in the {source}) is exported by none of {sorted(services)}\n{expr}"
            )
            labels = set().union(*(all_exported[s][metric] or set() for s in exporters))
            for label, op, value in matchers:
                if labels:
                    assert label in labels | TARGET_LABELS, f"{metric} has no label {label}"
                if label in known_values:
                    assert matcher_values_are_known(op, value, known_values[label]), (
                        f"{metric}{{{label}}}: {value!r} matches no value the services emit"
                    )
            checked.add(metric)
    assert len(checked) >= (8 if source == "alerts" else 12), checked


# ------------------------------------------------------------------- overlays of overlays

KUBE_PROMETHEUS_STACK = DEPLOY / "components" / "kube-prometheus-stack"


def render_on(
    directory: Path, overlay: str, *, resources: tuple[str, ...] = (), **fields: Any
) -> list[dict[str, Any]]:
    """Render a kustomization in `directory` built on deploy/overlays/`overlay`, as an
    operator's own overlay would be; `fields` are more of its kustomization's fields."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "overlays" / overlay, directory), *resources],
        **fields,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize_dir(directory)


def without_label(obj: dict[str, Any], label: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(obj))
    copy["metadata"].get("labels", {}).pop(label, None)
    return copy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kube_prometheus_stack_component_labels_monitors_and_rules_for_its_selectors(
    rendered, tmp_path, overlay
):
    """kube-prometheus-stack's Prometheus selects ServiceMonitors and PrometheusRules by
    `release: <Helm release>`: the component sets it on adrec's and on nothing else."""
    objects = render_on(
        tmp_path, overlay, components=[os.path.relpath(KUBE_PROMETHEUS_STACK, tmp_path)]
    )
    labelled = {
        (obj["kind"], obj["metadata"]["name"]): obj["metadata"]["labels"]["release"]
        for obj in objects
        if "release" in obj["metadata"].get("labels", {})
    }
    monitoring = {
        (obj["kind"], obj["metadata"]["name"])
        for obj in rendered[overlay]
        if obj["kind"] in ("ServiceMonitor", "PrometheusRule")
    }
    assert ("PrometheusRule", "adrec") in monitoring and len(monitoring) >= 4
    assert labelled == dict.fromkeys(monitoring, "kube-prometheus-stack")
    assert not any("release" in obj["metadata"].get("labels", {}) for obj in rendered[overlay])
    assert [without_label(obj, "release") for obj in objects] == rendered[overlay]
    docs = OPERATIONS_DOC.read_text()
    assert "`deploy/components/kube-prometheus-stack/`" in docs
    assert "release: kube-prometheus-stack" in docs


def runbook_links_snippets() -> tuple[dict[str, Any], dict[str, Any]]:
    """The two YAML blocks of docs/operations.md's "Runbook links": an overlay's
    kustomization fields, and the runbooks.yaml it lists."""
    text = OPERATIONS_DOC.read_text()
    section = text.split("### Runbook links\n", 1)[1].split("\n### ", 1)[0]
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    (fields,) = [block for block in blocks if "replacements" in block]
    (config_map,) = [block for block in blocks if block.get("kind") == "ConfigMap"]
    return fields, config_map


def test_the_documented_overlay_points_every_runbook_link_at_another_base(rendered, tmp_path):
    fields, config_map = runbook_links_snippets()
    assert fields["resources"] == ["runbooks.yaml"]
    (tmp_path / "runbooks.yaml").write_text(yaml.safe_dump(config_map))
    objects = render_on(
        tmp_path, "prod", resources=("runbooks.yaml",), replacements=fields["replacements"]
    )
    new_base = config_map["data"]["base"]
    (rule,) = [obj for obj in objects if obj["kind"] == "PrometheusRule"]
    (shipped,) = [obj for obj in rendered["prod"] if obj["kind"] == "PrometheusRule"]
    links = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    shipped_links = [
        r["annotations"]["runbook_url"] for g in shipped["spec"]["groups"] for r in g["rules"]
    ]
    assert links == [new_base + "#" + link.split("#", 1)[1] for link in shipped_links]
    assert all(not link.startswith(new_base) for link in shipped_links)
    # The ConfigMap only feeds the replacement (local-config): nothing else changes.
    assert [obj for obj in objects if obj["kind"] != "PrometheusRule"] == [
        obj for obj in rendered["prod"] if obj["kind"] != "PrometheusRule"
    ]
