"""RankingService over real gRPC, a real redis-server and a version published by the writer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status, loopback_channel
from service_data import (
    PIDS,
    TEST_RELOAD_SECONDS,
    expected_ranking,
    metric,
    mismatched_model_json,
    publish_version,
    random_model,
    rank,
    run,
    running_stack,
    wait_until,
)

from adrec.api.common.v1 import common_pb2
from adrec.core import codecs, events, features, keys, store
from adrec.core.codecs import UserFeatures
from adrec.core.model import Calibration, PlacementCalibration
from adrec.core.realtime import StateSettings, StateUpdate, StateWriter
from adrec.core.scoring import DENSE_ID_LIMIT
from jobs.offline import OFFLINE_PID, RankingData, rank_users
from services.ranking.snapshot import RankingSnapshot

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def ranking_port(stack) -> int:
    return stack.services["ranking"].port


@pytest.mark.parametrize("pid", PIDS)
def test_top_k_and_ctrs_equal_the_model_on_the_shared_encoding(redis_client, redis_url, pid):
    data = publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            assert stack.services["ranking"].service.snapshot.scorer.compiled is not None
            for user in (data.users_with_factors[0], data.users_without_factors[0]):
                candidates = data.recall_lists[user].tolist()
                response = await rank(channel, user_id=user, pid=pid, ad_ids=candidates, top_k=20)
                ids, ctrs, unknown = expected_ranking(data, user, pid, candidates)
                assert [ad.ad_id for ad in response.ads] == ids[:20]
                assert [ad.ctr for ad in response.ads] == pytest.approx(ctrs[:20], rel=1e-6)
                assert response.unknown_ads_skipped == unknown == 8
                assert response.user_profile_found
                assert response.data_version == data.version
                assert response.model_version == f"{data.version}/{data.model.spec.spec_id}"

    run(scenario)


def test_realtime_ranking_equals_the_jobs_offline_scoring(redis_client, redis_url):
    data = publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            users = [
                *data.users_with_factors[:5],
                *data.users_without_factors[:2],
                *data.users_without_profile[:2],
            ]
            for user in users:
                offline_ids, offline_ctrs = data.offline_lists[user]
                response = await rank(
                    channel,
                    user_id=user,
                    pid=OFFLINE_PID,
                    ad_ids=data.recall_lists[user].tolist(),
                    top_k=len(offline_ids),
                )
                assert [ad.ad_id for ad in response.ads] == offline_ids.tolist()
                assert [ad.ctr for ad in response.ads] == pytest.approx(
                    offline_ctrs.tolist(), rel=1e-6
                )

    run(scenario)


def test_a_user_without_a_profile_is_scored_with_missing_levels(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_without_profile[0]

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            candidates = data.recall_lists[user].tolist()
            response = await rank(channel, user_id=user, pid=PIDS[1], ad_ids=candidates)
            assert not response.user_profile_found
            ids, ctrs, _ = expected_ranking(data, user, PIDS[1], candidates)
            assert [ad.ad_id for ad in response.ads] == ids
            assert [ad.ctr for ad in response.ads] == pytest.approx(ctrs, rel=1e-6)
            assert metric(stack, "adrec_user_profiles_missing_total", adrec_service="ranking") == 1

    run(scenario)


def test_unknown_and_repeated_ads_are_skipped_counted_and_scored_once(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[1]
    known = data.ads["adgroup_id"][:5].tolist()
    unknown = data.unknown_ad_ids[:3].tolist()
    candidates = [
        known[0],
        unknown[0],
        known[1],
        known[0],
        unknown[1],
        known[2],
        unknown[0],
        unknown[2],
        known[3],
        known[4],
    ]

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            response = await rank(channel, user_id=user, pid=PIDS[0], ad_ids=candidates)
            assert sorted(ad.ad_id for ad in response.ads) == sorted(known)
            assert response.unknown_ads_skipped == 3
            assert metric(stack, "adrec_unknown_ads_total", adrec_service="ranking") == 3

            only_unknown = await rank(channel, user_id=user, pid=PIDS[0], ad_ids=unknown)
            assert list(only_unknown.ads) == []
            assert only_unknown.unknown_ads_skipped == 3

            empty = await rank(channel, user_id=user, pid=PIDS[0], ad_ids=[])
            assert list(empty.ads) == [] and empty.unknown_ads_skipped == 0

    run(scenario)


def test_ties_keep_the_request_order(redis_client, redis_url):
    data = publish_version(redis_client)
    table = data.ads
    # Ads whose every feature is equal score equally for any user.
    twins = [int(table["adgroup_id"][i]) for i in (3, 4, 5)]
    for column in ("cate_id", "price", "ctr_ad", "ctr_cate", "ctr_brand"):
        table[column][[4, 5]] = table[column][3]
    store.VersionWriter(redis_client, data.version).put_ad_table(table)

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            for order in (twins, twins[::-1], [twins[1], twins[0], twins[2]]):
                response = await rank(
                    channel, user_id=data.users_with_factors[0], pid=PIDS[0], ad_ids=order
                )
                assert [ad.ad_id for ad in response.ads] == order
                assert len({ad.ctr for ad in response.ads}) == 1

    run(scenario)


def job_top_n(data, table, user: int, candidates: np.ndarray, top_n: int):
    """The batch job's offline list for `user` over `candidates`, by its own rank_users."""
    stored = data.user_features.get(user, UserFeatures.missing())
    profiles = {field: np.array([stored.profile[field]]) for field in features.USER_PROFILE_FIELDS}
    factors = (
        np.full((1, data.cate_factors.shape[1]), np.nan, np.float32)
        if stored.als_factors is None
        else stored.als_factors[None, :]
    )
    served = RankingData.as_served(table, (data.cate_ids, data.cate_factors), data.model)
    ids, ctrs, _ = rank_users(
        profiles,
        factors.astype(np.float32),
        candidates.astype(np.int32),
        np.array([0, len(candidates)]),
        served,
        pid=OFFLINE_PID,
        top_n=top_n,
    )
    return ids.tolist(), ctrs.tolist()


