"""What operators rely on: health, reflection, /metrics, JSON logs, settings, drain and the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel, run_buf
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from service_data import (
    PIDS,
    TEST_RELOAD_SECONDS,
    expected_ranking,
    metric,
    path,
    publish_version,
    reasons,
    recommend,
    run,
    running_stack,
    service_process,
    wait_until,
)

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.api.recall.v1 import recall_service_pb2
from adrec.cli import main
from adrec.core import store
from adrec.core.metadata import VersionContent, VersionMeta
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import free_port, private_redis
from services import process
from services.runtime.data import RedisOp
from services.runtime.health import LIVENESS_SERVICE_NAME
from services.runtime.metrics import GRPC_CODE_NAMES, Metrics
from services.runtime.settings import SETTINGS, service_env_names

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = {
    "recall": "adrec.recall.v1.RecallService",
    "ranking": "adrec.ranking.v1.RankingService",
    "gateway": "adrec.gateway.v1.GatewayService",
    "events": "adrec.events.v1.EventService",
    "admin": "adrec.admin.v1.AdminService",
}


def test_health_follows_redis_down_and_back_while_answers_keep_coming():
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        data = publish_version(client, seed=1)
        user = data.users_with_factors[0]

        async def statuses(channels) -> set[int]:
            return {
                await health_status(channel, service)
                for channel, service in zip(channels, SERVICES.values(), strict=False)
            }

        async def scenario():
            async with running_stack(server.url) as stack:
                ports = [stack.services[name].port for name in SERVICES]
                async with (
                    loopback_channel(ports[0]) as recall,
                    loopback_channel(ports[1]) as ranking,
                    loopback_channel(ports[2]) as gateway,
                ):
                    channels = (recall, ranking, gateway)
                    assert await statuses(channels) == {SERVING}

                    await asyncio.to_thread(server.stop)
                    # Recall and ranking cannot answer without Redis: out of rotation, but
                    # alive (the liveness probe must not restart them).
                    await wait_until(async_equals(statuses, channels[:2], {NOT_SERVING}))
                    for channel in channels[:2]:
                        assert await health_status(channel) == NOT_SERVING
                        assert await health_status(channel, LIVENESS_SERVICE_NAME) == SERVING
                    # The gateway answers from memory, so it stays in rotation: a Redis
                    # outage must not take every gateway out at once.
                    assert await health_status(gateway) == SERVING
                    assert await health_status(gateway, SERVICES["gateway"]) == SERVING
                    # Each service's watcher notices at its own next poll.
                    await wait_until(
                        lambda: metric(stack, "adrec_redis_up", adrec_service="gateway") == 0
                    )
                    # Degraded, not failed: the gateway answers from memory.
                    answer = await recommend(gateway, user_id=user, pid=PIDS[0], count=5)
                    assert path(answer) == "POPULAR"
                    assert reasons(answer) == ["RECALL_UNAVAILABLE", "NO_OFFLINE_LIST"]
                    assert [ad.ad_id for ad in answer.ads] == data.popular[PIDS[0]][:5].tolist()

                    # The restarted Redis lost everything; the job publishes again, and
                    # reuses the version id "v1" for different data.
                    await asyncio.to_thread(server.restart)
                    republished = await asyncio.to_thread(
                        publish_version, redis.Redis.from_url(server.url), seed=2
                    )
                    assert republished.version == data.version
                    ids, _, _ = expected_ranking(
                        republished, user, PIDS[0], republished.recall_lists[user]
                    )

                    async def reloaded():
                        answer = await recommend(gateway, user_id=user, pid=PIDS[0], count=5)
                        return (
                            path(answer) == "REALTIME_RANKED"
                            and [ad.ad_id for ad in answer.ads] == ids[:5]
                        )

                    await wait_until(reloaded)
                    assert await statuses(channels) == {SERVING}
                    assert await health_status(gateway) == SERVING

        run(scenario)


def async_equals(function, argument, expected):
    async def check():
        return await function(argument) == expected

    return check


def describe(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        for name in services:
            pool.FindServiceByName(name)  # resolvable, with its imports
        return services


def test_reflection_describes_every_service_to_grpc_and_buf_clients(redis_client, redis_url):
    data = publish_version(redis_client)

    async def scenario():
        async with running_stack(redis_url) as stack:
            for name, full_name in SERVICES.items():
                port = stack.services[name].port
                described = await asyncio.to_thread(describe, port)
                assert described == {
                    full_name,
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection",
                }
                code, listed, errors = await run_buf(
                    "curl",
                    "--protocol",
                    "grpc",
                    "--http2-prior-knowledge",
                    "--reflect",
                    "--list-services",
                    f"http://127.0.0.1:{port}",
                )
                assert code == 0, errors
                assert full_name in listed.split()

            user = data.users_with_factors[0]
            code, output, errors = await run_buf(
                "curl",
                "--protocol",
                "grpc",
                "--http2-prior-knowledge",
                "--reflect",
                "--data",
                json.dumps({"userId": str(user), "pid": PIDS[0], "count": 3}),
                f"http://127.0.0.1:{stack.services['gateway'].port}"
                f"/{SERVICES['gateway']}/Recommend",
            )
            assert code == 0, errors
            answer = json.loads(output)
            assert answer["servingPath"] == "SERVING_PATH_REALTIME_RANKED"
            assert [int(ad["adId"]) for ad in answer["ads"]] == expected_ranking(
                data, user, PIDS[0], data.recall_lists[user]
            )[0][:3]

    run(scenario)


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def samples(families: dict, name: str, suffix: str = "", **labels: str) -> list[float]:
    return [
        sample.value
        for sample in families[name]
        if sample.name == name + suffix
        and all(sample.labels.get(key) == value for key, value in labels.items())
    ]


def test_metrics_endpoint_serves_standard_grpc_and_domain_metrics(redis_client, redis_url):
    data = publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            for user in data.users_with_factors[:3]:
                await recommend(channel, user_id=user, pid=PIDS[0], count=5)
            await recommend(channel, user_id=424242, pid=PIDS[0], count=5)
            with pytest.raises(grpc.aio.AioRpcError):
                await recommend(channel, user_id=-1, pid=PIDS[0], count=5)
            families = await asyncio.to_thread(scrape, stack.metrics_port)

        gateway = {
            "grpc_type": "unary",
            "grpc_service": SERVICES["gateway"],
            "grpc_method": "Recommend",
        }
        assert samples(families, "grpc_server_started", "_total", **gateway) == [5]
        assert samples(families, "grpc_server_handled", "_total", grpc_code="OK", **gateway) == [4]
        assert samples(
            families, "grpc_server_handled", "_total", grpc_code="InvalidArgument", **gateway
        ) == [1]
        assert samples(families, "grpc_server_handling_seconds", "_count", **gateway) == [5]
        # Each call received its request; only the answered ones sent a message back.
        assert samples(families, "grpc_server_msg_received", "_total", **gateway) == [5]
        assert samples(families, "grpc_server_msg_sent", "_total", **gateway) == [4]
        buckets = samples(families, "grpc_server_handling_seconds", "_bucket", le="0.01", **gateway)
        assert len(buckets) == 1 and 0 < buckets[0] <= 5
        ranking = {
            "grpc_type": "unary",
            "grpc_service": SERVICES["ranking"],
            "grpc_method": "RankCandidates",
        }
        assert samples(families, "grpc_server_handled", "_total", grpc_code="OK", **ranking) == [3]
        # The gateway's side of its calls: recall for the four valid requests, ranking for
        # the three users with a recall set.
        recall = {**ranking, "grpc_service": SERVICES["recall"], "grpc_method": "GetCandidates"}
        assert samples(families, "grpc_client_started", "_total", **recall) == [4]
        assert samples(families, "grpc_client_handled", "_total", grpc_code="OK", **ranking) == [3]
        assert samples(families, "grpc_client_handling_seconds", "_count", **ranking) == [3]
        assert samples(
            families, "adrec_candidates_per_request", "_count", adrec_service="ranking"
        ) == [3]
        assert samples(
            families, "adrec_candidates_per_request", "_sum", adrec_service="recall"
        ) == [3 * 500 + 200]
        assert samples(
            families, "adrec_fallbacks", "_total", adrec_service="gateway", reason="no_recall_set"
        ) == [1]
        created = dt.datetime.fromisoformat(
            store.read_meta(redis_client, data.version).created_at
        ).timestamp()
        for service in SERVICES:
            assert samples(
                families, "adrec_data_version_info", "", adrec_service=service, version=data.version
            ) == [1]
            assert samples(
                families, "adrec_data_version_created_timestamp_seconds", "", adrec_service=service
            ) == [created]
            assert samples(families, "adrec_redis_up", "", adrec_service=service) == [1]
        model_version = f"{data.version}/{data.model.spec.spec_id}"
        assert samples(
            families, "adrec_model_version_info", "", adrec_service="ranking", version=model_version
        ) == [1]
        assert samples(families, "adrec_unknown_ads", "_total", adrec_service="ranking") == [24]
        assert samples(
            families,
            "adrec_redis_latency_seconds",
            "_count",
            adrec_service="ranking",
            op="user_features",
        ) == [3]
        assert samples(
            families,
            "adrec_downstream_latency_seconds",
            "_count",
            adrec_service="gateway",
            downstream="ranking",
            grpc_code="OK",
        ) == [3]
        assert "process_cpu_seconds" in families

    run(scenario)


def series(families: dict, name: str, suffix: str = "") -> dict[frozenset, float]:
    """Label set -> value of every sample `name + suffix` of a scrape."""
    return {
        frozenset(sample.labels.items()): sample.value
        for sample in families.get(name, [])
        if sample.name == name + suffix
    }


def label_sets(**values: Iterable[str]) -> set[frozenset]:
    """Every combination of the given label values."""
    names = list(values)
    return {
        frozenset(zip(names, combination, strict=True))
        for combination in itertools.product(*values.values())
    }


def enum_values(enum) -> list[str]:
    """A proto enum's values as metrics spell them: `SERVING_PATH_POPULAR` -> "popular"."""
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return [name.removeprefix(prefix).lower() for name, value in enum.items() if value]


