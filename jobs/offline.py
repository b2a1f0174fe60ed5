"""Offline ranking: every user's recall list scored by the CTR model, top N kept.

Contract:

- :func:`offline_top_n` ``(recall_lists, users, ads, cate_factors, model, pid, top_n)``
  -> DataFrame(``user_id`` int, ``ad_ids`` array<int>, ``ctrs`` array<float>), best first.
  ``recall_lists`` is (user_id, ad_ids array<int>), ``users`` the output of
  :func:`jobs.features.user_features`, ``ads`` the column arrays of
  :func:`jobs.features.ad_table`, ``cate_factors`` the ALS (cate_ids, factors).
- :func:`rank_users` is the numpy core: a batch of users through
  :meth:`adrec.core.scoring.CtrScorer.rank_lists`.
- :func:`write_offline_lists` loads the lists into a version from the executors.

A list is what the ranking service answers for the same user and recall list, because both
score through :mod:`adrec.core.scoring`: recall list -> drop repeated ids and ads missing
from the ad table -> the user's stored features (a user without features gets missing
levels and no ALS factors) and the pid -> CTRs -> CTR descending, ties in recall order ->
top N. Users left with no known ad get no list.

One list per user, scored at the majority placement :data:`OFFLINE_PID`: the recall
lists alone take most of the Redis budget at full scale, so a list per placement does
not fit. Nothing is lost in the order: the model is additive and the pid enters it only
through its own one-hot, so switching placement shifts every candidate's logit by the
same amount and the ranking is identical for both placements; only the CTR values are
the majority placement's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias

from adrec.core.codecs import UserFeatures
from adrec.core.dataset import PIDS
from adrec.core.features import USER_PROFILE_FIELDS
from adrec.core.model import CtrModel
from adrec.core.redis_conn import RedisSettings
from adrec.core.scoring import CtrScorer
from adrec.core.store import VersionWriter
from jobs.ctr import encoder_inputs
from jobs.features import factor_matrix
from jobs.load import write_from_executors

#: The placement with 62% of the impressions.
OFFLINE_PID = PIDS[0]
DEFAULT_TOP_N = 50
#: Candidates scored per call: bounds the arrays of one batch of users to a few MB.
CANDIDATES_PER_CHUNK = 50_000

OFFLINE_SCHEMA = "user_id int, ad_ids array<int>, ctrs array<float>"

_NO_FACTORS = (np.zeros(0, dtype=np.int32), np.zeros((0, 0), dtype=np.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class RankingData:
    """What the executors hold: the version's scorer, built as the ranking service builds it."""

    scorer: CtrScorer

    @classmethod
    def as_served(
        cls,
        ads: Mapping[str, np.ndarray],
        cate_factors: tuple[np.ndarray, np.ndarray] | None,
        model: CtrModel,
    ) -> RankingData:
        """With the dtypes the service reads back from Redis (float32 factors)."""
        cate_ids, factors = cate_factors if cate_factors is not None else _NO_FACTORS
        return cls(
            CtrScorer.build(
                model,
                ads,
                np.asarray(cate_ids, dtype=np.int32),
                np.asarray(factors, dtype=np.float32),
            )
        )


def rank_users(
    profiles: Mapping[str, np.ndarray],
    user_factors: np.ndarray,
    candidates: np.ndarray,
    offsets: np.ndarray,
    data: RankingData,
    *,
    pid: str = OFFLINE_PID,
    top_n: int = DEFAULT_TOP_N,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``top_n`` candidates of ``m`` users: (ad ids, CTRs, offsets into them).

    ``profiles`` holds ``m`` values per profile field (NaN = missing), ``user_factors`` is
    ``(m, rank)`` with NaN rows for users without factors, and user ``i``'s candidates are
    ``candidates[offsets[i]:offsets[i + 1]]``.
    """
    values = {
        field: np.asarray(profiles[field], dtype=np.float64).tolist()
        for field in USER_PROFILE_FIELDS
    }
    has_factors = ~np.isnan(user_factors).any(axis=1)
    users = [
        UserFeatures(
            {field: values[field][i] for field in USER_PROFILE_FIELDS},
            user_factors[i] if has_factors[i] else None,
        )
        for i in range(len(user_factors))
    ]
    return data.scorer.rank_lists(pid, users, candidates, offsets, top_n)


def offline_top_n(
    recall_lists: DataFrame,
    users: DataFrame,
    ads: Mapping[str, np.ndarray],
    cate_factors: tuple[np.ndarray, np.ndarray] | None,
    model: CtrModel,
    *,
    pid: str = OFFLINE_PID,
    top_n: int = DEFAULT_TOP_N,
) -> DataFrame:
    """Each recall list's top ``top_n`` ads by the model's CTR, scored on the executors."""
    if pid not in PIDS:
        raise ValueError(f"unknown pid {pid!r}; known pids are {list(PIDS)}")
    if top_n < 1:
        raise ValueError("top_n must be at least 1")
    data = RankingData.as_served(ads, cate_factors, model)
    shared = recall_lists.sparkSession.sparkContext.broadcast(data)
    joined = recall_lists.select("user_id", "ad_ids").join(users, "user_id", "left")

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        served = shared.value
        for batch in batches:
            for chunk in _chunks_by_candidates(batch):
                yield _score_chunk(chunk, served, pid, top_n)

    return joined.mapInArrow(score, OFFLINE_SCHEMA).where(F.size("ad_ids") > 0)


def _chunks_by_candidates(batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    lengths = pc.list_value_length(batch.column("ad_ids")).fill_null(0).to_numpy()
    ends = np.cumsum(lengths)
    start = 0
    while start < len(lengths):
        budget = (ends[start - 1] if start else 0) + CANDIDATES_PER_CHUNK
        stop = max(int(np.searchsorted(ends, budget, side="right")), start + 1)
        yield batch.slice(start, stop - start)
        start = stop


def _score_chunk(chunk: pa.RecordBatch, data: RankingData, pid: str, top_n: int) -> pa.RecordBatch:
    lists = chunk.column("ad_ids")
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    candidates = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int32)
    profiles = encoder_inputs(chunk, USER_PROFILE_FIELDS)
    rank = data.scorer.als_rank
    factors = (
        factor_matrix(chunk.column("als_factors"), rank)
        if rank
        else np.zeros((chunk.num_rows, 0), dtype=np.float32)
    )
    ids, ctrs, top_offsets = rank_users(
        profiles, factors, candidates, offsets, data, pid=pid, top_n=top_n
    )
    offsets32 = pa.array(top_offsets.astype(np.int32))
    return pa.RecordBatch.from_arrays(
        [
            chunk.column("user_id"),
            pa.ListArray.from_arrays(offsets32, pa.array(ids.astype(np.int32))),
            pa.ListArray.from_arrays(offsets32, pa.array(ctrs.astype(np.float32))),
        ],
        names=["user_id", "ad_ids", "ctrs"],
    )


def write_offline_lists(offline: DataFrame, redis: RedisSettings, version: str) -> int:
    """Write every user's offline list from the executors; returns the number written."""

    def put(writer: VersionWriter, batch: pa.RecordBatch) -> int:
        rows = batch.to_pandas()
        lists = zip(rows["ad_ids"], rows["ctrs"], strict=True)
        return writer.put_offline_lists(rows["user_id"].to_numpy(), lists)

    return write_from_executors(offline.select("user_id", "ad_ids", "ctrs"), redis, version, put)
