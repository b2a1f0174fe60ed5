"""The gateway's ad-serving controls end to end: pauses set through the admin API, frequency
caps from the real-time state and the gateway's own served counts, exclusions, diversity
limits and short answers filled in by the next path; real services, Redis and gRPC."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import grpc
import numpy as np
import pytest
import redis
from grpc_helpers import loopback_channel
from service_data import (
    PIDS,
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
from test_service_events import violations

from adrec.api.admin.v1 import admin_service_pb2 as admin_pb
from adrec.api.admin.v1 import admin_service_pb2_grpc
from adrec.api.gateway.v1 import gateway_service_pb2 as pb
from adrec.core import events, keys, realtime
from adrec.core.adstate import ServedAds
from adrec.core.events import Kind, Scope

OFFLINE = pb.RECOMMEND_MODE_OFFLINE
FILTER_REASONS = ("paused", "capped", "excluded", "diversity", "unknown_ad")


async def set_state(channel: grpc.aio.Channel, level: str, id: int, status: str, **fields):
    stub = admin_service_pb2_grpc.AdminServiceStub(channel)
    return await stub.SetAdState(
        admin_pb.SetAdStateRequest(
            target=admin_pb.AdRef(level=f"AD_LEVEL_{level.upper()}", id=id),
            status=f"AD_STATUS_{status.upper()}",
            reason=fields.pop("reason", "test"),
            **fields,
        ),
        timeout=10,
    )


def column_of(data, name: str, ad_ids) -> list[int]:
    table = data.ads["adgroup_id"]
    rows = np.searchsorted(table, ad_ids)
    return data.ads[name][rows].tolist()


def filtered(response) -> dict[str, int]:
    return {
        pb.FilterReason.Name(item.reason).removeprefix("FILTER_REASON_").lower(): item.candidates
        for item in response.filtered
    }


def ids(response) -> list[int]:
    return [ad.ad_id for ad in response.ads]


@contextlib.asynccontextmanager
async def stack_channels(redis_url: str, **env):
    async with (
        running_stack(redis_url, **env) as stack,
        loopback_channel(stack.services["gateway"].port) as gateway,
        loopback_channel(stack.services["admin"].port) as admin,
    ):
        yield stack, gateway, admin


def test_a_campaign_paused_under_load_is_served_by_no_replica_from_the_admin_calls_return(
    redis_client, redis_url
):
    data = publish_version(redis_client)
    users = data.users_with_factors + data.users_without_factors

    async def scenario():
        async with (
            running_stack(redis_url, "recall") as recall,
            running_stack(redis_url, "ranking") as ranking,
            running_stack(redis_url, "admin") as admin_stack,
        ):
            env = {
                "ADREC_RECALL_ADDRESS": f"127.0.0.1:{recall.services['recall'].port}",
                "ADREC_RANKING_ADDRESS": f"127.0.0.1:{ranking.services['ranking'].port}",
            }
            async with (
                service_process(redis_url, "gateway", **env) as first,
                service_process(redis_url, "gateway", **env) as second,
                loopback_channel(first.ports["gateway"]) as one,
                loopback_channel(second.ports["gateway"]) as two,
                loopback_channel(admin_stack.services["admin"].port) as admin,
            ):
                # The campaign served most often, and the users it is served to.
                served_to: dict[int, set[int]] = collections.defaultdict(set)
                for user in users:
                    answer = await recommend(one, user_id=user, pid=PIDS[0], count=10)
                    for campaign in column_of(data, "campaign_id", ids(answer)):
                        served_to[campaign].add(user)
                campaign, audience = max(served_to.items(), key=lambda item: len(item[1]))
                paused_ads = set(
                    data.ads["adgroup_id"][data.ads["campaign_id"] == campaign].tolist()
                )
                answers: list[tuple[float, set[int]]] = []
                stop = asyncio.Event()

                async def load(channel: grpc.aio.Channel, offset: int) -> None:
                    targets = sorted(audience)
                    turn = offset
                    while not stop.is_set():
                        sent = time.monotonic()
                        answer = await recommend(
                            channel, user_id=targets[turn % len(targets)], pid=PIDS[0], count=10
                        )
                        answers.append((sent, set(ids(answer))))
                        turn += 1

                workers = [
                    asyncio.create_task(load(channel, offset))
                    for channel in (one, two)
                    for offset in range(4)
                ]
                await asyncio.sleep(1.0)
                await set_state(admin, "campaign", campaign, "paused", reason="budget spent")
                returned = time.monotonic()
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.gather(*workers)

        before = [served & paused_ads for sent, served in answers if sent < returned]
        after = [served & paused_ads for sent, served in answers if sent >= returned]
        assert sum(map(bool, before)) > 0, "the campaign was not served before its pause"
        assert len(after) > 50
        assert sum(len(hits) for hits in after) == 0

    run(scenario, timeout=120)


def test_pauses_hold_on_every_path_and_a_resume_serves_again(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]
    redis_client.delete(keys.OFFLINE.key(data.version, data.users_with_factors[1]))

    async def scenario():
        async with stack_channels(redis_url) as (stack, gateway, admin):
            assert metric(stack, "adrec_filtered_candidates_total", adrec_service="gateway") == 0
            for reason in FILTER_REASONS:
                labels = {"adrec_service": "gateway", "reason": reason}
                assert (
                    stack.metrics.registry.get_sample_value(
                        "adrec_filtered_candidates_total", labels
                    )
                    == 0
                )
            realtime_before = await recommend(gateway, user_id=user, pid=PIDS[0], count=10)
            offline_before = await recommend(
                gateway, user_id=user, pid=PIDS[0], count=10, mode=OFFLINE
            )
            recall_order_before = await recommend(
                gateway, user_id=data.users_with_factors[1], pid=PIDS[0], count=10, mode=OFFLINE
            )
            popular_before = await recommend(gateway, user_id=4242, pid=PIDS[0], count=10)
            assert path(recall_order_before) == "RECALL_ORDER"
            # One ad of each answer, by each level of the hierarchy.
            ad = ids(realtime_before)[0]
            (campaign,) = column_of(data, "campaign_id", [ids(offline_before)[1]])
            (customer,) = column_of(data, "customer_id", [ids(popular_before)[2]])
            recall_ad = ids(recall_order_before)[3]
            await set_state(admin, "adgroup", ad, "paused")
            await set_state(admin, "campaign", campaign, "paused")
            await set_state(admin, "customer", customer, "paused")
            await set_state(admin, "adgroup", recall_ad, "paused")
            paused = (
                {ad, recall_ad}
                | set(data.ads["adgroup_id"][data.ads["campaign_id"] == campaign].tolist())
                | set(data.ads["adgroup_id"][data.ads["customer_id"] == customer].tolist())
            )

            answers = [
                await recommend(gateway, user_id=user, pid=PIDS[0], count=10),
                await recommend(gateway, user_id=user, pid=PIDS[0], count=10, mode=OFFLINE),
                await recommend(
                    gateway,
                    user_id=data.users_with_factors[1],
                    pid=PIDS[0],
                    count=10,
                    mode=OFFLINE,
                ),
                await recommend(gateway, user_id=4242, pid=PIDS[0], count=10),
            ]
            for before, after in zip(
                (realtime_before, offline_before, recall_order_before, popular_before),
                answers,
                strict=True,
            ):
                assert path(after) == path(before)
                assert not set(ids(after)) & paused
                assert len(after.ads) == 10
                assert filtered(after).get("paused", 0) >= 1
                # Beyond the paused ones, the same ads in the same order.
                kept = [ad for ad in ids(before) if ad not in paused]
                assert ids(after)[: len(kept)] == kept
            assert (
                metric(
                    stack,
                    "adrec_filtered_candidates_total",
                    adrec_service="gateway",
                    reason="paused",
                )
                >= 4
            )

            await set_state(admin, "adgroup", ad, "active", reason="review done")
            again = await recommend(gateway, user_id=user, pid=PIDS[0], count=10)
            assert ad in ids(again)

            # A pause that starts later, and one that already ended, change nothing now.
            now = int(time.time())
            await set_state(admin, "adgroup", ad, "paused", start_time=now + 3600)
            assert ad in ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10))
            # A flight that has not started pauses the ad until it does.
            await set_state(
                admin, "adgroup", ad, "active", start_time=now + 3600, end_time=now + 7200
            )
            assert ad not in ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10))

    run(scenario)


def test_a_pause_survives_a_publish(redis_client, redis_url):
    data = publish_version(redis_client, seed=7)
    user = data.users_with_factors[0]

    async def scenario():
        async with stack_channels(redis_url) as (stack, gateway, admin):
            ad = ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=5))[0]
            await set_state(admin, "adgroup", ad, "paused")
            newer = publish_version(redis_client, seed=7)
            # Every service of the stack, not the gateway alone: the answer's version is
            # ranking's.
            await wait_until(
                lambda: all(
                    running.watcher.version == newer.version for running in stack.services.values()
                )
            )
            answer = await recommend(gateway, user_id=user, pid=PIDS[0], count=5)
            assert answer.data_version == newer.version
            assert ad not in ids(answer)

    run(scenario)


def add_impressions(client: redis.Redis, user: int, ad_ids: list[int], data, now: int) -> None:
    """Impressions as the stream job folds them into the user's state."""
    bucket = events.bucket_of(now)
    counts = []
    for ad, campaign, customer in zip(
        ad_ids,
        column_of(data, "campaign_id", ad_ids),
        column_of(data, "customer_id", ad_ids),
        strict=True,
    ):
        for scope, member in (
            (Scope.AD, ad),
            (Scope.CAMPAIGN, campaign),
            (Scope.CUSTOMER, customer),
        ):
            counts.append((events.count_field(Kind.IMPRESSION, scope, member, bucket), 1))
    writer = realtime.StateWriter(client, realtime.StateSettings())
    writer.apply(
        "test-run",
        int(time.time() * 1000),
        now,
        [realtime.StateUpdate(keys.REALTIME_USER.key(user), counts)],
    )


