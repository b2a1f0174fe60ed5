"""Scoring candidate ads with a version's CTR model: one path for the job and the service.

The batch job's offline top-N (``jobs.offline``, many users per call) and the ranking
service (``services.ranking.snapshot``, one user per request) both score through a
:class:`CtrScorer`, so the same user and candidates give the same list, CTRs included:

- lookup: each candidate id's row in the ad table (:class:`AdIndex`: a dense id -> row
  table, or a binary search when the ids are too large for one);
- candidates: a repeated id keeps its first occurrence, ids the table lacks are dropped and
  counted (:func:`known_candidates`);
- CTRs: the model's margin summed per input column (:class:`CompiledModel`), or the shared
  encoder and ``CtrModel.predict`` for a spec that does not split; either way one call per
  user over that user's candidates, so a user scored in a batch meets the very arithmetic
  of a request (a matrix product's rounding can depend on the shape it is given);
- order: CTR descending, equal CTRs in candidate order - the order recall produced,
  category rank then within-category order - then the first ``top_k`` (:func:`best_first`);
  or, asked for :attr:`RankBy.ECPM`, eCPM descending (:func:`by_ecpm`).

Beside the model's CTR a ranked ad carries its calibrated pCTR (the artifact's per-placement
:class:`adrec.core.model.Calibration`), and, when the version has bids (``keys.BIDS``), its
bid and eCPM: pCTR x bid x :data:`CPM_IMPRESSIONS`. Calibration is monotone at one
placement, so ranking by pCTR is ranking by CTR.

Why the per-column sums equal encode + predict: every block of a feature spec reads one
input column, and the model is linear, so a row's margin is the intercept plus one
contribution per column. The contributions are computed with the shared encoder itself
(``FeatureSpec.encode``), never re-derived:

- per ad (price, smoothed CTRs): encoded once per version for the whole ad table;
- per request (pid, profile fields): stored int8 codes have 129 possible values (missing,
  0..127), all encoded once per version into lookup tables;
- per (user, ad) pair (ALS affinity): its encoding must be affine in the value, with a
  constant for missing; that is probed through the encoder and checked, then applied;
- per (user, ad) pair (the ``behaviour`` set's history counts): encoded per request by the
  spec's own blocks of those columns, or one constant for a user without counts.

Summing per column changes only the order of the float64 additions, so margins agree with
``model.predict(spec.encode(...))`` to ~1e-15. :meth:`CompiledModel.compile` checks this on
random rows and returns None for a spec it cannot split (a new kind of column).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from adrec.core import events, features
from adrec.core.codecs import UserFeatures
from adrec.core.dataset import PIDS
from adrec.core.model import CtrModel

#: Ad table columns scoring reads (the table may hold more).
AD_COLUMNS = ("adgroup_id", "cate_id", *features.AD_NUMERIC_FIELDS)
#: Ad ids below this get a dense id -> row table (int32: 64 MiB at most; the data set's ids
#: stay under a million); larger ids are looked up by binary search instead.
DENSE_ID_LIMIT = 1 << 24

REQUEST_COLUMNS = ("pid", *features.USER_PROFILE_FIELDS)
PAIR_COLUMN = "als_affinity"
HISTORY_COLUMNS = features.HISTORY_COLUMNS
BRAND_COLUMN = "brand_id"
#: The one transform the compiled model applies to history counts itself.
HISTORY_TRANSFORM = "log_count"
#: Every value a stored profile field can take: missing, then the int8 codes 0..127.
PROFILE_VALUES = np.array([np.nan, *range(128)])
#: Row of PROFILE_VALUES holding each code; any other value (NaN, an unknown level) is not a
#: key, and so is missing: row 0.
_PROFILE_ROWS = {float(code): code + 1 for code in range(128)}
#: Encoded rows at a time when precomputing the ad table's contributions.
AD_CHUNK = 65_536
#: Largest margin disagreement with encode + predict accepted by the self-check.
TOLERANCE = 1e-9
# Exactly representable in float32, so the encoder's float32 output rounds none of them.
_AFFINE_PROBES = np.array([-8.0, -1.5, -0.25, 0.0, 0.5, 1.0, 2.75, 16.0])


#: A user's window counts by (kind, scope, member), as adrec.core.events.window_counts gives.
HistoryCounts = Mapping[tuple[events.Kind, events.Scope, int], tuple[int, ...]]


#: A bid is a price per click, so pCTR x bid is the expected revenue of one impression;
#: eCPM states it per thousand impressions, the unit ad servers compare prices in.
CPM_IMPRESSIONS = 1000.0
#: Feature contributions an explained ad carries.
EXPLAINED_FEATURES = 3


class ScoringDataError(ValueError):
    """An ad table or category factors that cannot be scored against."""


class RankBy(enum.Enum):
    """What a ranked list is ordered by."""

    #: Calibrated pCTR (the same order as the model's CTR).
    PCTR = "pctr"
    #: pCTR x bid; ads without a bid come after every ad with one, by pCTR.
    ECPM = "ecpm"


def ecpm(pctrs: np.ndarray, bids: np.ndarray) -> np.ndarray:
    """eCPM of each ad: NaN where the ad has no bid (a NaN bid)."""
    values: np.ndarray = pctrs * bids * CPM_IMPRESSIONS
    return values


def present(values: np.ndarray | None) -> list[float | None] | None:
    """Bids or eCPMs as a list with None for an ad without a bid (NaN); None stays None."""
    if values is None:
        return None
    return [None if math.isnan(value) else value for value in values.tolist()]


def by_ecpm(ctrs: np.ndarray, ecpms: np.ndarray, top_k: int) -> np.ndarray:
    """Positions of the best ``top_k`` candidates (all when 0) by eCPM, best first.

    Equal eCPMs, and all the ads without a bid (NaN), which come last, go by CTR as
    :func:`best_first` orders them, so in candidate order when those tie too.
    """
    by_ctr = best_first(ctrs, 0)
    keys = np.nan_to_num(ecpms[by_ctr], nan=-np.inf)
    order = by_ctr[np.argsort(-keys, kind="stable")]
    return order[:top_k] if top_k else order


# ------------------------------------------------------------------ lookup and order


@dataclasses.dataclass(frozen=True, eq=False)
class AdIndex:
    """Ad id -> row of the ad table."""

    #: The table's ids, ascending.
    ad_ids: np.ndarray
    #: Row of every id from 0 to one past the largest, -1 for ids the table lacks; None when
    #: the ids are too large for a dense table (or include 0 or below).
    row_by_id: np.ndarray | None

    @classmethod
    def of(cls, ad_ids: np.ndarray) -> AdIndex:
        """The index of an ad table's ids, which must be ascending."""
        ad_ids = np.asarray(ad_ids).astype(np.int64)
        if len(ad_ids) > 1 and not (np.diff(ad_ids) > 0).all():
            raise ScoringDataError("ad table is not sorted by adgroup_id")
        row_by_id = None
        if len(ad_ids) and ad_ids[0] >= 1 and ad_ids[-1] < DENSE_ID_LIMIT:
            row_by_id = np.full(int(ad_ids[-1]) + 2, -1, dtype=np.int32)
            row_by_id[ad_ids] = np.arange(len(ad_ids), dtype=np.int32)
        return cls(ad_ids, row_by_id)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the ad table, -1 for ids it lacks."""
        if self.row_by_id is not None:
            # Clipping sends every id outside the table to the first or the last entry, and
            # both are -1: no id is 0 or past the largest.
            return self.row_by_id.take(ids, mode="clip")
        return _rows_in(self.ad_ids, ids)


class Candidates(NamedTuple):
    """The candidates that can be scored, in candidate order."""

    ids: np.ndarray
    #: Row of each in the ad table.
    rows: np.ndarray
    #: Which list each candidate belongs to; None for a single list.
    lists: np.ndarray | None
    #: Distinct ids (per list) dropped because the ad table lacks them.
    unknown: int


def known_candidates(
    index: AdIndex, ids: np.ndarray, lists: np.ndarray | None = None
) -> Candidates:
    """The first occurrence of each id (within its list) that the ad table holds.

    ``lists``, the list of each id, takes several lists at once.
    """
    rows = index.rows(ids)
    if _may_repeat(ids):
        first = _first_occurrences(ids, lists)
        ids, rows = ids[first], rows[first]
        lists = None if lists is None else lists[first]
    known = rows >= 0
    unknown = len(rows) - int(np.count_nonzero(known))
    if unknown:
        ids, rows = ids[known], rows[known]
        lists = None if lists is None else lists[known]
    return Candidates(ids, rows, lists, unknown)


def best_first(ctrs: np.ndarray, top_k: int, lists: np.ndarray | None = None) -> np.ndarray:
    """Positions of each list's best ``top_k`` candidates (all when 0), best first.

    The one tie rule: CTR descending, equal CTRs in candidate order (their order in
    ``ctrs``). With ``lists`` (the list of each candidate) the lists come out one after the
    other, in ascending order.
    """
    order = np.argsort(-ctrs, kind="stable")
    if lists is None:
        return order[:top_k] if top_k else order
    # A stable sort by list keeps each list's candidates in the order just established.
    order = order[np.argsort(lists[order], kind="stable")]
    if top_k:
        grouped = lists[order]
        place_in_list = np.arange(len(order)) - np.searchsorted(grouped, grouped)
        order = order[place_in_list < top_k]
    return order


def _bids_by_row(index: AdIndex, ad_ids: np.ndarray, bids: np.ndarray) -> np.ndarray:
    by_row = np.full(len(index.ad_ids), np.nan)
    rows = index.rows(np.asarray(ad_ids, dtype=np.int64))
    known = rows >= 0
    by_row[rows[known]] = np.asarray(bids, dtype=np.float64)[known]
    return by_row


def _rows_in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of `ids` in the ascending `sorted_ids`, -1 where absent."""
    if not len(sorted_ids):
        return np.full(len(ids), -1, dtype=np.int64)
    position = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[position] == ids, position, -1)


