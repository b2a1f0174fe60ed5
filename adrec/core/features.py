"""The CTR feature spec and its vectorized encoder, shared by training and serving.

The batch job encodes training rows with :meth:`FeatureSpec.encode` (inside Spark,
through pandas batches) and the ranking service encodes candidates with the very
same call, so the column order of the model's weight vector cannot drift between
the two. Two feature sets exist: ``course`` (the original course's one-hot
profile fields plus price) and ``full`` (adds log-price, the user's ALS affinity
to the ad's category, and smoothed historical CTRs of ad, category and brand).

Inputs are column arrays keyed by :data:`INPUT_COLUMNS` names. Missing values are
NaN (or any value outside a field's known levels); every categorical block has a
"missing" slot, so a user without a profile encodes as all-missing levels.
Everything is deterministic: no hashing, no randomness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import numpy as np

from adrec.core import dataset
from adrec.core.dataset import PIDS, USER_PROFILE
from adrec.core.events import WINDOWS, Kind, Scope

#: Feature spec format version; bump when encoding semantics change.
SCHEMA_VERSION = 1


#: Profile fields stored per user, in storage order (see codecs.UserFeatures).
USER_PROFILE_FIELDS = dataset.USER_PROFILE_FIELDS

#: Ad-side numeric columns kept per ad in the ad feature table.
AD_NUMERIC_FIELDS = ("price", "ctr_ad", "ctr_cate", "ctr_brand")

#: What the ``behaviour`` set counts of a user's events on the candidate ad: each (kind,
#: scope) pair in every window of :data:`adrec.core.events.WINDOWS`. The batch job counts
#: them from the logs as of each training impression (``jobs.history``), the stream job
#: keeps them for serving (``adrec.core.realtime``); both by the windows' one definition.
HISTORY_COUNTS: tuple[tuple[Kind, Scope], ...] = (
    *(
        (kind, scope)
        for scope in (Scope.CATEGORY, Scope.BRAND)
        for kind in (
            Kind.PAGE_VIEW,
            Kind.CART,
            Kind.FAVOURITE,
            Kind.BUY,
        )
    ),
    (Kind.IMPRESSION, Scope.CATEGORY),
    (Kind.CLICK, Scope.CATEGORY),
)
_SCOPE_NAMES = {Scope.CATEGORY: "cate", Scope.BRAND: "brand"}


def history_column(kind: Kind, scope: Scope, window: str) -> str:
    """E.g. ``cart_cate_1d``: the user's carts in the candidate's category over a day."""
    return f"{kind.value}_{_SCOPE_NAMES[scope]}_{window}"


HISTORY_COLUMNS = tuple(
    history_column(kind, scope, window.name) for kind, scope in HISTORY_COUNTS for window in WINDOWS
)

INPUT_COLUMNS = (
    "pid",
    *USER_PROFILE_FIELDS,
    *AD_NUMERIC_FIELDS,
    "als_affinity",
    *HISTORY_COLUMNS,
)

#: Every constant a transform uses. Part of :attr:`FeatureSpec.spec_id`, so a model trained
#: under other constants is refused rather than scored with shifted inputs.
TRANSFORM_CONSTANTS: dict[str, float] = {
    # linear_capped: price / cap, clipped to [0, 1].
    "price_cap": 10_000.0,
    # log_scaled: log1p(price) / log1p(max_price), the data set's largest price.
    "max_price": 1e8,
    # logit: probabilities clipped to [eps, 1 - eps] before the log-odds.
    "ctr_eps": 1e-6,
    # logit: the probability a missing CTR stands for (log-odds 0).
    "ctr_missing": 0.5,
}


@dataclasses.dataclass(frozen=True)
class OneHot:
    """One slot per known level plus a trailing slot for missing or unknown values."""

    column: str
    levels: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        return [f"{self.column}={level}" for level in self.levels] + [f"{self.column}=missing"]

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        levels = np.asarray(self.levels, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        position = np.searchsorted(levels, values)
        clipped = np.minimum(position, len(levels) - 1)
        known = levels[clipped] == values  # NaN never equals, so missing lands in the last slot
        slot = np.where(known, clipped, len(levels))
        out[np.arange(len(out)), slot] = 1.0


@dataclasses.dataclass(frozen=True)
class PidOneHot:
    """Placement one-hot; an unknown pid is an input error, not a missing value."""

    column: str = "pid"

    @property
    def names(self) -> list[str]:
        return [f"pid={pid}" for pid in PIDS]

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        values = np.asarray(values).astype(str)
        for slot, pid in enumerate(PIDS):
            out[:, slot] = values == pid
        unknown = out.sum(axis=1) == 0
        if unknown.any():
            bad = sorted(set(values[unknown].tolist()))[:5]
            raise ValueError(f"unknown pid {bad}; known pids are {list(PIDS)}")


@dataclasses.dataclass(frozen=True)
class Numeric:
    """One numeric slot: ``transform`` maps the raw column to a well-scaled value."""

    column: str
    transform: str

    @property
    def names(self) -> list[str]:
        return [f"{self.column}:{self.transform}"]

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        out[:, 0] = _TRANSFORMS[self.transform](np.asarray(values, dtype=np.float64))


@dataclasses.dataclass(frozen=True)
class MissingIndicator:
    """1 where the column is missing (NaN): lets a 0-filled numeric stay unbiased."""

    column: str

    @property
    def names(self) -> list[str]:
        return [f"{self.column}:missing"]

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        out[:, 0] = np.isnan(np.asarray(values, dtype=np.float64))


def _price_linear(price: np.ndarray) -> np.ndarray:
    cap = TRANSFORM_CONSTANTS["price_cap"]
    scaled: np.ndarray = np.clip(np.nan_to_num(price, nan=0.0), 0.0, cap) / cap
    return scaled


def _log_price(price: np.ndarray) -> np.ndarray:
    most = TRANSFORM_CONSTANTS["max_price"]
    clipped = np.clip(np.nan_to_num(price, nan=0.0), 0.0, most)
    scaled: np.ndarray = np.log1p(clipped) / np.log1p(most)
    return scaled


def _logit(probability: np.ndarray) -> np.ndarray:
    eps = TRANSFORM_CONSTANTS["ctr_eps"]
    p = np.clip(np.nan_to_num(probability, nan=TRANSFORM_CONSTANTS["ctr_missing"]), eps, 1.0 - eps)
    log_odds: np.ndarray = np.log(p / (1.0 - p))
    return log_odds


def _log_count(counts: np.ndarray) -> np.ndarray:
    # Counts are heavy-tailed: the first few events say the most.
    scaled: np.ndarray = np.log1p(np.clip(np.nan_to_num(counts, nan=0.0), 0.0, None))
    return scaled


def _zero_if_missing(values: np.ndarray) -> np.ndarray:
    filled: np.ndarray = np.nan_to_num(values, nan=0.0)
    return filled


_TRANSFORMS = {
    "linear_capped": _price_linear,
    "log_scaled": _log_price,
    "logit": _logit,
    "zero_if_missing": _zero_if_missing,
    "log_count": _log_count,
}

Block = OneHot | PidOneHot | Numeric | MissingIndicator


def profile_levels(field: str) -> tuple[int, ...]:
    """The known levels of a profile field: its published value domain."""
    for column in USER_PROFILE.columns:
        if column.name == field and column.domain is not None:
            low, high = column.domain
            return tuple(range(low, high + 1))
    raise ValueError(f"{field!r} is not a profile field with a value domain")


_PROFILE_BLOCKS: tuple[Block, ...] = tuple(
    OneHot(field, profile_levels(field))
    for field in (
        "cms_group_id",
        "gender",
        "age_level",
        "shopping_level",
        "occupation",
        "pvalue_level",
        "new_user_class_level",
    )
)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    name: str
    blocks: tuple[Block, ...]

    @property
    def feature_names(self) -> list[str]:
        return [name for block in self.blocks for name in block.names]

    @property
    def dim(self) -> int:
        return len(self.feature_names)

    @property
    def input_columns(self) -> list[str]:
        return sorted({block.column for block in self.blocks})

    @property
    def spec_id(self) -> str:
        """Identifies the exact encoding; a model trained under another id is refused."""
        definition = json.dumps(
            {
                "schema": SCHEMA_VERSION,
                "name": self.name,
                "features": self.feature_names,
                "constants": TRANSFORM_CONSTANTS,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(definition.encode()).hexdigest()[:12]
        return f"{self.name}-v{SCHEMA_VERSION}-{digest}"

    def one_hot_index(self, column: str, level: int | str) -> int | None:
        """Position of `column`'s one-hot slot for `level` in the feature vector (and so in
        a model's weights); None when the spec has no such slot."""
        start = 0
        for block in self.blocks:
            if block.column == column and isinstance(block, OneHot | PidOneHot):
                slots: tuple[int | str, ...] = block.levels if isinstance(block, OneHot) else PIDS
                if level in slots:
                    return start + slots.index(level)
            start += len(block.names)
        return None

    def encode(self, columns: Mapping[str, np.ndarray | float | str]) -> np.ndarray:
        """Encode ``n`` rows into a float32 ``(n, dim)`` matrix.

        Each column is an array of length ``n`` or a scalar / length-1 array that is
        broadcast (serving passes one user's fields against ``n`` candidate ads).
        """
        missing = [c for c in self.input_columns if c not in columns]
        if missing:
            raise ValueError(f"feature set {self.name!r} needs input columns {missing}")
        arrays = {c: np.atleast_1d(np.asarray(columns[c])) for c in self.input_columns}
        n = max(len(a) for a in arrays.values())
        out = np.zeros((n, self.dim), dtype=np.float32)
        start = 0
        for block in self.blocks:
            width = len(block.names)
            values = arrays[block.column]
            if len(values) not in (1, n):
                raise ValueError(
                    f"column {block.column!r} has {len(values)} rows, expected 1 or {n}"
                )
            block.fill(out[:, start : start + width], np.broadcast_to(values, (n,)))
            start += width
        return out