def fresh_and_after(fresh: dict, after: dict, name: str, labels: frozenset) -> tuple[float, float]:
    return series(fresh, name, "_total")[labels], series(after, name, "_total")[labels]


def test_a_fresh_stack_exports_every_failure_counter_at_0_so_the_first_failure_counts(
    redis_client, redis_url
):
    """rate() and increase() count what a counter gained between two scrapes: a series born
    at its first failure hides that failure. Before any call, every method's handled count
    by status code and every counter of a known set of reasons or operations reads 0."""
    data = publish_version(redis_client)

    async def scenario():
        async with running_stack(redis_url) as stack:
            fresh = await asyncio.to_thread(scrape, stack.metrics_port)
            await stack.services["ranking"].server.stop(None)
            async with loopback_channel(stack.services["gateway"].port) as channel:
                answer = await recommend(
                    channel, user_id=data.users_with_factors[0], pid=PIDS[0], count=5
                )
            return fresh, answer, await asyncio.to_thread(scrape, stack.metrics_port)

    fresh, answer, after = asyncio.run(asyncio.wait_for(scenario(), timeout=60))

    codes = list(GRPC_CODE_NAMES.values())
    assert len(set(codes)) == len(grpc.StatusCode)
    methods = {
        service: [
            method.name
            for method in descriptor_pool.Default().FindServiceByName(service).methods
            if not method.client_streaming and not method.server_streaming
        ]
        for service in (*SERVICES.values(), "grpc.health.v1.Health")
    }
    calls = set().union(
        *(
            label_sets(grpc_type=["unary"], grpc_service=[service], grpc_method=names)
            for service, names in methods.items()
        )
    )
    assert series(fresh, "grpc_server_started", "_total") == dict.fromkeys(calls, 0)
    assert series(fresh, "grpc_server_handled", "_total") == dict.fromkeys(
        {call | {("grpc_code", code)} for call in calls for code in codes}, 0
    )
    assert series(fresh, "grpc_server_msg_received", "_total") == dict.fromkeys(calls, 0)
    assert series(fresh, "grpc_server_msg_sent", "_total") == dict.fromkeys(calls, 0)
    # The gateway's calls to recall and ranking, counted on its side.
    downstream_calls = set().union(
        *(
            label_sets(grpc_type=["unary"], grpc_service=[service], grpc_method=methods[service])
            for service in (SERVICES["recall"], SERVICES["ranking"])
        )
    )
    assert series(fresh, "grpc_client_started", "_total") == dict.fromkeys(downstream_calls, 0)
    assert series(fresh, "grpc_client_handled", "_total") == dict.fromkeys(
        {call | {("grpc_code", code)} for call in downstream_calls for code in codes}, 0
    )
    fallbacks = label_sets(
        adrec_service=["gateway"], reason=enum_values(gateway_pb2.DegradationReason)
    ) | label_sets(adrec_service=["recall"], reason=enum_values(recall_service_pb2.FallbackReason))
    assert series(fresh, "adrec_fallbacks", "_total") == dict.fromkeys(fallbacks, 0)
    answers = label_sets(
        adrec_service=["gateway"],
        mode=enum_values(gateway_pb2.RecommendMode),
        path=enum_values(gateway_pb2.ServingPath),
    )
    assert series(fresh, "adrec_recommendations", "_total") == dict.fromkeys(answers, 0)
    refusals = label_sets(
        adrec_service=["ranking"], reason=["model_spec_mismatch", "bad_version_data"]
    )
    assert series(fresh, "adrec_model_reload_failures", "_total") == dict.fromkeys(refusals, 0)
    # One enum labels every service's Redis operations, the controls' and the admin
    # API's among them.
    redis_errors = label_sets(adrec_service=list(SERVICES), op=[op.value for op in RedisOp])
    assert {"ad_state_seq", "record_served", "ad_state_write", "load_bids"} <= {
        op.value for op in RedisOp
    }
    assert series(fresh, "adrec_redis_errors", "_total") == dict.fromkeys(redis_errors, 0)
    # Calls shed over a server's limit (health is never shed), and calls that ended before
    # their handler ran.
    methods_of = {call - {("grpc_type", "unary")} for call in calls}
    assert series(fresh, "adrec_shed", "_total") == dict.fromkeys(
        {
            labels
            for labels in methods_of
            if ("grpc_service", "grpc.health.v1.Health") not in labels
        },
        0,
    )
    assert series(fresh, "adrec_abandoned", "_total") == dict.fromkeys(methods_of, 0)

    # The first failure: ranking has gone away, and the gateway answers from a fallback.
    reason = reasons(answer)[0]
    assert reason in ("RANKING_UNAVAILABLE", "RANKING_DEADLINE_EXCEEDED")
    fallback = frozenset({"adrec_service": "gateway", "reason": reason.lower()}.items())
    assert fresh_and_after(fresh, after, "adrec_fallbacks", fallback) == (0, 1)
    failed_call = frozenset(
        {
            "grpc_type": "unary",
            "grpc_service": SERVICES["ranking"],
            "grpc_method": "RankCandidates",
            "grpc_code": "Unavailable" if reason == "RANKING_UNAVAILABLE" else "DeadlineExceeded",
        }.items()
    )
    assert fresh_and_after(fresh, after, "grpc_client_handled", failed_call) == (0, 1)
    served = frozenset(
        {"adrec_service": "gateway", "mode": "realtime", "path": path(answer).lower()}.items()
    )
    assert fresh_and_after(fresh, after, "adrec_recommendations", served) == (0, 1)


