"""The planted behaviour and click model over a world, and the calibration of its intercepts.

A user's preference for a category is the dot product of their topic mix and the
category's topic loadings; behavior rows and targeted impressions draw a topic from the
mix, then a category from the topic. The click logit adds interest, ad and category
quality, pid, demographics and price sensitivity to an intercept calibrated to the
target mean CTR. The calibration and the row draws share these functions, so the
intercepts are solved for exactly the distribution the rows follow.
"""

from __future__ import annotations

import numpy as np

from adrec.synthetic.sampling import Stream, random_stream, sigmoid, solve_intercept, zipf_ranks
from adrec.synthetic.truth import BEHAVIOR_START, LATENT_RANK, SAMPLE_END, PlantedTruth
from adrec.synthetic.world import World

# Users drawn once, from their own stream, to calibrate the intercepts before generation.
CALIBRATION_USERS = 4096
CALIBRATION_DRAWS_PER_USER = 30


def calibrate(world: World) -> None:
    """Set the intercepts so the mean click probability and the non-pv share hit their targets.

    Uses impressions and behavior rows of calibration users drawn from their own stream, with
    exactly the machinery of the real draws.
    """
    truth, preset = world.truth, world.preset
    rng = random_stream(world.seed, Stream.CALIBRATION)
    users = rng.choice(preset.users, min(preset.users, CALIBRATION_USERS), replace=False)
    users = np.repeat(users, CALIBRATION_DRAWS_PER_USER)
    categories = preferred_categories(world, users, world.topic_category_cdf, rng)
    world.non_pv_intercept = solve_intercept(
        truth.non_pv_preference_slope * log_relative_preference(world, users, categories),
        truth.non_pv_share,
    )

    shown_ads = ads_in_categories(world, impression_categories(world, users, rng), rng)
    explorations = round(len(users) * preset.ads / preset.samples)
    shown_to = np.concatenate([users, rng.integers(0, preset.users, explorations)])
    shown_ads = np.concatenate([shown_ads, rng.integers(0, preset.ads, explorations)])
    pid = draw_pid(rng, len(shown_to), truth)
    categories = world.ad_category[shown_ads]
    # A category's behavior rows are the user's rows that drew it, spread uniformly over
    # the behavior log's span: their count in one recent window is binomial.
    recent = rng.binomial(
        world.behaviors[shown_to], recent_share(world) * _preference(world, shown_to, categories)
    )
    world.click_intercept = solve_intercept(
        click_logits(world, shown_to, shown_ads, pid)
        + recent_interest_logits(world, shown_to, categories, recent),
        truth.target_ctr,
    )


def non_pv_probability(world: World, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """P(a behavior row is cart, fav or buy): higher where the user prefers the category."""
    relative = log_relative_preference(world, users, categories)
    return sigmoid(world.non_pv_intercept + world.truth.non_pv_preference_slope * relative)


def preferred_categories(
    world: World, users: np.ndarray, topic_cdf: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One category per entry of ``users``: a topic from the user's mix, then a category from
    the topic (``topic_cdf`` holds each topic's cumulative distribution over categories)."""
    topic_draw = rng.random(len(users))
    topics = np.minimum(
        (topic_draw[:, None] >= world.user_topic_cdf[users]).sum(axis=1), LATENT_RANK - 1
    )
    category_draw = rng.random(len(users))
    categories = np.empty(len(users), dtype=np.int64)
    for topic in range(LATENT_RANK):
        rows = np.flatnonzero(topics == topic)
        categories[rows] = np.searchsorted(topic_cdf[topic], category_draw[rows], side="right")
    in_range: np.ndarray = np.minimum(categories, topic_cdf.shape[1] - 1)
    return in_range


def impression_categories(world: World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ad categories of impressions: part preference draws, part popularity draws."""
    from_preference = rng.random(len(users)) < world.truth.impression_preference_share
    by_preference = preferred_categories(world, users, world.topic_ad_category_cdf, rng)
    by_popularity = np.searchsorted(world.ad_category_cdf, rng.random(len(users)), side="right")
    by_popularity = np.minimum(by_popularity, world.ad_categories - 1)
    return np.where(from_preference, by_preference, by_popularity)


def _preference(world: World, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """P(category | user): the dot product of the user's topic mix and the category's loadings."""
    preference: np.ndarray = np.einsum(
        "ij,ij->i", world.user_topics[users], world.category_topics[categories]
    )
    return preference


def log_relative_preference(world: World, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """How much more the user prefers the category than the average user does (log ratio)."""
    log_ratio: np.ndarray = np.log(
        _preference(world, users, categories) / world.category_average_preference[categories]
    )
    return log_ratio


def _interest(world: World, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Expected behavior rows of the user in the category."""
    interest: np.ndarray = world.behaviors[users] * _preference(world, users, categories)
    return interest


def ads_in_categories(world: World, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ranks = zipf_ranks(rng, world.ad_count[categories], world.truth.ad_popularity_zipf)
    ads: np.ndarray = world.ad_start[categories] + ranks
    return ads


def click_logits(world: World, users: np.ndarray, ads: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """The planted click logit without its intercept."""
    truth = world.truth
    categories = world.ad_category[ads]
    logits: np.ndarray = (
        truth.interest_weight * np.minimum(_interest(world, users, categories), truth.interest_cap)
        + world.ad_quality[ads]
        + world.category_quality[categories]
        + np.asarray(truth.pid_effect, dtype=np.float32)[pid]
        + world.user_click_term[users]
        - world.user_price_sensitivity[users] * world.ad_centered_log_price[ads]
    )
    return logits


def recent_share(world: World) -> float:
    """The share of the behavior log's span one recent-interest window covers."""
    return world.truth.recent_interest_seconds / (SAMPLE_END - BEHAVIOR_START)


def recent_interest_logits(
    world: World, users: np.ndarray, categories: np.ndarray, recent: np.ndarray
) -> np.ndarray:
    """The planted recency term, for ``recent`` behavior rows in each entry's category."""
    expected = _interest(world, users, categories) * recent_share(world)
    term: np.ndarray = world.truth.recent_interest_weight * (np.log1p(recent) - np.log1p(expected))
    return term


def recent_behavior_counts(
    users: np.ndarray,
    categories: np.ndarray,
    times: np.ndarray,
    behavior_users: np.ndarray,
    behavior_categories: np.ndarray,
    behavior_times: np.ndarray,
    window_seconds: int,
) -> np.ndarray:
    """Per entry, the behavior rows of its user in its category in ``[time - window, time)``.

    Users and categories are non-negative indices; a (user, category, time) triple is packed
    into one int64 (times relative to the behavior log's start, below 2^32), so one sorted
    array answers every entry with two binary searches.
    """
    stride = int(max(categories.max(initial=0), behavior_categories.max(initial=0))) + 1

    def packed(user: np.ndarray, category: np.ndarray, time: np.ndarray) -> np.ndarray:
        offset = np.clip(time.astype(np.int64) - BEHAVIOR_START, 0, (1 << 32) - 1)
        key = user.astype(np.int64) * stride + category.astype(np.int64)
        combined: np.ndarray = (key << 32) | offset
        return combined

    rows = np.sort(packed(behavior_users, behavior_categories, behavior_times))
    until = np.searchsorted(rows, packed(users, categories, times), side="left")
    since = np.searchsorted(rows, packed(users, categories, times - window_seconds), side="left")
    counts: np.ndarray = until - since
    return counts


def draw_pid(rng: np.random.Generator, n: int, truth: PlantedTruth) -> np.ndarray:
    return (rng.random(n) >= truth.pid_shares[0]).astype(np.int8)
