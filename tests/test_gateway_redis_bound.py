"""A hung Redis costs a Recommend call each read's own bound, never the caller's deadline."""

from __future__ import annotations

import signal
import time

import redis
from grpc_helpers import loopback_channel
from service_data import PIDS, path, publish_version, reasons, recommend, run, service_settings

from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import private_redis
from services.process import serving

CALLER_DEADLINE_S = 2.0
READ_BOUND_MS = 30
RECALL_BUDGET_MS = 100


def test_a_hung_redis_answers_from_memory_long_before_the_callers_deadline():
    # Its own redis-server: the test stops it.
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        data = publish_version(client)
        user = data.users_with_factors[0]
        settings = service_settings(
            "all",
            ADREC_GATEWAY_REDIS_READ_TIMEOUT_MS=READ_BOUND_MS,
            # The test settings' downstream budgets suit a slow machine; here they would
            # hide the reads' own bound.
            ADREC_RECALL_TIMEOUT_MS=RECALL_BUDGET_MS,
            # With a cap, each answer also records the ads it served: a write that must not
            # wait on a hung Redis either.
            ADREC_GATEWAY_FREQUENCY_CAPS="ad:3/24h",
        )

        async def scenario():
            async with (
                serving(
                    "all", settings, RedisSettings(url=server.url, socket_timeout_s=5.0)
                ) as stack,
                loopback_channel(stack.services["gateway"].port) as channel,
            ):
                answer = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
                assert path(answer) == "REALTIME_RANKED"
                server.process.send_signal(signal.SIGSTOP)
                try:
                    for _ in range(3):
                        started = time.monotonic()
                        response = await recommend(
                            channel, timeout=CALLER_DEADLINE_S, user_id=user, pid=PIDS[0], count=5
                        )
                        elapsed = time.monotonic() - started
                        assert path(response) == "POPULAR"
                        assert "NO_OFFLINE_LIST" in reasons(response)
                        assert [ad.ad_id for ad in response.ads] == data.popular[PIDS[0]][
                            :5
                        ].tolist()
                        # The recall call's 100 ms and a few 30 ms reads, not the 2 s the
                        # caller allows (nor Redis' own 5 s socket bound): the answer from
                        # memory leaves with most of the deadline unspent.
                        assert elapsed < 0.5
                finally:
                    server.process.send_signal(signal.SIGCONT)

        run(scenario)
