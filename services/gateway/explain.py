"""Explaining a Recommend answer (the request's `debug`): where each ad came from, and why
it scored as it did.

Built only after the answer is complete, from what the call produced anyway (the recall
answer, ranking's explanations, the response's paths and fill-ins), so a request without
`debug` does none of this work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adrec.api.common.v1 import common_pb2
from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.api.ranking.v1 import ranking_service_pb2
from adrec.api.recall.v1 import recall_service_pb2
from services.gateway.controls import AdControls

AdDebug = gateway_pb2.AdDebug
Path = gateway_pb2.ServingPath
Origin = gateway_pb2.CandidateOrigin


def explanations(
    response: gateway_pb2.RecommendResponse,
    recalled: recall_service_pb2.GetCandidatesResponse | None,
    ranked: Sequence[ranking_service_pb2.AdExplanation],
    controls: AdControls,
) -> list[gateway_pb2.AdDebug]:
    """One AdDebug per ad of `response`, in its order."""
    paths = _paths(response)
    position: dict[int, int] = {}
    interest = 0
    category_rank: dict[int, int] = {}
    personal = recalled is not None and recalled.source == common_pb2.CANDIDATE_SOURCE_PERSONAL
    if recalled is not None:
        position = {ad_id: index for index, ad_id in enumerate(recalled.ad_ids)}
        interest = recalled.interest_count
        if personal:
            category_rank = _category_ranks(recalled.ad_ids[interest:], controls)
    cate_of = _categories([ad.ad_id for ad in response.ads], controls)
    contributions = {explained.ad_id: explained.contributions for explained in ranked}
    answer = []
    for ad, path in zip(response.ads, paths, strict=True):
        at = position.get(ad.ad_id)
        origin = _origin(path, at, interest, personal)
        debug = AdDebug(
            ad_id=ad.ad_id,
            serving_path=path,
            origin=origin,
            recall_position=0 if at is None else at + 1,
            als_category_rank=(
                category_rank.get(cate_of[ad.ad_id], 0)
                if origin == gateway_pb2.CANDIDATE_ORIGIN_ALS_CATEGORY
                else 0
            ),
        )
        if ad.HasField("pctr"):
            debug.pctr = ad.pctr
        if path == gateway_pb2.SERVING_PATH_REALTIME_RANKED:
            debug.contributions.extend(contributions.get(ad.ad_id, ()))
        answer.append(debug)
    return answer


def _paths(response: gateway_pb2.RecommendResponse) -> list[Path]:
    """The path that placed each ad: the serving path's come first, then each fill-in's."""
    filled = sum(fill.ads for fill in response.filled_from)
    paths = [response.serving_path] * (len(response.ads) - filled)
    for fill in response.filled_from:
        paths += [fill.serving_path] * fill.ads
    return paths


def _origin(path: Path, at: int | None, interest: int, personal: bool) -> Origin:
    if path == gateway_pb2.SERVING_PATH_POPULAR:
        return gateway_pb2.CANDIDATE_ORIGIN_POPULAR
    if path == gateway_pb2.SERVING_PATH_OFFLINE_RANKED:
        return gateway_pb2.CANDIDATE_ORIGIN_OFFLINE_LIST
    if at is not None and at < interest:
        return gateway_pb2.CANDIDATE_ORIGIN_REALTIME_INTEREST
    if personal:
        return gateway_pb2.CANDIDATE_ORIGIN_ALS_CATEGORY
    return gateway_pb2.CANDIDATE_ORIGIN_POPULAR


def _categories(ad_ids: Sequence[int], controls: AdControls) -> dict[int, int]:
    """Each ad's category in the gateway's ad table, 0 for an ad it lacks."""
    catalog = controls.catalog
    rows, known = catalog.lookup(np.asarray(ad_ids, dtype=np.int64))
    cates = np.where(known, catalog.cate[rows] if len(catalog.ids) else 0, 0)
    return dict(zip(ad_ids, cates.tolist(), strict=True))


def _category_ranks(ad_ids: Sequence[int], controls: AdControls) -> dict[int, int]:
    """1-based rank of each category in a recall set, by its first ad: the set is ordered by
    the user's predicted category preference."""
    ranks: dict[int, int] = {}
    for cate in _categories(list(ad_ids), controls).values():
        if cate and cate not in ranks:
            ranks[cate] = len(ranks) + 1
    return ranks