def test_the_gateway_sheds_a_burst_over_its_limit_and_its_calls_downstream_still_get_through(
    redis_client, redis_url
):
    """`serve all`, the gateway admitting 2 calls at once: a burst gets RESOURCE_EXHAUSTED
    for the excess, each counted, and never UNKNOWN. The limit is the gateway server's own,
    so the calls it makes to recall and ranking in the same process are admitted by theirs:
    every admitted call is answered ranked. Bytes that are no RecommendRequest get
    INVALID_ARGUMENT, counted with the other answers."""
    data = publish_version(redis_client)
    user = data.users_with_factors[0]
    burst = 150

    async def scenario():
        async with (
            # The whole burst on one connection reaches the gateway: the streams bound per
            # connection, tested on its own, would refuse part of it in the transport.
            running_stack(
                redis_url,
                ADREC_GATEWAY_MAX_CONCURRENT_RPCS=2,
                ADREC_GATEWAY_MAX_STREAMS_PER_CONNECTION=1000,
            ) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):

            async def one() -> str:
                try:
                    answer = await recommend(
                        channel, timeout=30, user_id=user, pid=PIDS[0], count=5
                    )
                except grpc.aio.AioRpcError as error:
                    assert error.details() == (
                        "server busy: at its limit of 2 concurrent calls; retry later"
                    )
                    return error.code().name
                return path(answer)

            outcomes = await asyncio.gather(*(one() for _ in range(burst)))
            raw = channel.unary_unary("/adrec.gateway.v1.GatewayService/Recommend")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(b"\xff" * 16, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == (
                "request is not a valid adrec.gateway.v1.RecommendRequest"
            )
            await wait_until(lambda: stack.services["gateway"].server.calls_running == 0)
            return outcomes, await asyncio.to_thread(scrape, stack.metrics_port)

    outcomes, families = asyncio.run(asyncio.wait_for(scenario(), timeout=90))
    shed = outcomes.count("RESOURCE_EXHAUSTED")
    assert 0 < shed < burst
    assert set(outcomes) == {"RESOURCE_EXHAUSTED", "REALTIME_RANKED"}

    def handled(service: str, method: str, code: str) -> list[float]:
        return samples(
            families,
            "grpc_server_handled",
            "_total",
            grpc_service=SERVICES[service],
            grpc_method=method,
            grpc_code=code,
        )

    def shed_count(service: str, method: str) -> list[float]:
        labels = {"grpc_service": SERVICES[service], "grpc_method": method}
        return samples(families, "adrec_shed", "_total", **labels)

    assert shed_count("gateway", "Recommend") == [shed]
    assert handled("gateway", "Recommend", "ResourceExhausted") == [shed]
    assert handled("gateway", "Recommend", "OK") == [burst - shed]
    assert handled("gateway", "Recommend", "InvalidArgument") == [1]
    assert handled("gateway", "Recommend", "Unknown") == [0]
    assert shed_count("recall", "GetCandidates") == [0]
    assert shed_count("ranking", "RankCandidates") == [0]
    assert handled("ranking", "RankCandidates", "OK") == [burst - shed]


def test_serve_all_process_answers_the_cli_logs_json_and_drains_on_sigterm(
    redis_client, redis_url, tmp_path: Path, capsys
):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]
    log_path = tmp_path / "serve.log"

    async def scenario():
        async with service_process(redis_url, "all", log_path=log_path) as served:
            gateway = f"127.0.0.1:{served.ports['gateway']}"
            async with loopback_channel(served.ports["gateway"]) as channel:

                async def serving():
                    return await health_status(channel) == SERVING

                await wait_until(serving, timeout=20)

            args = [
                "recommend",
                str(user),
                "--count",
                "4",
                "--gateway",
                gateway,
                "--request-id",
                "cli-1",
            ]
            assert await asyncio.to_thread(main, args) == 0
            table = capsys.readouterr().out.splitlines()
            assert table[0].startswith("path realtime_ranked  mode realtime  degraded: no")
            assert table[1] == (
                f"data {data.version}  model {data.version}/"
                f"{data.model.spec.spec_id}  request cli-1"
            )
            ids, ctrs, _ = expected_ranking(data, user, PIDS[0], data.recall_lists[user])
            assert [line.split() for line in table[3:]] == [
                [str(rank), str(ad), f"{ctr:.5f}"]
                for rank, (ad, ctr) in enumerate(zip(ids[:4], ctrs[:4], strict=True), start=1)
            ]

            args = [
                "recommend",
                "4242",
                "--mode",
                "offline",
                "--pid",
                PIDS[1],
                "--json",
                "--gateway",
                gateway,
                "--request-id",
                "cli-2",
            ]
            assert await asyncio.to_thread(main, args) == 0
            answer = json.loads(capsys.readouterr().out)
            assert answer["servingPath"] == "SERVING_PATH_POPULAR"
            assert answer["degradationReasons"] == [
                "DEGRADATION_REASON_NO_OFFLINE_LIST",
                "DEGRADATION_REASON_NO_RECALL_SET",
            ]

            metrics = await asyncio.to_thread(scrape, served.ports["metrics"])
            assert samples(metrics, "grpc_server_started", "_total", grpc_method="Recommend") == [2]

            served.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0

        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert all({"ts", "level", "service", "msg"} <= set(line) for line in lines)
        assert {line["service"] for line in lines} >= {"recall", "ranking", "gateway"}
        degraded = [line for line in lines if line["msg"] == "degraded answer"]
        assert [line["request_id"] for line in degraded] == ["cli-2"]
        assert any(line["msg"].startswith("received SIGTERM") for line in lines)

    run(scenario, timeout=60)