def test_tied_ads_in_a_non_sorted_recall_order_rank_as_the_job_ranks_them(redis_client, redis_url):
    data = publish_version(redis_client)
    table = data.ads
    ids = table["adgroup_id"]
    # Five ads with every feature equal score equally for any user: in a recall order that is
    # not their id order (positions 9, 3, 7, 1, 5 of the ascending ids), the job and the
    # service must both keep that order.
    twins = [int(ids[10 * k]) for k in (9, 3, 7, 1, 5)]
    rows = np.searchsorted(ids, twins)
    for column in ("cate_id", "price", "ctr_ad", "ctr_cate", "ctr_brand"):
        table[column][rows] = table[column][rows[0]]
    store.VersionWriter(redis_client, data.version).put_ad_table(table)
    users = [
        data.users_with_factors[0],
        data.users_without_factors[0],
        data.users_without_profile[0],
    ]

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            for user in users:
                others = data.recall_lists[user][~np.isin(data.recall_lists[user], twins)]
                for candidates in (
                    np.array(twins),
                    np.concatenate([others[:40], twins, others[40:80]]),
                ):
                    # Every candidate kept, so the five are in the list wherever they rank.
                    top_n = len(candidates)
                    expected_ids, expected_ctrs = job_top_n(data, table, user, candidates, top_n)
                    response = await rank(
                        channel,
                        user_id=user,
                        pid=OFFLINE_PID,
                        ad_ids=candidates.tolist(),
                        top_k=top_n,
                    )
                    assert [ad.ad_id for ad in response.ads] == expected_ids
                    assert [ad.ctr for ad in response.ads] == pytest.approx(expected_ctrs, rel=1e-6)
                    position = expected_ids.index(twins[0])
                    assert expected_ids[position : position + 5] == twins

    run(scenario)


