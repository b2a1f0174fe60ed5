"""The gateway's eCPM ranking and its debug explanations: real recall and ranking services,
real Redis, real gRPC."""

from __future__ import annotations

import dataclasses
import time

import grpc
import numpy as np
import pytest
from grpc_helpers import loopback_channel
from service_data import (
    OFFLINE_TOP_N,
    PIDS,
    path,
    publish_version,
    random_model,
    recommend,
    run,
    running_stack,
)

from adrec.api.common.v1 import common_pb2
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.api.recall.v1 import recall_service_pb2, recall_service_pb2_grpc
from adrec.core import keys
from adrec.core.model import Calibration, PlacementCalibration
from adrec.core.realtime import InterestUpdate, StateSettings, StateUpdate, StateWriter

ECPM = common_pb2.RANK_BY_ECPM
OFFLINE = gateway_pb2.RECOMMEND_MODE_OFFLINE
CALIBRATION = Calibration(
    {PIDS[0]: PlacementCalibration(1.2, 0.3), PIDS[1]: PlacementCalibration(0.9, -0.1)}
)


def calibrated_version(redis_client, with_bids=True):
    model = dataclasses.replace(random_model(np.random.default_rng(7)), calibration=CALIBRATION)
    return publish_version(redis_client, model=model, with_bids=with_bids)


def assert_priced(ad, data, pid):
    """pctr is the calibrated ctr; bid and eCPM are the version's, or absent without a bid."""
    assert ad.pctr == pytest.approx(CALIBRATION.apply(pid, np.array([ad.ctr]))[0], rel=1e-5)
    bid = data.bid_of(ad.ad_id)
    if bid is None:
        assert not ad.HasField("bid") and not ad.HasField("ecpm")
    else:
        assert ad.bid == pytest.approx(bid, rel=1e-6)
        assert ad.ecpm == pytest.approx(ad.pctr * bid * 1000, rel=1e-5)


def ecpm_order(ads):
    """The documented order: ads with a bid by eCPM, then the others by pCTR."""
    return sorted(
        ads,
        key=lambda ad: (not ad.HasField("ecpm"), -(ad.ecpm if ad.HasField("ecpm") else ad.pctr)),
    )


@pytest.mark.parametrize("pid", PIDS)
def test_both_ranked_paths_order_by_ecpm_when_asked(redis_client, redis_url, pid):
    data = calibrated_version(redis_client)
    user = data.users_with_factors[0]

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            by_pctr = await recommend(channel, user_id=user, pid=pid, count=30)
            realtime = await recommend(channel, user_id=user, pid=pid, count=30, rank_by=ECPM)
            offline = await recommend(
                channel, user_id=user, pid=pid, count=30, mode=OFFLINE, rank_by=ECPM
            )
            whole_list = await recommend(
                channel, user_id=user, pid=pid, count=OFFLINE_TOP_N, mode=OFFLINE
            )
        assert by_pctr.rank_by == common_pb2.RANK_BY_PCTR and realtime.rank_by == ECPM
        assert path(realtime) == "REALTIME_RANKED" and path(offline) == "OFFLINE_RANKED"
        pctrs = [ad.pctr for ad in by_pctr.ads]
        assert pctrs == sorted(pctrs, reverse=True)
        for response in (by_pctr, realtime, offline, whole_list):
            for ad in response.ads:
                assert_priced(ad, data, pid)
        assert [ad.ad_id for ad in realtime.ads] == [ad.ad_id for ad in ecpm_order(realtime.ads)]
        assert [ad.ad_id for ad in realtime.ads] != [ad.ad_id for ad in by_pctr.ads]
        # The whole offline list, re-ordered by eCPM, then its first 30.
        assert [ad.ad_id for ad in whole_list.ads] == data.offline_lists[user][0].tolist()
        reordered = ecpm_order(whole_list.ads)[:30]
        assert [ad.ad_id for ad in offline.ads] == [ad.ad_id for ad in reordered]
        ecpms = [ad.ecpm for ad in offline.ads if ad.HasField("ecpm")]
        assert ecpms == sorted(ecpms, reverse=True)

    run(scenario)