def _may_repeat(ids: np.ndarray) -> bool:
    """Whether an id may occur twice; checked on the ids cut to 32 bits, which sort faster and
    can only add repeats (then the exact check sorts out the truth), never hide one."""
    ordered = np.sort(ids.astype(np.int32))
    return bool((ordered[1:] == ordered[:-1]).any())


def _first_occurrences(ids: np.ndarray, lists: np.ndarray | None) -> np.ndarray:
    """Mask of the ids that do not repeat an earlier id of their list."""
    # Stable, so each run of equal (list, id) pairs starts with its first occurrence.
    order = np.argsort(ids, kind="stable") if lists is None else np.lexsort((ids, lists))
    ordered = ids[order]
    repeat = ordered[1:] == ordered[:-1]
    if lists is not None:
        ordered_lists = lists[order]
        repeat &= ordered_lists[1:] == ordered_lists[:-1]
    first = np.ones(len(ids), dtype=bool)
    first[order[1:][repeat]] = False
    return first


# ------------------------------------------------------------------ scoring


class Ranked(NamedTuple):
    """One list's best candidates, best first, and how many distinct ids had no ad row."""

    ad_ids: np.ndarray
    ctrs: np.ndarray
    unknown_ads: int
    #: Calibrated, row-aligned with ``ctrs``.
    pctrs: np.ndarray
    #: NaN for an ad without a bid; None when the version has no bids at all.
    bids: np.ndarray | None
    ecpms: np.ndarray | None
    #: Rows of the ranked ads in the ad table, for :meth:`CtrScorer.contributions`.
    rows: np.ndarray