def test_a_profile_update_changes_the_next_answer(redis_client, redis_url):
    data = publish_version(redis_client)
    user = data.users_with_factors[2]
    candidates = data.recall_lists[user].tolist()

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            before = await rank(channel, user_id=user, pid=PIDS[0], ad_ids=candidates, top_k=5)
            old = data.user_features[user]
            changed = {
                **old.profile,
                "age_level": (old.profile["age_level"] + 3) % 7,
                "gender": 3 - old.profile["gender"] if old.profile["gender"] in (1, 2) else 1.0,
            }
            data.user_features[user] = UserFeatures(changed, -old.als_factors)
            store.VersionWriter(redis_client, data.version).put_user_features(
                [user], [data.user_features[user]]
            )
            after = await rank(channel, user_id=user, pid=PIDS[0], ad_ids=candidates, top_k=5)
            ids, ctrs, _ = expected_ranking(data, user, PIDS[0], candidates)
            assert [ad.ad_id for ad in after.ads] == ids[:5]
            assert [ad.ctr for ad in after.ads] == pytest.approx(ctrs[:5], rel=1e-6)
            assert [ad.ad_id for ad in after.ads] != [ad.ad_id for ad in before.ads]

    run(scenario)


def test_hot_reload_switches_within_the_poll_interval_without_failing_calls(
    redis_client, redis_url
):
    first = publish_version(redis_client, seed=1)

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            user = first.users_with_factors[0]
            candidates = first.recall_lists[user].tolist()
            seen: list[str] = []
            stop = asyncio.Event()

            async def keep_ranking():
                while not stop.is_set():
                    response = await rank(
                        channel, user_id=user, pid=PIDS[0], ad_ids=candidates, top_k=10
                    )
                    seen.append(response.data_version)

            callers = [asyncio.ensure_future(keep_ranking()) for _ in range(4)]
            await wait_until(lambda: len(seen) > 20)
            second = await asyncio.to_thread(publish_version, redis_client, seed=2)
            activated = asyncio.get_running_loop().time()
            await wait_until(lambda: seen[-1] == second.version, timeout=5)
            switch_seconds = asyncio.get_running_loop().time() - activated
            count_at_switch = len(seen)
            await wait_until(lambda: len(seen) > count_at_switch + 20)
            stop.set()
            await asyncio.gather(*callers)  # every call succeeded, before and after

            assert switch_seconds < TEST_RELOAD_SECONDS + 1.0
            assert set(seen) == {first.version, second.version}
            switched = seen.index(second.version)
            assert set(seen[switched + 8 :]) == {second.version}
            response = await rank(
                channel,
                user_id=second.users_with_factors[0],
                pid=PIDS[0],
                ad_ids=second.recall_lists[second.users_with_factors[0]].tolist(),
                top_k=10,
            )
            ids, _, _ = expected_ranking(
                second,
                second.users_with_factors[0],
                PIDS[0],
                second.recall_lists[second.users_with_factors[0]],
            )
            assert [ad.ad_id for ad in response.ads] == ids[:10]
            assert (
                metric(
                    stack,
                    "adrec_data_version_info",
                    adrec_service="ranking",
                    version=second.version,
                )
                == 1
            )
            assert (
                metric(
                    stack, "adrec_data_version_info", adrec_service="ranking", version=first.version
                )
                == 0
            )

    run(scenario)


