"""Temperature scaling, ECE/Brier and threshold selection on constructed cases."""

import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma_dist.report import calibration as cal


def _binary(p):
    p = np.asarray(p, dtype=float)
    return np.stack([1 - p, p], axis=1)


def _miscalibrated(n=4000, sharpness=3.0, seed=0):
    """True P(y=1) = q; the model reports sigmoid(sharpness * logit(q)) (over-confident when > 1)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < q).astype(int)
    logit = np.log(q / (1 - q))
    return y, _binary(1 / (1 + np.exp(-sharpness * logit)))


def test_temperature_one_is_identity_and_binary_is_sigmoid_of_scaled_logit():
    p = np.array([0.01, 0.3, 0.5, 0.9])
    np.testing.assert_allclose(cal.apply_temperature(_binary(p), 1.0)[:, 1], p, atol=1e-9)
    logit = np.log(p / (1 - p))
    np.testing.assert_allclose(cal.apply_temperature(_binary(p), 2.5)[:, 1], 1 / (1 + np.exp(-logit / 2.5)))


def test_temperature_scaling_fixes_over_confidence():
    y, probs = _miscalibrated(sharpness=3.0)
    t = cal.fit_temperature(y, probs)
    assert t > 1 and t == pytest.approx(3.0, rel=0.15)
    scaled = cal.apply_temperature(probs, t)
    before = cal.expected_calibration_error(y, probs[:, 1])
    after = cal.expected_calibration_error(y, scaled[:, 1])
    assert after < before / 2
    assert cal.negative_log_likelihood(y, scaled) < cal.negative_log_likelihood(y, probs)
    # Ranking is unchanged, so is the AUC.
    assert skm.roc_auc_score(y, scaled[:, 1]) == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))


def test_temperature_below_one_for_under_confidence():
    y, probs = _miscalibrated(sharpness=0.5, seed=1)
    assert cal.fit_temperature(y, probs) < 1


def test_multiclass_temperature():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 3000)
    logits = rng.normal(size=(3000, 4)) + 1.5 * np.eye(4)[y]
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in true_p])  # labels drawn from the true probabilities
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
    t = cal.fit_temperature(y, sharp)
    assert t == pytest.approx(3.0, rel=0.15)
    assert cal.top_label_ece(y, cal.apply_temperature(sharp, t)) < cal.top_label_ece(y, sharp)


def test_ece_and_brier_known_values():
    # Two bins used: [0, .1] holds p=.1 x2 (0 of 2 positive); (.9, 1] holds p=.95 x2 (2 of 2).
    y, p = [0, 0, 1, 1], [0.1, 0.1, 0.95, 0.95]
    assert cal.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.1 + 0.5 * 0.05)
    assert cal.brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p))
    bins = cal.reliability_bins(y, p, 10)
    assert bins["count"][0] == 2 and bins["count"][9] == 2 and sum(bins["count"]) == 4
    assert bins["frac_pos"][9] == 1.0 and bins["mean_prob"][1] is None


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_target_sensitivity_and_is_the_highest(target):
    rng = np.random.default_rng(int(target * 100))
    y = (rng.random(500) < 0.2).astype(int)
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0, 1)
    op = cal.threshold_for_sensitivity(y, s, target)
    sens, spec = cal.sensitivity_specificity(y, s, op.threshold)
    assert sens >= target and op.sensitivity == sens and op.specificity == spec
    higher = np.min(s[y == 1][s[y == 1] > op.threshold], initial=np.inf)  # the next positive score up
    if np.isfinite(higher):
        assert cal.sensitivity_specificity(y, s, higher)[0] < target


def test_threshold_docstring_example():
    op = cal.threshold_for_sensitivity([0, 1, 1, 0, 1], [.2, .9, .6, .7, .4], target=0.66)
    assert op.threshold == 0.6 and op.sensitivity == pytest.approx(2 / 3) and op.specificity == 0.5


INVALID_CASES = [
    (lambda: cal.threshold_for_sensitivity([0, 1], [0.1, 0.9], 0.0), ValueError),
    (lambda: cal.threshold_for_sensitivity([0, 1], [0.1, 0.9], 1.5), ValueError),
    (lambda: cal.threshold_for_sensitivity([0, 0], [0.1, 0.9], 0.9), ValueError),  # no positives
    (lambda: cal.apply_temperature(_binary([0.5]), 0.0), ValueError),
    (lambda: cal.apply_temperature(np.array([0.5, 0.5]), 1.0), ValueError),  # not [N, C]
    (lambda: cal.fit_temperature([0, 2], _binary([0.1, 0.9])), ValueError),  # label outside classes
]


@pytest.mark.parametrize("call, exc", INVALID_CASES)
def test_invalid_inputs(call, exc):
    with pytest.raises(exc):
        call()


def test_calibrate_end_to_end():
    y, probs = _miscalibrated(sharpness=2.0, seed=3)
    c = cal.calibrate(y, probs, decision_index=1, target_sensitivity=0.9)
    assert c.temperature > 1 and c.after["ece"] < c.before["ece"]
    assert c.operating_point.sensitivity >= 0.9
    d = c.to_dict()
    assert d["operating_point"]["target_sensitivity"] == 0.9 and len(d["before"]["reliability"]["count"]) == 10
