"""The services' Redis reads: RedisReader over its direct GET connections, and the services
reading a published version through gRPC in each Redis mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel
from redis.exceptions import RedisError
from redis_fixtures import TLS_PASSWORD
from service_data import (
    PIDS,
    expected_ranking,
    metric,
    path,
    publish_version,
    recommend,
    run,
    running_stack,
    wait_until,
)

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import private_redis
from services.runtime.app import DATA_HEALTH_NAME
from services.runtime.data import (
    MAX_IDLE_CONNECTIONS,
    MAX_OPEN_CONNECTIONS,
    DirectGets,
    RedisReader,
    client_without_socket_timeouts,
)
from services.runtime.metrics import SERVICE_LABEL, Metrics

OFFLINE = gateway_pb2.RECOMMEND_MODE_OFFLINE
#: Time limit of each read: no test here waits for it to run out, so it is wide enough that
#: a read on a loaded machine never does.
READ_TIMEOUT_SECONDS = 5.0


@asynccontextmanager
async def reader_of(url: str) -> AsyncIterator[RedisReader]:
    """A reader as the services make one; its connections and its client closed after."""
    client = client_without_socket_timeouts(RedisSettings(url=url))
    reader = RedisReader(client, Metrics().service("recall"), READ_TIMEOUT_SECONDS)
    try:
        yield reader
    finally:
        await reader.aclose()
        await client.aclose()


def test_gets_values_and_misses_over_reused_connections(redis_client, redis_url):
    redis_client.set(b"adrec:test:a", b"\x00\x01binary")

    async def scenario():
        async with reader_of(redis_url) as reader:
            assert isinstance(reader._direct, DirectGets)
            for _ in range(3):
                assert await reader.get(b"adrec:test:a", op="recall") == b"\x00\x01binary"
                assert await reader.get(b"adrec:test:missing", op="recall") is None
            # Sequential GETs share one connection; concurrent ones open more.
            assert reader._direct.open_connections == 1
            values = await asyncio.gather(
                *(reader.get(b"adrec:test:a", op="recall") for _ in range(5))
            )
            assert values == [b"\x00\x01binary"] * 5
            assert 1 < reader._direct.open_connections <= 5

    run(scenario)


def test_a_get_cancelled_mid_reply_leaves_no_reply_behind_for_the_next(redis_client, redis_url):
    redis_client.set(b"adrec:test:a", b"a")
    redis_client.set(b"adrec:test:b", b"b")

    async def scenario():
        async with reader_of(redis_url) as reader:
            assert await reader.get(b"adrec:test:b", op="recall") == b"b"  # connected
            # Out of time at once: the GET is written (no wait for that on an idle socket)
            # and cut off waiting for its reply.
            with pytest.raises(redis.exceptions.TimeoutError):
                await reader.get(b"adrec:test:a", op="recall", timeout=0)
            assert await reader.get(b"adrec:test:b", op="recall") == b"b"
            assert reader._direct.open_connections == 1

    run(scenario)


def test_idle_connections_survive_a_redis_restart_and_fail_while_it_is_down():
    with private_redis() as server:
        redis.Redis.from_url(server.url).set(b"k", b"before")

        async def scenario():
            async with reader_of(server.url) as reader:
                assert await reader.get(b"k", op="recall") == b"before"
                await asyncio.to_thread(server.stop)
                with pytest.raises(RedisError):
                    await reader.get(b"k", op="recall")
                await asyncio.to_thread(server.restart)
                # The restarted server lost the key; what matters is an answer, not an error.
                assert await reader.get(b"k", op="recall") is None

        run(scenario)


def test_stale_connection_is_retried_once_on_a_new_socket():
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        client.set(b"k", b"v")

        async def scenario():
            async with reader_of(server.url) as reader:
                assert await reader.get(b"k", op="recall") == b"v"
                # The server drops every client connection, as on a restart or idle timeout.
                client.client_kill_filter(_type="normal", skipme=True)
                assert await reader.get(b"k", op="recall") == b"v"
                errors = reader.metrics.metrics.registry.get_sample_value(
                    "adrec_redis_errors_total", {"adrec_service": "recall", "op": "recall"}
                )
                assert not errors

        run(scenario)
        client.close()


def test_a_burst_of_reads_is_served_over_a_bounded_number_of_connections(redis_client, redis_url):
    redis_client.set(b"adrec:test:a", b"a")
    baseline = int(redis_client.info("clients")["connected_clients"])

    async def scenario():
        async with reader_of(redis_url) as reader:
            direct = reader._direct
            peak = 0
            done = asyncio.Event()

            async def sample():
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, direct.open_connections)
                    await asyncio.sleep(0)

            sampler = asyncio.create_task(sample())
            values = await asyncio.gather(
                *(reader.get(b"adrec:test:a", op="recall") for _ in range(600))
            )
            done.set()
            await sampler
            assert values == [b"a"] * 600
            assert 1 < peak <= MAX_OPEN_CONNECTIONS
            # Once the burst is over only the idle ones stay, on both sides.
            assert direct.open_connections <= MAX_IDLE_CONNECTIONS
            connected = int(redis_client.info("clients")["connected_clients"])
            assert connected - baseline <= MAX_IDLE_CONNECTIONS

    run(scenario)


def test_the_services_serve_a_published_version_in_every_redis_mode(
    redis_target, any_redis, caplog
):
    data = publish_version(any_redis)
    users = (data.users_with_factors[0], data.users_without_factors[0], data.users_with_factors[5])

    async def scenario():
        async with (
            running_stack(redis_target.settings) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert (
                await health_status(channel, DATA_HEALTH_NAME)
                == health_pb2.HealthCheckResponse.SERVING
            )
            for user in users:
                response = await recommend(channel, user_id=user, pid=PIDS[1], count=10)
                ids, _, _ = expected_ranking(data, user, PIDS[1], data.recall_lists[user])
                assert path(response) == "REALTIME_RANKED"
                assert [ad.ad_id for ad in response.ads] == ids[:10]
                assert response.data_version == data.version
            offline = await recommend(channel, user_id=users[0], pid=PIDS[0], count=5, mode=OFFLINE)
            assert path(offline) == "OFFLINE_RANKED"
            assert [ad.ad_id for ad in offline.ads] == data.offline_lists[users[0]][0][:5].tolist()
            for service in ("recall", "ranking", "gateway"):
                watcher = stack.services[service].watcher
                expected_nodes = 3 if redis_target.mode == "cluster" else 1
                assert len(watcher.nodes) == expected_nodes
                assert all(node.reachable and not node.missing for node in watcher.nodes)
                # A check slowed past its time limit on a loaded machine counts as a failure
                # until the next poll, 0.1 s later.
                await wait_until(
                    lambda name=service: (
                        metric(stack, "adrec_redis_up", **{SERVICE_LABEL: name}) == 1
                    )
                )
                assert metric(stack, "adrec_data_loss_detected", **{SERVICE_LABEL: service}) == 0

    run(scenario)
    assert TLS_PASSWORD not in caplog.text


def test_several_gets_share_one_round_trip_and_an_error_reply_fails_them_all(
    redis_client, redis_url
):
    redis_client.set(b"adrec:test:a", b"a")
    redis_client.rpush(b"adrec:test:list", b"x")

    async def scenario():
        async with reader_of(redis_url) as reader:
            both = [(b"adrec:test:a", "recall"), (b"adrec:test:missing", "offline")]
            assert await reader.get_many(both, READ_TIMEOUT_SECONDS) == [b"a", None]
            assert reader._direct.open_connections == 1
            # A GET of a list is an error reply; the replies after it are still read.
            wrong = [(b"adrec:test:list", "recall"), (b"adrec:test:a", "offline")]
            with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
                await reader.get_many(wrong, READ_TIMEOUT_SECONDS)
            assert reader.last_failure == "ResponseError"
            # The connection holds no reply of the failed read.
            assert await reader.get(b"adrec:test:a", op="recall") == b"a"
            assert reader._direct.open_connections == 1
            metrics = reader.metrics.metrics.registry
            errors = {
                op: metrics.get_sample_value(
                    "adrec_redis_errors_total", {SERVICE_LABEL: "recall", "op": op}
                )
                for op in ("recall", "offline")
            }
            assert errors == {"recall": 1.0, "offline": 1.0}

    run(scenario)
