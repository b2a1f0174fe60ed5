"""The gateway's record of the ads it served (services/gateway/controls.py ServedRecorder)
on a real redis-server: counted at once by the answering process, written together a
moment later, written on close, and a failed write counted, never in an answer's way."""

from __future__ import annotations

import asyncio
import signal
import time

import redis
from service_data import run

from adrec.core.adstate import ServedAds
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import private_redis
from services.gateway.controls import SERVED_WRITE_TIMEOUT_SECONDS, ServedRecorder
from services.runtime.data import RedisReader, client_without_socket_timeouts
from services.runtime.metrics import SERVICE_LABEL, Metrics


def recorder_of(url: str, warnings: list[str]) -> ServedRecorder:
    reader = RedisReader(
        client_without_socket_timeouts(RedisSettings(url=url)), Metrics().service("gateway"), 5.0
    )
    return ServedRecorder(reader, ServedAds(60), lambda message, _error: warnings.append(message))


def stored(client: redis.Redis, served: ServedAds, user: int, now: float) -> list[int]:
    return sorted(served.decode(client.mget(served.read_keys(user, now))).tolist())


def test_served_ads_count_at_once_here_and_reach_redis_together(redis_client, redis_url):
    warnings: list[str] = []

    async def scenario():
        recorder = recorder_of(redis_url, warnings)
        now = time.time()
        try:
            recorder.add(7, [1, 2], now)
            recorder.add(8, [3], now)
            recorder.add(7, [2], now)
            # Before any write: this process counts them.
            assert sorted(recorder.of(7, [None, None], now).tolist()) == [1, 2, 2]
            assert stored(redis_client, recorder.ads, 7, now) == []
            await recorder.flush()
            assert stored(redis_client, recorder.ads, 7, now) == [1, 2, 2]
            assert stored(redis_client, recorder.ads, 8, now) == [3]
            # Written: counted from Redis alone, not twice.
            values = redis_client.mget(recorder.ads.read_keys(7, now))
            assert sorted(recorder.of(7, values, now).tolist()) == [1, 2, 2]
            # A stopping gateway writes what still waits.
            recorder.add(9, [4], now)
            await recorder.aclose()
            assert stored(redis_client, recorder.ads, 9, now) == [4]
        finally:
            await recorder.reader.aclose()
            await recorder.reader.client.aclose()
        assert warnings == []

    run(scenario)


def test_a_write_to_a_hung_redis_is_counted_and_holds_up_nothing():
    warnings: list[str] = []
    # Its own redis-server: the test stops it.
    with private_redis() as server:

        async def scenario():
            recorder = recorder_of(server.url, warnings)
            now = time.time()
            server.process.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                recorder.add(7, [1], now)
                # The answer never waits for the write.
                assert time.monotonic() - started < 0.05
                assert recorder.of(7, [], now).tolist() == [1]
                await asyncio.sleep(SERVED_WRITE_TIMEOUT_SECONDS + 0.5)
                assert warnings == ["cannot record the ads served"]
                registry = recorder.reader.metrics.metrics.registry
                errors = registry.get_sample_value(
                    "adrec_redis_errors_total", {SERVICE_LABEL: "gateway", "op": "record_served"}
                )
                assert errors == 1.0
                # A failed write is not retried: the caps rest on the impressions.
                assert recorder.of(7, [], now).tolist() == []
            finally:
                server.process.send_signal(signal.SIGCONT)
                await recorder.aclose()
                await recorder.reader.aclose()
                await recorder.reader.client.aclose()

        run(scenario)