def test_recommend_cli_reports_bad_input_and_an_unreachable_gateway(capsys):
    gateway = f"127.0.0.1:{free_port()}"
    assert main(["recommend", "0", "--gateway", gateway]) == 2
    assert "USER: must be a positive id" in capsys.readouterr().err
    assert main(["recommend", "7", "--count", "501", "--gateway", gateway]) == 2
    assert "--count: must be between 1 and 500" in capsys.readouterr().err
    assert main(["recommend", "7", "--pid", "x", "--gateway", gateway]) == 2
    assert "--pid: 'x' is not a known placement" in capsys.readouterr().err
    assert main(["recommend", "7", "--gateway", gateway, "--timeout", "2"]) == 1
    assert f"cannot reach the gateway at {gateway}" in capsys.readouterr().err


def test_bad_settings_stop_the_start_naming_each_env_var_and_flag(monkeypatch, capsys):
    monkeypatch.setenv("ADREC_RECALL_PORT", "fifty")
    monkeypatch.setenv("ADREC_RELOAD_INTERVAL_SECONDS", "0")
    assert main(["serve", "recall", "--redis", "http://nope"]) == 2
    error = capsys.readouterr().err
    assert "ADREC_RECALL_PORT='fifty': expected an integer" in error
    assert "ADREC_RELOAD_INTERVAL_SECONDS='0': must be between" in error
    assert "--redis-url (or REDIS_URL)='http://nope'" in error

    monkeypatch.delenv("ADREC_RECALL_PORT")
    monkeypatch.delenv("ADREC_RELOAD_INTERVAL_SECONDS")
    assert (
        main(["serve", "gateway", "--ranking-timeout-ms", "0", "--fallback-reserve-ms", "500"]) == 2
    )
    error = capsys.readouterr().err
    assert "--ranking-timeout-ms (or ADREC_RANKING_TIMEOUT_MS)='0'" in error

    assert main(["serve", "gateway", "--fallback-reserve-ms", "500"]) == 2
    assert (
        "ADREC_FALLBACK_RESERVE_MS must be smaller than ADREC_REQUEST_TIMEOUT_MS"
        in capsys.readouterr().err
    )

    assert main(["serve", "ranking", "--redis", "http://nope"]) == 2
    assert "REDIS_URL" in capsys.readouterr().err


