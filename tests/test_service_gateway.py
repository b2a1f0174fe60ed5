"""GatewayService end to end: real recall and ranking services, real Redis, real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import redis
from grpc_helpers import loopback_channel
from service_data import (
    PIDS,
    expected_ranking,
    metric,
    path,
    publish_version,
    reasons,
    recommend,
    run,
    running_stack,
    service_process,
    service_settings,
)

from adrec.api.common.v1 import common_pb2
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.api.gateway.v1 import gateway_service_pb2_grpc
from adrec.core import keys, store
from adrec.core.redis_conn import RedisSettings
from adrec.core.redis_server import free_port, private_redis
from jobs.offline import OFFLINE_PID
from services.process import serving

REALTIME = gateway_pb2.RECOMMEND_MODE_REALTIME
OFFLINE = gateway_pb2.RECOMMEND_MODE_OFFLINE
PERSONAL = common_pb2.CANDIDATE_SOURCE_PERSONAL
POPULAR = common_pb2.CANDIDATE_SOURCE_POPULAR


@contextlib.asynccontextmanager
async def separate_services(redis_url: str, **gateway_env) -> AsyncIterator[dict]:
    """Recall, ranking and gateway as three servers, so one can be stopped on its own."""
    async with (
        running_stack(redis_url, "recall") as recall,
        running_stack(redis_url, "ranking") as ranking,
    ):
        env = {
            "ADREC_RECALL_ADDRESS": f"127.0.0.1:{recall.services['recall'].port}",
            "ADREC_RANKING_ADDRESS": f"127.0.0.1:{ranking.services['ranking'].port}",
            **gateway_env,
        }
        async with (
            running_stack(redis_url, "gateway", **env) as gateway,
            loopback_channel(gateway.services["gateway"].port) as channel,
        ):
            yield {
                "recall": recall.services["recall"],
                "ranking": ranking.services["ranking"],
                "gateway": gateway,
                "channel": channel,
            }


def test_realtime_recommend_end_to_end(redis_client, redis_url):
    data = publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            for user in (data.users_with_factors[0], data.users_without_profile[0]):
                for pid in PIDS:
                    response = await recommend(
                        channel, user_id=user, pid=pid, count=10, request_id=f"r-{user}-{pid}"
                    )
                    ids, ctrs, _ = expected_ranking(data, user, pid, data.recall_lists[user])
                    assert [ad.ad_id for ad in response.ads] == ids[:10]
                    assert [ad.ctr for ad in response.ads] == pytest.approx(ctrs[:10], rel=1e-6)
                    assert path(response) == "REALTIME_RANKED"
                    assert list(response.degradation_reasons) == []
                    assert response.candidate_source == PERSONAL
                    assert response.mode == REALTIME
                    assert response.data_version == data.version
                    assert response.model_version == f"{data.version}/{data.model.spec.spec_id}"
                    assert response.request_id == f"r-{user}-{pid}"
            unspecified = await recommend(
                channel, user_id=data.users_with_factors[1], pid=PIDS[0], count=3
            )
            assert unspecified.mode == REALTIME and path(unspecified) == "REALTIME_RANKED"
            assert len(unspecified.request_id) == 32  # generated
            assert (
                metric(
                    stack,
                    "adrec_recommendations_total",
                    adrec_service="gateway",
                    mode="realtime",
                    path="realtime_ranked",
                )
                == 5
            )

    run(scenario)


def test_offline_recommend_serves_the_jobs_list_converted_to_the_placement(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            offline_ids, offline_ctrs = data.offline_lists[user]
            for pid in PIDS:
                response = await recommend(channel, user_id=user, pid=pid, count=10, mode=OFFLINE)
                realtime = await recommend(channel, user_id=user, pid=pid, count=10)
                assert path(response) == "OFFLINE_RANKED" and response.mode == OFFLINE
                assert [ad.ad_id for ad in response.ads] == offline_ids[:10].tolist()
                assert [ad.ad_id for ad in response.ads] == [ad.ad_id for ad in realtime.ads]
                # Stored as float16: about three significant digits.
                assert [ad.ctr for ad in response.ads] == pytest.approx(
                    [ad.ctr for ad in realtime.ads], rel=2e-3
                )
                if pid == OFFLINE_PID:
                    stored = offline_ctrs[:10].astype(np.float16).astype(np.float32)
                    assert [ad.ctr for ad in response.ads] == stored.tolist()
                assert response.model_version == realtime.model_version
                assert response.data_version == data.version

    run(scenario)


def test_unknown_users_get_popular_ads_in_both_modes(redis_client, redis_url):
    data = publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            for user in (data.users_without_recall[0], 55_555):
                realtime = await recommend(channel, user_id=user, pid=PIDS[1], count=7)
                assert path(realtime) == "POPULAR"
                assert reasons(realtime) == ["NO_RECALL_SET"]
                assert [ad.ad_id for ad in realtime.ads] == data.popular[PIDS[1]][:7].tolist()
                assert not any(ad.HasField("ctr") for ad in realtime.ads)
                assert realtime.candidate_source == POPULAR and realtime.model_version == ""
                offline = await recommend(channel, user_id=user, pid=PIDS[1], count=7, mode=OFFLINE)
                assert path(offline) == "POPULAR"
                assert reasons(offline) == ["NO_OFFLINE_LIST", "NO_RECALL_SET"]
                assert list(offline.ads) == list(realtime.ads)
            assert (
                metric(
                    stack, "adrec_fallbacks_total", adrec_service="gateway", reason="no_recall_set"
                )
                == 4
            )

    run(scenario)


def test_a_user_without_an_offline_list_gets_recall_order_in_offline_mode(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[4]
    redis_client.delete(keys.OFFLINE.key(data.version, user))

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            response = await recommend(channel, user_id=user, pid=PIDS[0], count=12, mode=OFFLINE)
            assert path(response) == "RECALL_ORDER"
            assert reasons(response) == ["NO_OFFLINE_LIST"]
            assert [ad.ad_id for ad in response.ads] == data.recall_lists[user][:12].tolist()

    run(scenario)


def test_ranking_down_falls_back_to_the_offline_list_then_recall_order(redis_client, redis_url):
    data = publish_version(redis_client)
    with_offline = data.users_with_factors[0]
    without_offline = data.users_with_factors[1]
    redis_client.delete(keys.OFFLINE.key(data.version, without_offline))

    async def scenario():
        async with separate_services(redis_url) as services:
            channel = services["channel"]
            assert (
                path(await recommend(channel, user_id=with_offline, pid=PIDS[0], count=5))
                == "REALTIME_RANKED"
            )
            await services["ranking"].server.stop(grace=0)

            offline = await recommend(channel, user_id=with_offline, pid=PIDS[0], count=5)
            assert path(offline) == "OFFLINE_RANKED"
            assert reasons(offline) == ["RANKING_UNAVAILABLE"]
            assert [ad.ad_id for ad in offline.ads] == data.offline_lists[with_offline][0][
                :5
            ].tolist()
            assert all(ad.HasField("ctr") for ad in offline.ads)

            recall_order = await recommend(channel, user_id=without_offline, pid=PIDS[0], count=5)
            assert path(recall_order) == "RECALL_ORDER"
            assert reasons(recall_order) == ["RANKING_UNAVAILABLE", "NO_OFFLINE_LIST"]
            assert [ad.ad_id for ad in recall_order.ads] == data.recall_lists[without_offline][
                :5
            ].tolist()
            assert not any(ad.HasField("ctr") for ad in recall_order.ads)
            assert recall_order.candidate_source == PERSONAL
            assert (
                metric(
                    services["gateway"],
                    "adrec_fallbacks_total",
                    adrec_service="gateway",
                    reason="ranking_unavailable",
                )
                == 2
            )

    run(scenario)


def test_an_outage_logs_a_line_a_second_per_kind_of_degraded_answer_and_counts_all(
    redis_client, redis_url, caplog
):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]
    caplog.set_level(logging.INFO, logger="services.gateway")

    async def scenario():
        async with separate_services(redis_url) as services:
            await services["ranking"].server.stop(grace=0)
            started = time.monotonic()
            for _ in range(30):
                answer = await recommend(services["channel"], user_id=user, pid=PIDS[0], count=5)
                assert reasons(answer) == ["RANKING_UNAVAILABLE"]
            seconds = time.monotonic() - started
            assert (
                metric(
                    services["gateway"],
                    "adrec_fallbacks_total",
                    adrec_service="gateway",
                    reason="ranking_unavailable",
                )
                == 30
            )
            logged = [record for record in caplog.records if record.msg == "degraded answer"]
            assert 1 <= len(logged) <= seconds + 1
            assert logged[0].reasons == ["ranking_unavailable"]
            assert logged[0].similar_answers_not_logged == 0
            assert len(logged) + sum(r.similar_answers_not_logged for r in logged) <= 30

    run(scenario)


def test_recall_down_falls_back_to_the_offline_list_then_popular(redis_client, redis_url):
    data = publish_version(redis_client)
    with_offline = data.users_with_factors[0]

    async def scenario():
        async with separate_services(redis_url) as services:
            channel = services["channel"]
            await services["recall"].server.stop(grace=0)
            offline = await recommend(channel, user_id=with_offline, pid=PIDS[0], count=5)
            assert path(offline) == "OFFLINE_RANKED"
            assert reasons(offline) == ["RECALL_UNAVAILABLE"]

            popular = await recommend(
                channel, user_id=data.users_without_recall[0], pid=PIDS[1], count=5
            )
            assert path(popular) == "POPULAR"
            assert reasons(popular) == ["RECALL_UNAVAILABLE", "NO_OFFLINE_LIST"]
            assert [ad.ad_id for ad in popular.ads] == data.popular[PIDS[1]][:5].tolist()
            assert popular.data_version == data.version

    run(scenario)


def test_a_hung_ranking_costs_only_the_callers_deadline_and_serves_the_offline_list(
    redis_client, redis_url
):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as recall,
            service_process(redis_url, "ranking") as ranking,
        ):
            env = {
                "ADREC_RECALL_ADDRESS": f"127.0.0.1:{recall.services['recall'].port}",
                "ADREC_RANKING_ADDRESS": f"127.0.0.1:{ranking.ports['ranking']}",
                # A budget far beyond the caller's deadline: the caller's must win.
                "ADREC_RANKING_TIMEOUT_MS": 30_000,
                "ADREC_FALLBACK_RESERVE_MS": 800,
            }
            async with (
                running_stack(redis_url, "gateway", **env) as gateway,
                loopback_channel(gateway.services["gateway"].port) as channel,
            ):

                async def ranked():
                    answer = await recommend(channel, user_id=user, pid=PIDS[0], count=5)
                    return path(answer) == "REALTIME_RANKED"

                deadline = time.monotonic() + 20
                while not await ranked():  # the child process is still loading
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)

                ranking.process.send_signal(signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    response = await recommend(
                        channel, timeout=2.0, user_id=user, pid=PIDS[0], count=5
                    )
                    elapsed = time.monotonic() - started
                finally:
                    ranking.process.send_signal(signal.SIGCONT)
                assert path(response) == "OFFLINE_RANKED"
                assert reasons(response) == ["RANKING_DEADLINE_EXCEEDED"]
                assert [ad.ad_id for ad in response.ads] == data.offline_lists[user][0][:5].tolist()
                # Ranking got the caller's 2 s minus the 0.8 s reserve, not its 30 s budget;
                # the reserve is wide enough for the fallback on a busy machine.
                assert 1.0 < elapsed < 2.0

    run(scenario, timeout=60)


def test_a_caller_without_a_deadline_gets_the_configured_request_budget(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as recall,
            service_process(redis_url, "ranking") as ranking,
        ):
            env = {
                "ADREC_RECALL_ADDRESS": f"127.0.0.1:{recall.services['recall'].port}",
                "ADREC_RANKING_ADDRESS": f"127.0.0.1:{ranking.ports['ranking']}",
                "ADREC_REQUEST_TIMEOUT_MS": 2000,
                "ADREC_RANKING_TIMEOUT_MS": 30_000,
                "ADREC_FALLBACK_RESERVE_MS": 800,
            }
            async with (
                running_stack(redis_url, "gateway", **env) as gateway,
                loopback_channel(gateway.services["gateway"].port) as channel,
            ):
                stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
                request = gateway_pb2.RecommendRequest(user_id=user, pid=PIDS[0], count=5)
                deadline = time.monotonic() + 20
                while path(await stub.Recommend(request)) != "REALTIME_RANKED":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                ranking.process.send_signal(signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    response = await stub.Recommend(request)  # no deadline at all
                    elapsed = time.monotonic() - started
                finally:
                    ranking.process.send_signal(signal.SIGCONT)
                assert reasons(response) == ["RANKING_DEADLINE_EXCEEDED"]
                # Ranking got the 2 s request budget minus the 0.8 s reserve.
                assert 1.0 < elapsed < 2.0

    run(scenario, timeout=60)


INVALID_REQUESTS = [
    ({"user_id": 0}, "user_id"),
    ({"user_id": -5}, "user_id"),
    ({"pid": ""}, "pid"),
    ({"pid": "430548_1008"}, "pid"),
    ({"count": 501}, "count"),
    ({"count": -1}, "count"),
    ({"mode": 7}, "mode"),
    # Large values are named, never echoed whole (a 900 KB echo exceeded the status size).
    ({"pid": "p" * 900_000}, "pid"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"request_id": "r" * 900_000}, "request_id"),
]


def test_bad_requests_are_invalid_argument_naming_the_field(redis_client, redis_url):
    publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            valid = {"user_id": 1001, "pid": PIDS[0], "count": 500}
            assert len((await recommend(channel, **valid)).ads) == 492  # 8 unknown skipped
            longest_id = {**valid, "request_id": "r" * 128}
            assert len((await recommend(channel, **longest_id)).ads) == 492
            for change, field in INVALID_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await recommend(channel, **{**valid, **change})
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
                assert error.value.details().startswith(f"{field}: "), error.value.details()
                assert len(error.value.details()) < 300
            # Nothing reached the downstream services.
            assert (
                metric(
                    stack,
                    "grpc_server_started_total",
                    grpc_type="unary",
                    grpc_service="adrec.recall.v1.RecallService",
                    grpc_method="GetCandidates",
                )
                == 2
            )

    run(scenario)


def test_count_bounds_the_answer_on_every_path(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            for count in (1, 50, 500):
                realtime = await recommend(channel, user_id=user, pid=PIDS[0], count=count)
                assert len(realtime.ads) == min(count, 492)
                offline = await recommend(
                    channel, user_id=user, pid=PIDS[0], count=count, mode=OFFLINE
                )
                assert len(offline.ads) == min(count, 50)
                popular = await recommend(channel, user_id=4242, pid=PIDS[0], count=count)
                assert len(popular.ads) == min(count, 200)
            ctrs = np.array([ad.ctr for ad in realtime.ads])
            assert (np.diff(ctrs) <= 0).all()

    run(scenario)


def test_a_hung_redis_still_answers_within_the_callers_deadline():
    # Its own redis-server: the test stops it.
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        data = publish_version(client)
        user = data.users_with_factors[0]
        settings = service_settings("all", ADREC_FALLBACK_RESERVE_MS=800)

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
                            channel, timeout=2.0, user_id=user, pid=PIDS[0], count=5
                        )
                        elapsed = time.monotonic() - started
                        assert path(response) == "POPULAR"
                        assert "NO_OFFLINE_LIST" in reasons(response)
                        assert [ad.ad_id for ad in response.ads] == data.popular[PIDS[0]][
                            :5
                        ].tolist()
                        # Redis' own 5 s read bound and the caller's 2 s both lose to the
                        # caller's deadline minus the 0.8 s reserve the fallback keeps.
                        assert elapsed < 2.0
                finally:
                    server.process.send_signal(signal.SIGCONT)

        run(scenario)


def test_a_recall_set_of_unknown_ads_falls_back_instead_of_answering_nothing(
    redis_client, redis_url
):
    data = publish_version(redis_client)
    with_offline, without_offline = data.users_with_factors[:2]
    writer = store.VersionWriter(redis_client, data.version)
    writer.put_recall_lists([with_offline, without_offline], [data.unknown_ad_ids] * 2)
    redis_client.delete(keys.OFFLINE.key(data.version, without_offline))

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            offline = await recommend(channel, user_id=with_offline, pid=PIDS[0], count=5)
            assert path(offline) == "OFFLINE_RANKED"
            assert reasons(offline) == ["NO_KNOWN_CANDIDATES"]
            expected = data.offline_lists[with_offline][0][:5].tolist()
            assert [ad.ad_id for ad in offline.ads] == expected

            popular = await recommend(channel, user_id=without_offline, pid=PIDS[0], count=5)
            assert path(popular) == "POPULAR"
            assert reasons(popular) == ["NO_KNOWN_CANDIDATES", "NO_OFFLINE_LIST"]
            assert [ad.ad_id for ad in popular.ads] == data.popular[PIDS[0]][:5].tolist()
            assert (
                metric(
                    stack,
                    "adrec_fallbacks_total",
                    adrec_service="gateway",
                    reason="no_known_candidates",
                )
                == 2
            )

    run(scenario)


def test_without_a_version_the_gateway_tells_an_unreachable_redis_from_an_empty_one(redis_url):
    password = "not-for-callers"
    port = free_port()
    # Nothing listens there: every connection is refused.
    closed = f"redis://:{password}@127.0.0.1:{port}/0"
    downstreams = {
        "ADREC_RECALL_ADDRESS": f"127.0.0.1:{free_port()}",
        "ADREC_RANKING_ADDRESS": f"127.0.0.1:{free_port()}",
    }

    async def refusal(url: str) -> str:
        async with (
            running_stack(url, "gateway", **downstreams) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await recommend(channel, user_id=1001, pid=PIDS[0], count=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            return error.value.details()

    async def scenario():
        unreachable = await refusal(closed)
        assert unreachable == "no data version loaded: Redis is unreachable (ConnectionError)"
        for secret in (password, closed, str(port)):
            assert secret not in unreachable

        empty = await refusal(redis_url)
        assert "unreachable" not in empty
        assert empty == (
            "no data version loaded: Redis is reachable but has no active version; "
            "publish one with the job"
        )

    run(scenario)
