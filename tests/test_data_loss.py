"""Data loss under running services: a Redis, or one Redis Cluster node, restarted empty.

The services keep the loaded version in memory, so nothing fails when Redis loses its data:
users silently get fallbacks. The version's sentinels, checked every poll, tell; the
services report it (metrics, the `data` health name, an error log line) and keep their
readiness, and a new publish clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel
from redis.cluster import RedisCluster
from service_data import metric, publish_version, run, running_stack, wait_until

from adrec.core import keys
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import private_cluster, private_redis
from services.runtime.app import DATA_HEALTH_NAME
from services.runtime.metrics import SERVICE_LABEL

SERVICES = ("recall", "ranking", "gateway")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: The services' default poll interval: detection must come within a few of them.
POLL_SECONDS = 2.0
#: Bound on noticing the loss: a few polls, generous for a loaded 2-core machine.
DETECTION_BOUND_SECONDS = 15.0


def gauge(stack, name: str) -> list[float]:
    return [metric(stack, name, **{SERVICE_LABEL: service}) for service in SERVICES]


def test_a_redis_restarted_empty_is_detected_within_seconds_and_cleared_by_a_publish(caplog):
    caplog.set_level(logging.INFO)
    with private_redis() as server, contextlib.closing(redis.Redis.from_url(server.url)) as client:
        publish_version(client)

        async def scenario():
            async with (
                running_stack(server.url, ADREC_RELOAD_INTERVAL_SECONDS=POLL_SECONDS) as stack,
                loopback_channel(stack.services["gateway"].port) as channel,
            ):
                assert gauge(stack, "adrec_data_loss_detected") == [0, 0, 0]
                assert await health_status(channel, DATA_HEALTH_NAME) == SERVING

                await asyncio.to_thread(server.restart)
                await wait_until(
                    lambda: gauge(stack, "adrec_data_loss_detected") == [1, 1, 1],
                    timeout=DETECTION_BOUND_SECONDS,
                )
                # A first check may find the pointer gone before Redis takes the sentinel
                # reads again; the next one counts them all.
                await wait_until(
                    lambda: (
                        gauge(stack, "adrec_version_sentinels_missing") == [keys.SENTINEL_COUNT] * 3
                    ),
                    timeout=DETECTION_BOUND_SECONDS,
                )
                assert await health_status(channel, DATA_HEALTH_NAME) == NOT_SERVING
                # Readiness stays: every replica reads the same Redis, and the gateway
                # answers from memory.
                assert await health_status(channel) == SERVING
                lost = [r for r in caplog.records if r.getMessage().startswith("data loss")]
                assert {record.levelno for record in lost} == {logging.ERROR}
                # One line per service, not one per poll.
                assert sorted(record.name for record in lost) == sorted({r.name for r in lost})
                assert {f"services.{service}" for service in SERVICES} <= {r.name for r in lost}

                await asyncio.to_thread(publish_version, client, seed=8)
                await wait_until(
                    lambda: gauge(stack, "adrec_data_loss_detected") == [0, 0, 0],
                    timeout=DETECTION_BOUND_SECONDS,
                )
                assert gauge(stack, "adrec_version_sentinels_missing") == [0, 0, 0]
                assert await health_status(channel, DATA_HEALTH_NAME) == SERVING

        run(scenario, timeout=120)


def test_one_cluster_node_restarted_empty_is_detected_within_seconds():
    with private_cluster() as cluster:
        client = RedisCluster.from_url(cluster.url)
        publish_version(client)
        restarted = cluster.nodes[1]
        # The sentinels that node held: the ones whose slot it serves.
        first, last = cluster.slot_ranges[1]
        on_node = [key for key in keys.sentinel_keys("v1") if first <= keys.key_slot(key) <= last]
        assert 0 < len(on_node) < keys.SENTINEL_COUNT

        async def scenario():
            settings = RedisSettings(url=cluster.url, cluster=True)
            async with (
                running_stack(settings, ADREC_RELOAD_INTERVAL_SECONDS=POLL_SECONDS) as stack,
                loopback_channel(stack.services["gateway"].port) as channel,
            ):
                assert gauge(stack, "adrec_data_loss_detected") == [0, 0, 0]
                await asyncio.to_thread(restarted.restart)
                await asyncio.to_thread(cluster.wait_ok)
                await wait_until(
                    lambda: gauge(stack, "adrec_data_loss_detected") == [1, 1, 1],
                    timeout=DETECTION_BOUND_SECONDS,
                )
                # Exactly that node's sentinels: the other nodes kept theirs.
                await wait_until(
                    lambda: gauge(stack, "adrec_version_sentinels_missing") == [len(on_node)] * 3,
                    timeout=DETECTION_BOUND_SECONDS,
                )
                assert await health_status(channel, DATA_HEALTH_NAME) == NOT_SERVING
                assert await health_status(channel) == SERVING
                for service in SERVICES:
                    nodes = stack.services[service].watcher.nodes
                    assert [node.node for node in nodes if node.missing] == [
                        f"127.0.0.1:{restarted.port}"
                    ]

        run(scenario, timeout=120)
        client.close()
