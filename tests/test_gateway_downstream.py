"""The gateway's channels to recall and ranking: client-side health checking over several
backends, and the client-side gRPC metrics of its calls. Real services, Redis and gRPC."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel
from service_data import (
    PIDS,
    metric,
    path,
    publish_version,
    reasons,
    recommend,
    run,
    running_stack,
    wait_until,
)

from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core.redis_server import free_port
from services.process import Stack

RECALL = "adrec.recall.v1.RecallService"
RANKING = "adrec.ranking.v1.RankingService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALLS = 40


def unreachable_redis_url() -> str:
    """A loopback port nobody listens on: a service pointed at it stays NOT_SERVING."""
    return f"redis://127.0.0.1:{free_port()}/0"


async def status_of(port: int) -> int:
    async with loopback_channel(port) as channel:
        return await health_status(channel)


def started_calls(stack: Stack, service: str, method: str) -> float:
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
    return metric(stack, "grpc_server_started_total", **labels)


def client_calls(stack: Stack, service: str, method: str, code: str | None = None) -> float:
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
    if code is None:
        return metric(stack, "grpc_client_started_total", **labels)
    return metric(stack, "grpc_client_handled_total", grpc_code=code, **labels)


@contextlib.asynccontextmanager
async def two_recall_backends(redis_url: str) -> AsyncIterator[tuple[Stack, Stack, Stack, Stack]]:
    """Recall A (serving), recall B (NOT_SERVING: its Redis is unreachable), ranking, and a
    gateway whose recall target lists both backends' addresses."""
    async with (
        running_stack(redis_url, "recall") as healthy,
        running_stack(unreachable_redis_url(), "recall") as unhealthy,
        running_stack(redis_url, "ranking") as ranking,
    ):
        healthy_port = healthy.services["recall"].port
        unhealthy_port = unhealthy.services["recall"].port

        async def healthy_serves() -> bool:
            return await status_of(healthy_port) == SERVING

        await wait_until(healthy_serves)
        assert await status_of(unhealthy_port) == NOT_SERVING
        async with running_stack(
            redis_url,
            "gateway",
            ADREC_RECALL_ADDRESS=f"ipv4:127.0.0.1:{healthy_port},127.0.0.1:{unhealthy_port}",
            ADREC_RANKING_ADDRESS=f"127.0.0.1:{ranking.services['ranking'].port}",
        ) as gateway:
            yield healthy, unhealthy, ranking, gateway


def test_with_one_of_two_recall_backends_not_serving_no_answer_degrades(redis_client, redis_url):
    """Round robin alone sends every other call to the NOT_SERVING backend, which answers
    UNAVAILABLE (checked directly below): half the answers would fall back. The gateway's
    channel watches both backends' health and sends them all to the serving one."""
    data = publish_version(redis_client)
    users = [data.users_with_factors[i % len(data.users_with_factors)] for i in range(CALLS)]

    async def scenario():
        async with two_recall_backends(redis_url) as (healthy, unhealthy, ranking, gateway):
            unhealthy_port = unhealthy.services["recall"].port
            # The NOT_SERVING backend is up and would fail every call the gateway sent it.
            async with loopback_channel(unhealthy_port) as channel:
                stub = recall_service_pb2_grpc.RecallServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GetCandidates(
                        recall_service_pb2.GetCandidatesRequest(user_id=users[0], pid=PIDS[0]),
                        timeout=5,
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert started_calls(unhealthy, RECALL, "GetCandidates") == 1

            async with loopback_channel(gateway.services["gateway"].port) as channel:
                answers = [
                    await recommend(channel, user_id=user, pid=PIDS[i % 2], count=10)
                    for i, user in enumerate(users)
                ]
            outcomes = Counter(path(answer) for answer in answers)
            assert outcomes == {"REALTIME_RANKED": CALLS}
            assert [reasons(answer) for answer in answers] == [[]] * CALLS
            assert started_calls(healthy, RECALL, "GetCandidates") == CALLS
            assert started_calls(unhealthy, RECALL, "GetCandidates") == 1
            assert started_calls(ranking, RANKING, "RankCandidates") == CALLS
            # The gateway's own count of its calls, on the client side.
            assert client_calls(gateway, RECALL, "GetCandidates") == CALLS
            assert client_calls(gateway, RECALL, "GetCandidates", "OK") == CALLS
            assert client_calls(gateway, RECALL, "GetCandidates", "Unavailable") == 0
            assert client_calls(gateway, RANKING, "RankCandidates", "OK") == CALLS
            count = metric(
                gateway,
                "grpc_client_handling_seconds_count",
                grpc_type="unary",
                grpc_service=RANKING,
                grpc_method="RankCandidates",
            )
            assert count == CALLS

    run(scenario)


def test_a_backend_turning_not_serving_is_left_out_and_taken_back_when_it_serves_again(
    redis_client, redis_url
):
    """The serving backend turns NOT_SERVING too: with no backend left, recall calls fail at
    once (UNAVAILABLE, not a deadline) and the gateway falls back; once it serves again,
    answers are ranked again."""
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with two_recall_backends(redis_url) as (healthy, _unhealthy, _ranking, gateway):
            recall_server = healthy.services["recall"].server
            async with loopback_channel(gateway.services["gateway"].port) as channel:
                first = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
                assert path(first) == "REALTIME_RANKED"

                await recall_server.set_serving(False)

                async def degraded() -> bool:
                    answer = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
                    return path(answer) != "REALTIME_RANKED"

                await wait_until(degraded)
                answer = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
                assert reasons(answer)[0] == "RECALL_UNAVAILABLE"
                assert path(answer) == "OFFLINE_RANKED"
                assert client_calls(gateway, RECALL, "GetCandidates", "Unavailable") >= 2
                served_before = started_calls(healthy, RECALL, "GetCandidates")

                await recall_server.set_serving(True)

                async def ranked() -> bool:
                    answer = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
                    return path(answer) == "REALTIME_RANKED"

                await wait_until(ranked)
                assert started_calls(healthy, RECALL, "GetCandidates") > served_before

    run(scenario)