def test_the_serve_command_only_parses_and_leaves_the_wiring_to_the_runtime():
    # Building the command line must not import the services: `adrec --help` stays light.
    probe = (
        "import sys; from adrec.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['services', 'recall'], ['services', 'ranking'], ['services', 'gateway'], "
        "['services', 'events'], ['services', 'process'])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
    assert set(process.TARGETS) == set(SETTINGS)

    async def unknown_target():
        async with process.serving("search", SETTINGS["recall"](), RedisSettings()):
            pass

    with pytest.raises(ValueError, match="unknown target 'search'"):
        run(unknown_target)


def test_each_service_declares_its_env_vars_and_ports():
    assert set(SETTINGS) == {"recall", "ranking", "gateway", "events", "admin", "all"}
    assert {"ADREC_RECALL_PORT", "ADREC_METRICS_PORT", "REDIS_URL"} <= set(
        service_env_names("recall")
    )
    assert "ADREC_RANKING_ADDRESS" in service_env_names("gateway")
    assert "ADREC_GATEWAY_PORT" not in service_env_names("ranking")
    assert "ADREC_EVENTS_LOG_MAX_LENGTH" in service_env_names("events")
    assert "ADREC_EVENTS_PORT" in service_env_names("all")
    assert "ADREC_EVENTS_PORT" not in service_env_names("gateway")
    defaults = {name: SETTINGS[name]() for name in ("recall", "ranking", "gateway", "events")}
    ports = {
        defaults["recall"].recall_port,
        defaults["ranking"].ranking_port,
        defaults["gateway"].gateway_port,
        defaults["events"].events_port,
    }
    assert len(ports) == 4
    assert defaults["gateway"].ranking_address.endswith(f":{defaults['ranking'].ranking_port}")
    assert defaults["recall"].reload_interval_seconds > TEST_RELOAD_SECONDS


def test_the_creation_time_of_a_version_comes_from_its_metadata_or_is_not_exported():
    def created_at(text: str) -> float | None:
        return VersionMeta("v1", "run", text, 0, VersionContent()).created_at_unix

    assert (
        created_at("2026-11-28T02:30:00+00:00")
        == dt.datetime(2026, 11, 28, 2, 30, tzinfo=dt.UTC).timestamp()
    )
    assert (
        created_at("2026-11-28T03:30:00+01:00")
        == dt.datetime(2026, 11, 28, 2, 30, tzinfo=dt.UTC).timestamp()
    )
    assert (
        created_at("2026-11-28T02:30:00")
        == dt.datetime(2026, 11, 28, 2, 30, tzinfo=dt.UTC).timestamp()
    )
    for text in ("", "yesterday"):
        assert created_at(text) is None

    metrics = Metrics()
    recall = metrics.service("recall")

    def exported() -> float | None:
        return metrics.registry.get_sample_value(
            "adrec_data_version_created_timestamp_seconds", {"adrec_service": "recall"}
        )

    recall.set_data_version("v1", 1764297000.0)
    assert exported() == 1764297000.0
    # A version whose metadata has no creation time must not inherit the previous one's.
    recall.set_data_version("v2", None)
    assert exported() is None
    recall.set_data_version("v3", 1764383400.0)
    assert exported() == 1764383400.0
