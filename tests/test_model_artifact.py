"""The CTR model artifact: JSON round trip, spec binding, refusal of mismatches."""

import json

import numpy as np
import pytest

from adrec.core.features import COURSE, FULL
from adrec.core.model import CtrModel, ModelArtifactError


def model(spec=COURSE):
    weights = np.linspace(-1, 1, spec.dim)
    return CtrModel(
        spec=spec,
        weights=weights,
        intercept=-3.0,
        metrics={"auc": 0.61},
        trained_at="2026-11-28T00:00:00Z",
    )


def test_round_trip_preserves_weights_exactly():
    original = model(FULL)
    restored = CtrModel.from_json(original.to_json())
    np.testing.assert_array_equal(restored.weights, original.weights)
    assert restored.intercept == -3.0
    assert restored.spec is FULL
    assert restored.metrics == {"auc": 0.61}


def test_artifact_is_plain_json_with_named_weights():
    document = json.loads(model().to_json())
    assert document["format"] == "adrec.ctr_model.v1"
    assert document["feature_spec_id"] == COURSE.spec_id
    assert list(document["weights"]) == COURSE.feature_names


def test_predict_is_the_logistic_function():
    m = model()
    x = np.zeros((2, COURSE.dim), dtype=np.float32)
    x[1, 0] = 1.0
    expected = 1 / (1 + np.exp(-np.array([-3.0, -3.0 + m.weights[0]])))
    np.testing.assert_allclose(m.predict(x), expected)


def test_mismatched_feature_spec_is_refused():
    document = json.loads(model().to_json())
    document["feature_spec_id"] = "course-v1-000000000000"
    with pytest.raises(ModelArtifactError, match="trained with feature spec"):
        CtrModel.from_json(json.dumps(document))


def test_reordered_weights_are_refused():
    document = json.loads(model().to_json())
    names = list(document["weights"])
    document["weights"] = {n: document["weights"][n] for n in reversed(names)}
    with pytest.raises(ModelArtifactError, match="order"):
        CtrModel.from_json(json.dumps(document))


@pytest.mark.parametrize(
    "raw", [b"\x80\x04K\x01.", b"[]", b'{"format": "pickle"}', b'{"format": "adrec.ctr_model.v1"}']
)
def test_foreign_or_broken_artifacts_are_refused(raw):
    with pytest.raises(ModelArtifactError):
        CtrModel.from_json(raw)


def test_wrong_weight_count_and_non_finite_weights():
    with pytest.raises(ModelArtifactError, match="weights"):
        CtrModel(spec=COURSE, weights=np.zeros(3), intercept=0.0)
    with pytest.raises(ModelArtifactError, match="finite"):
        CtrModel(spec=COURSE, weights=np.full(COURSE.dim, np.nan), intercept=0.0)


def test_calibration_round_trips_and_applies_per_placement():
    import dataclasses

    from adrec.core.dataset import PIDS
    from adrec.core.model import Calibration, PlacementCalibration

    calibration = Calibration({PIDS[0]: PlacementCalibration(1.5, -0.25)})
    calibrated = dataclasses.replace(model(), calibration=calibration)
    document = json.loads(calibrated.to_json())
    assert document["calibration"] == {PIDS[0]: {"slope": 1.5, "offset": -0.25}}
    loaded = CtrModel.from_json(calibrated.to_json())
    assert loaded.calibration == calibration
    ctrs = np.array([0.01, 0.05, 0.3])
    logits = np.log(ctrs / (1 - ctrs))
    np.testing.assert_allclose(
        loaded.calibration.apply(PIDS[0], ctrs), 1 / (1 + np.exp(-(1.5 * logits - 0.25)))
    )
    # Another placement, and an artifact written before calibration, keep the CTRs.
    np.testing.assert_array_equal(loaded.calibration.apply(PIDS[1], ctrs), ctrs)
    del document["calibration"]
    assert CtrModel.from_json(json.dumps(document)).calibration == Calibration()
    rows = loaded.calibration.apply_rows(np.array([PIDS[1], PIDS[0]]), ctrs[:2])
    assert rows[0] == ctrs[0] and rows[1] == loaded.calibration.apply(PIDS[0], ctrs[1:2])[0]


@pytest.mark.parametrize(
    "bad", [{"p": {"slope": 0.0, "offset": 0.0}}, {"p": {"slope": 1.0}}, {"p": "x"}, []]
)
def test_a_bad_calibration_is_refused(bad):
    document = json.loads(model().to_json())
    document["calibration"] = bad
    with pytest.raises(ModelArtifactError, match="calibration"):
        CtrModel.from_json(json.dumps(document))
