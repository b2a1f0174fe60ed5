"""Redis memory of one published version at the full data set's size, by key family.

Run: ``.venv/bin/python bench/bench_memory.py`` (its run time and the private
redis-server's size are in docs/performance.md). ``--users 100000`` gives a quick smaller
run that extrapolates to the full size.

One version is written into a private redis-server through the job's own writers
(:class:`adrec.core.catalog.Publication` and :class:`adrec.core.store.VersionWriter`, so
the keys and value codecs are exactly the published ones) with every family at the real
data's sizes: a 500-ad recall list and a 50-ad offline list per sample user, user
features (profile and ALS factors) per user, the ad table, ALS category factors, the
popular lists, the model artifact and the metadata. Ids are drawn from the real data's
ranges and the values are random: memory depends on value sizes, not on the values.

Reported: ``used_memory`` before and after (the budget is 3 GB) and the per-family
estimate the job itself reports (exact key counts, sampled ``MEMORY USAGE``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from adrec.core import features, keys
from adrec.core.catalog import Publication, family_memory, used_memory
from adrec.core.codecs import UserFeatures
from adrec.core.dataset import PIDS
from adrec.core.metadata import VersionContent
from adrec.core.model import CtrModel
from adrec.core.redis_conn import RedisSettings, connect
from adrec.core.redis_server import private_redis
from adrec.core.store import VersionWriter
from jobs.features import AD_TABLE_DTYPES

FULL_USERS = 1_141_729
FULL_ADS = 846_811
# The real adgroup_ids run 1..846,811; the generator spreads them a little further.
FULL_MAX_AD_ID = 889_152
FULL_CATEGORIES = 6_769
RECALL_LENGTH = 500
OFFLINE_LENGTH = 50
ALS_RANK = 10
BUDGET_BYTES = 3 * 10**9
CHUNK = 20_000
PER_USER_FAMILIES = ("recall", "offline", "user")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=FULL_USERS)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    scale = FULL_USERS / args.users

    with private_redis() as server:
        client = connect(RedisSettings(url=server.url))
        before = used_memory(client)
        started = time.perf_counter()
        with Publication(client, keep_versions=0) as publication:
            _write_version(publication.writer, rng, args.users)
            families = family_memory(client, publication.version)
            publication.commit(VersionContent())
        after = used_memory(client)
        seconds = time.perf_counter() - started

    per_user = sum(families.get(f, {}).get("bytes", 0) for f in PER_USER_FAMILIES)
    total = (after - before) + per_user * (scale - 1)
    print(
        f"one version, {args.users:,} users ({seconds:.0f} s to write), "
        f"Redis used_memory {before / 2**20:,.0f} -> {after / 2**20:,.0f} MiB"
    )
    if scale != 1:
        print(
            f"extrapolated to {FULL_USERS:,} users: the per-user families "
            f"({', '.join(PER_USER_FAMILIES)}) scaled by {scale:.2f}x"
        )
    print(f"  {'family':<13} {'keys':>11} {'bytes':>15} {'per key':>9}")
    for family, row in sorted(families.items(), key=lambda item: -item[1]["bytes"]):
        print(
            f"  {family:<13} {row['keys']:>11,} {row['bytes']:>15,} "
            f"{row['bytes'] / row['keys']:>9,.0f}"
        )
    verdict = "PASS" if total <= BUDGET_BYTES else "FAIL"
    print(
        f"{verdict}  used_memory for one full version: {total / 1e9:.2f} GB "
        f"(target <= {BUDGET_BYTES / 1e9:.0f} GB)"
    )
    return 0


def _write_version(writer: VersionWriter, rng: np.random.Generator, users: int) -> None:
    ad_ids = np.sort(rng.choice(np.arange(1, FULL_MAX_AD_ID + 1), FULL_ADS, replace=False))
    user_ids = np.sort(rng.choice(np.arange(1, FULL_USERS + 1), users, replace=False))
    for start in range(0, users, CHUNK):
        chunk = user_ids[start : start + CHUNK]
        # Distinct ads per list: a random window of a random permutation.
        order = rng.permutation(ad_ids)
        offsets = rng.integers(0, FULL_ADS - RECALL_LENGTH, len(chunk))
        recall = [order[o : o + RECALL_LENGTH] for o in offsets]
        writer.put_recall_lists(chunk, recall)
        writer.put_offline_lists(
            chunk,
            [
                (ids[:OFFLINE_LENGTH], np.sort(rng.uniform(0.001, 0.3, OFFLINE_LENGTH))[::-1])
                for ids in recall
            ],
        )
        writer.put_user_features(chunk, [_user(rng) for _ in chunk])
    writer.put_ad_table(_ad_table(rng, ad_ids))
    writer.put_cate_factors(
        np.arange(1, FULL_CATEGORIES + 1), rng.normal(0, 1, (FULL_CATEGORIES, ALS_RANK))
    )
    for scope in (keys.POPULAR_ALL, *PIDS):
        writer.put_popular(scope, rng.choice(ad_ids, RECALL_LENGTH, replace=False))
    spec = features.FULL
    writer.put_model(CtrModel(spec, rng.normal(0, 0.5, spec.dim), -3.0, trained_at="bench"))


def _user(rng: np.random.Generator) -> UserFeatures:
    profile = {field: float(rng.integers(0, 4)) for field in features.USER_PROFILE_FIELDS}
    return UserFeatures(profile, rng.normal(0, 1, ALS_RANK).astype(np.float32))


def _ad_table(rng: np.random.Generator, ad_ids: np.ndarray) -> dict[str, np.ndarray]:
    table = {
        column: rng.integers(1, 1_000_000, len(ad_ids)).astype(dtype)
        for column, dtype in AD_TABLE_DTYPES.items()
    }
    table["adgroup_id"] = ad_ids.astype(AD_TABLE_DTYPES["adgroup_id"])
    return table


if __name__ == "__main__":
    raise SystemExit(main())