def test_frequency_caps_count_reported_impressions_and_what_the_gateway_served(
    redis_client, redis_url
):
    data = publish_version(redis_client)
    user, other = data.users_with_factors[:2]

    async def scenario():
        async with stack_channels(
            redis_url, ADREC_GATEWAY_FREQUENCY_CAPS="ad:2/24h", ADREC_GATEWAY_SERVED_SECONDS=0
        ) as (stack, gateway, _admin):
            first = ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10))
            add_impressions(redis_client, user, first[:3], data, int(time.time()))
            # One impression each: under the server's cap of 2.
            assert ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10)) == first
            # A request may tighten the cap...
            tightened = await recommend(
                gateway,
                user_id=user,
                pid=PIDS[0],
                count=10,
                frequency_caps=[
                    pb.FrequencyCap(scope="CAP_SCOPE_AD", max_impressions=1, window_hours=1)
                ],
            )
            assert not set(ids(tightened)) & set(first[:3])
            assert ids(tightened)[:7] == first[3:]
            assert filtered(tightened) == {"capped": 3}
            # ... but never loosen it.
            add_impressions(redis_client, user, first[:1], data, int(time.time()))
            loosened = await recommend(
                gateway,
                user_id=user,
                pid=PIDS[0],
                count=10,
                frequency_caps=[
                    pb.FrequencyCap(scope="CAP_SCOPE_AD", max_impressions=9, window_hours=24)
                ],
            )
            assert first[0] not in ids(loosened) and first[1] in ids(loosened)
            # A campaign cap removes every ad of the campaigns the user has seen.
            campaigns = set(column_of(data, "campaign_id", first[:3]))
            of_campaigns = set(
                data.ads["adgroup_id"][np.isin(data.ads["campaign_id"], list(campaigns))].tolist()
            )
            by_campaign = await recommend(
                gateway,
                user_id=user,
                pid=PIDS[0],
                count=10,
                frequency_caps=[
                    pb.FrequencyCap(scope="CAP_SCOPE_CAMPAIGN", max_impressions=1, window_hours=24)
                ],
            )
            assert len(by_campaign.ads) == 10 and not set(ids(by_campaign)) & of_campaigns
            capped_candidates = len(of_campaigns & set(data.recall_lists[user].tolist()))
            assert filtered(by_campaign) == {"capped": capped_candidates}
            # Another user has seen nothing.
            assert ids(await recommend(gateway, user_id=other, pid=PIDS[0], count=10))
            assert (
                metric(
                    stack,
                    "adrec_filtered_candidates_total",
                    adrec_service="gateway",
                    reason="capped",
                )
                == 3 + 1 + capped_candidates
            )

    run(scenario)


