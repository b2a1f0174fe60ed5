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
The ``behaviour`` set adds the user's history counts on the candidate's category and
brand, and crosses: profile levels x the ad's price level, and profile levels x its
category hashed into a fixed number of slots. Everything is deterministic: the crosses'
hash is a fixed integer mix, never Python's ``hash()``, and no randomness.
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

#: The candidate ad's category, read only by the profile x category crosses.
CATEGORY_COLUMN = "cate_id"

INPUT_COLUMNS = (
    "pid",
    *USER_PROFILE_FIELDS,
    *AD_NUMERIC_FIELDS,
    CATEGORY_COLUMN,
    "als_affinity",
    *HISTORY_COLUMNS,
)

#: Upper price bounds of the price levels a profile field is crossed with (log-spaced over
#: the data set's prices); a price above the last is the top level, a missing one its own.
PRICE_LEVEL_EDGES: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 2000.0)
#: Slots of the hashed profile x category cross: every profile field's (level, category)
#: pair lands in one of them, so the width stays fixed whatever the number of categories.
CATEGORY_CROSS_BUCKETS = 256

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
    def inputs(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def names(self) -> list[str]:
        return [f"{self.column}={level}" for level in self.levels] + [f"{self.column}=missing"]

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        out[np.arange(len(out)), level_slots(self.levels, values)] = 1.0


def level_slots(levels: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    """Each value's position among ``levels``; ``len(levels)`` for missing or unknown."""
    known_levels = np.asarray(levels, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    position = np.searchsorted(known_levels, values)
    clipped = np.minimum(position, len(known_levels) - 1)
    known = known_levels[clipped] == values  # NaN never equals, so missing lands last
    slots: np.ndarray = np.where(known, clipped, len(known_levels))
    return slots


def level_of(levels: tuple[int, ...], value: float) -> int:
    """:func:`level_slots` of one value, without numpy's per-call cost (a request's user)."""
    return levels.index(int(value)) if value in levels else len(levels)


def price_levels(prices: np.ndarray) -> np.ndarray:
    """Level of each price by :data:`PRICE_LEVEL_EDGES`: 0 up to the first edge, ...,
    ``len(edges)`` above the last, ``len(edges) + 1`` for a missing price."""
    prices = np.asarray(prices, dtype=np.float64)
    levels: np.ndarray = np.where(
        np.isnan(prices),
        len(PRICE_LEVEL_EDGES) + 1,
        np.searchsorted(np.asarray(PRICE_LEVEL_EDGES), prices, side="left"),
    )
    return levels


#: Price levels a cross distinguishes: the edges' intervals, above the last, missing.
PRICE_LEVELS = len(PRICE_LEVEL_EDGES) + 2


@dataclasses.dataclass(frozen=True)
class PriceLevelCross:
    """A profile field's level x the ad's price level, one-hot: how price-sensitive a kind
    of user is, which neither field says alone."""

    field: str
    levels: tuple[int, ...]

    @property
    def column(self) -> str:
        return f"{self.field}*price_level"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.field, "price")

    @property
    def names(self) -> list[str]:
        return [
            f"{self.field}={level}*price_level={price}"
            for level in (*self.levels, "missing")
            for price in range(PRICE_LEVELS)
        ]

    def slots(self, values: np.ndarray, prices: np.ndarray) -> np.ndarray:
        return self.slots_at(values, price_levels(prices))

    def slots_at(self, values: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Slots of the field's values against price levels already looked up."""
        slots: np.ndarray = level_slots(self.levels, values) * PRICE_LEVELS + levels
        return slots

    def fill(self, out: np.ndarray, values: np.ndarray, prices: np.ndarray) -> None:
        out[np.arange(len(out)), self.slots(values, prices)] = 1.0


def category_bits(categories: np.ndarray) -> np.ndarray:
    """A category as the low 32 bits of a cross's hash key; a missing one as category 0."""
    category = np.nan_to_num(np.asarray(categories, dtype=np.float64), nan=0.0)
    bits: np.ndarray = category.astype(np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    return bits


def _mixed(keys: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a fixed, well-spread hash of 64-bit keys (no Python hash()).
    The multiplications wrap modulo 2^64 as the algorithm intends."""
    z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed: np.ndarray = z ^ (z >> np.uint64(31))
    return mixed


@dataclasses.dataclass(frozen=True)
class CategoryCross:
    """Every profile field's level x the ad's category, hashed into ``buckets`` slots: one
    slot per field is 1 (two fields landing on one slot make it 2), so a kind of user's
    taste for a category is learnt without a slot per (level, category) pair."""

    fields: tuple[str, ...]
    levels: tuple[tuple[int, ...], ...]
    buckets: int

    @property
    def column(self) -> str:
        return f"profile*{CATEGORY_COLUMN}"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (*self.fields, CATEGORY_COLUMN)

    @property
    def names(self) -> list[str]:
        return [f"profile*{CATEGORY_COLUMN}#{slot}" for slot in range(self.buckets)]

    def slots(self, *columns: np.ndarray) -> np.ndarray:
        """(rows, fields) slots. A field given as one value (a request's user) is broadcast
        against the categories."""
        *fields, categories = columns
        codes = np.stack(np.broadcast_arrays(*self.level_codes(*fields)), axis=1)
        return self.slots_at(codes, category_bits(categories))

    def level_codes(self, *fields: np.ndarray) -> list[np.ndarray]:
        """Per field, its index and each value's level, packed above the category's bits."""
        return [
            (np.uint64(index) << np.uint64(40))
            | (level_slots(levels, values).astype(np.uint64) << np.uint64(32))
            for index, (values, levels) in enumerate(zip(fields, self.levels, strict=True))
        ]

    def slots_at(self, codes: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """Slots of (rows or 1, fields) level codes with the rows' :func:`category_bits`."""
        keys = codes | categories[:, None]
        slots: np.ndarray = (_mixed(keys) % np.uint64(self.buckets)).astype(np.int64)
        return slots

    def fill(self, out: np.ndarray, *columns: np.ndarray) -> None:
        slots = self.slots(*columns)
        rows = np.repeat(np.arange(len(out)), slots.shape[1])
        np.add.at(out, (rows, slots.ravel()), 1.0)


@dataclasses.dataclass(frozen=True)
class PidOneHot:
    """Placement one-hot; an unknown pid is an input error, not a missing value."""

    column: str = "pid"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.column,)

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
    def inputs(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def names(self) -> list[str]:
        return [f"{self.column}:{self.transform}"]

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        out[:, 0] = transformed(self.transform, values)


@dataclasses.dataclass(frozen=True)
class MissingIndicator:
    """1 where the column is missing (NaN): lets a 0-filled numeric stay unbiased."""

    column: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.column,)

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


def transformed(transform: str, values: np.ndarray) -> np.ndarray:
    """``values`` (any shape) through a :class:`Numeric` block's transform."""
    result: np.ndarray = _TRANSFORMS[transform](np.asarray(values, dtype=np.float64))
    return result


Block = OneHot | PidOneHot | Numeric | MissingIndicator | PriceLevelCross | CategoryCross
#: Blocks reading a user's and an ad's columns together.
Cross = PriceLevelCross | CategoryCross


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
        return sorted({column for block in self.blocks for column in block.inputs})

    @property
    def spec_id(self) -> str:
        """Identifies the exact encoding; a model trained under another id is refused."""
        definition: dict[str, object] = {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "features": self.feature_names,
            "constants": TRANSFORM_CONSTANTS,
        }
        if any(isinstance(block, PriceLevelCross | CategoryCross) for block in self.blocks):
            # Only where crosses read them: the other sets keep the ids their models carry.
            definition["price_level_edges"] = PRICE_LEVEL_EDGES
            definition["cross_hash"] = "splitmix64"
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:12]
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
            inputs = []
            for column in block.inputs:
                values = arrays[column]
                if len(values) not in (1, n):
                    raise ValueError(f"column {column!r} has {len(values)} rows, expected 1 or {n}")
                inputs.append(np.broadcast_to(values, (n,)))
            block.fill(out[:, start : start + width], *inputs)
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

#: Profile fields crossed with the ad's price level.
PRICE_CROSSED_FIELDS = ("age_level", "gender", "pvalue_level", "shopping_level")
#: Profile fields crossed with the ad's category.
CATEGORY_CROSSED_FIELDS = (
    "cms_group_id",
    "gender",
    "age_level",
    "shopping_level",
    "occupation",
    "pvalue_level",
    "new_user_class_level",
)

BEHAVIOUR = FeatureSpec(
    name="behaviour",
    blocks=(
        *FULL.blocks,
        *(Numeric(column, "log_count") for column in HISTORY_COLUMNS),
        *(PriceLevelCross(field, profile_levels(field)) for field in PRICE_CROSSED_FIELDS),
        CategoryCross(
            CATEGORY_CROSSED_FIELDS,
            tuple(profile_levels(field) for field in CATEGORY_CROSSED_FIELDS),
            CATEGORY_CROSS_BUCKETS,
        ),
    ),
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
