"""``raw_sample.csv``, its truth side file and ``behavior_log.csv``, drawn per block of users.

Each block of ``USERS_PER_BLOCK`` users draws its impressions, clicks and behavior rows
from its own random stream and formats them as CSV in a worker thread; the blocks are
appended in block order, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from adrec.core.dataset import BEHAVIOR_LOG, BTAGS, PIDS, RAW_SAMPLE, TRUTH_FILE
from adrec.synthetic.files import atomic_file, csv_lines, fixed_decimals, label_column
from adrec.synthetic.model import (
    ads_in_categories,
    click_logits,
    draw_pid,
    impression_categories,
    non_pv_probability,
    preferred_categories,
    recent_behavior_counts,
    recent_interest_logits,
)
from adrec.synthetic.progress import Progress
from adrec.synthetic.sampling import Stream, random_stream, sigmoid, zipf_ranks
from adrec.synthetic.truth import BEHAVIOR_START, SAMPLE_END, SAMPLE_START
from adrec.synthetic.world import USERS_PER_BLOCK, World

TRUTH_HEADER = "user,time_stamp,adgroup_id,pid,clk,click_probability"


@dataclass
class Totals:
    """What the manifest reports about the rows, summed over the blocks."""

    behavior_categories_used: np.ndarray  # bool, per category
    behavior_brands_used: np.ndarray  # bool, per brand slot
    samples: int = 0
    clicks: int = 0
    click_probability_sum: float = 0.0
    behavior_rows: int = 0


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


def write_blocks(world: World, out: Path, workers: int, report: Progress) -> Totals:
    """Write the three per-impression and per-behavior files, each appearing only complete."""
    totals = Totals(
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
            handles[key] = stack.enter_context(atomic_file(path))
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


def _blocks_in_order(world: World, workers: int) -> Iterator[_Block]:
    """Draw blocks, ``workers`` at a time, and yield them in block order."""
    if workers <= 1:
        for index in range(world.blocks):
            yield draw_block(world, index)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datagen") as pool:
        pending: deque[Future[_Block]] = deque()
        next_index = 0
        while pending or next_index < world.blocks:
            while next_index < world.blocks and len(pending) <= workers:
                pending.append(pool.submit(draw_block, world, next_index))
                next_index += 1
            yield pending.popleft().result()


def draw_block(world: World, index: int) -> _Block:
    """Block ``index``: its users' impressions with clicks, and their behavior rows."""
    truth = world.truth
    rng = random_stream(world.seed, Stream.BLOCK, index)
    first = index * USERS_PER_BLOCK
    users = np.arange(first, min(first + USERS_PER_BLOCK, world.preset.users))

    behaving = np.repeat(users, world.behaviors[users])
    behavior_categories = preferred_categories(world, behaving, world.topic_category_cdf, rng)
    viewers = np.repeat(users, world.impressions[users])
    preference_ads = ads_in_categories(world, impression_categories(world, viewers, rng), rng)

    explored = slice(*np.searchsorted(world.exploration_users, [users[0], users[-1] + 1]))
    shown_to = np.concatenate([viewers, world.exploration_users[explored]])
    shown_ads = np.concatenate([preference_ads, world.exploration_ads[explored]])
    shuffle = rng.permutation(len(shown_to))
    shown_to, shown_ads = shown_to[shuffle], shown_ads[shuffle]
    pid = draw_pid(rng, len(shown_to), truth)
    shown_at = rng.integers(SAMPLE_START, SAMPLE_END, len(shown_to))
    behavior, brand_slots = _behavior_table(world, behaving, behavior_categories, rng)
    shown_categories = world.ad_category[shown_ads]
    recent = recent_behavior_counts(
        shown_to - first,
        shown_categories,
        shown_at,
        behaving - first,
        behavior_categories,
        behavior["time_stamp"].to_numpy(),
        truth.recent_interest_seconds,
    )
    probability = sigmoid(
        world.click_intercept
        + click_logits(world, shown_to, shown_ads, pid)
        + recent_interest_logits(world, shown_to, shown_categories, recent)
    )
    clicked = (rng.random(len(probability)) < probability).astype(np.int8)

    raw_sample = pa.table(
        {
            "user": world.user_ids[shown_to],
            "time_stamp": shown_at,
            "adgroup_id": world.ad_ids[shown_ads],
            "pid": label_column(pid, PIDS),
            "nonclk": 1 - clicked,
            "clk": clicked,
        }
    )
    truth_table = pa.table(
        {
            "user": raw_sample["user"],
            "time_stamp": raw_sample["time_stamp"],
            "adgroup_id": raw_sample["adgroup_id"],
            "pid": raw_sample["pid"],
            "clk": raw_sample["clk"],
            "click_probability": fixed_decimals(probability, 6),
        }
    )
    return _Block(
        raw_sample_csv=csv_lines(raw_sample),
        truth_csv=csv_lines(truth_table),
        behavior_csv=csv_lines(behavior),
        samples=raw_sample.num_rows,
        behavior_rows=behavior.num_rows,
        clicks=int(clicked.sum()),
        click_probability_sum=float(probability.sum(dtype=np.float64)),
        behavior_categories=behavior_categories,
        behavior_brand_slots=brand_slots,
    )


def _behavior_table(
    world: World, users: np.ndarray, categories: np.ndarray, rng: np.random.Generator
) -> tuple[pa.Table, np.ndarray]:
    """Behavior rows of ``users`` (one entry per row) in the drawn categories, and their brands."""
    truth = world.truth
    rows = len(users)
    non_pv = rng.random(rows) < non_pv_probability(world, users, categories)
    btag = np.zeros(rows, dtype=np.int8)
    btag[non_pv] = 1 + rng.choice(3, int(non_pv.sum()), p=truth.non_pv_btag_mix)
    brand_slots = world.brand_start[categories] + zipf_ranks(
        rng, world.brand_count[categories], truth.behavior_brand_zipf
    )
    time_stamp = rng.integers(BEHAVIOR_START, SAMPLE_END, rows)
    # The real log has a few rows with time_stamp <= 0.
    first_row = world.behavior_offsets[users[0]] if rows else 0
    bad = slice(*np.searchsorted(world.bad_timestamp_rows, [first_row, first_row + rows]))
    bad_rows = world.bad_timestamp_rows[bad] - first_row
    time_stamp[bad_rows] = -rng.integers(0, SAMPLE_START, len(bad_rows))
    table = pa.table(
        {
            "user": world.user_ids[users],
            "time_stamp": time_stamp,
            "btag": label_column(btag, BTAGS),
            "cate": world.category_ids[categories],
            "brand": world.brand_ids[brand_slots],
        }
    )
    return table, brand_slots