COURSE = FeatureSpec(
    name="course",
    blocks=(PidOneHot(), *_PROFILE_BLOCKS, Numeric("price", "linear_capped")),
)

FULL = FeatureSpec(
    name="full",
    blocks=(
        *COURSE.blocks,
        Numeric("price", "log_scaled"),
        Numeric("als_affinity", "zero_if_missing"),
        MissingIndicator("als_affinity"),
        Numeric("ctr_ad", "logit"),
        Numeric("ctr_cate", "logit"),
        Numeric("ctr_brand", "logit"),
    ),
)

BEHAVIOUR = FeatureSpec(
    name="behaviour",
    blocks=(*FULL.blocks, *(Numeric(column, "log_count") for column in HISTORY_COLUMNS)),
)

FEATURE_SETS: dict[str, FeatureSpec] = {spec.name: spec for spec in (COURSE, FULL, BEHAVIOUR)}


def feature_spec(name: str) -> FeatureSpec:
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise ValueError(
            f"unknown feature set {name!r}; choose one of {sorted(FEATURE_SETS)}"
        ) from None


def als_affinity(
    user_factors: np.ndarray,
    ad_cate_ids: np.ndarray,
    cate_ids: np.ndarray,
    cate_factors: np.ndarray,
) -> np.ndarray:
    """Predicted ALS rating of a user for each ad's category; NaN where unknown.

    ``user_factors`` is ``(k,)`` for one user against many ads, or ``(n, k)`` row-aligned
    with ``ad_cate_ids``; an all-NaN user vector means the user has no ALS factors.
    ``cate_ids`` must be sorted ascending with ``cate_factors`` row-aligned to it.
    """
    ad_cate_ids = np.asarray(ad_cate_ids, dtype=np.int64)
    result = np.full(len(ad_cate_ids), np.nan, dtype=np.float64)
    if len(cate_ids) == 0:
        return result
    position = np.minimum(np.searchsorted(cate_ids, ad_cate_ids), len(cate_ids) - 1)
    known = cate_ids[position] == ad_cate_ids
    rows = cate_factors[position].astype(np.float64)
    users = np.asarray(user_factors, dtype=np.float64)
    scores = rows @ users if users.ndim == 1 else np.einsum("ij,ij->i", rows, users)
    result[known] = scores[known]
    return result


