"""RecallService over real gRPC, a real redis-server and a version published by the writer."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_helpers import loopback_channel
from service_data import PIDS, metric, publish_version, run, running_stack, wait_until

from adrec.api.common.v1 import common_pb2
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core import keys, realtime, store
from adrec.core.realtime import CategoryAds, InterestUpdate, StateSettings, StateUpdate, StateWriter

PERSONAL = common_pb2.CANDIDATE_SOURCE_PERSONAL
POPULAR = common_pb2.CANDIDATE_SOURCE_POPULAR
NO_RECALL_SET = recall_service_pb2.FALLBACK_REASON_NO_RECALL_SET


async def candidates(channel: grpc.aio.Channel, **request):
    stub = recall_service_pb2_grpc.RecallServiceStub(channel)
    return await stub.GetCandidates(recall_service_pb2.GetCandidatesRequest(**request), timeout=5)


def recall_port(stack) -> int:
    return stack.services["recall"].port


def test_a_users_list_in_order_with_the_limit_honoured(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]
    stored = data.recall_lists[user].tolist()

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            whole = await candidates(channel, user_id=user)
            assert list(whole.ad_ids) == stored and len(stored) == 500
            assert whole.source == PERSONAL
            assert whole.fallback_reason == recall_service_pb2.FALLBACK_REASON_UNSPECIFIED
            assert whole.data_version == data.version
            for limit in (1, 7, 500, 900):
                limited = await candidates(channel, user_id=user, limit=limit, pid=PIDS[1])
                assert list(limited.ad_ids) == stored[:limit]
            assert metric(stack, "adrec_candidates_per_request_count", adrec_service="recall") == 5

    run(scenario)


def test_users_without_a_recall_set_get_the_placements_popular_list(redis_client, redis_url):
    data = publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            for user in (data.users_without_recall[0], 987_654):
                for pid in PIDS:
                    answer = await candidates(channel, user_id=user, pid=pid, limit=20)
                    assert list(answer.ad_ids) == data.popular[pid][:20].tolist()
                    assert answer.source == POPULAR
                    assert answer.fallback_reason == NO_RECALL_SET
                overall = await candidates(channel, user_id=user)
                assert list(overall.ad_ids) == data.popular[keys.POPULAR_ALL].tolist()
            assert (
                metric(
                    stack, "adrec_fallbacks_total", adrec_service="recall", reason="no_recall_set"
                )
                == 6
            )

    run(scenario)


def test_a_placement_without_its_own_popular_list_gets_the_overall_one(redis_client, redis_url):
    data = publish_version(redis_client)
    redis_client.delete(keys.POPULAR.key(data.version, PIDS[1]))

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            answer = await candidates(channel, user_id=987_654, pid=PIDS[1], limit=5)
            assert list(answer.ad_ids) == data.popular[keys.POPULAR_ALL][:5].tolist()

    run(scenario)


def test_an_updated_recall_list_is_served_by_the_next_request(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[3]
    newcomer = data.users_without_recall[1]

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            assert (await candidates(channel, user_id=newcomer)).source == POPULAR
            writer = store.VersionWriter(redis_client, data.version)
            writer.put_recall_lists([user, newcomer], [[11, 22, 33], [44, 55]])
            assert list((await candidates(channel, user_id=user)).ad_ids) == [11, 22, 33]
            now_personal = await candidates(channel, user_id=newcomer)
            assert list(now_personal.ad_ids) == [44, 55]
            assert now_personal.source == PERSONAL

    run(scenario)


def _interest(redis_client, user: int, categories: dict[int, float]) -> None:
    now = int(time.time())
    writer = StateWriter(redis_client, StateSettings())
    updates = [InterestUpdate(cate, score, now) for cate, score in categories.items()]
    writer.apply("test", 0, now, [StateUpdate(keys.REALTIME_USER.key(user), interest=updates)])


def test_real_time_interest_leads_the_candidates_without_repeating_them(redis_client, redis_url):
    data = publish_version(redis_client)
    user, newcomer, quiet = data.users_with_factors[0], 987_654, data.users_with_factors[1]
    leaders = CategoryAds.from_table(data.category_ads)
    strong, weak = (int(c) for c in data.cate_ids[:2])
    expected_interest = np.concatenate([leaders.for_category(strong), leaders.for_category(weak)])[
        : realtime.INTEREST_CANDIDATES
    ].tolist()
    _interest(redis_client, user, {strong: 2.0, weak: 1.0})
    _interest(redis_client, newcomer, {strong: 1.0})
    redis_client.set(keys.REALTIME_USER.key(quiet), b"not a state")

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            answer = await candidates(channel, user_id=user)
            ids = list(answer.ad_ids)
            assert answer.interest_count == len(expected_interest) > 0
            assert ids[: answer.interest_count] == expected_interest
            stored = data.recall_lists[user].tolist()
            assert ids[answer.interest_count :] == [a for a in stored if a not in expected_interest]
            assert answer.source == PERSONAL
            assert len(set(ids)) == len(ids)

            cold = await candidates(channel, user_id=newcomer, limit=10)
            assert cold.source == POPULAR and cold.interest_count == 10
            assert list(cold.ad_ids) == leaders.for_category(strong)[:10].tolist()

            # Unreadable state only loses the interest, never the answer.
            plain = await candidates(channel, user_id=quiet)
            assert plain.interest_count == 0
            assert list(plain.ad_ids) == data.recall_lists[quiet].tolist()

    run(scenario)


def test_follows_a_newly_activated_version(redis_client, redis_url):
    first = publish_version(redis_client, seed=1)

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            user = first.users_with_factors[0]
            assert (await candidates(channel, user_id=user)).data_version == first.version
            second = await asyncio.to_thread(publish_version, redis_client, seed=2)

            async def switched():
                answer = await candidates(channel, user_id=user)
                return (
                    answer.data_version == second.version
                    and list(answer.ad_ids) == second.recall_lists[user].tolist()
                )

            await wait_until(switched)

    run(scenario)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"user_id": 0}, "user_id"),
        ({"user_id": -1}, "user_id"),
        ({"user_id": 2**31}, "user_id"),
        ({"limit": -1}, "limit"),
        ({"pid": "nope"}, "pid"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    redis_client, redis_url, request_fields, field
):
    publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await candidates(channel, **{"user_id": 1001, **request_fields})
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith(f"{field}: ")

    run(scenario)


def test_unavailable_before_any_version_is_published(redis_url):
    async def scenario():
        async with (
            running_stack(redis_url, "recall") as stack,
            loopback_channel(recall_port(stack)) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await candidates(channel, user_id=1001)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)