def test_a_model_with_another_feature_spec_is_refused_and_the_old_one_keeps_serving(
    redis_client, redis_url, caplog
):
    first = publish_version(redis_client, seed=1)
    caplog.set_level(logging.INFO, logger="services.ranking")

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            refused = await asyncio.to_thread(
                publish_version,
                redis_client,
                seed=2,
                model_json=mismatched_model_json(random_model(np.random.default_rng(2))),
            )
            assert store.active_version(redis_client) == refused.version
            await wait_until(
                lambda: (
                    metric(
                        stack,
                        "adrec_model_reload_failures_total",
                        adrec_service="ranking",
                        reason="model_spec_mismatch",
                    )
                    == 1
                )
            )
            await asyncio.sleep(5 * TEST_RELOAD_SECONDS)  # refused once, not at every poll
            assert (
                metric(
                    stack,
                    "adrec_model_reload_failures_total",
                    adrec_service="ranking",
                    reason="model_spec_mismatch",
                )
                == 1
            )

            user = first.users_with_factors[0]
            response = await rank(
                channel,
                user_id=user,
                pid=PIDS[0],
                ad_ids=first.recall_lists[user].tolist(),
                top_k=5,
            )
            assert response.data_version == first.version
            assert [ad.ad_id for ad in response.ads] == expected_ranking(
                first, user, PIDS[0], first.recall_lists[user]
            )[0][:5]
            assert await health_status(channel) == SERVING
            assert (
                metric(
                    stack,
                    "adrec_model_version_info",
                    adrec_service="ranking",
                    version=f"{first.version}/{first.model.spec.spec_id}",
                )
                == 1
            )

            fixed = await asyncio.to_thread(publish_version, redis_client, seed=3)
            await wait_until(
                lambda: stack.services["ranking"].service.snapshot.data_version == fixed.version
            )

        refusals = [r for r in caplog.records if r.getMessage().startswith("refused data version")]
        assert len(refusals) == 1
        assert refusals[0].levelname == "ERROR"
        assert refusals[0].version == refused.version
        assert refusals[0].serving_version == first.version
        assert "feature spec" in refusals[0].error

    run(scenario)


def test_not_serving_until_a_usable_model_is_published(redis_client, redis_url):
    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            assert await health_status(channel) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as no_model:
                await rank(channel, user_id=5, pid=PIDS[0], ad_ids=[1, 2])
            assert no_model.value.code() == grpc.StatusCode.UNAVAILABLE

            await asyncio.to_thread(
                publish_version,
                redis_client,
                model_json=mismatched_model_json(random_model(np.random.default_rng(0))),
            )
            await asyncio.sleep(5 * TEST_RELOAD_SECONDS)
            assert await health_status(channel) == NOT_SERVING

            await asyncio.to_thread(publish_version, redis_client, seed=4)

            async def serving():
                return await health_status(channel) == SERVING

            await wait_until(serving)

    run(scenario)


INVALID_REQUESTS = [
    ({"user_id": 0}, "user_id"),
    ({"user_id": -3}, "user_id"),
    ({"pid": ""}, "pid"),
    ({"pid": "430548_9999"}, "pid"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1001}, "top_k"),
    ({"ad_ids": list(range(1, 1002))}, "ad_ids"),
    ({"ad_ids": [5, 0, 7]}, "ad_ids"),
    ({"ad_ids": [5, -7]}, "ad_ids"),
    ({"rank_by": 7}, "rank_by"),
    # The version published for these has no bids.
    ({"rank_by": common_pb2.RANK_BY_ECPM}, "rank_by"),
]


def test_bad_requests_are_invalid_argument_naming_the_field(redis_client, redis_url):
    publish_version(redis_client)

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            valid = {"user_id": 1001, "pid": PIDS[0], "ad_ids": [1, 2, 3], "top_k": 2}
            await rank(channel, **valid)
            await rank(channel, **{**valid, "ad_ids": list(range(1, 1001)), "top_k": 1000})
            for change, field in INVALID_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await rank(channel, **{**valid, **change})
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
                assert error.value.details().startswith(f"{field}: "), error.value.details()

            def rejected() -> float:
                return metric(
                    stack,
                    "grpc_server_handled_total",
                    grpc_type="unary",
                    grpc_service="adrec.ranking.v1.RankingService",
                    grpc_method="RankCandidates",
                    grpc_code="InvalidArgument",
                )

            # The server counts a call after its status is sent, so the last one may trail.
            await wait_until(lambda: rejected() >= len(INVALID_REQUESTS))
            assert rejected() == len(INVALID_REQUESTS)

    run(scenario)


