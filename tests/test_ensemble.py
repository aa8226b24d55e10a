"""The exported ensemble averages temperature-scaled member probabilities (and flips with TTA)."""

import keras
import numpy as np
import pytest

from melanoma_dist.inference.ensemble import Ensemble
from melanoma_dist.model.build import probabilities
from melanoma_dist.report.calibration import apply_temperature

pytestmark = pytest.mark.integration


def _manual(model_dir, spec, x):
    out = []
    for m in spec["members"]:
        member = keras.models.load_model(model_dir / m, compile=False)
        p = probabilities(member.predict(x, verbose=0), 2)
        out.append(apply_temperature(p, spec["calibration"]["temperature"]))
    return np.mean(out, axis=0), out


def test_predict_is_the_mean_of_calibrated_members_and_tta_adds_the_flip(exported_model):
    model = Ensemble.load(exported_model)
    x = np.random.default_rng(0).random((5, 16, 16, 3)).astype(np.float32)
    want, _ = _manual(exported_model, model.spec, x)
    got = model.predict(x)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    flipped, _ = _manual(exported_model, model.spec, x[:, :, ::-1, :])
    np.testing.assert_allclose(model.predict(x, tta=True), (want + flipped) / 2, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, tta="flip"), (want + flipped) / 2, atol=1e-6)
    # Dihedral: the mean over the 4 rotations of the image and of its mirror.
    dihedral = [_manual(exported_model, model.spec, np.ascontiguousarray(np.rot90(v, k, axes=(1, 2))))[0]
                for v in (x, x[:, :, ::-1, :]) for k in range(4)]
    np.testing.assert_allclose(model.predict(x, tta="dihedral"), np.mean(dihedral, axis=0), atol=1e-6)
    np.testing.assert_array_equal(model.decide(got), got[:, 1] >= model.threshold)
    assert model.predict(x[:0]).shape == (0, 2)


def test_predict_rejects_wrong_shapes(exported_model):
    model = Ensemble.load(exported_model)
    with pytest.raises(ValueError, match=r"shape \[N, 16, 16, 3\]"):
        model.predict(np.zeros((2, 32, 32, 3)))
