"""The planted model's parameters: tastes, popularity laws, the click model, profile shares.

Everything here is recorded in the manifest, so a data set says what was planted in it.
Also the time windows rows are drawn in, derived from the published format's days.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from adrec.core.dataset import BEHAVIOR_FIRST_DAY, CHINA_TIME, SAMPLE_FIRST_DAY, TEST_DAY

# Distinct tastes: enough that a 500-ad popular list cannot cover every taste's ads.
LATENT_RANK = 24


def _china_midnight(day: date) -> int:
    return int(datetime.combine(day, datetime.min.time(), CHINA_TIME).timestamp())


# Unix seconds; each window ends at the China-time midnight after the test day.
SAMPLE_START = _china_midnight(SAMPLE_FIRST_DAY)
SAMPLE_END = _china_midnight(TEST_DAY + timedelta(days=1))
BEHAVIOR_START = _china_midnight(BEHAVIOR_FIRST_DAY)


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
    # logit += recent_interest_weight * (log1p(n) - log1p(expected n)), n the user's behavior
    # rows in the ad's category in the recent_interest_seconds before the impression: a
    # burst of browsing lifts clicks beyond the long-term preference, as on the real site
    # (the gain DIN-style models find on this data set). Centred on the expected count, so
    # a long-term model sees the preference and only a model of recent behavior sees the
    # burst.
    recent_interest_weight: float = 0.8
    recent_interest_seconds: int = 86_400
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
# A profile level left empty in the file.
MISSING = -1
