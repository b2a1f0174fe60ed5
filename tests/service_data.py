"""A small but realistic published version for the service tests, and the services over it.

The version goes through the real writer (`Publication`, `VersionWriter`) with a real
`CtrModel` over the full feature set; its offline lists are scored by the batch job's own
`rank_users`. Users come in every shape the services must handle: with a profile and ALS
factors, without factors, without a profile record, and without a recall list; recall
lists hold a few ads the ad table lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis

from adrec.api.gateway.v1 import gateway_service_pb2 as gateway_pb2
from adrec.api.gateway.v1 import gateway_service_pb2_grpc
from adrec.api.ranking.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from adrec.core import features, keys
from adrec.core.catalog import Publication
from adrec.core.codecs import UserFeatures
from adrec.core.dataset import PIDS
from adrec.core.metadata import VersionContent, VersionCounts
from adrec.core.model import CtrModel
from adrec.core.redis_conn import RedisSettings
from adrec.core.settings import load
from jobs.offline import OFFLINE_PID, RankingData, rank_users
from services.process import Stack, serving
from services.runtime.settings import SETTINGS

ALS_RANK = 6
RECALL_SIZE = 500
OFFLINE_TOP_N = 50
#: Poll interval of the services under test: reloads and health changes show within it.
TEST_RELOAD_SECONDS = 0.1
#: Services on free loopback ports, quick to notice changes, with downstream budgets that a
#: busy test machine cannot exceed by accident (the deadline tests set their own).
TEST_ENV = {
    "ADREC_HOST": "127.0.0.1",
    "ADREC_METRICS_PORT": "0",
    "ADREC_RECALL_PORT": "0",
    "ADREC_RANKING_PORT": "0",
    "ADREC_GATEWAY_PORT": "0",
    "ADREC_EVENTS_PORT": "0",
    "ADREC_ADMIN_PORT": "0",
    "ADREC_RELOAD_INTERVAL_SECONDS": str(TEST_RELOAD_SECONDS),
    "ADREC_DRAIN_SECONDS": "2",
    "ADREC_REQUEST_TIMEOUT_MS": "5000",
    "ADREC_RECALL_TIMEOUT_MS": "2000",
    "ADREC_RANKING_TIMEOUT_MS": "2000",
}

_PROFILE_LEVELS = {
    "cms_segid": range(0, 97),
    "cms_group_id": range(0, 13),
    "gender": (1, 2),
    "age_level": range(0, 7),
    "pvalue_level": (1, 2, 3),
    "shopping_level": (1, 2, 3),
    "occupation": (0, 1),
    "new_user_class_level": (1, 2, 3, 4),
}
_OFTEN_MISSING = {"pvalue_level": 0.5, "new_user_class_level": 0.3}


@dataclasses.dataclass
class PublishedData:
    version: str
    model: CtrModel
    ads: dict[str, np.ndarray]
    cate_ids: np.ndarray
    cate_factors: np.ndarray
    #: user -> features, for users with a profile record (users without one are absent).
    user_features: dict[int, UserFeatures]
    recall_lists: dict[int, np.ndarray]
    offline_lists: dict[int, tuple[np.ndarray, np.ndarray]]
    popular: dict[str, np.ndarray]
    unknown_ad_ids: np.ndarray
    users_with_factors: list[int]
    users_without_factors: list[int]
    users_without_profile: list[int]
    users_without_recall: list[int]
    #: The version's leading ads per category (real-time interest), as the job writes them.
    category_ads: dict[str, np.ndarray]
    #: Ad ids with a bid, ascending, and their bids; None when published without.
    bids: tuple[np.ndarray, np.ndarray] | None = None

    def bid_of(self, ad_id: int) -> float | None:
        if self.bids is None:
            return None
        ids, values = self.bids
        found = np.flatnonzero(ids == ad_id)
        return float(np.float32(values[found[0]])) if len(found) else None


def random_model(rng: np.random.Generator, spec: features.FeatureSpec = features.FULL) -> CtrModel:
    weights = rng.normal(0.0, 0.6, spec.dim)
    # Distinct placement weights, so the placement visibly changes every CTR.
    weights[spec.feature_names.index(f"pid={PIDS[0]}")] = 0.3
    weights[spec.feature_names.index(f"pid={PIDS[1]}")] = -0.4
    return CtrModel(spec=spec, weights=weights, intercept=-2.5, trained_at="test")


def publish_version(
    client: redis.Redis,
    *,
    seed: int = 7,
    users: int = 120,
    ads: int = 3000,
    categories: int = 80,
    model: CtrModel | None = None,
    model_json: bytes | None = None,
    with_bids: bool = False,
) -> PublishedData:
    """Publish one complete version and make it active; `model_json` replaces the artifact;
    `with_bids`: a bid for four ads in five."""
    rng = np.random.default_rng(seed)
    model = model or random_model(rng)

    ad_ids = np.sort(rng.choice(np.arange(1, 2_000_000), size=ads, replace=False)).astype(np.int32)
    cate_ids = np.sort(rng.choice(np.arange(1, 20_000), size=categories, replace=False))
    ad_table = {
        "adgroup_id": ad_ids,
        "cate_id": rng.choice(cate_ids, size=ads).astype(np.int32),
        "campaign_id": rng.integers(1, 50_000, ads).astype(np.int32),
        "customer_id": rng.integers(1, 20_000, ads).astype(np.int32),
        "brand_id": np.where(rng.random(ads) < 0.1, -1, rng.integers(1, 9_000, ads)).astype(
            np.int32
        ),
        "price": np.round(np.exp(rng.normal(4.5, 1.5, ads)), 2).astype(np.float32),
        "ctr_ad": rng.beta(2, 38, ads).astype(np.float32),
        "ctr_cate": rng.beta(5, 95, ads).astype(np.float32),
        "ctr_brand": rng.beta(5, 95, ads).astype(np.float32),
    }
    cate_factors = rng.normal(0.0, 0.5, (categories, ALS_RANK)).astype(np.float32)

    user_ids = np.arange(1001, 1001 + users)
    shape = np.arange(users) % 6
    with_factors = user_ids[shape <= 2].tolist()
    without_factors = user_ids[shape == 3].tolist()
    without_profile = user_ids[shape == 4].tolist()
    without_recall = user_ids[shape == 5].tolist()

    user_features: dict[int, UserFeatures] = {}
    for user in with_factors + without_factors + without_recall:
        factors = rng.normal(0.0, 0.5, ALS_RANK) if user in with_factors else None
        user_features[user] = UserFeatures(_random_profile(rng), factors)

    unknown = np.setdiff1d(rng.integers(2_000_000, 2_100_000, 40), ad_ids)
    recall_lists = {}
    for user in with_factors + without_factors + without_profile:
        known = rng.choice(ad_ids, size=RECALL_SIZE - 8, replace=False)
        recall = np.concatenate([known, rng.choice(unknown, size=8, replace=False)])
        recall_lists[user] = rng.permutation(recall).astype(np.int32)

    offline_lists = _offline_lists(
        recall_lists,
        user_features,
        RankingData.as_served(ad_table, (cate_ids.astype(np.int32), cate_factors), model),
    )
    by_quality = ad_ids[np.argsort(-ad_table["ctr_ad"], kind="stable")]
    popular = {
        keys.POPULAR_ALL: by_quality[:200],
        PIDS[0]: by_quality[5:205],
        PIDS[1]: by_quality[10:210],
    }

    leading = np.lexsort((-ad_table["ctr_ad"], ad_table["cate_id"]))
    cates_in_order = ad_table["cate_id"][leading]
    rank = np.arange(len(leading)) - np.searchsorted(cates_in_order, cates_in_order)
    kept = leading[rank < 50]
    category_ads = {"cate_id": ad_table["cate_id"][kept], "ad_id": ad_table["adgroup_id"][kept]}

    bids = None
    if with_bids:
        # A generator of its own, so the rest of the version is the same with or without.
        bid_rng = np.random.default_rng(seed + 1)
        chosen = np.sort(bid_rng.choice(ad_ids, size=ads * 4 // 5, replace=False))
        bids = (chosen, np.round(np.exp(bid_rng.normal(-0.7, 0.6, len(chosen))), 2))

    with Publication(client, keep_versions=5) as publication:
        writer = publication.writer
        writer.put_ad_table(ad_table)
        if bids is not None:
            writer.put_bids(*bids)
        writer.put_category_ads(category_ads)
        writer.put_cate_factors(cate_ids.astype(np.int32), cate_factors)
        if model_json is None:
            writer.put_model(model)
        else:
            client.set(keys.MODEL.key(publication.version), model_json)
        writer.put_user_features(list(user_features), list(user_features.values()))
        writer.put_recall_lists(list(recall_lists), list(recall_lists.values()))
        writer.put_offline_lists(list(offline_lists), list(offline_lists.values()))
        for scope, ids in popular.items():
            writer.put_popular(scope, ids)
        publication.commit(
            VersionContent(
                counts=VersionCounts(users=len(user_ids), ads=ads),
                feature_spec_id=model.spec.spec_id,
                offline_pid=OFFLINE_PID,
                report={"offline": {"pid": OFFLINE_PID, "top_n": OFFLINE_TOP_N}},
            )
        )
        version = publication.version

    return PublishedData(
        version=version,
        model=model,
        ads=ad_table,
        cate_ids=cate_ids.astype(np.int32),
        cate_factors=cate_factors,
        user_features=user_features,
        recall_lists=recall_lists,
        offline_lists=offline_lists,
        popular=popular,
        unknown_ad_ids=unknown,
        users_with_factors=with_factors,
        users_without_factors=without_factors,
        users_without_profile=without_profile,
        users_without_recall=without_recall,
        category_ads=category_ads,
        bids=bids,
    )


def mismatched_model_json(model: CtrModel) -> bytes:
    """The artifact as a job built from other feature-spec code would have written it."""
    document = json.loads(model.to_json())
    document["feature_spec_id"] = f"{model.spec.name}-v0-000000000000"
    return json.dumps(document).encode()


def _random_profile(rng: np.random.Generator) -> dict[str, float]:
    profile = {}
    for field, levels in _PROFILE_LEVELS.items():
        missing = rng.random() < _OFTEN_MISSING.get(field, 0.02)
        profile[field] = math.nan if missing else float(rng.choice(list(levels)))
    return profile


def _offline_lists(
    recall_lists: dict[int, np.ndarray],
    user_features: dict[int, UserFeatures],
    served: RankingData,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every user's offline top-N, scored by the batch job's own numpy core."""
    users = list(recall_lists)
    missing = UserFeatures.missing()
    stored = [user_features.get(user, missing) for user in users]
    profiles = {
        field: np.array([f.profile[field] for f in stored])
        for field in features.USER_PROFILE_FIELDS
    }
    factors = np.array(
        [f.als_factors if f.als_factors is not None else np.full(ALS_RANK, np.nan) for f in stored],
        dtype=np.float32,
    )
    lengths = [len(recall_lists[user]) for user in users]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    candidates = np.concatenate([recall_lists[user] for user in users])
    ids, ctrs, top_offsets = rank_users(
        profiles, factors, candidates, offsets, served, pid=OFFLINE_PID, top_n=OFFLINE_TOP_N
    )
    return {
        user: (ids[top_offsets[i] : top_offsets[i + 1]], ctrs[top_offsets[i] : top_offsets[i + 1]])
        for i, user in enumerate(users)
    }


