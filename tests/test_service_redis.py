"""The services' Redis reads: RedisReader over its direct GET connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis
from redis.exceptions import RedisError
from service_data import run

from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import private_redis
from services.runtime.data import (
    MAX_IDLE_CONNECTIONS,
    MAX_OPEN_CONNECTIONS,
    DirectGets,
    RedisReader,
    client_without_socket_timeouts,
)
from services.runtime.metrics import Metrics

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
                    "adrec_redis_errors_total", {"service": "recall", "op": "recall"}
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
