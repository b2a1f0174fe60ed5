"""Synthetic Taobao display-ad data with a planted, known truth.

Writes ``raw_sample.csv``, ``ad_feature.csv``, ``user_profile.csv`` and ``behavior_log.csv`` in
the published format (headers, quirks and value domains of the real files), a side file with
every impression's true click probability, and ``manifest.json``.

The planted truth:

* preferences are low-rank and non-negative: each user mixes ``LATENT_RANK`` interest topics,
  each topic is a sparse, popularity-weighted distribution over categories, so a user's
  preference for a category is the dot product of a user vector and a category vector. Each
  behavior row draws a topic from the user's mix, then a category from the topic.
  A user's *interest* in a category is their expected number of behavior rows there (their
  activity times their preference): exactly what per-(user, category) ratings over the
  behavior log estimate, so collaborative filtering recovers it. Cart, fav and buy are more
  likely than pv where the user prefers the category more than the average user does.
* categories have Zipf-like popularity and sizes; within a category ads and brands have
  Zipf-like popularity.
* impressions lean toward the user's preferred categories (a mix of preference draws and
  popularity draws) and every ad is shown at least once.
* clicks follow a logistic model of interest, ad and category quality, pid, demographics and
  price sensitivity by pvalue_level; the intercept is calibrated to the target mean CTR.

Everything is vectorized over blocks of users with a fixed size; each block draws from its own
random stream derived from the seed, so the output depends on the preset and seed only (not on
the number of worker threads) and the same inputs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from adrec.core.dataset import (
    AD_FEATURE,
    BEHAVIOR_FIRST_DAY,
    BEHAVIOR_LOG,
    BTAGS,
    CHINA_TIME,
    MANIFEST_FILE,
    NULL_BRAND,
    PIDS,
    RAW_SAMPLE,
    SAMPLE_FIRST_DAY,
    TEST_DAY,
    TRUTH_FILE,
    USER_PROFILE,
)
from adrec.synthetic.presets import PRESETS, REAL_BEHAVIOR_ROWS, Preset

GENERATOR_VERSION = "2"
TRUTH_HEADER = "user,time_stamp,adgroup_id,pid,clk,click_probability"

# Distinct tastes: enough that a 500-ad popular list cannot cover every taste's ads.
LATENT_RANK = 24
# Part of the output definition: the random streams are drawn per block of this many users.
USERS_PER_BLOCK = 4096
# Users drawn once, from their own stream, to calibrate the intercepts before generation.
CALIBRATION_USERS = 4096
CALIBRATION_DRAWS_PER_USER = 30



def _china_midnight(day: date) -> int:
    return int(datetime.combine(day, datetime.min.time(), CHINA_TIME).timestamp())


# Unix seconds; each window ends at the China-time midnight after the test day.
SAMPLE_START = _china_midnight(SAMPLE_FIRST_DAY)
SAMPLE_END = _china_midnight(TEST_DAY + timedelta(days=1))
BEHAVIOR_START = _china_midnight(BEHAVIOR_FIRST_DAY)

_WRITE_OPTIONS = pa_csv.WriteOptions(include_header=False, quoting_style="none")


@dataclass(frozen=True)
class PlantedTruth:
    """Every parameter of the planted model; recorded in the manifest."""

    # Preferences: topic loadings of a category ~ popularity^exponent * Gamma(shape) with
    # shape = topic_categories / categories, so that about that many categories carry a
    # topic's weight whatever the preset's size; users' topic mixes ~
    # Dirichlet(concentration). A popularity exponent near 1 would instead pile
    # every topic onto the same few popular categories (one category drew 62% of all
    # clicks at medium when it was 1.2), a world where nothing beats a popularity list.
    category_popularity_zipf: float = 1.0
    # Ads per category ~ popularity^exponent: popular categories hold more ads, less than
    # proportionally (the largest holds ~0.3% of all ads at medium, not 12%).
    category_size_exponent: float = 0.3
    topic_popularity_exponent: float = 0.5
    topic_categories: float = 18.0
    user_topic_concentration: float = 0.05
    behavior_brand_zipf: float = 1.1
    non_pv_share: float = 0.048
    # Per unit of log(user's preference / average user's preference) for the category.
    non_pv_preference_slope: float = 0.5
    # Shares of cart, fav and buy among the non-pv rows (2.2% : 1.3% : 1.3% of all rows).
    non_pv_btag_mix: tuple[float, float, float] = (2.2 / 4.8, 1.3 / 4.8, 1.3 / 4.8)
    bad_timestamp_share: float = 5e-5
    # Impressions: this share of a user's impressions follow their preferences (the ads
    # were targeted), the rest follow category popularity; ads within a category follow
    # Zipf-like popularity.
    impression_preference_share: float = 0.95
    ad_popularity_zipf: float = 0.6
    ad_brand_zipf: float = 1.3
    null_brand_share: float = 0.29
    pid_shares: tuple[float, float] = (0.62, 0.38)
    # Prices: lognormal around a per-category level.
    median_price: float = 120.0
    category_log_price_sd: float = 0.9
    ad_log_price_sd: float = 0.7
    # Clicks: logit = intercept + the terms below, intercept calibrated to target_ctr.
    target_ctr: float = 0.0514
    # logit += interest_weight * min(interest, interest_cap)
    interest_weight: float = 0.1
    interest_cap: float = 20.0
    ad_quality_sd: float = 0.2
    category_quality_sd: float = 0.25
    pid_effect: tuple[float, float] = (0.0, -0.1)
    female_effect: float = 0.1
    age_effect: tuple[float, ...] = (0.1, 0.05, 0.0, 0.0, -0.05, -0.1, -0.15)  # age_level 0..6
    shopping_effect: tuple[float, ...] = (-0.15, -0.05, 0.0)  # shopping_level 1..3
    occupation_effect: float = 0.1
    # By new_user_class_level: missing (an empty field), then levels 1..4.
    new_user_class_effect: tuple[float, ...] = (0.0, 0.1, 0.05, 0.0, -0.05)
    # logit -= sensitivity * (log price - log median_price), by pvalue_level: missing, 1..3.
    price_sensitivity: tuple[float, ...] = (0.08, 0.2, 0.1, 0.03)


TRUTH = PlantedTruth()

# Profile value distributions, close to the real file's.
GENDER_SHARES = {1: 0.35, 2: 0.65}
AGE_SHARES = {0: 0.01, 1: 0.06, 2: 0.25, 3: 0.33, 4: 0.2, 5: 0.11, 6: 0.04}
SEGMENT_ZERO_SHARE = 0.9
SEGMENTS = 97
PVALUE_MISSING = 0.54
PVALUE_SHARES = {1: 0.3, 2: 0.6, 3: 0.1}
SHOPPING_SHARES = {1: 0.06, 2: 0.16, 3: 0.78}
OCCUPATION_STUDENT_SHARE = 0.06
NEW_USER_CLASS_MISSING = 0.32
NEW_USER_CLASS_SHARES = {1: 0.1, 2: 0.35, 3: 0.3, 4: 0.25}
MISSING = -1


class _Stream:
    """Spawn keys of the independent random streams."""

    CATEGORIES = 0
    ADS = 1
    USERS = 2
    COUNTS = 3
    CALIBRATION = 4
    BLOCK = 5


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, index))
    return np.random.Generator(np.random.PCG64(sequence))


@dataclass
class _World:
    """Every entity and per-user count, drawn before any row is written."""

    preset: Preset
    seed: int
    truth: PlantedTruth
    # Categories, ad categories first.
    category_ids: np.ndarray
    category_topics: np.ndarray  # (categories, topics): P(category | topic)
    category_average_preference: np.ndarray
    topic_category_cdf: np.ndarray  # (topics, categories)
    topic_ad_category_cdf: np.ndarray  # (topics, ad categories)
    category_quality: np.ndarray
    ad_category_cdf: np.ndarray
    brand_start: np.ndarray
    brand_count: np.ndarray
    brand_ids: np.ndarray
    # Ads, sorted by category and then by popularity rank within it.
    ad_start: np.ndarray
    ad_count: np.ndarray
    ad_ids: np.ndarray
    ad_category: np.ndarray
    ad_quality: np.ndarray
    ad_brand: np.ndarray  # 0 means NULL
    ad_campaign: np.ndarray
    ad_customer: np.ndarray
    ad_price_cents: np.ndarray
    ad_centered_log_price: np.ndarray
    # Users: the sample users first, then users who only have a profile.
    user_ids: np.ndarray
    user_topics: np.ndarray  # (sample users, topics): the user's topic mix
    user_topic_cdf: np.ndarray
    profile: dict[str, np.ndarray]
    has_profile: np.ndarray
    user_click_term: np.ndarray
    user_price_sensitivity: np.ndarray
    # Per sample user: impressions drawn from preferences, behavior rows.
    impressions: np.ndarray
    behaviors: np.ndarray
    behavior_offsets: np.ndarray
    exploration_users: np.ndarray  # sorted; exploration_ads[i] is shown to it once
    exploration_ads: np.ndarray
    bad_timestamp_rows: np.ndarray
    click_intercept: float = 0.0
    non_pv_intercept: float = 0.0

    @property
    def blocks(self) -> int:
        return math.ceil(self.preset.users / USERS_PER_BLOCK)

    @property
    def ad_categories(self) -> int:
        return self.preset.ad_categories


@dataclass
class GenerationResult:
    out_dir: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


def generate(
    preset: str | Preset,
    seed: int,
    out_dir: str | Path,
    *,
    workers: int = 2,
    progress: bool = True,
) -> GenerationResult:
    """Write the four files, the truth side file and the manifest into ``out_dir``.

    Each file appears under its final name only when complete, and the manifest last, so an
    interrupted run never leaves a directory that looks complete.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    preset.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    report = _Progress(enabled=progress)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    world = _build_world(preset, seed, TRUTH)
    _calibrate(world)
    seconds["entities and calibration"] = time.perf_counter() - started
    report.line(f"entities ready: {preset.users:,} users, {preset.ads:,} ads")

    for name, writer in (("ad_feature.csv", _write_ad_feature),
                         ("user_profile.csv", _write_user_profile)):
        started = time.perf_counter()
        writer(world, out)
        seconds[name] = time.perf_counter() - started
        report.line(f"{name} written")

    started = time.perf_counter()
    totals = _write_blocks(world, out, workers, report)
    seconds["raw_sample.csv, behavior_log.csv and truth (draws and writes)"] = (
        time.perf_counter() - started
    )

    manifest = _manifest(world, totals)
    with _atomic_file(out / MANIFEST_FILE) as handle:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode())
    report.line(f"done: mean click probability {manifest['clicks']['mean_click_probability']:.4f}")
    return GenerationResult(out, manifest, seconds)