def test_a_course_feature_set_model_is_served_with_the_same_semantics(redis_client, redis_url):
    model = random_model(np.random.default_rng(5), features.COURSE)
    data = publish_version(redis_client, model=model)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            snapshot = stack.services["ranking"].service.snapshot
            assert snapshot.scorer.compiled is not None  # the split-by-column path, checked at load
            candidates = data.recall_lists[user].tolist()
            response = await rank(channel, user_id=user, pid=PIDS[1], ad_ids=candidates, top_k=30)
            ids, ctrs, _ = expected_ranking(data, user, PIDS[1], candidates)
            assert [ad.ad_id for ad in response.ads] == ids[:30]
            assert [ad.ctr for ad in response.ads] == pytest.approx(ctrs[:30], rel=1e-6)
            assert response.model_version == f"{data.version}/{features.COURSE.spec_id}"

    run(scenario)


def _snapshot(table: dict, factors: dict) -> RankingSnapshot:
    return RankingSnapshot.build(
        "v1",
        random_model(np.random.default_rng(5)).to_json(),
        codecs.encode_table(table),
        codecs.encode_table(factors),
    )


def _ad_data(ad_ids: np.ndarray, rng: np.random.Generator) -> tuple[dict, dict]:
    """An ad table and category factors; categories 20..29 have no factors."""
    rows = len(ad_ids)
    table = {
        "adgroup_id": ad_ids,
        "cate_id": rng.integers(1, 30, rows).astype(np.int32),
        "price": rng.uniform(1, 500, rows).astype(np.float32),
        **{
            name: rng.uniform(0, 0.2, rows).astype(np.float32)
            for name in ("ctr_ad", "ctr_cate", "ctr_brand")
        },
    }
    factors = {
        "cate_id": np.arange(1, 20, dtype=np.int32),
        "factors": rng.normal(0, 0.5, (19, 4)).astype(np.float32),
    }
    return table, factors


def test_ids_past_the_dense_lookup_table_score_the_same_by_binary_search():
    rng = np.random.default_rng(11)
    small_ids = np.sort(rng.choice(np.arange(1, 50_000), 400, replace=False)).astype(np.int64)
    small = _snapshot(*_ad_data(small_ids, np.random.default_rng(1)))
    # The same ads under ids too large for a dense table.
    large = _snapshot(*_ad_data(small_ids + DENSE_ID_LIMIT, np.random.default_rng(1)))
    assert small.scorer.index.row_by_id is not None and large.scorer.index.row_by_id is None
    user = UserFeatures(
        {field: 2.0 for field in features.USER_PROFILE_FIELDS},
        rng.normal(0, 0.5, 4).astype(np.float32),
    )
    for repeats in (False, True):
        candidates = np.concatenate(
            [rng.choice(small_ids, 120, replace=False), [3, 60_000, 3]]
        )  # ids neither table holds
        if repeats:
            candidates = np.concatenate([candidates, candidates[5:40]])
        rng.shuffle(candidates)
        for top_k in (0, 10):
            expected = small.score(PIDS[0], user, candidates, top_k)
            assert expected.unknown_ads == 2
            assert len(expected.ad_ids) == (top_k or 120)
            shifted = np.where(
                np.isin(candidates, small_ids), candidates + DENSE_ID_LIMIT, candidates
            )
            scored = large.score(PIDS[0], user, shifted, top_k)
            assert scored.ad_ids == [ad + DENSE_ID_LIMIT for ad in expected.ad_ids]
            assert scored.ctrs == expected.ctrs
            assert scored.unknown_ads == expected.unknown_ads


def test_affinity_is_the_shared_encoders_and_missing_for_categories_without_factors():
    rng = np.random.default_rng(12)
    ad_ids = np.sort(rng.choice(np.arange(1, 50_000), 400, replace=False)).astype(np.int64)
    table, cate_factors = _ad_data(ad_ids, np.random.default_rng(2))
    snapshot = _snapshot(table, cate_factors)
    factors = rng.normal(0, 0.5, 4).astype(np.float32)
    user = UserFeatures({field: 1.0 for field in features.USER_PROFILE_FIELDS}, factors)
    known = np.isin(table["cate_id"], cate_factors["cate_id"])
    assert known.any() and not known.all()
    affinity = snapshot.scorer.affinity(user, np.arange(len(ad_ids)))
    expected = features.als_affinity(
        factors, table["cate_id"], cate_factors["cate_id"], cate_factors["factors"]
    )
    assert np.array_equal(affinity, expected, equal_nan=True)
    assert np.isnan(affinity[~known]).all() and not np.isnan(affinity[known]).any()
    # A version whose categories have no factors at all: every affinity is missing.
    no_factors = {"cate_id": np.zeros(0, np.int32), "factors": np.zeros((0, 4), np.float32)}
    no_affinity = _snapshot(table, no_factors).scorer.affinity(user, np.arange(len(ad_ids)))
    assert np.isnan(no_affinity).all()