def service_settings(target: str = "all", **env: Any) -> Any:
    """Settings for services on free loopback ports that notice changes within 0.1 s."""
    return load(SETTINGS[target], env={**TEST_ENV, **{k: str(v) for k, v in env.items()}})


@contextlib.asynccontextmanager
async def running_stack(
    redis: str | RedisSettings, target: str = "all", **env: Any
) -> AsyncIterator[Stack]:
    """The real services of `adrec serve <target>`, in this process and event loop, on the
    Redis at a URL or of whole settings (cluster, TLS, password)."""
    settings = redis if isinstance(redis, RedisSettings) else RedisSettings(url=redis)
    async with serving(target, service_settings(target, **env), settings) as stack:
        yield stack


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=timeout))


async def wait_until(condition: Callable[[], Any], timeout: float = 20) -> None:
    """Poll `condition` (a function or a coroutine function) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def metric(stack: Stack, name: str, **labels: str) -> float:
    """Current value of one sample of the stack's metrics (0 when never recorded)."""
    return stack.metrics.registry.get_sample_value(name, labels) or 0.0


def expected_ranking(
    data: PublishedData, user_id: int, pid: str, candidates: Sequence[int]
) -> tuple[list[int], list[float], int]:
    """(ad ids, CTRs, unknown count) by the shared encoder and CtrModel.predict, best first."""
    ids = list(dict.fromkeys(candidates))
    table = data.ads["adgroup_id"]
    position = np.searchsorted(table, ids).clip(0, len(table) - 1)
    known = table[position] == np.array(ids)
    position = position[known]
    user = data.user_features.get(user_id, UserFeatures.missing())
    columns: dict[str, Any] = {"pid": pid, **user.columns()}
    for name in features.AD_NUMERIC_FIELDS:
        columns[name] = data.ads[name][position]
    cate_ids = data.ads["cate_id"][position]
    columns["als_affinity"] = (
        features.als_affinity(user.als_factors, cate_ids, data.cate_ids, data.cate_factors)
        if user.als_factors is not None
        else np.full(len(position), np.nan)
    )
    ctrs = data.model.predict(data.model.spec.encode(columns))
    order = np.argsort(-ctrs, kind="stable")
    known_ids = np.array(ids)[known]
    return known_ids[order].tolist(), ctrs[order].tolist(), int((~known).sum())


