"""Pictures of the CTR models' day-8 quality: ROC and reliability curves, and one HTML page.

:func:`write_plots` ``(out_dir, models, oracle=None, served=None)`` takes the metrics
:func:`jobs.evaluation.evaluate` returns, one entry per model (each feature set's logistic
regression, the factorization machine), and writes into ``out_dir``:

- ``roc.png``: every model's ROC curve (the ``roc`` points), labelled with its AUC, with
  the diagonal of a random ranking;
- ``reliability.png``: every model's reliability bins, mean prediction against observed
  CTR, with the diagonal of perfect calibration; both axes span the predictions'
  range, since CTRs crowd near zero;
- ``report.html``: a page needing nothing else, the metrics table of every model (and
  the oracle's row when there is one) and both pictures, embedded and linked.

The oracle, the synthetic data's true probabilities, is drawn in black and dashed:
the best any model can do. Matplotlib draws on its Agg canvas, so no display is needed.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jobs.report import ORACLE, ctr_models, model_label

ROC_FILE = "roc.png"
RELIABILITY_FILE = "reliability.png"
HTML_FILE = "report.html"
#: Inches at 100 dots per inch: 800 x 600 pixels.
FIGURE_SIZE = (8.0, 6.0)
DPI = 100

Metrics = Mapping[str, Any]

#: The report table's columns: heading, metrics key, digits (None: a count).
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("AUC", "auc", 4),
    ("gAUC", "gauc", 4),
    ("gAUC users", "gauc_users", None),
    ("gAUC impressions", "gauc_impressions", None),
    ("logloss", "logloss", 4),
    ("NE", "normalized_entropy", 4),
    ("mean predicted", "mean_predicted", 4),
    ("observed CTR", "observed_ctr", 4),
    ("calibration error", "calibration_error", 4),
    ("test rows", "test_rows", None),
)


def write_plots(
    out_dir: str | Path,
    models: Mapping[str, Metrics],
    oracle: Metrics | None = None,
    served: str | None = None,
) -> dict[str, Path]:
    """Writes the two PNGs and the page into ``out_dir`` (created if missing); returns
    their paths by file name. ``served`` names the model the version serves."""
    if not models:
        raise ValueError("no model metrics to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {**models, **({ORACLE: oracle} if oracle else {})}
    paths = {
        ROC_FILE: out / ROC_FILE,
        RELIABILITY_FILE: out / RELIABILITY_FILE,
        HTML_FILE: out / HTML_FILE,
    }
    _draw(_roc, curves, paths[ROC_FILE])
    _draw(_reliability, curves, paths[RELIABILITY_FILE])
    paths[HTML_FILE].write_text(
        render_html(models, oracle, served, paths[ROC_FILE], paths[RELIABILITY_FILE]),
        encoding="utf-8",
    )
    return paths


def write_report_plots(out_dir: str | Path, ctr: Mapping[str, Any]) -> dict[str, Path]:
    """:func:`write_plots` for a job report's CTR section: every model it lists, its
    oracle and its served feature set."""
    models = {name: metrics for name, metrics in ctr_models(ctr) if name != ORACLE}
    return write_plots(out_dir, models, ctr.get(ORACLE), served=ctr.get("served_feature_set"))


def _style(name: str) -> dict[str, Any]:
    return {"color": "black", "linestyle": "--"} if name == ORACLE else {}


def _draw(
    plot: Callable[[Axes, Mapping[str, Metrics]], None], curves: Mapping[str, Metrics], path: Path
) -> None:
    # A figure of its own on an Agg canvas, not pyplot: no display, no global figure state.
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    plot(axes, curves)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")


def _label(name: str, metrics: Metrics, key: str, heading: str) -> str:
    value = metrics.get(key)
    shown = f"{value:.4f}" if value is not None else "-"
    return f"{model_label(name, metrics)} ({heading} {shown})"


def _roc(axes: Axes, curves: Mapping[str, Metrics]) -> None:
    axes.plot([0, 1], [0, 1], color="grey", linewidth=1, label="random")
    for name, metrics in curves.items():
        roc = metrics.get("roc") or {}
        if roc.get("fpr"):
            axes.plot(
                roc["fpr"], roc["tpr"], label=_label(name, metrics, "auc", "AUC"), **_style(name)
            )
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC, day 8",
    )


def _reliability(axes: Axes, curves: Mapping[str, Metrics]) -> None:
    highest = 0.0
    for name, metrics in curves.items():
        bins = metrics.get("reliability") or []
        if bins:
            predicted = [b["mean_predicted"] for b in bins]
            observed = [b["observed_ctr"] for b in bins]
            highest = max(highest, *predicted, *observed)
            label = _label(name, metrics, "calibration_error", "calibration error")
            axes.plot(predicted, observed, marker="o", label=label, **_style(name))
    top = min(1.0, highest * 1.05) if highest > 0 else 1.0
    axes.plot([0, top], [0, top], color="grey", linewidth=1, label="perfect calibration")
    axes.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel="mean predicted CTR (per bin of equal rows)",
        ylabel="observed CTR",
        title="Reliability, day 8",
    )


def _cell(value: Any, digits: int | None) -> str:
    if value is None:
        return "-"
    if digits is None:
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def _embedded(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (
        f'<figure><a href="{name}"><img src="data:image/png;base64,{data}" alt="{name}" '
        f'title="{name}"></a><figcaption><a href="{name}">{name}</a></figcaption></figure>'
    )


def render_html(
    models: Mapping[str, Metrics],
    oracle: Metrics | None,
    served: str | None,
    roc_png: Path,
    reliability_png: Path,
) -> str:
    """The report page; the PNGs are embedded and linked by their names, which resolve
    next to the page."""
    rows = [*models.items(), *([(ORACLE, oracle)] if oracle else [])]
    header = "".join(f"<th>{html.escape(heading)}</th>" for heading, _, _ in COLUMNS)
    body = []
    for name, metrics in rows:
        label = model_label(name, metrics)
        marks = " (served)" if name == served else ""
        kind = ' class="oracle"' if name == ORACLE else ""
        cells = "".join(f"<td>{_cell(metrics.get(key), digits)}</td>" for _, key, digits in COLUMNS)
        body.append(f"<tr{kind}><th>{html.escape(label + marks)}</th>{cells}</tr>")
    rows_html = "\n".join(body)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>adrec CTR models, day 8</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; }}
td {{ text-align: right; font-variant-numeric: tabular-nums; }}
tbody th {{ text-align: left; }}
tr.oracle {{ font-style: italic; color: #555; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style>
</head>
<body>
<h1>CTR models on day 8</h1>
<p>gAUC: each user's AUC weighted by their impressions, over the users with both a click
and a non-click. NE: logloss over the entropy of the observed CTR (below 1 beats
predicting the base rate). The oracle is the synthetic data's true click probability.</p>
<table>
<thead><tr><th>model</th>{header}</tr></thead>
<tbody>
{rows_html}
</tbody>
</table>
{_embedded(roc_png)}
{_embedded(reliability_png)}
</body>
</html>
"""