# --- the world -----------------------------------------------------------------------------


def _build_world(preset: Preset, seed: int, truth: PlantedTruth) -> _World:
    categories = _build_categories(preset, seed, truth)
    ads = _build_ads(preset, seed, truth, categories)
    users = _build_users(preset, seed, truth)
    counts = _draw_counts(preset, seed, truth)
    return _World(preset=preset, seed=seed, truth=truth, **categories, **ads, **users, **counts)


def _build_categories(preset: Preset, seed: int, truth: PlantedTruth) -> dict[str, np.ndarray]:
    rng = _rng(seed, _Stream.CATEGORIES)
    total, with_ads = preset.behavior_categories, preset.ad_categories
    popularity = _zipf_weights(rng.permutation(total), truth.category_popularity_zipf)
    # Weighted sampling without replacement (Efraimidis-Spirakis keys): ad categories tend to
    # be popular ones. They come first in the internal order.
    keys = np.log(rng.random(total)) / popularity
    order = np.argsort(-keys, kind="stable")
    popularity = popularity[order]

    ad_popularity = popularity[:with_ads] / popularity[:with_ads].sum()
    ad_count = 1 + rng.multinomial(preset.ads - with_ads,
                                   _normalized(ad_popularity**truth.category_size_exponent))
    brand_count = 1 + rng.multinomial(preset.brands - total, _normalized(popularity**0.7))

    loadings = rng.gamma(truth.topic_categories / total, 1.0, (LATENT_RANK, total))
    topics = loadings * popularity**truth.topic_popularity_exponent
    topics /= topics.sum(axis=1, keepdims=True)
    ad_topics = topics[:, :with_ads] / topics[:, :with_ads].sum(axis=1, keepdims=True)
    # Dirichlet mixes average to equal topic weights.
    average_preference = topics.mean(axis=0)
    return {
        "category_ids": _sparse_ids(rng, total, spread=1.05),
        "category_topics": np.ascontiguousarray(topics.T, dtype=np.float32),
        "category_average_preference": average_preference.astype(np.float32),
        "topic_category_cdf": np.cumsum(topics, axis=1),
        "topic_ad_category_cdf": np.cumsum(ad_topics, axis=1),
        "category_quality": rng.normal(0.0, truth.category_quality_sd, with_ads).astype(np.float32),
        "ad_category_cdf": np.cumsum(ad_popularity),
        "ad_start": _starts(ad_count),
        "ad_count": ad_count,
        "brand_start": _starts(brand_count),
        "brand_count": brand_count,
        "brand_ids": _sparse_ids(rng, preset.brands, spread=1.08),
    }


