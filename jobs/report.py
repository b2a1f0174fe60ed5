"""The human-readable form of a job's quality report (the JSON form is the report itself)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers, *[[_number(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  "
            + "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


#: The CTR section's entry of the synthetic data's true probabilities, shown last.
ORACLE = "oracle"
#: The CTR section's entry of the factorization machine compared on the behaviour set.
FM_ENTRY = "fm"


def ctr_models(ctr: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The CTR section's model metrics in report order: every model as the section lists
    them (the feature sets' regressions, the factorization machine), then the oracle."""
    models = [
        (name, metrics)
        for name, metrics in ctr.items()
        if name != ORACLE and isinstance(metrics, dict) and "auc" in metrics
    ]
    oracle = ctr.get(ORACLE)
    return [*models, *([(ORACLE, oracle)] if oracle else [])]


def model_label(name: str, metrics: Mapping[str, Any]) -> str:
    """A model's row label: its name, and its feature set when that is another name (an
    FM entry ``fm`` on ``behaviour`` reads ``fm (behaviour)``)."""
    feature_set = metrics.get("feature_set")
    return name if feature_set in (None, name) else f"{name} ({feature_set})"


def fm_lines(fm_metrics: Mapping[str, Any], lr_metrics: Mapping[str, Any]) -> list[str]:
    """Whether the factorization machine beat the regression on its feature set."""
    fm_auc, lr_auc = fm_metrics.get("auc"), lr_metrics.get("auc")
    gain = f"{fm_auc - lr_auc:+.4f}" if fm_auc is not None and lr_auc is not None else "n/a"
    verdict = "enough to be worth serving" if fm_metrics.get("wins") else "not enough to serve it"
    return [
        "",
        f"factorization machine on {fm_metrics.get('feature_set')} "
        f"({_number(fm_metrics.get('train_rows'))} training rows): AUC {gain} against "
        f"the regression, {verdict} (+{fm_metrics.get('serving_margin')} needed); the "
        "regression is served",
    ]


def calibration_lines(calibration: Mapping[str, Any]) -> list[str]:
    """The served model's per-pid calibration and its effect on day 8."""
    before, after = calibration.get("before", {}), calibration.get("after", {})
    lines = [
        "",
        "calibration of the served model per pid (fitted on training impressions held out "
        "of the fit), day 8",
        f"  calibration error {_number(before.get('calibration_error'))} before, "
        f"{_number(after.get('calibration_error'))} after; logloss "
        f"{_number(before.get('logloss'))} before, {_number(after.get('logloss'))} after",
    ]
    test = calibration.get("test_by_pid", {})
    rows = []
    for pid, fitted in calibration.get("pids", {}).items():
        day8 = test.get(pid, {})
        rows.append(
            [
                pid,
                fitted.get("rows"),
                fitted.get("slope") if fitted.get("calibrated") else "none",
                fitted.get("offset") if fitted.get("calibrated") else "-",
                day8.get("observed_ctr"),
                day8.get("mean_ctr"),
                day8.get("mean_pctr"),
            ]
        )
    return lines + _table(
        ["pid", "held-out rows", "slope", "offset", "observed CTR", "mean CTR", "mean pCTR"],
        rows,
    )


def render_report(report: dict[str, Any]) -> str:
    version = report.get("version") or "(not published)"
    previous = report.get("previous_version")
    lines = [
        f"adrec job report: version {version}"
        + (f" (previous {previous})" if previous else "")
        + f", {report.get('elapsed_seconds', 0):.0f}s, config {report.get('config_digest', '')}",
        "",
        "stages",
        *_table(
            ["stage", "seconds", "rows"],
            [[s["name"], f"{s['seconds']:.1f}", s["rows"]] for s in report.get("stages", [])],
        ),
    ]
    if ingest := report.get("ingest"):
        lines += ["", "ingest"]
        lines += _table(
            ["file", "rows", "clean", "rejected", "reasons"],
            [
                [
                    name,
                    t["rows"],
                    t["clean"],
                    t["rows"] - t["clean"],
                    ", ".join(f"{k}={v:,}" for k, v in t["rejected"].items()) or "-",
                ]
                for name, t in ingest.items()
            ],
        )
    if als := report.get("als"):
        lines += ["", "ALS"]
        lines += _table(
            ["users", "categories", "rank", "held-out RMSE", "mean-rating RMSE"],
            [
                [
                    als["als_users"],
                    als["als_categories"],
                    als["als_rank"],
                    als["als_holdout_rmse"],
                    als["als_baseline_rmse"],
                ]
            ],
        )
    if recall := report.get("recall"):
        lines += [
            "",
            f"recall ({recall['strategy']} published): {recall['users']:,} users, "
            f"{recall['full_lists']:,} full lists, {recall['filled_users']:,} filled "
            "from popular",
        ]
        lines += _table(
            ["day-8 hit rate", "clicked pairs", "hits", "rate"],
            [
                [name, r["clicked_pairs"], r["hits"], r["rate"]]
                for name, r in recall["hit_rate"].items()
            ],
        )
    if ctr := report.get("ctr"):
        lines += ["", f"CTR model (served: {ctr['served_feature_set']}), day 8"]
        lines += _table(
            [
                "model",
                "AUC",
                "gAUC",
                "logloss",
                "NE",
                "mean predicted",
                "observed CTR",
                "calibration error",
            ],
            [
                [
                    model_label(name, metrics),
                    metrics.get("auc"),
                    metrics.get("gauc"),
                    metrics.get("logloss"),
                    metrics.get("normalized_entropy"),
                    metrics.get("mean_predicted"),
                    metrics.get("observed_ctr"),
                    metrics.get("calibration_error"),
                ]
                for name, metrics in ctr_models(ctr)
            ],
        )
        if fm_metrics := ctr.get(FM_ENTRY):
            lines += fm_lines(fm_metrics, ctr.get(fm_metrics.get("feature_set", "")) or {})
        served = ctr.get(ctr["served_feature_set"]) or {}
        if calibration := served.get("calibration"):
            lines += calibration_lines(calibration)
    if offline := report.get("offline"):
        lines += [
            "",
            f"offline: {offline['lists']:,} lists of top {offline['top_n']} "
            f"scored at pid {offline['pid']}",
        ]
    if memory := report.get("memory"):
        lines += ["", "Redis memory of this version (estimated per family)"]
        rows = [[family, m["keys"], m["bytes"] / 1e6] for family, m in memory.items()]
        rows.append(
            [
                "total",
                sum(m["keys"] for m in memory.values()),
                sum(m["bytes"] for m in memory.values()) / 1e6,
            ]
        )
        lines += _table(["family", "keys", "MB"], rows)
    if removed := report.get("removed_versions"):
        lines += ["", f"removed old versions: {', '.join(removed)}"]
    return "\n".join(lines)
