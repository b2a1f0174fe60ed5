"""Per-placement calibration of the CTR model: Platt scaling of its logit, fitted in Spark.

Contract:

- :func:`fit_calibration` ``(scored)`` -> ``(Calibration, report)``: ``scored`` holds
  ``label``, ``pid`` and the model's ``probability`` for impressions the model was not
  trained on; per pid, ``pctr = sigmoid(slope * logit(probability) + offset)`` by maximum
  likelihood (Newton's method, one aggregation over the rows per step, every pid at once).
- :func:`calibrated` ``(scored, calibration)`` -> ``scored`` with ``probability`` replaced
  by the calibrated pCTR, computed on the executors by
  :meth:`adrec.core.model.Calibration.apply_rows`, the function serving applies.

A pid with too few rows, or without both a click and a non-click, keeps its CTRs (no
entry), as does one whose fit does not converge to a positive slope; the report says which.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F  # noqa: N812 - the conventional alias
from pyspark.sql import types as T  # noqa: N812

from adrec.core.model import LOGIT_CLIP, Calibration, PlacementCalibration

#: Fewest held-out impressions of a pid worth fitting two parameters on.
MIN_ROWS = 200
MAX_STEPS = 25
#: Newton stops once no parameter moves by more than this.
CONVERGED = 1e-9


def _logit(probability: Column) -> Column:
    clipped = F.least(F.greatest(probability, F.lit(LOGIT_CLIP)), F.lit(1 - LOGIT_CLIP))
    return F.log(clipped / (F.lit(1.0) - clipped))


def fit_calibration(scored: DataFrame) -> tuple[Calibration, dict[str, Any]]:
    """Each pid's slope and offset; the report holds them with each pid's rows and clicks."""
    frame = scored.select(
        F.col("pid"),
        F.col("label").cast("double").alias("y"),
        _logit(F.col("probability").cast("double")).alias("z"),
    ).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {
            row["pid"]: (int(row["rows"]), float(row["clicks"]))
            for row in frame.groupBy("pid")
            .agg(F.count(F.lit(1)).alias("rows"), F.sum("y").alias("clicks"))
            .collect()
        }
        fitted = [pid for pid, (rows, clicks) in counts.items() if _fittable(rows, clicks)]
        params = _newton(frame, fitted)
    finally:
        frame.unpersist()
    by_pid: dict[str, PlacementCalibration] = {}
    report: dict[str, Any] = {}
    for pid, (rows, clicks) in sorted(counts.items()):
        entry: dict[str, Any] = {"rows": rows, "clicks": int(clicks)}
        slope, offset = params.get(pid, (math.nan, math.nan))
        if pid not in fitted:
            entry["calibrated"] = False
            entry["why_not"] = f"needs {MIN_ROWS} rows with clicks and non-clicks"
        elif not (math.isfinite(slope) and math.isfinite(offset) and slope > 0):
            entry["calibrated"] = False
            entry["why_not"] = "the fit did not converge to a positive slope"
        else:
            by_pid[pid] = PlacementCalibration(slope, offset)
            entry.update(calibrated=True, slope=slope, offset=offset)
        report[pid] = entry
    return Calibration(by_pid), report


def _fittable(rows: int, clicks: float) -> bool:
    return rows >= MIN_ROWS and 0 < clicks < rows


def _newton(frame: DataFrame, pids: list[str]) -> dict[str, tuple[float, float]]:
    """Maximum-likelihood (slope, offset) of each pid; NaN for a fit that diverged."""
    params = dict.fromkeys(pids, (1.0, 0.0))
    pending = set(pids)
    for _ in range(MAX_STEPS):
        if not pending:
            break
        slope = _per_pid({pid: params[pid][0] for pid in pending})
        offset = _per_pid({pid: params[pid][1] for pid in pending})
        p = F.lit(1.0) / (F.lit(1.0) + F.exp(-(slope * F.col("z") + offset)))
        weight = p * (F.lit(1.0) - p)
        residual = F.col("y") - p
        sums = (
            frame.where(F.col("pid").isin(sorted(pending)))
            .groupBy("pid")
            .agg(
                F.sum(residual * F.col("z")).alias("g_slope"),
                F.sum(residual).alias("g_offset"),
                F.sum(weight * F.col("z") * F.col("z")).alias("h_ss"),
                F.sum(weight * F.col("z")).alias("h_so"),
                F.sum(weight).alias("h_oo"),
            )
            .collect()
        )
        for row in sums:
            pid = row["pid"]
            hessian = np.array([[row["h_ss"], row["h_so"]], [row["h_so"], row["h_oo"]]])
            gradient = np.array([row["g_slope"], row["g_offset"]])
            try:
                step = np.linalg.solve(hessian, gradient)
            except np.linalg.LinAlgError:
                params[pid] = (math.nan, math.nan)
                pending.discard(pid)
                continue
            current = np.array(params[pid])
            updated = current + step
            params[pid] = (float(updated[0]), float(updated[1]))
            if not np.isfinite(updated).all() or np.max(np.abs(step)) <= CONVERGED:
                pending.discard(pid)
    return params


def _per_pid(values: dict[str, float]) -> Column:
    expression: Column | None = None
    for pid, value in values.items():
        expression = (
            F.when(F.col("pid") == pid, F.lit(value))
            if expression is None
            else expression.when(F.col("pid") == pid, F.lit(value))
        )
    assert expression is not None  # called with at least one pid
    return expression


def calibrated(scored: DataFrame, calibration: Calibration) -> DataFrame:
    """``scored`` (with ``pid`` and ``probability``) with each probability calibrated."""
    schema = scored.schema
    names = schema.names
    position = names.index("probability")

    def apply(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            pids = batch.column("pid").to_numpy(zero_copy_only=False)
            ctrs = batch.column("probability").to_numpy(zero_copy_only=False)
            columns = list(batch.columns)
            columns[position] = pa.array(calibration.apply_rows(pids, ctrs), pa.float64())
            yield pa.RecordBatch.from_arrays(columns, names=names)

    out = T.StructType(
        [
            T.StructField(f.name, T.DoubleType()) if f.name == "probability" else f
            for f in schema.fields
        ]
    )
    return scored.mapInArrow(apply, out)
