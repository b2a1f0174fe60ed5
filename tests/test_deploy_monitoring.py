"""Monitoring: ServiceMonitors, the PrometheusRule and the Grafana dashboard.

The metric names in the alert rules and the dashboard are compared with what the real
services export, scraped from their /metrics endpoints after real Recommend calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from deploy_helpers import DEPLOY, OVERLAYS, REPO, SERVICE_PORTS, of_kind, rule_groups
from grpc_helpers import loopback_channel
from prometheus_client.parser import text_string_to_metric_families
from service_data import PIDS, path, publish_version, recommend, run, service_settings

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core.redis_conn import RedisSettings
from services.process import serving
from services.runtime.metrics import GRPC_CODE_NAMES
from services.runtime.settings import DEFAULT_METRICS_PORT

OPERATIONS_DOC = REPO / "docs" / "operations.md"

#: Metrics in the rules that no adrec service exports, and who does.
EXTERNAL_METRICS = {
    "up": "Prometheus, per scrape target",
    "kube_cronjob_status_last_successful_time": "kube-state-metrics",
}
#: Labels Prometheus (Operator) puts on every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
JOBS = {f"adrec-{name}": name for name in SERVICE_PORTS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_scrape_each_services_metrics_port_once(rendered, overlay):
    objects = rendered[overlay]
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {f"adrec-{s}" for s in SERVICE_PORTS}
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
        assert port["port"] == DEFAULT_METRICS_PORT


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
    docs = OPERATIONS_DOC.read_text().lower()
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
            for name, stack in (("recall", recall), ("ranking", ranking), ("gateway", gateway)):
                scraped[name] = await asyncio.to_thread(scrape, stack.metrics_port)

    run(scenario, timeout=60)
    yield scraped
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()


def test_services_export_the_standard_grpc_metrics(exported_metrics):
    for service, metrics in exported_metrics.items():
        for name in (
            "grpc_server_started_total",
            "grpc_server_handled_total",
            "grpc_server_handling_seconds_bucket",
        ):
            assert name in metrics, (service, name)
        assert {"grpc_type", "grpc_service", "grpc_method", "grpc_code"} <= metrics[
            "grpc_server_handled_total"
        ]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_in_the_alerts_and_dashboard_is_exported(exported_metrics, source):
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
            exporters = {s for s in services if metric in exported_metrics[s]}
            assert exporters, (
                f"{metric} (in the {source}) is exported by none of {sorted(services)}\n{expr}"
            )
            labels = set().union(*(exported_metrics[s][metric] or set() for s in exporters))
            for label, op, value in matchers:
                if labels:
                    assert label in labels | TARGET_LABELS, f"{metric} has no label {label}"
                if label in known_values:
                    assert matcher_values_are_known(op, value, known_values[label]), (
                        f"{metric}{{{label}}}: {value!r} matches no value the services emit"
                    )
            checked.add(metric)
    assert len(checked) >= (8 if source == "alerts" else 12), checked