#: `adrec` as a command, from the interpreter running the tests.
ADREC = (sys.executable, "-c", "import sys; from adrec.cli import main; sys.exit(main())")


@dataclasses.dataclass
class ServiceProcess:
    process: asyncio.subprocess.Process
    #: Service name ("recall", ..., "metrics") -> bound port, as printed by `adrec serve`.
    ports: dict[str, int]


@contextlib.asynccontextmanager
async def service_process(
    redis_url: str, target: str, log_path: Path | None = None, **env: Any
) -> AsyncIterator[ServiceProcess]:
    """`adrec serve <target>` as a child process on free loopback ports; killed on exit.

    Its JSON logs go to `log_path` when given.
    """
    settings_env = {
        **TEST_ENV,
        "REDIS_URL": redis_url,
        **{name: str(value) for name, value in env.items()},
    }
    with contextlib.ExitStack() as files:
        stderr = (
            files.enter_context(log_path.open("wb"))
            if log_path is not None
            else asyncio.subprocess.DEVNULL
        )
        process = await asyncio.create_subprocess_exec(
            *ADREC,
            "serve",
            target,
            env={**os.environ, **settings_env},
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    expected = {
        "metrics",
        *(("recall", "ranking", "gateway", "events", "admin") if target == "all" else (target,)),
    }
    ports: dict[str, int] = {}
    try:
        while set(ports) != expected:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
            assert line, f"adrec serve {target} exited with {await process.wait()}"
            name, _, address = line.decode().strip().partition(" listening on ")
            ports[name] = int(address.rsplit(":", 1)[1])
        yield ServiceProcess(process, ports)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            await process.wait()


async def recommend(channel: grpc.aio.Channel, timeout: float = 5, **request: Any):
    stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
    return await stub.Recommend(gateway_pb2.RecommendRequest(**request), timeout=timeout)


async def rank(channel: grpc.aio.Channel, **request: Any):
    stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
    return await stub.RankCandidates(
        ranking_service_pb2.RankCandidatesRequest(**request), timeout=5
    )


def path(response: Any) -> str:
    """A Recommend answer's serving path, e.g. "REALTIME_RANKED"."""
    return gateway_pb2.ServingPath.Name(response.serving_path).removeprefix("SERVING_PATH_")


def reasons(response: Any) -> list[str]:
    """A Recommend answer's degradation reasons, e.g. ["RANKING_UNAVAILABLE"]."""
    return [
        gateway_pb2.DegradationReason.Name(reason).removeprefix("DEGRADATION_REASON_")
        for reason in response.degradation_reasons
    ]
