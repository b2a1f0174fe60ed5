"""Recall lists: up to L distinct ads per user from the categories ALS predicts they like most.

Contract
--------
- :func:`build_catalog` (numpy) / :func:`collect_catalog` (from Spark frames) build the
  :class:`RecallCatalog` every user shares: the ad categories that have ALS factors, their
  ads grouped per category (CSR layout), each ad's sampling weight (training
  impressions + 1, so ads never shown stay reachable) and the popular fallback list.
- :func:`recall_chunk` is the whole algorithm for a block of users, in numpy; the Spark
  stages, the benchmark and single-user updates all call it.
- :func:`build_recall_lists` ``(user_factors, catalog, config)`` -> DataFrame
  ``user_id`` int, ``ad_ids`` array<int>, ``personal`` int, computed on the executors.
  ``user_factors`` has ``user_id`` int and ``als_factors`` array<float> (see
  :meth:`jobs.als.AlsResult.user_factor_frame`).
- :func:`write_recall_lists` loads such a DataFrame into a version from the executors;
  :func:`publish_recall_lists` computes and writes in one pass (the fast path),
  optionally saving the lists as parquet (:func:`save_recall_lists`), and returns
  :class:`RecallStats` (the personal / fallback source counts; :func:`recall_stats`
  computes them from lists).
- :func:`recall_hit_rate` measures the lists against day-8 clicks.

Modules
-------
``catalog`` (the shared catalog), ``lists`` (the configuration and the per-chunk
algorithm), ``ranking`` (top categories), ``sampler`` (distinct ads per category),
``randomness`` (counter-based random numbers), ``stage`` (the Spark stages and Redis
writes), ``hit_rate`` (quality against test-day clicks).
"""

from jobs.recall.catalog import RecallCatalog, build_catalog, collect_catalog
from jobs.recall.hit_rate import HitRate, recall_hit_rate
from jobs.recall.lists import RECALL_SCHEMA, STRATEGIES, RecallChunk, RecallConfig, recall_chunk
from jobs.recall.stage import (
    RecallStats,
    build_recall_lists,
    publish_recall_lists,
    recall_stats,
    save_recall_lists,
    write_recall_lists,
)

__all__ = [
    "RECALL_SCHEMA",
    "STRATEGIES",
    "HitRate",
    "RecallCatalog",
    "RecallChunk",
    "RecallConfig",
    "RecallStats",
    "build_catalog",
    "build_recall_lists",
    "collect_catalog",
    "publish_recall_lists",
    "recall_chunk",
    "recall_hit_rate",
    "recall_stats",
    "save_recall_lists",
    "write_recall_lists",
]