def history_inputs(
    counts: Mapping[tuple[Kind, Scope, int], tuple[int, ...]],
    cate_ids: np.ndarray,
    brand_ids: np.ndarray,
) -> dict[str, np.ndarray]:
    """The :data:`HISTORY_COLUMNS` of one user's candidates from their window counts.

    ``counts`` maps (kind, scope, member) to the count in each of ``WINDOWS``, as
    :func:`adrec.core.events.window_counts` gives them; ``cate_ids`` and ``brand_ids`` are
    the candidates' (brand 0 or less: none, so nothing is counted for it).
    """
    n = len(cate_ids)
    members = {Scope.CATEGORY: np.asarray(cate_ids), Scope.BRAND: np.asarray(brand_ids)}
    by_pair: dict[tuple[Kind, Scope], list[tuple[int, tuple[int, ...]]]] = {}
    for (kind, scope, member), values in counts.items():
        by_pair.setdefault((kind, scope), []).append((member, values))
    columns: dict[str, np.ndarray] = {}
    for kind, scope in HISTORY_COUNTS:
        found = sorted(by_pair.get((kind, scope), ()))
        per_window = np.zeros((n, len(WINDOWS)))
        if found:
            ids = np.array([member for member, _ in found], dtype=np.int64)
            table = np.array([values for _, values in found], dtype=np.float64)
            wanted = members[scope].astype(np.int64)
            position = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
            hit = (ids[position] == wanted) & (wanted > 0)
            per_window[hit] = table[position[hit]]
        for index, window in enumerate(WINDOWS):
            columns[history_column(kind, scope, window.name)] = per_window[:, index]
    return columns