def test_the_behaviour_model_reads_the_users_counts_in_the_same_request(redis_client, redis_url):
    """Counts written by the stream's state script change the next ranking; a user without
    them is scored with 0s and flagged, and an unreadable state (damaged, or of the wrong
    type) is scored as none."""
    model = random_model(np.random.default_rng(5), features.BEHAVIOUR)
    data = publish_version(redis_client, model=model)
    active, quiet, broken, wrong_type = data.users_with_factors[:4]
    candidates = [
        ad for ad in data.recall_lists[active].tolist() if ad in set(data.ads["adgroup_id"])
    ]
    position = np.searchsorted(data.ads["adgroup_id"], candidates)
    cate, brand = int(data.ads["cate_id"][position[5]]), int(data.ads["brand_id"][position[5]])
    now = int(time.time())
    bucket = events.bucket_of(now)
    fields = [
        (events.count_field(events.Kind.CLICK, events.Scope.CATEGORY, cate, bucket), 2),
        (events.count_field(events.Kind.CART, events.Scope.CATEGORY, cate, bucket - 5), 1),
        (events.count_field(events.Kind.PAGE_VIEW, events.Scope.BRAND, brand, bucket - 30), 4),
    ]
    writer = StateWriter(redis_client, StateSettings())
    writer.apply("test", 0, now, [StateUpdate(keys.REALTIME_USER.key(active), counts=fields)])
    redis_client.set(keys.REALTIME_USER.key(broken), b"not a state")
    # A GET of it answers WRONGTYPE: the state alone fails, not the user's features.
    redis_client.hset(keys.REALTIME_USER.key(wrong_type), "counts", "1")

    def expected(user: int, history: dict | None) -> list[int]:
        found = (
            UserFeatures.missing() if user not in data.user_features else data.user_features[user]
        )
        columns = {"pid": PIDS[0], **found.columns()}
        for name in features.AD_NUMERIC_FIELDS:
            columns[name] = data.ads[name][position]
        columns[features.CATEGORY_COLUMN] = data.ads["cate_id"][position]
        columns["als_affinity"] = features.als_affinity(
            found.als_factors, data.ads["cate_id"][position], data.cate_ids, data.cate_factors
        )
        counts = features.history_inputs(
            history or {}, data.ads["cate_id"][position], data.ads["brand_id"][position]
        )
        ctrs = model.predict(model.spec.encode({**columns, **counts}))
        return np.array(candidates)[np.argsort(-ctrs, kind="stable")].tolist()

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            assert stack.services["ranking"].service.snapshot.scorer.compiled is not None
            answers = {}
            for user in (active, quiet, broken, wrong_type):
                answers[user] = await rank(
                    channel, user_id=user, pid=PIDS[0], ad_ids=candidates, top_k=0
                )
            counts = events.window_counts(fields, now)
            assert [ad.ad_id for ad in answers[active].ads] == expected(active, counts)
            assert answers[active].behaviour_counts_found
            for user in (quiet, broken, wrong_type):
                assert [ad.ad_id for ad in answers[user].ads] == expected(user, None)
                assert not answers[user].behaviour_counts_found
            assert expected(active, counts) != expected(active, None)

    run(scenario)


CALIBRATION = Calibration(
    {PIDS[0]: PlacementCalibration(1.3, 0.4), PIDS[1]: PlacementCalibration(0.8, -0.2)}
)


def calibrated_model(seed=7):
    return dataclasses.replace(random_model(np.random.default_rng(seed)), calibration=CALIBRATION)


