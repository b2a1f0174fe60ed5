"""The quality report's pictures and page, from metrics the evaluation really computes."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from PIL import Image

from jobs import evaluation, plots
from jobs.report import render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Matplotlib's first two cycle colours: the first and second model's curves.
FIRST, SECOND = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def scored(spark, seed, noise):
    """Labels drawn from true probabilities, predictions blurred by ``noise`` logits."""
    rng = np.random.default_rng(seed)
    truth = rng.beta(2, 20, 3_000)
    labels = (rng.random(truth.size) < truth).astype(float)
    logits = np.log(truth / (1 - truth)) + rng.normal(0, noise, truth.size)
    predicted = 1 / (1 + np.exp(-logits))
    users = rng.integers(0, 300, truth.size)
    rows = [
        (float(y), float(p), float(t), int(u))
        for y, p, t, u in zip(labels, predicted, truth, users, strict=True)
    ]
    return spark.createDataFrame(rows, "label double, probability double, truth double, user int")


@pytest.fixture(scope="module")
def metrics(spark):
    frame = scored(spark, 1, 1.0).cache()
    models = {
        "course": evaluation.evaluate(scored(spark, 2, 3.0), user="user"),
        "full": evaluation.evaluate(frame, user="user"),
    }
    oracle = evaluation.evaluate(frame, probability="truth", user="user")
    frame.unpersist()
    return models, oracle


def png_size(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def colour_share(image, colour, tolerance=12):
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    near = (np.abs(pixels - np.array(colour)) <= tolerance).all(axis=2)
    return near.mean()


@pytest.mark.spark
def test_pngs_are_valid_of_the_right_size_and_show_every_curve(tmp_path, metrics):
    models, oracle = metrics
    paths = plots.write_plots(tmp_path / "out", models, oracle, served="full")
    assert set(paths) == {"roc.png", "reliability.png", "report.html"}
    width, height = plots.FIGURE_SIZE[0] * plots.DPI, plots.FIGURE_SIZE[1] * plots.DPI
    for name in ("roc.png", "reliability.png"):
        path = tmp_path / "out" / name
        assert paths[name] == path and png_size(path) == (width, height)
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size == (width, height)
            grey = np.asarray(image.convert("L"))
            # Not blank: mostly white background, but axes, text and curves drawn on it.
            assert grey.std() > 10 and (grey < 128).mean() > 0.005
            # One curve per model in its own colour, and the oracle in black.
            assert colour_share(image, FIRST) > 0.0005
            assert colour_share(image, SECOND) > 0.0005


@pytest.mark.spark
def test_the_page_names_every_model_its_auc_and_the_images(tmp_path, metrics):
    models, oracle = metrics
    paths = plots.write_plots(tmp_path, models, oracle, served="full")
    page = paths["report.html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    for name, result in {**models, "oracle": oracle}.items():
        row = re.search(rf"<tr[^>]*><th>{name}[^<]*</th>(.*?)</tr>", page)
        assert row, name
        cells = re.findall(r"<td>([^<]*)</td>", row.group(1))
        assert cells[0] == f"{result['auc']:.4f}"
        assert cells[1] == f"{result['gauc']:.4f}"
        assert cells[5] == f"{result['normalized_entropy']:.4f}"
    assert "<th>full (served)</th>" in page
    assert '<tr class="oracle">' in page
    for image in ("roc.png", "reliability.png"):
        assert f'href="{image}"' in page
    assert page.count('src="data:image/png;base64,') == 2
    # Self-contained: nothing is fetched from elsewhere.
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_a_model_without_a_curve_still_gets_its_row(tmp_path):
    one_class = {
        "test_rows": 4,
        "auc": None,
        "logloss": 0.1,
        "reliability": [
            {
                "rows": 4,
                "min_predicted": 0.1,
                "max_predicted": 0.1,
                "mean_predicted": 0.1,
                "observed_ctr": 0.0,
            }
        ],
        "roc": {"threshold": [], "fpr": [], "tpr": []},
    }
    fm_on_course = {**one_class, "auc": 0.61, "feature_set": "course"}
    paths = plots.write_plots(tmp_path, {"course": one_class, "fm": fm_on_course})
    page = paths["report.html"].read_text()
    assert "<th>course</th><td>-</td>" in page
    assert "<th>fm (course)</th><td>0.6100</td>" in page
    assert 'class="oracle"' not in page
    assert png_size(paths["roc.png"]) == (800, 600)


def test_no_models_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no model"):
        plots.write_plots(tmp_path, {})


def test_the_text_report_shows_gauc_ne_and_every_model_with_the_oracle_last():
    def result(auc, gauc, ne, feature_set):
        return {
            "feature_set": feature_set,
            "auc": auc,
            "gauc": gauc,
            "logloss": 0.19,
            "normalized_entropy": ne,
            "mean_predicted": 0.05,
            "observed_ctr": 0.05,
            "calibration_error": 0.001,
        }

    ctr = {
        "served_feature_set": "full",
        "course": result(0.54, 0.51, 0.99, "course"),
        "full": result(0.68, 0.61, 0.95, "full"),
        "fm": result(0.69, 0.62, 0.94, "full"),
        "oracle": result(0.71, None, 0.93, None),
    }
    text = render_report({"ctr": ctr})
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["model", "AUC", "gAUC"])
    assert lines[header].split()[3:5] == ["logloss", "NE"]
    rows = [line.split() for line in lines[header + 2 : header + 6]]
    assert [row[0] for row in rows] == ["course", "full", "fm", "oracle"]
    assert rows[2][:5] == ["fm", "(full)", "0.6900", "0.6200", "0.1900"]
    assert rows[2][5] == "0.9400"
    assert rows[3][:3] == ["oracle", "0.7100", "-"]
    # The FM's verdict against the regression on its own feature set, by the margin.
    assert "AUC +0.0100 against the regression, enough to be worth serving" not in text
    ctr["fm"] = {**ctr["fm"], "train_rows": 1200, "wins": True, "serving_margin": 0.005}
    verdict = render_report({"ctr": ctr})
    assert (
        "factorization machine on full (1,200 training rows): AUC +0.0100 against the "
        "regression, enough to be worth serving (+0.005 needed)" in verdict
    )
    ctr["fm"]["wins"] = False
    assert "not enough to serve it" in render_report({"ctr": ctr})
    # No oracle on real data: no row for it.
    del ctr["oracle"]
    assert "oracle" not in render_report({"ctr": ctr})