def test_served_counts_hold_a_cap_before_any_impression_is_reported(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with stack_channels(
            redis_url, ADREC_GATEWAY_FREQUENCY_CAPS="ad:1/1h", ADREC_GATEWAY_SERVED_SECONDS=60
        ) as (_stack, gateway, _admin):
            first = ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10))
            # Right after the answer: this gateway counts what it served before the write.
            second = ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10))
            assert len(second) == 10 and not set(first) & set(second)
            # Written together a moment later, for every replica to count.
            served = ServedAds(60)

            def stored() -> list[int]:
                values = redis_client.mget(served.read_keys(user, time.time()))
                return sorted(served.decode(values).tolist())

            await wait_until(lambda: stored() == sorted(first + second), timeout=10)
            assert redis_client.ttl(keys.served_key(user, served.slice_of(time.time()))) > 0
            # Another user is not affected.
            other = data.users_with_factors[1]
            assert ids(await recommend(gateway, user_id=other, pid=PIDS[0], count=10))

    run(scenario)


def test_exclusions_and_diversity_limits(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with stack_channels(redis_url, ADREC_GATEWAY_MAX_PER_CUSTOMER=1) as (
            _stack,
            gateway,
            _admin,
        ):
            plain = ids(await recommend(gateway, user_id=user, pid=PIDS[0], count=10))
            excluded = await recommend(
                gateway, user_id=user, pid=PIDS[0], count=10, exclude_ad_ids=plain[:4] * 2
            )
            assert ids(excluded)[:6] == plain[4:] and not set(ids(excluded)) & set(plain[:4])
            assert filtered(excluded) == {"excluded": 4}

            one_per_category = await recommend(
                gateway, user_id=user, pid=PIDS[0], count=20, diversity={"max_per_category": 1}
            )
            categories = column_of(data, "cate_id", ids(one_per_category))
            assert len(one_per_category.ads) == 20 and len(set(categories)) == 20
            ctrs = [ad.ctr for ad in one_per_category.ads]
            assert ctrs == sorted(ctrs, reverse=True)
            assert filtered(one_per_category).get("diversity", 0) > 0
            # The server's default applies to every request that does not set its own.
            customers = column_of(data, "customer_id", ids(one_per_category))
            assert len(set(customers)) == len(customers)

            brands = await recommend(
                gateway, user_id=user, pid=PIDS[0], count=30, diversity={"max_per_brand": 2}
            )
            by_brand = collections.Counter(
                b for b in column_of(data, "brand_id", ids(brands)) if b > 0
            )
            assert max(by_brand.values()) <= 2

    run(scenario)


def test_a_short_answer_is_filled_by_the_next_paths_and_says_so(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[0]
    known = set(data.ads["adgroup_id"].tolist())
    recall = [ad for ad in data.recall_lists[user].tolist() if ad in known]

    async def scenario():
        async with stack_channels(redis_url) as (stack, gateway, _admin):
            # All but three of the user's candidates excluded: the offline list (drawn from
            # the same candidates) adds nothing new, popular ads fill in.
            answer = await recommend(
                gateway, user_id=user, pid=PIDS[0], count=10, exclude_ad_ids=recall[3:]
            )
            assert path(answer) == "REALTIME_RANKED"
            assert reasons(answer) == ["FILTERED_SHORT"]
            assert len(answer.ads) == 10
            assert not set(ids(answer)) & set(recall[3:])
            assert set(ids(answer)[:3]) == set(recall[:3])
            assert [(f.serving_path, f.ads) for f in answer.filled_from] == [
                (pb.SERVING_PATH_POPULAR, 7)
            ]
            assert (
                ids(answer)[3:]
                == [ad for ad in data.popular[PIDS[0]].tolist() if ad not in set(recall)][:7]
            )
            assert filtered(answer)["excluded"] == len(recall) - 3
            assert (
                metric(
                    stack,
                    "adrec_fallbacks_total",
                    adrec_service="gateway",
                    reason="filtered_short",
                )
                == 1
            )

            # Every candidate excluded in OFFLINE mode: the recall order has nothing left
            # either, so popular ads answer.
            offline = await recommend(
                gateway,
                user_id=user,
                pid=PIDS[0],
                count=5,
                mode=OFFLINE,
                exclude_ad_ids=data.offline_lists[user][0].tolist(),
            )
            assert path(offline) == "OFFLINE_RANKED" and reasons(offline) == ["FILTERED_SHORT"]
            assert [f.serving_path for f in offline.filled_from] == [pb.SERVING_PATH_RECALL_ORDER]
            assert (
                ids(offline)
                == [
                    ad
                    for ad in data.recall_lists[user].tolist()
                    if ad in known and ad not in set(data.offline_lists[user][0].tolist())
                ][:5]
            )
            assert filtered(offline)["excluded"] == len(data.offline_lists[user][0])

            # Nothing filtered: a short answer stays as it was.
            plain = await recommend(gateway, user_id=user, pid=PIDS[0], count=500)
            assert len(plain.ads) == len(recall) and not plain.filled_from
            assert reasons(plain) == [] and filtered(plain) == {}

    run(scenario)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"exclude_ad_ids": list(range(1, 502))}, ["exclude_ad_ids"]),
        ({"exclude_ad_ids": [5, -3]}, ["exclude_ad_ids[1]"]),
        (
            {
                "frequency_caps": [
                    {"scope": "CAP_SCOPE_AD", "max_impressions": -1, "window_hours": 1}
                ]
            },
            ["frequency_caps[0].max_impressions"],
        ),
        (
            {
                "frequency_caps": [
                    {"scope": "CAP_SCOPE_AD", "max_impressions": 1, "window_hours": 0}
                ]
            },
            ["frequency_caps[0].window_hours"],
        ),
        (
            {"frequency_caps": [{"max_impressions": 1, "window_hours": 1}]},
            ["frequency_caps[0].scope"],
        ),
        (
            {
                "frequency_caps": [
                    {"scope": "CAP_SCOPE_CAMPAIGN", "max_impressions": 3, "window_hours": 24},
                    {"scope": "CAP_SCOPE_CAMPAIGN", "max_impressions": 5, "window_hours": 24},
                ]
            },
            ["frequency_caps[1]"],
        ),
        ({"diversity": {"max_per_brand": -2}}, ["diversity.max_per_brand"]),
    ],
)
def test_bad_controls_are_invalid_argument_naming_the_field(
    redis_client, redis_url, fields, expected
):
    data = publish_version(redis_client)

    async def scenario():
        async with stack_channels(redis_url) as (_stack, gateway, _admin):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await recommend(gateway, user_id=data.users_with_factors[0], pid=PIDS[0], **fields)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [field for field, _ in violations(caught.value)] == expected
            await asyncio.sleep(0.05)  # past the served ads' write delay
            assert list(redis_client.scan_iter(match=b"adrec:served:*")) == []

    run(scenario)