@pytest.mark.parametrize("pid", PIDS)
def test_ecpm_ranking_orders_by_calibrated_pctr_times_bid(redis_client, redis_url, pid):
    data = publish_version(redis_client, model=calibrated_model(), with_bids=True)
    user = data.users_with_factors[0]
    candidates = data.recall_lists[user].tolist()

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            by_pctr = await rank(channel, user_id=user, pid=pid, ad_ids=candidates)
            by_ecpm = await rank(
                channel, user_id=user, pid=pid, ad_ids=candidates, rank_by=common_pb2.RANK_BY_ECPM
            )
        ids, ctrs, _ = expected_ranking(data, user, pid, candidates)
        # pCTR order is the model's CTR order, as before.
        assert [ad.ad_id for ad in by_pctr.ads] == ids
        ctr_of = dict(zip(ids, ctrs, strict=True))
        pctr_of = dict(zip(ids, CALIBRATION.apply(pid, np.array(ctrs)).tolist(), strict=True))
        for ad in by_ecpm.ads:
            assert ad.ctr == pytest.approx(ctr_of[ad.ad_id], rel=1e-6)
            assert ad.pctr == pytest.approx(pctr_of[ad.ad_id], rel=1e-6)
            bid = data.bid_of(ad.ad_id)
            if bid is None:
                assert not ad.HasField("bid") and not ad.HasField("ecpm")
            else:
                assert ad.bid == pytest.approx(bid, rel=1e-6)
                assert ad.ecpm == pytest.approx(pctr_of[ad.ad_id] * bid * 1000, rel=1e-5)
        with_bid = [ad for ad in by_ecpm.ads if ad.HasField("bid")]
        without = [ad for ad in by_ecpm.ads if not ad.HasField("bid")]
        assert with_bid and without
        # Every ad with a bid first, by eCPM; then the others, by pCTR.
        assert by_ecpm.ads[: len(with_bid)] == with_bid
        expected = sorted(with_bid, key=lambda ad: -pctr_of[ad.ad_id] * data.bid_of(ad.ad_id))
        assert [ad.ad_id for ad in with_bid] == [ad.ad_id for ad in expected]
        assert [ad.ad_id for ad in without] == [i for i in ids if data.bid_of(i) is None]
        assert [ad.ad_id for ad in with_bid] != [i for i in ids if data.bid_of(i) is not None]

    run(scenario)


def test_explain_returns_each_ads_largest_contributions_only_when_asked(redis_client, redis_url):
    data = publish_version(redis_client, model=calibrated_model())
    user = data.users_with_factors[1]
    candidates = data.recall_lists[user].tolist()

    async def scenario():
        async with (
            running_stack(redis_url, "ranking") as stack,
            loopback_channel(ranking_port(stack)) as channel,
        ):
            plain = await rank(channel, user_id=user, pid=PIDS[0], ad_ids=candidates, top_k=5)
            explained = await rank(
                channel, user_id=user, pid=PIDS[0], ad_ids=candidates, top_k=5, explain=True
            )
            snapshot = stack.services["ranking"].service.snapshot
        assert not plain.explanations
        assert list(explained.ads) == list(plain.ads)
        assert [e.ad_id for e in explained.explanations] == [ad.ad_id for ad in plain.ads]
        rows = snapshot.scorer.index.rows(np.array([ad.ad_id for ad in plain.ads]))
        every = snapshot.scorer.contributions(
            PIDS[0], data.user_features[user], rows, top=data.model.spec.dim
        )
        for explanation, terms, ad in zip(explained.explanations, every, plain.ads, strict=True):
            assert len(explanation.contributions) == 3
            assert [(c.feature, c.column) for c in explanation.contributions] == [
                (t.feature, t.column) for t in terms[:3]
            ]
            sizes = [abs(c.margin) for c in explanation.contributions]
            assert sizes == sorted(sizes, reverse=True)
            # All the terms and the intercept are the ad's logit.
            logit = np.log(ad.ctr / (1 - ad.ctr))
            total = data.model.intercept + sum(t.margin for t in terms)
            assert total == pytest.approx(logit, abs=1e-4)

    run(scenario)
