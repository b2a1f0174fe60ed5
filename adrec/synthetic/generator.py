"""``generate``: the entity tables, then the per-block files, then the manifest, timed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adrec.core.dataset import MANIFEST_FILE
from adrec.synthetic.blocks import write_blocks
from adrec.synthetic.files import atomic_file
from adrec.synthetic.manifest import build_manifest
from adrec.synthetic.model import calibrate
from adrec.synthetic.presets import PRESETS, Preset
from adrec.synthetic.progress import Progress
from adrec.synthetic.tables import write_ad_feature, write_bids, write_user_profile
from adrec.synthetic.truth import TRUTH
from adrec.synthetic.world import build_world


@dataclass
class GenerationResult:
    out_dir: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def generate(
    preset: str | Preset,
    seed: int,
    out_dir: str | Path,
    *,
    workers: int = 2,
    progress: bool = True,
) -> GenerationResult:
    """Write the four files, the bids, the truth side file and the manifest into ``out_dir``.

    Each file appears under its final name only when complete, and the manifest last, so an
    interrupted run never leaves a directory that looks complete.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    preset.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    report = Progress(enabled=progress)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    world = build_world(preset, seed, TRUTH)
    calibrate(world)
    seconds["entities and calibration"] = time.perf_counter() - started
    report.line(f"entities ready: {preset.users:,} users, {preset.ads:,} ads")

    for name, writer in (
        ("ad_feature.csv", write_ad_feature),
        ("user_profile.csv", write_user_profile),
    ):
        started = time.perf_counter()
        writer(world, out)
        seconds[name] = time.perf_counter() - started
        report.line(f"{name} written")

    started = time.perf_counter()
    bid_rows = write_bids(world, out)
    seconds["bids.csv"] = time.perf_counter() - started
    report.line(f"bids.csv written: {bid_rows:,} ads with a bid")

    started = time.perf_counter()
    totals = write_blocks(world, out, workers, report)
    seconds["raw_sample.csv, behavior_log.csv and truth (draws and writes)"] = (
        time.perf_counter() - started
    )

    manifest = build_manifest(world, totals)
    with atomic_file(out / MANIFEST_FILE) as handle:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode())
    report.line(f"done: mean click probability {manifest['clicks']['mean_click_probability']:.4f}")
    return GenerationResult(out, manifest, seconds)
