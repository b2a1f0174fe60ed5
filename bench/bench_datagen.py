"""Benchmark the synthetic data generator: wall time per stage, peak memory, file sizes.

    python bench/bench_datagen.py [PRESET] [--seed N] [--workers N] [--out DIR]

The generator runs in a child process so its peak resident memory can be read from the
kernel's accounting; PASS/FAIL lines compare against the targets for the ``full`` preset
(at most 15 minutes and 8 GB on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 15 * 60
TARGET_PEAK_BYTES = 8 * 1024**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "preset", nargs="?", default="full", choices=("tiny", "small", "medium", "full")
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--out", type=Path, help="keep the files here (default: a temporary directory, removed)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _run_generator(args)

    out = args.out or Path(tempfile.mkdtemp(prefix=f"adrec-datagen-{args.preset}-"))
    command = [
        sys.executable,
        __file__,
        args.preset,
        "--seed",
        str(args.seed),
        "--workers",
        str(args.workers),
        "--out",
        str(out),
        "--child",
    ]
    print(
        f"generating preset {args.preset} (seed {args.seed}, {args.workers} workers) into {out}",
        flush=True,
    )
    started = time.perf_counter()
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - started
    peak_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    stages = json.loads(child.stdout)
    manifest = json.loads((out / "manifest.json").read_text())

    print(f"\npreset {args.preset}: wall {wall:.1f} s, peak RSS {peak_bytes / 1024**3:.2f} GiB")
    for stage, seconds in stages.items():
        print(f"  {stage}: {seconds:.1f} s")
    print("files:")
    for name, info in manifest["files"].items():
        size = (out / name).stat().st_size
        print(f"  {name}: {info['rows']:,} rows, {size / 1024**2:,.1f} MiB")
    clicks = manifest["clicks"]
    print(
        f"mean click probability {clicks['mean_click_probability']:.4f}, "
        f"observed CTR {clicks['observed_ctr']:.4f}"
    )
    print(manifest["behavior_log_scale"]["note"])

    time_ok = wall <= TARGET_SECONDS
    memory_ok = peak_bytes <= TARGET_PEAK_BYTES
    print(
        f"{'PASS' if time_ok else 'FAIL'} wall time {wall / 60:.1f} min "
        f"(target <= {TARGET_SECONDS / 60:.0f} min)"
    )
    print(
        f"{'PASS' if memory_ok else 'FAIL'} peak RSS {peak_bytes / 1024**3:.2f} GiB "
        f"(target <= {TARGET_PEAK_BYTES / 1024**3:.0f} GiB)"
    )
    if args.out is None:
        shutil.rmtree(out)
    return 0 if time_ok and memory_ok else 1


def _run_generator(args: argparse.Namespace) -> int:
    from adrec.synthetic import generate

    result = generate(args.preset, args.seed, args.out, workers=args.workers)
    print(json.dumps(result.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