def test_ecpm_without_bids_and_an_unknown_rank_by_are_invalid_argument(redis_client, redis_url):
    calibrated_version(redis_client, with_bids=False)

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            valid = {"user_id": 1001, "pid": PIDS[0], "count": 5}
            answer = await recommend(channel, **valid)
            assert answer.ads and not any(ad.HasField("bid") for ad in answer.ads)
            for rank_by, problem in ((ECPM, "has none"), (9, "unknown value 9")):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await recommend(channel, **valid, rank_by=rank_by)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error.value.details().startswith("rank_by: "), error.value.details()
                assert problem in error.value.details()

    run(scenario)


def test_debug_explains_every_ad_and_costs_nothing_when_off(redis_client, redis_url):
    data = calibrated_version(redis_client)
    user = data.users_with_factors[0]
    # Real-time interest in one category: its leading ads lead the candidates.
    cate = int(data.category_ads["cate_id"][0])
    now = int(time.time())
    StateWriter(redis_client, StateSettings()).apply(
        "test",
        0,
        now,
        [StateUpdate(keys.REALTIME_USER.key(user), interest=[InterestUpdate(cate, 3.0, now)])],
    )

    async def scenario():
        async with (
            running_stack(redis_url) as stack,
            loopback_channel(stack.services["gateway"].port) as channel,
        ):
            plain = await recommend(channel, user_id=user, pid=PIDS[0], count=40)
            debug = await recommend(channel, user_id=user, pid=PIDS[0], count=40, debug=True)
            popular = await recommend(
                channel, user_id=data.users_without_recall[0], pid=PIDS[0], count=5, debug=True
            )
            async with loopback_channel(stack.services["recall"].port) as recall_channel:
                recall_answer = await recall_service_pb2_grpc.RecallServiceStub(
                    recall_channel
                ).GetCandidates(recall_service_pb2.GetCandidatesRequest(user_id=user, pid=PIDS[0]))
        assert not plain.explanations
        assert list(plain.ads) == list(debug.ads)
        assert [e.ad_id for e in debug.explanations] == [ad.ad_id for ad in debug.ads]
        position = {ad_id: i + 1 for i, ad_id in enumerate(recall_answer.ad_ids)}
        interest = recall_answer.interest_count
        assert interest > 0
        cate_of = dict(
            zip(data.ads["adgroup_id"].tolist(), data.ads["cate_id"].tolist(), strict=True)
        )
        ranks: dict[int, int] = {}
        for ad_id in recall_answer.ad_ids[interest:]:
            if ad_id in cate_of:  # an ad the version lacks has no category to rank
                ranks.setdefault(cate_of[ad_id], len(ranks) + 1)
        origins = set()
        for ad, explained in zip(debug.ads, debug.explanations, strict=True):
            assert explained.serving_path == gateway_pb2.SERVING_PATH_REALTIME_RANKED
            assert explained.recall_position == position[ad.ad_id]
            assert explained.pctr == pytest.approx(ad.pctr)
            assert len(explained.contributions) == 3
            if position[ad.ad_id] <= interest:
                assert explained.origin == gateway_pb2.CANDIDATE_ORIGIN_REALTIME_INTEREST
                assert explained.als_category_rank == 0
            else:
                assert explained.origin == gateway_pb2.CANDIDATE_ORIGIN_ALS_CATEGORY
                assert explained.als_category_rank == ranks[cate_of[ad.ad_id]]
            origins.add(explained.origin)
        assert len(origins) == 2
        assert path(popular) == "POPULAR"
        for explained in popular.explanations:
            assert explained.origin == gateway_pb2.CANDIDATE_ORIGIN_POPULAR
            assert not explained.contributions and not explained.HasField("pctr")

    run(scenario)
