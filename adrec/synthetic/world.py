"""The world: every category, ad, user and per-user count, drawn before any row is written.

Categories carry the planted tastes (topic loadings), popularity and sizes; ads their
category, brand, campaign, customer, price and quality; users their profile, topic mix
and click terms; the counts say how many impressions and behavior rows each user gets.
Each part draws from its own random stream, so none depends on another's draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from adrec.synthetic.presets import Preset
from adrec.synthetic.sampling import (
    Stream,
    draw_levels,
    normalized,
    random_group_sizes,
    random_stream,
    sparse_ids,
    starts,
    zipf_ranks,
    zipf_weights,
)
from adrec.synthetic.truth import (
    AGE_SHARES,
    GENDER_SHARES,
    LATENT_RANK,
    NEW_USER_CLASS_MISSING,
    NEW_USER_CLASS_SHARES,
    OCCUPATION_STUDENT_SHARE,
    PVALUE_MISSING,
    PVALUE_SHARES,
    SEGMENT_ZERO_SHARE,
    SEGMENTS,
    SHOPPING_SHARES,
    PlantedTruth,
)

# Part of the output definition: the random streams are drawn per block of this many users.
USERS_PER_BLOCK = 4096


@dataclass
class World:
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


def build_world(preset: Preset, seed: int, truth: PlantedTruth) -> World:
    """The world without its intercepts (see :func:`adrec.synthetic.model.calibrate`)."""
    categories = _build_categories(preset, seed, truth)
    ads = _build_ads(preset, seed, truth, categories)
    users = _build_users(preset, seed, truth)
    counts = _draw_counts(preset, seed, truth)
    return World(preset=preset, seed=seed, truth=truth, **categories, **ads, **users, **counts)


class _Categories(TypedDict):
    """The category and brand fields of :class:`World`."""

    category_ids: np.ndarray
    category_topics: np.ndarray
    category_average_preference: np.ndarray
    topic_category_cdf: np.ndarray
    topic_ad_category_cdf: np.ndarray
    category_quality: np.ndarray
    ad_category_cdf: np.ndarray
    ad_start: np.ndarray
    ad_count: np.ndarray
    brand_start: np.ndarray
    brand_count: np.ndarray
    brand_ids: np.ndarray


def _build_categories(preset: Preset, seed: int, truth: PlantedTruth) -> _Categories:
    rng = random_stream(seed, Stream.CATEGORIES)
    total, with_ads = preset.behavior_categories, preset.ad_categories
    popularity = zipf_weights(rng.permutation(total), truth.category_popularity_zipf)
    # Weighted sampling without replacement (Efraimidis-Spirakis keys): ad categories tend to
    # be popular ones. They come first in the internal order.
    keys = np.log(rng.random(total)) / popularity
    order = np.argsort(-keys, kind="stable")
    popularity = popularity[order]

    ad_popularity = popularity[:with_ads] / popularity[:with_ads].sum()
    ad_count = 1 + rng.multinomial(
        preset.ads - with_ads, normalized(ad_popularity**truth.category_size_exponent)
    )
    brand_count = 1 + rng.multinomial(preset.brands - total, normalized(popularity**0.7))

    loadings = rng.gamma(truth.topic_categories / total, 1.0, (LATENT_RANK, total))
    topics = loadings * popularity**truth.topic_popularity_exponent
    topics /= topics.sum(axis=1, keepdims=True)
    ad_topics = topics[:, :with_ads] / topics[:, :with_ads].sum(axis=1, keepdims=True)
    # Dirichlet mixes average to equal topic weights.
    average_preference = topics.mean(axis=0)
    return {
        "category_ids": sparse_ids(rng, total, spread=1.05),
        "category_topics": np.ascontiguousarray(topics.T, dtype=np.float32),
        "category_average_preference": average_preference.astype(np.float32),
        "topic_category_cdf": np.cumsum(topics, axis=1),
        "topic_ad_category_cdf": np.cumsum(ad_topics, axis=1),
        "category_quality": rng.normal(0.0, truth.category_quality_sd, with_ads).astype(np.float32),
        "ad_category_cdf": np.cumsum(ad_popularity),
        "ad_start": starts(ad_count),
        "ad_count": ad_count,
        "brand_start": starts(brand_count),
        "brand_count": brand_count,
        "brand_ids": sparse_ids(rng, preset.brands, spread=1.08),
    }


class _Ads(TypedDict):
    """The per-ad fields of :class:`World`."""

    ad_ids: np.ndarray
    ad_category: np.ndarray
    ad_quality: np.ndarray
    ad_brand: np.ndarray
    ad_campaign: np.ndarray
    ad_customer: np.ndarray
    ad_price_cents: np.ndarray
    ad_centered_log_price: np.ndarray


def _build_ads(preset: Preset, seed: int, truth: PlantedTruth, categories: _Categories) -> _Ads:
    rng = random_stream(seed, Stream.ADS)
    n = preset.ads
    category = np.repeat(np.arange(preset.ad_categories), categories["ad_count"])

    brand_slot = categories["brand_start"][category] + zipf_ranks(
        rng, categories["brand_count"][category], truth.ad_brand_zipf
    )
    brand = categories["brand_ids"][brand_slot]
    brand[rng.random(n) < truth.null_brand_share] = 0

    # Campaigns group neighbouring ads of a category; customers own campaigns across categories.
    campaign_of_ad = np.repeat(
        np.arange(preset.campaigns), random_group_sizes(rng, n, preset.campaigns)
    )
    customer_of_campaign = np.empty(preset.campaigns, dtype=np.int64)
    customer_of_campaign[rng.permutation(preset.campaigns)] = np.repeat(
        np.arange(preset.customers), random_group_sizes(rng, preset.campaigns, preset.customers)
    )
    campaign_ids = sparse_ids(rng, preset.campaigns, spread=1.05)
    customer_ids = sparse_ids(rng, preset.customers, spread=1.05)

    log_median = math.log(truth.median_price)
    category_log_price = rng.normal(log_median, truth.category_log_price_sd, preset.ad_categories)
    price = np.exp(category_log_price[category] + rng.normal(0.0, truth.ad_log_price_sd, n))
    # Most prices are whole yuan, some end in dimes, some in cents (170.0, 89.9, 32.99).
    granularity = rng.choice(np.array([100, 10, 1]), size=n, p=[0.6, 0.2, 0.2])
    cents = np.rint(np.clip(price, 0.01, 1e8) * 100 / granularity) * granularity
    price_cents = np.clip(cents, 1, 10**10).astype(np.int64)
    return {
        "ad_ids": sparse_ids(rng, n, spread=1.05),
        "ad_category": category,
        "ad_quality": rng.normal(0.0, truth.ad_quality_sd, n).astype(np.float32),
        "ad_brand": brand,
        "ad_campaign": campaign_ids[campaign_of_ad],
        "ad_customer": customer_ids[customer_of_campaign[campaign_of_ad]],
        "ad_price_cents": price_cents,
        "ad_centered_log_price": (np.log(price_cents / 100) - log_median).astype(np.float32),
    }


class _Users(TypedDict):
    """The per-user fields of :class:`World`."""

    user_ids: np.ndarray
    user_topics: np.ndarray
    user_topic_cdf: np.ndarray
    profile: dict[str, np.ndarray]
    has_profile: np.ndarray
    user_click_term: np.ndarray
    user_price_sensitivity: np.ndarray


def _build_users(preset: Preset, seed: int, truth: PlantedTruth) -> _Users:
    rng = random_stream(seed, Stream.USERS)
    everyone = preset.users + preset.profile_only_users
    gender = draw_levels(rng, GENDER_SHARES, everyone)
    age = draw_levels(rng, AGE_SHARES, everyone)
    # As in the real data, cms_group_id encodes gender and age: 0..6 male, 7..12 female.
    group = np.where(gender == 1, age, 6 + np.maximum(age, 1))
    segment = np.where(
        rng.random(everyone) < SEGMENT_ZERO_SHARE, 0, rng.integers(1, SEGMENTS, everyone)
    )
    pvalue = draw_levels(rng, PVALUE_SHARES, everyone, missing_share=PVALUE_MISSING)
    shopping = draw_levels(rng, SHOPPING_SHARES, everyone)
    occupation = (rng.random(everyone) < OCCUPATION_STUDENT_SHARE).astype(np.int64)
    new_user_class = draw_levels(
        rng, NEW_USER_CLASS_SHARES, everyone, missing_share=NEW_USER_CLASS_MISSING
    )
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
        "user_ids": sparse_ids(rng, everyone, spread=1.05),
        "user_topics": topic_mix.astype(np.float32),
        "user_topic_cdf": np.cumsum(topic_mix, axis=1),
        "profile": {
            "cms_segid": segment,
            "cms_group_id": group,
            "final_gender_code": gender,
            "age_level": age,
            "pvalue_level": pvalue,
            "shopping_level": shopping,
            "occupation": occupation,
            "new_user_class_level ": new_user_class,
        },
        "has_profile": has_profile,
        "user_click_term": click_term.astype(np.float32),
        "user_price_sensitivity": sensitivity.astype(np.float32),
    }


class _Counts(TypedDict):
    """The per-user count fields of :class:`World`."""

    impressions: np.ndarray
    behaviors: np.ndarray
    behavior_offsets: np.ndarray
    exploration_users: np.ndarray
    exploration_ads: np.ndarray
    bad_timestamp_rows: np.ndarray


def _draw_counts(preset: Preset, seed: int, truth: PlantedTruth) -> _Counts:
    rng = random_stream(seed, Stream.COUNTS)
    users = preset.users
    # Every user sees at least one ad, every ad is shown at least once (to a random user).
    extra_impressions = preset.samples - users - preset.ads
    impression_weight = normalized(rng.lognormal(0.0, 0.8, users))
    impressions = 1 + rng.multinomial(extra_impressions, impression_weight)
    behaviors = rng.multinomial(preset.behavior_rows, normalized(rng.lognormal(0.0, 1.0, users)))

    exploration_user = rng.integers(0, users, preset.ads)
    order = np.argsort(exploration_user, kind="stable")
    bad_rows = max(1, round(truth.bad_timestamp_share * preset.behavior_rows))
    return {
        "impressions": impressions,
        "behaviors": behaviors,
        "behavior_offsets": starts(behaviors),
        "exploration_users": exploration_user[order],
        "exploration_ads": order,
        "bad_timestamp_rows": np.sort(rng.choice(preset.behavior_rows, bad_rows, replace=False)),
    }
