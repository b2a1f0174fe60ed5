"""Configuration of one batch job run, from env (the CronJob) and flags (a laptop).

The config digest (stored in each version's metadata) covers everything that shapes
the published data, so two versions with the same digest and inputs are equivalent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Literal

from adrec.core.catalog import DEFAULT_PRUNE_GRACE_SECONDS
from adrec.core.features import FEATURE_SETS
from adrec.core.settings import in_range, one_of, parse_float, parse_int, setting

STAGES = (
    "ingest",
    "ratings",
    "als",
    "popular",
    "recall",
    "features",
    "ctr",
    "offline",
    "publish",
)

RECALL_STRATEGIES = ("uniform", "popular")


def _stage_list(raw: str) -> tuple[str, ...]:
    if raw.strip() in ("", "all"):
        return STAGES
    chosen = tuple(part.strip() for part in raw.split(",") if part.strip())
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages are {', '.join(STAGES)}")
    return chosen


def _check_stages(stages: tuple[str, ...]) -> str | None:
    if stages != STAGES[: len(stages)]:
        return (
            "must be the stages in order from the first, e.g. ingest,ratings,als "
            f"(order: {', '.join(STAGES)})"
        )
    return None


#: Below this heap Spark refuses to start (it reserves 300 MB and wants 1.5x that).
MIN_LOCAL_MEMORY_MB = 512


def _memory_size(value: str) -> str | None:
    if value == "auto":
        return None
    match = re.fullmatch(r"([1-9][0-9]*)([mg])", value)
    if match is None:
        return "must be auto or a JVM memory size such as 8g or 2048m"
    megabytes = int(match[1]) * (1024 if match[2] == "g" else 1)
    if megabytes < MIN_LOCAL_MEMORY_MB:
        return f"must be at least {MIN_LOCAL_MEMORY_MB}m: Spark does not start with less"
    return None


@dataclasses.dataclass(frozen=True)
class JobConfig:
    data: str = setting(
        "ADREC_JOB_DATA",
        "",
        "Folder or URI (s3a://, hdfs://) holding the four data files",
        aliases=("--data",),
    )
    input_format: Literal["csv", "parquet"] = setting(
        "ADREC_JOB_INPUT_FORMAT", "csv", "csv or parquet", check=one_of("csv", "parquet")
    )
    master: str = setting(
        "ADREC_JOB_MASTER",
        "",
        "Spark master; empty: local[*], or the spark-submit master",
        aliases=("--master",),
    )
    stages: tuple[str, ...] = setting(
        "ADREC_JOB_STAGES",
        STAGES,
        "Comma-separated stages to run, from the first; without 'publish' nothing is written",
        parse=_stage_list,
        check=_check_stages,
        aliases=("--stages",),
    )
    local_memory: str = setting(
        "ADREC_JOB_LOCAL_MEMORY",
        "auto",
        "JVM heap of a local run; auto: 40% of the machine's (or container's) memory. "
        "Under spark-submit its --driver-memory and --executor-memory apply",
        check=_memory_size,
    )
    max_rejected_share: float = setting(
        "ADREC_JOB_MAX_REJECTED_SHARE",
        0.01,
        "Stop before publishing when more than this share of a file's rows is rejected",
        parse=parse_float,
        check=in_range(0.0, 1.0),
    )
    max_row_drop: float = setting(
        "ADREC_JOB_MAX_ROW_DROP",
        0.2,
        "Stop before publishing when a table has this share fewer clean rows than the "
        "active version's input had (1: never)",
        parse=parse_float,
        check=in_range(0.0, 1.0),
    )
    seed: int = setting("ADREC_JOB_SEED", 42, "Seed for ALS and recall sampling", parse=parse_int)
    als_rank: int = setting(
        "ADREC_JOB_ALS_RANK", 10, "ALS rank", parse=parse_int, check=in_range(1, 500)
    )
    als_max_iter: int = setting(
        "ADREC_JOB_ALS_MAX_ITER", 10, "ALS iterations", parse=parse_int, check=in_range(1, 100)
    )
    als_reg_param: float = setting(
        "ADREC_JOB_ALS_REG_PARAM",
        0.1,
        "ALS regularisation",
        parse=parse_float,
        check=in_range(0.0, 100.0),
    )
    recall_size: int = setting(
        "ADREC_JOB_RECALL_SIZE",
        500,
        "Ads per recall list",
        parse=parse_int,
        check=in_range(1, 1000),
    )
    interest_ads_per_category: int = setting(
        "ADREC_JOB_INTEREST_ADS_PER_CATEGORY",
        50,
        "Leading ads kept per category for real-time interest (the most clicked first)",
        parse=parse_int,
        check=in_range(1, 1000),
    )
    recall_top_categories: int = setting(
        "ADREC_JOB_RECALL_TOP_CATEGORIES",
        20,
        "ALS categories walked per user",
        parse=parse_int,
        check=in_range(1, 1000),
    )
    recall_strategy: str = setting(
        "ADREC_JOB_RECALL_STRATEGY",
        "popular",
        "How ads are picked within a category: uniform (the course) or popular",
        check=one_of(*RECALL_STRATEGIES),
    )
    feature_set: str = setting(
        "ADREC_JOB_FEATURE_SET",
        "full",
        "Feature set of the served CTR model",
        check=one_of(*FEATURE_SETS),
    )
    ctr_train_rows: int = setting(
        "ADREC_JOB_CTR_TRAIN_ROWS",
        5_000_000,
        "At most this many training impressions per CTR model, a seeded sample; 0: all",
        parse=parse_int,
        check=in_range(0, 10**12),
    )
    ctr_fm_train_rows: int = setting(
        "ADREC_JOB_CTR_FM_TRAIN_ROWS",
        250_000,
        "At most this many training impressions for the factorization machine the report "
        "compares on the behaviour set (a seeded sample of the models' own); 0: no FM",
        parse=parse_int,
        check=in_range(0, 10**12),
    )
    ctr_reg_param: float = setting(
        "ADREC_JOB_CTR_REG_PARAM",
        0.0,
        "LR regularisation",
        parse=parse_float,
        check=in_range(0.0, 100.0),
    )
    offline_top_n: int = setting(
        "ADREC_JOB_OFFLINE_TOP_N",
        50,
        "Offline list length",
        parse=parse_int,
        check=in_range(1, 500),
    )
    work_dir: str = setting(
        "ADREC_JOB_WORK_DIR",
        "",
        "Scratch folder or URI for intermediate data; required on a cluster (shared storage)",
    )
    keep_versions: int = setting(
        "ADREC_JOB_KEEP_VERSIONS",
        2,
        "Previous versions kept for rollback",
        parse=parse_int,
        check=in_range(0, 100),
    )
    prune_grace_seconds: float = setting(
        "ADREC_JOB_PRUNE_GRACE_SECONDS",
        DEFAULT_PRUNE_GRACE_SECONDS,
        "Seconds a replaced version is kept whatever ADREC_JOB_KEEP_VERSIONS says, so "
        "services still following it switch first",
        parse=parse_float,
        check=in_range(0, 86_400),
    )

    def validate(self) -> list[str]:
        problems = []
        if not self.data:
            problems.append("ADREC_JOB_DATA (--data) is required: the input folder or URI")
        if self.offline_top_n > self.recall_size:
            problems.append("ADREC_JOB_OFFLINE_TOP_N cannot exceed ADREC_JOB_RECALL_SIZE")
        return problems

    def digest(self) -> str:
        """Hash of every setting that shapes the published data (not where it comes from)."""
        shaping = dataclasses.asdict(self)
        for operational in (
            "data",
            "master",
            "stages",
            "work_dir",
            "keep_versions",
            "prune_grace_seconds",
            "local_memory",
            "max_rejected_share",
            "max_row_drop",
        ):
            shaping.pop(operational)
        canonical = json.dumps(shaping, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
