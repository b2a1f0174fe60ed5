"""``manifest.json``: what was generated (preset, seed, row counts, windows) and what was planted.

It holds no timings, so the same preset and seed give the same manifest bytes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from adrec.core.dataset import (
    AD_FEATURE,
    BEHAVIOR_LOG,
    RAW_SAMPLE,
    TEST_DAY,
    TRUTH_FILE,
    USER_PROFILE,
)
from adrec.synthetic.blocks import Totals
from adrec.synthetic.presets import REAL_BEHAVIOR_ROWS
from adrec.synthetic.truth import BEHAVIOR_START, LATENT_RANK, SAMPLE_END, SAMPLE_START
from adrec.synthetic.world import World

GENERATOR_VERSION = "3"


def build_manifest(world: World, totals: Totals) -> dict[str, Any]:
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
            TRUTH_FILE: {
                "rows": totals.samples,
                "note": "row i gives the true click probability of raw_sample row i",
            },
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