class Contribution(NamedTuple):
    """One encoded feature's share of an ad's margin: its weight times its value."""

    feature: str
    column: str
    margin: float


@dataclasses.dataclass(frozen=True, eq=False)
class CtrScorer:
    """One version's model, ad table and category factors, prepared to score candidates."""

    model: CtrModel
    index: AdIndex
    ad_numeric: dict[str, np.ndarray]
    cate_ids: np.ndarray
    #: float64 (the float32 stored values, exactly), row-aligned with cate_ids, plus a last
    #: row of NaN: the factors of every category without any, so their affinity is missing.
    cate_factors: np.ndarray
    #: Row of each ad's category in cate_factors (the NaN row when it has no factors).
    ad_cate_rows: np.ndarray
    #: Brand of each ad (0 or less: none), row-aligned with the ad table.
    ad_brands: np.ndarray
    ad_cates: np.ndarray
    #: None when the model's spec cannot be split: CTRs are then encoded.
    compiled: CompiledModel | None
    uses_affinity: bool
    uses_history: bool
    #: Bid of each ad, row-aligned with the ad table, NaN for none; None without bids.
    bids: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        model: CtrModel,
        ads: Mapping[str, np.ndarray],
        cate_ids: np.ndarray,
        cate_factors: np.ndarray,
        bids: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> CtrScorer:
        """Prepare the ad table (sorted by id), the category factors (sorted by category,
        ``(categories, rank)``) and the version's bids (ad ids and bids, as ``keys.BIDS``
        holds them; bids of ads the table lacks are ignored); raises ScoringDataError for
        data that cannot be scored."""
        missing = [column for column in AD_COLUMNS if column not in ads]
        if missing:
            raise ScoringDataError(f"ad table lacks columns {missing}")
        index = AdIndex.of(ads["adgroup_id"])
        cate_ids = np.asarray(cate_ids).astype(np.int64)
        if len(cate_ids) > 1 and not (np.diff(cate_ids) > 0).all():
            raise ScoringDataError("category factors are not sorted")
        ad_numeric = {
            name: np.asarray(ads[name]).astype(np.float64) for name in features.AD_NUMERIC_FIELDS
        }
        # Stored as float32: widening once here gives the values als_affinity computes with
        # after widening the rows it gathers.
        factors = np.asarray(cate_factors).astype(np.float32).astype(np.float64)
        ad_cates = np.asarray(ads["cate_id"]).astype(np.int64)
        ad_brands = np.asarray(ads.get(BRAND_COLUMN, np.zeros(len(index.ad_ids)))).astype(np.int64)
        ad_cate_rows = _rows_in(cate_ids, ad_cates)
        return cls(
            model=model,
            index=index,
            ad_numeric=ad_numeric,
            cate_ids=cate_ids,
            cate_factors=np.vstack([factors, np.full((1, factors.shape[1]), np.nan)]),
            ad_cate_rows=np.where(ad_cate_rows < 0, len(cate_ids), ad_cate_rows),
            ad_brands=ad_brands,
            ad_cates=ad_cates,
            compiled=CompiledModel.compile(
                model,
                {
                    **ad_numeric,
                    features.CATEGORY_COLUMN: ad_cates.astype(np.float64),
                    BRAND_COLUMN: ad_brands.astype(np.float64),
                },
            )
            if len(index.ad_ids)
            else None,
            uses_affinity=PAIR_COLUMN in model.spec.input_columns,
            uses_history=bool(set(HISTORY_COLUMNS) & set(model.spec.input_columns)),
            bids=None if bids is None else _bids_by_row(index, *bids),
        )

    @property
    def als_rank(self) -> int:
        return int(self.cate_factors.shape[1])

    def rank(
        self,
        pid: str,
        user: UserFeatures,
        candidates: np.ndarray,
        top_k: int,
        history: HistoryCounts | None = None,
        rank_by: RankBy = RankBy.PCTR,
    ) -> Ranked:
        """The best ``top_k`` known candidates of one user (all when 0), best first.

        ``history``: the user's window counts (:func:`adrec.core.events.window_counts`);
        None (no real-time state) counts 0 everywhere, as the job encodes a user without
        events. ``rank_by`` ECPM needs the version's bids (:attr:`has_bids`).
        """
        found = known_candidates(self.index, candidates)
        calibration = self.model.calibration
        if not len(found.rows):
            none = np.zeros(0)
            no_bids = None if self.bids is None else none
            return Ranked(found.ids, none, found.unknown, none, no_bids, no_bids, found.rows)
        ctrs = self.ctrs(pid, user, found.rows, history)
        if rank_by is RankBy.ECPM:
            if self.bids is None:
                raise ScoringDataError("the version has no bids to rank by eCPM")
            pctrs = calibration.apply(pid, ctrs)
            bids = self.bids.take(found.rows)
            ecpms = ecpm(pctrs, bids)
            order = by_ecpm(ctrs, ecpms, top_k)
            return Ranked(
                found.ids[order],
                ctrs[order],
                found.unknown,
                pctrs[order],
                bids[order],
                ecpms[order],
                found.rows[order],
            )
        order = best_first(ctrs, top_k)
        rows = found.rows[order]
        ranked_ctrs = ctrs[order]
        ranked_pctrs = calibration.apply(pid, ranked_ctrs)
        ranked_bids = None if self.bids is None else self.bids.take(rows)
        return Ranked(
            found.ids[order],
            ranked_ctrs,
            found.unknown,
            ranked_pctrs,
            ranked_bids,
            None if ranked_bids is None else ecpm(ranked_pctrs, ranked_bids),
            rows,
        )

    @property
    def has_bids(self) -> bool:
        return self.bids is not None

    def contributions(
        self,
        pid: str,
        user: UserFeatures,
        rows: np.ndarray,
        history: HistoryCounts | None = None,
        top: int = EXPLAINED_FEATURES,
    ) -> list[list[Contribution]]:
        """For each ad at ``rows``, its ``top`` features by the size of weight x value.

        Encoded by the shared encoder, so they are the terms of the very margin the model
        scored (the intercept aside); for explaining a few ads, not for ranking many.
        """
        columns: dict[str, np.ndarray | str | float] = {"pid": pid, **user.columns()}
        for name, values in self.ad_numeric.items():
            columns[name] = values[rows]
        columns[features.CATEGORY_COLUMN] = self.ad_cates.take(rows)
        columns[PAIR_COLUMN] = (
            self.affinity(user, rows) if self.uses_affinity else np.full(len(rows), np.nan)
        )
        counts = self.history_columns(history, rows) if history and self.uses_history else None
        for name in HISTORY_COLUMNS:
            columns[name] = counts[name] if counts else 0.0
        spec = self.model.spec
        terms = spec.encode(columns).astype(np.float64) * self.model.weights
        names = spec.feature_names
        column_of = [block.column for block in spec.blocks for _ in block.names]
        largest = np.argsort(-np.abs(terms), axis=1, kind="stable")[:, :top]
        return [
            [Contribution(names[slot], column_of[slot], float(terms[i, slot])) for slot in slots]
            for i, slots in enumerate(largest.tolist())
        ]

    def rank_lists(
        self,
        pid: str,
        users: Sequence[UserFeatures],
        candidates: np.ndarray,
        offsets: np.ndarray,
        top_k: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`rank` of many users at once: (ad ids, CTRs, offsets into them).

        User ``i``'s candidates are ``candidates[offsets[i]:offsets[i + 1]]``; a user left
        with no known candidate gets an empty list.
        """
        lists = np.repeat(np.arange(len(users)), np.diff(offsets))
        found = known_candidates(self.index, candidates, lists)
        owners = found.lists
        assert owners is not None  # given lists, known_candidates returns theirs
        bounds = np.searchsorted(owners, np.arange(len(users) + 1))
        ctrs = np.empty(len(found.rows))
        for user, start, stop in zip(users, bounds[:-1], bounds[1:], strict=True):
            if stop > start:
                ctrs[start:stop] = self.ctrs(pid, user, found.rows[start:stop])
        order = best_first(ctrs, top_k, owners)
        kept = np.bincount(owners[order], minlength=len(users))
        return found.ids[order], ctrs[order], np.concatenate([[0], np.cumsum(kept)])

    def ctrs(
        self,
        pid: str,
        user: UserFeatures,
        rows: np.ndarray,
        history: HistoryCounts | None = None,
    ) -> np.ndarray:
        """The user's CTR for each ad at ``rows`` of the ad table."""
        affinity = self.affinity(user, rows) if self.uses_affinity else None
        if self.compiled is None:
            counts = self.history_columns(history, rows) if history and self.uses_history else None
            return self.encode_and_predict(pid, user, rows, affinity, counts)
        margins = self.compiled.margins(
            pid, user, rows, affinity, history if self.uses_history else None
        )
        probabilities: np.ndarray = 1.0 / (1.0 + np.exp(-margins))
        return probabilities

    def encode_and_predict(
        self,
        pid: str,
        user: UserFeatures,
        rows: np.ndarray,
        affinity: np.ndarray | None,
        history: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """CTRs the plain way: the shared encoder over every candidate row, then the model."""
        columns: dict[str, np.ndarray | str | float] = {"pid": pid, **user.columns()}
        for name, values in self.ad_numeric.items():
            columns[name] = values[rows]
        columns[features.CATEGORY_COLUMN] = self.ad_cates.take(rows)
        if affinity is not None:
            columns[PAIR_COLUMN] = affinity
        for name in HISTORY_COLUMNS:
            columns[name] = history[name] if history else 0.0
        return self.model.predict(self.model.spec.encode(columns))

    def history_columns(self, history: HistoryCounts, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The history count columns of the ads at ``rows`` for one user's window counts."""
        return features.history_inputs(history, self.ad_cates.take(rows), self.ad_brands.take(rows))

    def affinity(self, user: UserFeatures, rows: np.ndarray) -> np.ndarray:
        """features.als_affinity of the ads at `rows`, with their categories looked up once
        per version: the same products of the same values, so the same results."""
        factors = user.als_factors
        if not self.als_rank or factors is None or len(factors) != self.als_rank:
            # No factors (or factors of another ALS rank): missing, as the job encodes it.
            return np.full(len(rows), np.nan)
        # take() gathers rows several times faster than fancy indexing does; an ad whose
        # category has no factors meets the NaN row, so its product is NaN. A matrix product
        # may give two ads of one category values a last bit apart; the model reads the
        # affinity as float32, which rounds that away unless it straddles a float32 step.
        return self.cate_factors.take(self.ad_cate_rows.take(rows), axis=0) @ np.asarray(
            factors, np.float64
        )


# ------------------------------------------------------------------ the model split by column


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledModel:
    """The LR model's margin split by input column, so a request costs lookups, not an encode."""

    model: CtrModel
    #: Margin contribution of every ad's own columns, row-aligned with the ad table.
    ad_margins: np.ndarray
    pid_margins: Mapping[str, float]
    #: Per profile field: contribution of each of PROFILE_VALUES, as Python floats, which a
    #: request adds faster than numpy scalars (the same IEEE additions).
    profile_margins: Mapping[str, list[float]]
    #: ALS affinity contribution: offset + slope * value, or `missing` for NaN; None if unused.
    pair: tuple[float, float, float] | None
    #: The spec's history blocks as one part; None if the spec has none.
    history: HistoryPart | None
    #: The spec's crosses as weight tables; None if the spec has none.
    crosses: CrossPart | None = None
    #: Every ad's category and brand, where the history counts are looked up.
    ad_members: Mapping[events.Scope, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def compile(cls, model: CtrModel, ads: Mapping[str, np.ndarray]) -> CompiledModel | None:
        """Split `model` over the ad table `ads`; None when the spec does not split cleanly."""
        columns = set(model.spec.input_columns)
        allowed = {
            *REQUEST_COLUMNS,
            *features.AD_NUMERIC_FIELDS,
            features.CATEGORY_COLUMN,
            PAIR_COLUMN,
            *HISTORY_COLUMNS,
        }
        if not columns <= allowed:
            return None
        # One weight table per version is built for one category cross; more are scored
        # by encode + predict.
        if sum(isinstance(block, features.CategoryCross) for block in model.spec.blocks) > 1:
            return None
        if any(
            block.column in HISTORY_COLUMNS
            and not (isinstance(block, features.Numeric) and block.transform == HISTORY_TRANSFORM)
            for block in model.spec.blocks
        ):
            return None
        slots = _slots_by_column(model.spec)
        rows = len(next(iter(ads.values())))
        ad_margins = np.zeros(rows)
        for start in range(0, rows, AD_CHUNK):
            chunk = {
                c: ads[c][start : start + AD_CHUNK]
                for c in features.AD_NUMERIC_FIELDS
                if c in columns
            }
            if chunk:
                ad_margins[start : start + AD_CHUNK] = _contributions(model, slots, chunk)
        pid_margins = (
            {pid: float(_contributions(model, slots, {"pid": np.array([pid])})[0]) for pid in PIDS}
            if "pid" in columns
            else {}
        )
        profile_margins = {
            field: (
                _contributions(model, slots, {field: PROFILE_VALUES})
                if field in columns
                else np.zeros(len(PROFILE_VALUES))
            ).tolist()
            for field in features.USER_PROFILE_FIELDS
        }
        pair = None
        if PAIR_COLUMN in columns:
            pair = _affine_pair(model, slots)
            if pair is None:
                return None
        crosses = CrossPart.of(model, slots, ads)
        ad_members = {
            events.Scope.CATEGORY: np.asarray(ads[features.CATEGORY_COLUMN]).astype(np.int64),
            events.Scope.BRAND: np.asarray(ads[BRAND_COLUMN]).astype(np.int64),
        }
        compiled = cls(
            model,
            ad_margins,
            pid_margins,
            profile_margins,
            pair,
            _history_part(model, slots),
            crosses,
            ad_members,
        )
        return compiled if compiled._agrees_with_encoder(ads) else None

    def margins(
        self,
        pid: str,
        user: UserFeatures,
        rows: np.ndarray,
        affinity: np.ndarray | None,
        history: HistoryCounts | None = None,
    ) -> np.ndarray:
        """Margins of the ads at `rows` of the ad table for one user with the window counts
        `history` (None: no counts)."""
        request = self.model.intercept + self.pid_margins.get(pid, 0.0)
        for field, table in self.profile_margins.items():
            request += table[_PROFILE_ROWS.get(user.profile[field], 0)]
        margins = self.ad_margins.take(rows) + request
        if self.pair is not None and affinity is not None:
            offset, slope, missing = self.pair
            # As the encoder hands it to the model: float32.
            values = affinity.astype(np.float32).astype(np.float64)
            margins += np.where(np.isnan(values), missing, offset + slope * values)
        if self.history is not None:
            margins += self._history_margins(history, rows)
        if self.crosses is not None:
            margins += self.crosses.margins(user.profile, rows)
        return margins

    def _history_margins(self, history: HistoryCounts | None, rows: np.ndarray) -> np.ndarray:
        """The history blocks' share of each ad's margin. Encoded once per counted member
        (a category or brand the user has counts on), not once per candidate: a candidate
        gets the no-counts share plus what its category's and its brand's counts add."""
        assert self.history is not None
        part = self.history
        total = np.full(len(rows), part.without_counts)
        if not history:
            return total
        # Per scope: each counted member's row, and (row, slot, count) of every count.
        member_rows: dict[events.Scope, dict[int, int]] = {}
        cells: dict[events.Scope, tuple[list[int], list[int], list[int]]] = {}
        slots_of = part.slots
        for (kind, scope, member), values in history.items():
            slots = slots_of.get((kind, scope))
            if slots is None:
                continue
            rows_of_scope = member_rows.setdefault(scope, {})
            row = rows_of_scope.setdefault(member, len(rows_of_scope))
            at_rows, at_slots, counts = cells.setdefault(scope, ([], [], []))
            at_rows.extend((row,) * len(slots))
            at_slots.extend(slots)
            counts.extend(values)
        for scope, rows_of_scope in member_rows.items():
            at_rows, at_slots, counts = cells[scope]
            table = np.zeros((len(rows_of_scope), len(part.weights)))
            table[at_rows, at_slots] = counts
            # Every history block is one log-count column (checked when compiling): one
            # transform of the whole table is the encoder's value for each of its cells.
            encoded = features.transformed(HISTORY_TRANSFORM, table).astype(np.float32)
            # Summed along each row in the same order whatever its position: members with
            # equal counts add equal margins.
            added = (encoded.astype(np.float64) * part.weights).sum(axis=1) - part.without_counts
            ids = np.fromiter(rows_of_scope, np.int64, len(rows_of_scope))
            order = np.argsort(ids)
            ids = ids[order]
            wanted = self.ad_members[scope].take(rows)
            position = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
            hit = (ids[position] == wanted) & (wanted > 0)
            total[hit] += added[order[position[hit]]]
        return total

    def _agrees_with_encoder(self, ads: Mapping[str, np.ndarray], samples: int = 256) -> bool:
        rng = np.random.default_rng(0)
        rows = len(next(iter(ads.values())))
        position = rng.integers(0, rows, samples)
        pids = rng.choice(PIDS, samples)
        codes = rng.integers(-1, 128, (samples, len(features.USER_PROFILE_FIELDS)))
        affinity = np.where(rng.random(samples) < 0.2, np.nan, rng.normal(0, 2, samples))
        columns: dict[str, np.ndarray] = {"pid": pids, PAIR_COLUMN: affinity}
        counts = (
            rng.poisson(1.0, (samples, len(HISTORY_COLUMNS))) * (rng.random(samples) < 0.5)[:, None]
        )
        for i, name in enumerate(HISTORY_COLUMNS):
            columns[name] = counts[:, i].astype(np.float64)
        for i, field in enumerate(features.USER_PROFILE_FIELDS):
            columns[field] = np.where(codes[:, i] < 0, np.nan, codes[:, i])
        for column in features.AD_NUMERIC_FIELDS:
            columns[column] = ads[column][position]
        columns[features.CATEGORY_COLUMN] = ads[features.CATEGORY_COLUMN][position]
        # An ad without a brand (0 or less) has no brand counts, as history_inputs has it.
        brands = ads[BRAND_COLUMN][position]
        for kind, scope in features.HISTORY_COUNTS:
            if scope is events.Scope.BRAND:
                for window in events.WINDOWS:
                    name = features.history_column(kind, scope, window.name)
                    columns[name] = np.where(brands <= 0, 0.0, columns[name])
        spec = self.model.spec
        expected = (
            spec.encode(columns).astype(np.float64) @ self.model.weights + self.model.intercept
        )
        actual = np.empty(samples)
        for i in range(samples):
            profile = {f: float(columns[f][i]) for f in features.USER_PROFILE_FIELDS}
            history = _history_of_row(columns, i, ads, position[i]) if counts[i].any() else None
            actual[i] = self.margins(
                str(pids[i]),
                UserFeatures(profile),
                position[i : i + 1],
                affinity[i : i + 1],
                history,
            )[0]
        return bool(np.max(np.abs(actual - expected)) <= TOLERANCE)


def _history_of_row(
    columns: Mapping[str, np.ndarray], row: int, ads: Mapping[str, np.ndarray], ad: int
) -> dict[tuple[events.Kind, events.Scope, int], tuple[int, ...]]:
    """The window counts that give the ad at `ad` the history columns of `row`."""
    members = {
        events.Scope.CATEGORY: int(ads[features.CATEGORY_COLUMN][ad]),
        events.Scope.BRAND: int(ads[BRAND_COLUMN][ad]),
    }
    return {
        (kind, scope, members[scope]): tuple(
            int(columns[features.history_column(kind, scope, window.name)][row])
            for window in events.WINDOWS
        )
        for kind, scope in features.HISTORY_COUNTS
    }


def _slots_by_column(spec: features.FeatureSpec) -> dict[str, list[int]]:
    slots: dict[str, list[int]] = {}
    start = 0
    for block in spec.blocks:
        width = len(block.names)
        slots.setdefault(block.column, []).extend(range(start, start + width))
        start += width
    return slots


def _contributions(
    model: CtrModel, slots: dict[str, list[int]], values: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Summed margin contribution of the columns in `values`, one per row, via the encoder."""
    # Every other column gets a value each block accepts; its slots are not read.
    probe: dict[str, np.ndarray | float | str] = {
        column: np.nan for column in model.spec.input_columns
    }
    probe["pid"] = PIDS[0]
    probe.update(values)
    encoded = model.spec.encode(probe)
    # Slot by slot, not one matrix product, whose rounding may depend on a row's position:
    # ads with equal features then get equal margins and stay tied.
    total = np.zeros(len(encoded))
    for slot in (slot for column in values for slot in slots[column]):
        total += encoded[:, slot].astype(np.float64) * model.weights[slot]
    return total


@dataclasses.dataclass(frozen=True)
class CrossPart:
    """A spec's crosses as tables of weights by the user's levels and the ad's side, so a
    request looks its weights up instead of hashing each candidate's keys."""

    #: Per price cross: its field, levels and weights as (user level, price level).
    price: tuple[tuple[str, tuple[int, ...], np.ndarray], ...]
    #: Every ad's price level, row-aligned with the ad table.
    ad_price_levels: np.ndarray
    #: The category cross's fields and levels, the first row of each field's levels in
    #: `category_weights`, and the weight of every (field level, category) pair, one
    #: column per distinct category of the ad table.
    category: features.CategoryCross | None
    field_rows: tuple[int, ...]
    category_weights: np.ndarray
    #: Every ad's column in `category_weights`.
    ad_categories: np.ndarray

    @classmethod
    def of(
        cls, model: CtrModel, slots: dict[str, list[int]], ads: Mapping[str, np.ndarray]
    ) -> CrossPart | None:
        blocks = model.spec.blocks
        price = tuple(
            (
                block.field,
                block.levels,
                model.weights[slots[block.column]].reshape(
                    len(block.levels) + 1, features.PRICE_LEVELS
                ),
            )
            for block in blocks
            if isinstance(block, features.PriceLevelCross)
        )
        category = next(
            (block for block in blocks if isinstance(block, features.CategoryCross)), None
        )
        if not price and category is None:
            return None
        field_rows: tuple[int, ...] = ()
        category_weights = np.zeros((0, 0))
        ad_categories = np.zeros(0, np.int64)
        if category is not None:
            # Every level of every field, missing last, as the encoder codes them.
            every_level = [np.array([*levels, np.nan]) for levels in category.levels]
            codes = np.concatenate(category.level_codes(*every_level))
            field_rows = tuple(np.cumsum([0, *(len(v) for v in every_level[:-1])]).tolist())
            distinct, ad_categories = np.unique(
                features.category_bits(ads[features.CATEGORY_COLUMN]), return_inverse=True
            )
            chosen = category.slots_at(codes[None, :], distinct)
            category_weights = model.weights[slots[category.column]][chosen].T.astype(np.float64)
        return cls(
            price,
            features.price_levels(ads["price"]),
            category,
            field_rows,
            np.ascontiguousarray(category_weights),
            ad_categories.astype(np.int64),
        )

    def margins(self, profile: Mapping[str, float], rows: np.ndarray) -> np.ndarray:
        """The crosses' share of the margins of the ads at `rows` for a user's `profile`."""
        total = np.zeros(len(rows))
        if self.price:
            by_price_level = sum(
                table[features.level_of(levels, profile[field])]
                for field, levels, table in self.price
            )
            total += np.asarray(by_price_level).take(self.ad_price_levels.take(rows))
        if self.category is not None:
            user_rows = np.array(
                [
                    first + features.level_of(levels, profile[field])
                    for first, field, levels in zip(
                        self.field_rows, self.category.fields, self.category.levels, strict=True
                    )
                ]
            )
            columns = self.ad_categories.take(rows)
            total += self.category_weights[user_rows[:, None], columns[None, :]].sum(axis=0)
        return total


@dataclasses.dataclass(frozen=True)
class HistoryPart:
    """A spec's history blocks: their weights, each count's slots among them (one per
    window), and their contribution when every count is 0."""

    weights: np.ndarray
    slots: Mapping[tuple[events.Kind, events.Scope], tuple[int, ...]]
    without_counts: float


def _history_part(model: CtrModel, slots: dict[str, list[int]]) -> HistoryPart | None:
    blocks = tuple(block for block in model.spec.blocks if block.column in HISTORY_COLUMNS)
    if not blocks:
        return None
    part = features.FeatureSpec(f"{model.spec.name}-history", blocks)
    weights = model.weights[[slot for block in blocks for slot in slots[block.column]]]
    zeros = {column: np.zeros(1) for column in part.input_columns}
    without_counts = float(part.encode(zeros).astype(np.float64)[0] @ weights)
    slot_of = {block.column: slot for slot, block in enumerate(blocks)}
    count_slots = {
        (kind, scope): tuple(
            slot_of[features.history_column(kind, scope, window.name)] for window in events.WINDOWS
        )
        for kind, scope in features.HISTORY_COUNTS
        if all(
            features.history_column(kind, scope, window.name) in slot_of
            for window in events.WINDOWS
        )
    }
    return HistoryPart(weights, count_slots, without_counts)


def _affine_pair(model: CtrModel, slots: dict[str, list[int]]) -> tuple[float, float, float] | None:
    probed = _contributions(model, slots, {PAIR_COLUMN: np.array([np.nan, *_AFFINE_PROBES])})
    missing, finite = float(probed[0]), probed[1:]
    offset = float(finite[_AFFINE_PROBES.tolist().index(0.0)])
    slope = float((finite[-1] - finite[0]) / (_AFFINE_PROBES[-1] - _AFFINE_PROBES[0]))
    fitted = offset + slope * _AFFINE_PROBES
    if np.max(np.abs(fitted - finite)) > TOLERANCE:
        return None
    return offset, slope, missing