def _build_ads(preset: Preset, seed: int, truth: PlantedTruth,
               categories: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = _rng(seed, _Stream.ADS)
    n = preset.ads
    category = np.repeat(np.arange(preset.ad_categories), categories["ad_count"])

    brand_slot = categories["brand_start"][category] + _zipf_ranks(
        rng, categories["brand_count"][category], truth.ad_brand_zipf
    )
    brand = categories["brand_ids"][brand_slot]
    brand[rng.random(n) < truth.null_brand_share] = 0

    # Campaigns group neighbouring ads of a category; customers own campaigns across categories.
    campaign_of_ad = np.repeat(np.arange(preset.campaigns),
                               _random_group_sizes(rng, n, preset.campaigns))
    customer_of_campaign = np.empty(preset.campaigns, dtype=np.int64)
    customer_of_campaign[rng.permutation(preset.campaigns)] = np.repeat(
        np.arange(preset.customers), _random_group_sizes(rng, preset.campaigns, preset.customers)
    )
    campaign_ids = _sparse_ids(rng, preset.campaigns, spread=1.05)
    customer_ids = _sparse_ids(rng, preset.customers, spread=1.05)

    log_median = math.log(truth.median_price)
    category_log_price = rng.normal(log_median, truth.category_log_price_sd, preset.ad_categories)
    price = np.exp(category_log_price[category] + rng.normal(0.0, truth.ad_log_price_sd, n))
    # Most prices are whole yuan, some end in dimes, some in cents (170.0, 89.9, 32.99).
    granularity = rng.choice(np.array([100, 10, 1]), size=n, p=[0.6, 0.2, 0.2])
    cents = np.rint(np.clip(price, 0.01, 1e8) * 100 / granularity) * granularity
    price_cents = np.clip(cents, 1, 10**10).astype(np.int64)
    return {
        "ad_ids": _sparse_ids(rng, n, spread=1.05),
        "ad_category": category,
        "ad_quality": rng.normal(0.0, truth.ad_quality_sd, n).astype(np.float32),
        "ad_brand": brand,
        "ad_campaign": campaign_ids[campaign_of_ad],
        "ad_customer": customer_ids[customer_of_campaign[campaign_of_ad]],
        "ad_price_cents": price_cents,
        "ad_centered_log_price": (np.log(price_cents / 100) - log_median).astype(np.float32),
    }


def _build_users(preset: Preset, seed: int, truth: PlantedTruth) -> dict[str, np.ndarray]:
    rng = _rng(seed, _Stream.USERS)
    everyone = preset.users + preset.profile_only_users
    gender = _draw_levels(rng, GENDER_SHARES, everyone)
    age = _draw_levels(rng, AGE_SHARES, everyone)
    # As in the real data, cms_group_id encodes gender and age: 0..6 male, 7..12 female.
    group = np.where(gender == 1, age, 6 + np.maximum(age, 1))
    segment = np.where(rng.random(everyone) < SEGMENT_ZERO_SHARE, 0,
                       rng.integers(1, SEGMENTS, everyone))
    pvalue = _draw_levels(rng, PVALUE_SHARES, everyone, missing_share=PVALUE_MISSING)
    shopping = _draw_levels(rng, SHOPPING_SHARES, everyone)
    occupation = (rng.random(everyone) < OCCUPATION_STUDENT_SHARE).astype(np.int64)
    new_user_class = _draw_levels(rng, NEW_USER_CLASS_SHARES, everyone,
                                  missing_share=NEW_USER_CLASS_MISSING)
    has_profile = np.ones(everyone, dtype=bool)
    has_profile[rng.choice(preset.users, preset.users_without_profile, replace=False)] = False
    topic_mix = rng.dirichlet(np.full(LATENT_RANK, truth.user_topic_concentration), preset.users)

    click_term = (
        truth.female_effect * (gender == 2)
        + np.asarray(truth.age_effect)[age]
        + np.asarray(truth.shopping_effect)[shopping - 1]
        + truth.occupation_effect * occupation
        + np.asarray(truth.new_user_class_effect)[np.maximum(new_user_class, 0)]
    )
    sensitivity = np.asarray(truth.price_sensitivity)[np.maximum(pvalue, 0)]
    # Users without a profile have no demographic term and the "missing" price sensitivity.
    click_term = np.where(has_profile, click_term, 0.0)
    sensitivity = np.where(has_profile, sensitivity, truth.price_sensitivity[0])
    return {
        "user_ids": _sparse_ids(rng, everyone, spread=1.05),
        "user_topics": topic_mix.astype(np.float32),
        "user_topic_cdf": np.cumsum(topic_mix, axis=1),
        "profile": {
            "cms_segid": segment, "cms_group_id": group, "final_gender_code": gender,
            "age_level": age, "pvalue_level": pvalue, "shopping_level": shopping,
            "occupation": occupation, "new_user_class_level ": new_user_class,
        },
        "has_profile": has_profile,
        "user_click_term": click_term.astype(np.float32),
        "user_price_sensitivity": sensitivity.astype(np.float32),
    }


def _draw_counts(preset: Preset, seed: int, truth: PlantedTruth) -> dict[str, np.ndarray]:
    rng = _rng(seed, _Stream.COUNTS)
    users = preset.users
    # Every user sees at least one ad, every ad is shown at least once (to a random user).
    extra_impressions = preset.samples - users - preset.ads
    impression_weight = _normalized(rng.lognormal(0.0, 0.8, users))
    impressions = 1 + rng.multinomial(extra_impressions, impression_weight)
    behaviors = rng.multinomial(preset.behavior_rows, _normalized(rng.lognormal(0.0, 1.0, users)))

    exploration_user = rng.integers(0, users, preset.ads)
    order = np.argsort(exploration_user, kind="stable")
    bad_rows = max(1, round(truth.bad_timestamp_share * preset.behavior_rows))
    return {
        "impressions": impressions,
        "behaviors": behaviors,
        "behavior_offsets": _starts(behaviors),
        "exploration_users": exploration_user[order],
        "exploration_ads": order,
        "bad_timestamp_rows": np.sort(rng.choice(preset.behavior_rows, bad_rows, replace=False)),
    }


def _calibrate(world: _World) -> None:
    """Set the intercepts so the mean click probability and the non-pv share hit their targets.

    Uses impressions and behavior rows of calibration users drawn from their own stream, with
    exactly the machinery of the real draws.
    """
    truth, preset = world.truth, world.preset
    rng = _rng(world.seed, _Stream.CALIBRATION)
    users = rng.choice(preset.users, min(preset.users, CALIBRATION_USERS), replace=False)
    users = np.repeat(users, CALIBRATION_DRAWS_PER_USER)
    categories = _preferred_categories(world, users, world.topic_category_cdf, rng)
    world.non_pv_intercept = _solve_intercept(
        truth.non_pv_preference_slope * _log_relative_preference(world, users, categories),
        truth.non_pv_share,
    )

    shown_ads = _ads_in_categories(world, _impression_categories(world, users, rng), rng)
    explorations = round(len(users) * preset.ads / preset.samples)
    shown_to = np.concatenate([users, rng.integers(0, preset.users, explorations)])
    shown_ads = np.concatenate([shown_ads, rng.integers(0, preset.ads, explorations)])
    pid = _draw_pid(rng, len(shown_to), truth)
    world.click_intercept = _solve_intercept(
        _click_logits(world, shown_to, shown_ads, pid), truth.target_ctr
    )


# --- drawing rows --------------------------------------------------------------------------


@dataclass
class _Block:
    """One block of users' rows, already formatted as CSV lines (formatting runs in workers)."""

    raw_sample_csv: pa.Buffer
    truth_csv: pa.Buffer
    behavior_csv: pa.Buffer
    samples: int
    behavior_rows: int
    clicks: int
    click_probability_sum: float
    behavior_categories: np.ndarray
    behavior_brand_slots: np.ndarray


def _draw_block(world: _World, index: int) -> _Block:
    truth = world.truth
    rng = _rng(world.seed, _Stream.BLOCK, index)
    first = index * USERS_PER_BLOCK
    users = np.arange(first, min(first + USERS_PER_BLOCK, world.preset.users))

    behaving = np.repeat(users, world.behaviors[users])
    behavior_categories = _preferred_categories(world, behaving, world.topic_category_cdf, rng)
    viewers = np.repeat(users, world.impressions[users])
    preference_ads = _ads_in_categories(world, _impression_categories(world, viewers, rng), rng)

    explored = slice(*np.searchsorted(world.exploration_users, [users[0], users[-1] + 1]))
    shown_to = np.concatenate([viewers, world.exploration_users[explored]])
    shown_ads = np.concatenate([preference_ads, world.exploration_ads[explored]])
    shuffle = rng.permutation(len(shown_to))
    shown_to, shown_ads = shown_to[shuffle], shown_ads[shuffle]
    pid = _draw_pid(rng, len(shown_to), truth)
    probability = _sigmoid(world.click_intercept + _click_logits(world, shown_to, shown_ads, pid))
    clicked = (rng.random(len(probability)) < probability).astype(np.int8)
    shown_at = rng.integers(SAMPLE_START, SAMPLE_END, len(shown_to))

    raw_sample = pa.table({
        "user": world.user_ids[shown_to],
        "time_stamp": shown_at,
        "adgroup_id": world.ad_ids[shown_ads],
        "pid": _labels(pid, PIDS),
        "nonclk": 1 - clicked,
        "clk": clicked,
    })
    truth_table = pa.table({
        "user": raw_sample["user"],
        "time_stamp": raw_sample["time_stamp"],
        "adgroup_id": raw_sample["adgroup_id"],
        "pid": raw_sample["pid"],
        "clk": raw_sample["clk"],
        "click_probability": _fixed_decimals(probability, 6),
    })
    behavior, brand_slots = _behavior_table(world, behaving, behavior_categories, rng)
    return _Block(
        raw_sample_csv=_csv_lines(raw_sample),
        truth_csv=_csv_lines(truth_table),
        behavior_csv=_csv_lines(behavior),
        samples=raw_sample.num_rows,
        behavior_rows=behavior.num_rows,
        clicks=int(clicked.sum()),
        click_probability_sum=float(probability.sum(dtype=np.float64)),
        behavior_categories=behavior_categories,
        behavior_brand_slots=brand_slots,
    )


def _behavior_table(
    world: _World, users: np.ndarray, categories: np.ndarray, rng: np.random.Generator
) -> tuple[pa.Table, np.ndarray]:
    """Behavior rows of ``users`` (one entry per row) in the drawn categories, and their brands."""
    truth = world.truth
    rows = len(users)
    relative = _log_relative_preference(world, users, categories)
    non_pv = rng.random(rows) < _sigmoid(
        world.non_pv_intercept + truth.non_pv_preference_slope * relative
    )
    btag = np.zeros(rows, dtype=np.int8)
    btag[non_pv] = 1 + rng.choice(3, int(non_pv.sum()), p=truth.non_pv_btag_mix)
    brand_slots = world.brand_start[categories] + _zipf_ranks(
        rng, world.brand_count[categories], truth.behavior_brand_zipf
    )
    time_stamp = rng.integers(BEHAVIOR_START, SAMPLE_END, rows)
    # The real log has a few rows with time_stamp <= 0.
    first_row = world.behavior_offsets[users[0]] if rows else 0
    bad = slice(*np.searchsorted(world.bad_timestamp_rows, [first_row, first_row + rows]))
    bad_rows = world.bad_timestamp_rows[bad] - first_row
    time_stamp[bad_rows] = -rng.integers(0, SAMPLE_START, len(bad_rows))
    table = pa.table({
        "user": world.user_ids[users],
        "time_stamp": time_stamp,
        "btag": _labels(btag, BTAGS),
        "cate": world.category_ids[categories],
        "brand": world.brand_ids[brand_slots],
    })
    return table, brand_slots


def _preferred_categories(world: _World, users: np.ndarray, topic_cdf: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """One category per entry of ``users``: a topic from the user's mix, then a category from
    the topic (``topic_cdf`` holds each topic's cumulative distribution over categories)."""
    topic_draw = rng.random(len(users))
    topics = np.minimum((topic_draw[:, None] >= world.user_topic_cdf[users]).sum(axis=1),
                        LATENT_RANK - 1)
    category_draw = rng.random(len(users))
    categories = np.empty(len(users), dtype=np.int64)
    for topic in range(LATENT_RANK):
        rows = np.flatnonzero(topics == topic)
        categories[rows] = np.searchsorted(topic_cdf[topic], category_draw[rows], side="right")
    return np.minimum(categories, topic_cdf.shape[1] - 1)


def _impression_categories(world: _World, users: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Ad categories of impressions: part preference draws, part popularity draws."""
    from_preference = rng.random(len(users)) < world.truth.impression_preference_share
    by_preference = _preferred_categories(world, users, world.topic_ad_category_cdf, rng)
    by_popularity = np.searchsorted(world.ad_category_cdf, rng.random(len(users)), side="right")
    by_popularity = np.minimum(by_popularity, world.ad_categories - 1)
    return np.where(from_preference, by_preference, by_popularity)


def _preference(world: _World, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """P(category | user): the dot product of the user's topic mix and the category's loadings."""
    return np.einsum("ij,ij->i", world.user_topics[users], world.category_topics[categories])


def _log_relative_preference(world: _World, users: np.ndarray,
                             categories: np.ndarray) -> np.ndarray:
    """How much more the user prefers the category than the average user does (log ratio)."""
    return np.log(_preference(world, users, categories)
                  / world.category_average_preference[categories])


def _interest(world: _World, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Expected behavior rows of the user in the category."""
    return world.behaviors[users] * _preference(world, users, categories)


def _ads_in_categories(world: _World, categories: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    ranks = _zipf_ranks(rng, world.ad_count[categories], world.truth.ad_popularity_zipf)
    return world.ad_start[categories] + ranks


def _click_logits(world: _World, users: np.ndarray, ads: np.ndarray,
                  pid: np.ndarray) -> np.ndarray:
    """The planted click logit without its intercept."""
    truth = world.truth
    categories = world.ad_category[ads]
    return (
        truth.interest_weight * np.minimum(_interest(world, users, categories), truth.interest_cap)
        + world.ad_quality[ads]
        + world.category_quality[categories]
        + np.asarray(truth.pid_effect, dtype=np.float32)[pid]
        + world.user_click_term[users]
        - world.user_price_sensitivity[users] * world.ad_centered_log_price[ads]
    )


def _draw_pid(rng: np.random.Generator, n: int, truth: PlantedTruth) -> np.ndarray:
    return (rng.random(n) >= truth.pid_shares[0]).astype(np.int8)


# --- writing files -------------------------------------------------------------------------


def _write_ad_feature(world: _World, out: Path) -> None:
    order = np.lexsort((world.ad_ids, world.ad_customer))  # the real file is sorted by customer
    brand = world.ad_brand[order]
    table = pa.table({
        "adgroup_id": world.ad_ids[order],
        "cate_id": world.category_ids[world.ad_category[order]],
        "campaign_id": world.ad_campaign[order],
        "customer": world.ad_customer[order],
        "brand": pc.fill_null(pa.array(brand, mask=brand == 0).cast(pa.string()), NULL_BRAND),
        "price": _price_strings(world.ad_price_cents[order]),
    })
    with _atomic_file(out / AD_FEATURE.csv_file) as handle:
        _write_table(handle, AD_FEATURE.header, table)


def _write_user_profile(world: _World, out: Path) -> None:
    listed = np.flatnonzero(world.has_profile)
    listed = listed[np.argsort(world.user_ids[listed], kind="stable")]
    columns = {"userid": world.user_ids[listed]}
    for name, values in world.profile.items():
        shown = values[listed]
        columns[name] = pa.array(shown, mask=shown == MISSING)
    with _atomic_file(out / USER_PROFILE.csv_file) as handle:
        _write_table(handle, USER_PROFILE.header, pa.table(columns))


@dataclass
class _Totals:
    samples: int = 0
    clicks: int = 0
    click_probability_sum: float = 0.0
    behavior_rows: int = 0
    behavior_categories_used: np.ndarray | None = None
    behavior_brands_used: np.ndarray | None = None


def _write_blocks(world: _World, out: Path, workers: int, report: _Progress) -> _Totals:
    totals = _Totals(
        behavior_categories_used=np.zeros(world.preset.behavior_categories, dtype=bool),
        behavior_brands_used=np.zeros(world.preset.brands, dtype=bool),
    )
    files = {
        "raw_sample_csv": (out / RAW_SAMPLE.csv_file, RAW_SAMPLE.header),
        "truth_csv": (out / TRUTH_FILE, TRUTH_HEADER),
        "behavior_csv": (out / BEHAVIOR_LOG.csv_file, BEHAVIOR_LOG.header),
    }
    with contextlib.ExitStack() as stack:
        handles = {}
        for key, (path, header) in files.items():
            handles[key] = stack.enter_context(_atomic_file(path))
            handles[key].write((header + "\n").encode())
        for block in _blocks_in_order(world, workers):
            for key, handle in handles.items():
                handle.write(getattr(block, key))
            totals.samples += block.samples
            totals.clicks += block.clicks
            totals.click_probability_sum += block.click_probability_sum
            totals.behavior_rows += block.behavior_rows
            totals.behavior_categories_used[block.behavior_categories] = True
            totals.behavior_brands_used[block.behavior_brand_slots] = True
            report.rows(
                f"raw_sample {totals.samples:,}/{world.preset.samples:,}, "
                f"behavior_log {totals.behavior_rows:,}/{world.preset.behavior_rows:,} rows",
                done=totals.samples == world.preset.samples,
            )
    return totals


def _blocks_in_order(world: _World, workers: int) -> Iterator[_Block]:
    """Draw blocks, ``workers`` at a time, and yield them in block order."""
    if workers <= 1:
        for index in range(world.blocks):
            yield _draw_block(world, index)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datagen") as pool:
        pending: deque[Future[_Block]] = deque()
        next_index = 0
        while pending or next_index < world.blocks:
            while next_index < world.blocks and len(pending) <= workers:
                pending.append(pool.submit(_draw_block, world, next_index))
                next_index += 1
            yield pending.popleft().result()


def _write_table(handle: BinaryIO, header: str, table: pa.Table) -> None:
    handle.write((header + "\n").encode())
    pa_csv.write_csv(table, handle, _WRITE_OPTIONS)


def _csv_lines(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, _WRITE_OPTIONS)
    return sink.getvalue()


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears under ``path`` only once it is completely written."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            yield handle
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _manifest(world: _World, totals: _Totals) -> dict:
    preset = world.preset
    brands = world.ad_brand[world.ad_brand != 0]
    return {
        "generator": "adrec synthetic",
        "generator_version": GENERATOR_VERSION,
        "preset": preset.name,
        "seed": world.seed,
        "files": {
            RAW_SAMPLE.csv_file: {"rows": totals.samples},
            AD_FEATURE.csv_file: {"rows": preset.ads},
            USER_PROFILE.csv_file: {"rows": int(world.has_profile.sum())},
            BEHAVIOR_LOG.csv_file: {"rows": totals.behavior_rows},
            TRUTH_FILE: {"rows": totals.samples,
                         "note": "row i gives the true click probability of raw_sample row i"},
        },
        "counts": {
            "users": preset.users,
            "ads": preset.ads,
            "ad_categories": preset.ad_categories,
            "campaigns": int(np.unique(world.ad_campaign).size),
            "customers": int(np.unique(world.ad_customer).size),
            "ad_brands": int(np.unique(brands).size),
            "ads_with_null_brand": int(preset.ads - brands.size),
            "profile_users": int(world.has_profile.sum()),
            "sample_users_without_profile": preset.users_without_profile,
            "profile_only_users": preset.profile_only_users,
            "behavior_users": int(np.count_nonzero(world.behaviors)),
            "behavior_categories": int(totals.behavior_categories_used.sum()),
            "behavior_brands": int(totals.behavior_brands_used.sum()),
            "behavior_rows_with_bad_timestamp": int(world.bad_timestamp_rows.size),
        },
        "behavior_log_scale": {
            "generated_rows": totals.behavior_rows,
            "real_rows": REAL_BEHAVIOR_ROWS,
            "fraction_of_real": round(totals.behavior_rows / REAL_BEHAVIOR_ROWS, 6),
            "note": (
                f"behavior_log.csv is scaled down: {totals.behavior_rows:,} rows against "
                f"{REAL_BEHAVIOR_ROWS:,} in the real data set"
            ),
        },
        "time_windows": {
            "raw_sample": [SAMPLE_START, SAMPLE_END],
            "behavior_log": [BEHAVIOR_START, SAMPLE_END],
            "test_day_china_time": TEST_DAY.isoformat(),
        },
        "clicks": {
            "mean_click_probability": round(totals.click_probability_sum / totals.samples, 6),
            "observed_ctr": round(totals.clicks / totals.samples, 6),
            "truth_file": TRUTH_FILE,
            "click_intercept": round(world.click_intercept, 6),
            "non_pv_intercept": round(world.non_pv_intercept, 6),
        },
        "planted_truth": {"latent_rank": LATENT_RANK, **asdict(world.truth)},
        "preset_sizes": preset.as_dict(),
    }


# --- vectorized helpers --------------------------------------------------------------------


def _labels(codes: np.ndarray, labels: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(labels))


def _fixed_decimals(values: np.ndarray, digits: int) -> pa.Array:
    """Non-negative floats as strings with exactly ``digits`` decimals (0.051234)."""
    scale = 10**digits
    units = np.rint(values.astype(np.float64) * scale).astype(np.int64)
    fraction = pc.utf8_lpad(pa.array(units % scale).cast(pa.string()), digits, "0")
    return pc.binary_join_element_wise(pa.array(units // scale).cast(pa.string()), fraction, ".")


def _price_strings(cents: np.ndarray) -> pa.Array:
    """Prices as Python prints floats with at most two decimals: 170.0, 89.9, 32.99."""
    whole = pa.array(cents // 100).cast(pa.string())
    hundredths = cents % 100
    fraction = pc.if_else(
        pa.array(hundredths % 10 == 0),
        pa.array(hundredths // 10).cast(pa.string()),
        pc.utf8_lpad(pa.array(hundredths).cast(pa.string()), 2, "0"),
    )
    return pc.binary_join_element_wise(whole, fraction, ".")


def _zipf_weights(ranks: np.ndarray, exponent: float) -> np.ndarray:
    return (ranks + 1.0) ** -exponent


def _zipf_ranks(rng: np.random.Generator, sizes: np.ndarray, exponent: float) -> np.ndarray:
    """A rank in ``[0, size)`` per draw with P(rank r) roughly proportional to (r + 1)^-exponent.

    Inverts the continuous power law on ``[1, size + 1)``; ``exponent`` must not be 1.
    """
    power = 1.0 - exponent
    top = (sizes + 1.0) ** power
    drawn = (1.0 + rng.random(len(sizes)) * (top - 1.0)) ** (1.0 / power)
    return np.minimum(drawn.astype(np.int64) - 1, sizes - 1)


def _draw_levels(rng: np.random.Generator, shares: dict[int, float], n: int,
                 missing_share: float = 0.0) -> np.ndarray:
    levels = rng.choice(np.array(list(shares)), size=n, p=list(shares.values()))
    if missing_share:
        levels[rng.random(n) < missing_share] = MISSING
    return levels


def _random_group_sizes(rng: np.random.Generator, items: int, groups: int) -> np.ndarray:
    """Sizes (each at least one) of ``groups`` consecutive groups covering ``items`` items."""
    cuts = np.sort(rng.choice(items - 1, groups - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [items]]))


def _sparse_ids(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """``n`` distinct positive ids in random order, drawn from 1..about n * spread."""
    return (rng.choice(math.ceil(n * spread), n, replace=False) + 1).astype(np.int32)


def _starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _normalized(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _solve_intercept(logits: np.ndarray, target_mean: float) -> float:
    """The intercept b with mean(sigmoid(b + logits)) == target_mean, by bisection."""
    low, high = -30.0, 30.0
    logits = logits.astype(np.float64)
    for _ in range(60):
        middle = (low + high) / 2
        if _sigmoid(middle + logits).mean() < target_mean:
            low = middle
        else:
            high = middle
    return (low + high) / 2


class _Progress:
    """One progress line on stderr: rewritten in place on a terminal, else at most every 10 s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.started = time.monotonic()
        self.last_shown = -math.inf
        self.interactive = sys.stderr.isatty()

    def line(self, message: str) -> None:
        self._show(message, final=True)

    def rows(self, message: str, done: bool) -> None:
        now = time.monotonic()
        if done or now - self.last_shown >= (0.5 if self.interactive else 10.0):
            self.last_shown = now
            self._show(message, final=done or not self.interactive)

    def _show(self, message: str, final: bool) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.started
            prefix = "\r" if self.interactive else ""
            sys.stderr.write(f"{prefix}adrec datagen [{elapsed:7.1f}s] {message}"
                             + ("\n" if final else ""))
            sys.stderr.flush()
