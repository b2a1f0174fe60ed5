"""The factorization machine: Spark's FMClassifier, its numpy artifact, and the comparison.

Real local Spark on small frames; the artifact's checks need no Spark.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import functions as F  # noqa: N812
from test_job_ctr import driver_columns, random_examples

from adrec.core.dataset import PIDS
from adrec.core.features import COURSE, FULL
from adrec.core.fm import FmModel
from adrec.core.model import ModelArtifactError
from jobs import ctr, fm

SMALL = fm.FmConfig(factor_size=4, max_iter=10)


def random_fm(spec=FULL, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return FmModel(spec, rng.normal(0, 0.5, spec.dim), rng.normal(0, 0.3, (spec.dim, k)), -2.0)


# ------------------------------------------------------------------ the numpy artifact


def test_margin_is_the_pairwise_sum_written_out():
    model = random_fm(COURSE)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (5, COURSE.dim)).astype(np.float32)
    for row, margin in zip(x.astype(np.float64), model.margin(x), strict=True):
        pairs = sum(
            float(model.factors[i] @ model.factors[j]) * row[i] * row[j]
            for i, j in itertools.combinations(range(COURSE.dim), 2)
        )
        assert margin == pytest.approx(model.intercept + row @ model.linear + pairs, rel=1e-12)
    np.testing.assert_allclose(model.predict(x), 1 / (1 + np.exp(-model.margin(x))), rtol=1e-14)
    # No overflow at extreme margins.
    with np.errstate(over="raise", invalid="raise"):
        extreme = FmModel(COURSE, np.full(COURSE.dim, 1e3), model.factors, 0.0)
        assert extreme.predict(-np.ones((1, COURSE.dim)))[0] == 0.0


def test_artifact_round_trips_through_json():
    model = dataclasses.replace(random_fm(), metrics={"auc": 0.7}, trained_at="t")
    loaded = FmModel.from_json(model.to_json())
    np.testing.assert_array_equal(loaded.linear, model.linear)
    np.testing.assert_array_equal(loaded.factors, model.factors)
    assert loaded.intercept == model.intercept and loaded.spec == FULL
    assert loaded.metrics == {"auc": 0.7} and loaded.trained_at == "t"
    document = json.loads(model.to_json())
    assert list(document["linear"]) == FULL.feature_names
    assert document["factor_size"] == 3


def _edited(change):
    document = json.loads(random_fm().to_json())
    change(document)
    return json.dumps(document)


def _rename_first(section):
    def change(document):
        names = list(document[section])
        document[section] = {"renamed": document[section][names[0]]} | {
            name: document[section][name] for name in names[1:]
        }

    return change


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x80\x04pickle", "not JSON"),
        ('{"format": "adrec.ctr_model.v1"}', "format is not"),
        (_edited(lambda d: d.pop("factors")), "missing or has a bad field"),
        (_edited(lambda d: d.update(feature_set="nope")), "unknown feature set"),
        (_edited(lambda d: d.update(feature_spec_id="full-v1-000")), "retrain"),
        (_edited(_rename_first("linear")), "names do not match"),
        (_edited(_rename_first("factors")), "names do not match"),
        (_edited(lambda d: d.update(factor_size=4)), "must list 4 numbers"),
        (_edited(lambda d: d.update(factor_size=0)), "at least 1"),
        (_edited(lambda d: d["factors"].update({FULL.feature_names[0]: ["a", 1, 2]})), "numbers"),
        (_edited(lambda d: d.update(intercept="x")), "bad field"),
    ],
)
def test_a_malformed_artifact_is_refused_with_a_clear_error(raw, message):
    with pytest.raises(ModelArtifactError, match=message):
        FmModel.from_json(raw)


def test_shapes_and_finiteness_are_checked():
    model = random_fm(COURSE)
    with pytest.raises(ModelArtifactError, match="linear weights"):
        FmModel(COURSE, model.linear[:-1], model.factors, 0.0)
    with pytest.raises(ModelArtifactError, match="matrix"):
        FmModel(COURSE, model.linear, model.factors[:-1], 0.0)
    with pytest.raises(ModelArtifactError, match="finite"):
        FmModel(COURSE, model.linear, np.full_like(model.factors, np.inf), 0.0)
    with pytest.raises(ModelArtifactError, match="finite"):
        FmModel(COURSE, model.linear, model.factors, float("nan"))


# ------------------------------------------------------------------ config


def test_config_defaults_and_checks():
    config = fm.FmConfig()
    assert config.factor_size >= 1 and 0 < config.step_size < 1 and config.solver == "adamW"
    for bad in (
        {"factor_size": 0},
        {"max_iter": 0},
        {"step_size": 0.0},
        {"reg_param": -1.0},
        {"mini_batch_fraction": 0.0},
        {"mini_batch_fraction": 1.5},
        {"init_std": 0.0},
        {"solver": "lbfgs"},
    ):
        with pytest.raises(ValueError):
            fm.FmConfig(**bad)


def test_fm_wins_only_by_the_margin():
    assert fm.fm_wins({"auc": 0.705}, {"auc": 0.7})
    assert not fm.fm_wins({"auc": 0.7049}, {"auc": 0.7})
    assert not fm.fm_wins({"auc": None}, {"auc": 0.5})
    assert not fm.fm_wins({"auc": 0.9}, {})


# ------------------------------------------------------------------ in Spark


@pytest.mark.spark
def test_numpy_artifact_predicts_sparks_probabilities(spark):
    examples = random_examples(spark, rows=600).cache()
    fitted = fm.fit(examples, FULL, SMALL)
    model = fm.to_fm_model(fitted, FULL)
    assert model.factor_size == 4 and np.abs(model.factors).sum() > 0

    train = examples.where(F.col("split") == "train").orderBy("user_id")
    encoded = ctr.encode_features(train, FULL)
    scored = fitted.transform(encoded.withColumn("features", array_to_vector("features")))
    spark_probability = np.array(
        scored.select(vector_to_array("probability")[1].alias("p")).toPandas()["p"]
    )
    assert spark_probability.std() > 1e-4
    np.testing.assert_allclose(
        model.predict(FULL.encode(driver_columns(train))), spark_probability, rtol=0, atol=1e-6
    )
    on_executors = ctr.predict(train, FmModel.from_json(model.to_json())).toPandas()
    np.testing.assert_allclose(on_executors["probability"], spark_probability, rtol=0, atol=1e-6)
    assert on_executors["user_id"].tolist() == sorted(on_executors["user_id"])
    examples.unpersist()


def interaction_examples(spark):
    """Clicks driven by an interaction alone: likely when the placement is the first pid
    XOR the gender is 1, so neither one-hot on its own says anything."""
    examples = random_examples(spark, rows=1_600, seed=5)
    first_pid = F.col("pid") == PIDS[0]
    female = F.coalesce(F.col("gender") == 1, F.lit(False))
    probability = F.when(first_pid != female, 0.5).otherwise(0.05)
    draw = F.pmod(F.xxhash64("user_id", F.lit(3)), F.lit(10_000)) / 10_000
    return examples.withColumns(
        {
            "label": (draw < probability).cast("double"),
            # Two rows per user, so the group AUC has users with both classes.
            "user_id": F.col("user_id") % 800,
        }
    )


@pytest.mark.spark
def test_fm_learns_an_interaction_the_logistic_regression_cannot(spark):
    examples = interaction_examples(spark).cache()
    _, lr = ctr.train_ctr_model(examples, COURSE, ctr.CtrConfig(reg_param=0.01))
    model, metrics = fm.train_fm_model(examples, COURSE, fm.FmConfig(max_iter=30))
    assert metrics["model"] == "fm" and metrics["feature_set"] == "course"
    assert metrics["test_rows"] == lr["test_rows"] == 400
    assert model.metrics == metrics
    assert lr["auc"] < 0.6 < metrics["auc"]
    assert fm.fm_wins(metrics, lr)
    assert metrics["gauc_users"] > 0 and metrics["gauc"] is not None
    assert metrics["normalized_entropy"] < lr["normalized_entropy"]
    assert metrics["mean_predicted"] == pytest.approx(metrics["observed_ctr"], abs=0.05)
    examples.unpersist()
