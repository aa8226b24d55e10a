"""Bootstrap intervals and weighted statistics, against scikit-learn and constructed cases."""

import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma_dist.report import bootstrap as bs


def _scores(n, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.normal(size=n) + signal * y
    return y, np.round(s, 1)  # rounding makes ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_roc_auc_equals_sklearn_with_ties_and_weights(seed):
    y, s = _scores(300, seed)
    w = np.random.default_rng(seed + 10).integers(0, 4, size=(5, 300)).astype(float)
    got = bs.weighted_roc_auc(y, s, w)
    want = [skm.roc_auc_score(y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert bs.weighted_roc_auc(y, s, np.ones(300))[0] == pytest.approx(skm.roc_auc_score(y, s))


def test_weighted_roc_auc_undefined_with_one_class():
    assert np.isnan(bs.weighted_roc_auc([1, 1, 1], [0.1, 0.2, 0.3], np.ones(3))[0])


def test_weighted_balanced_accuracy_and_accuracy_equal_sklearn():
    rng = np.random.default_rng(3)
    y, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    w = rng.integers(0, 3, size=(4, 200)).astype(float)
    np.testing.assert_allclose(bs.weighted_balanced_accuracy(y, pred, 4, w),
                               [skm.balanced_accuracy_score(y, pred, sample_weight=r) for r in w])
    np.testing.assert_allclose(bs.weighted_accuracy(y, pred, w),
                               [skm.accuracy_score(y, pred, sample_weight=r) for r in w])


def test_weighted_recall_known_case():
    # 3 positives, 2 found; weights double the missed one: 2 / (2 + 2) = 0.5.
    got = bs.weighted_recall([1, 1, 1, 0], [1, 1, 0, 1], np.array([1.0, 1.0, 2.0, 5.0]))
    assert got[0] == pytest.approx(0.5)


def test_ci_contains_estimate_and_is_narrower_with_more_data():
    widths = []
    for n in (150, 1500):
        y, s = _scores(n, seed=5)
        ci = bs.bootstrap_ci(lambda w: bs.weighted_roc_auc(y, s, w), y, n_boot=500, seed=1)
        assert ci.low <= ci.estimate <= ci.high
        assert ci.estimate == pytest.approx(skm.roc_auc_score(y, s))
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(10) of the width


def test_resampling_keeps_groups_whole_and_strata_sized():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0])
    groups = np.array(["a", "a", "b", "c", "c", "d", "e", "e", "f"])
    for w in bs.resample_weights(labels, groups, n_boot=50, seed=0):
        for g in np.unique(groups):
            m = groups == g
            assert (w[:, m] == w[:, m][:, :1]).all()  # every image of a group has the group's draw count
        # label-0 groups a, b, d, f (4 of them) and label-1 groups c, e (2) are drawn 4 and 2 times.
        first = {g: np.flatnonzero(groups == g)[0] for g in np.unique(groups)}
        counts0 = sum(w[:, first[g]] for g in "abdf")
        counts1 = sum(w[:, first[g]] for g in "ce")
        assert (counts0 == 4).all() and (counts1 == 2).all()


def test_identical_images_of_a_group_equal_one_weighted_image_per_group():
    """A group of m identical images (same label, same score) is one image of weight m."""
    rng = np.random.default_rng(7)
    n_groups = 80
    g_label = (np.arange(n_groups) % 3 == 0).astype(int)
    g_score = rng.normal(size=n_groups) + g_label
    sizes = rng.integers(1, 5, n_groups)
    ids = np.array([f"g{i:03d}" for i in range(n_groups)])
    # A: every image listed; B: one row per group with a weight.
    y_a, s_a, grp_a = np.repeat(g_label, sizes), np.repeat(g_score, sizes), np.repeat(ids, sizes)
    ci_a = bs.bootstrap_ci(lambda w: bs.weighted_roc_auc(y_a, s_a, w), y_a, grp_a, n_boot=300, seed=4)
    ci_b = bs.bootstrap_ci(lambda w: bs.weighted_roc_auc(g_label, g_score, w), g_label, ids,
                           weights=sizes, n_boot=300, seed=4)
    assert ci_a.n_units == ci_b.n_units == n_groups and ci_a.unit == "group"
    assert (ci_a.estimate, ci_a.low, ci_a.high) == pytest.approx((ci_b.estimate, ci_b.low, ci_b.high), abs=1e-12)
    # Resampling the images instead would ignore the correlation: a narrower interval.
    ci_img = bs.bootstrap_ci(lambda w: bs.weighted_roc_auc(y_a, s_a, w), y_a, None, n_boot=300, seed=4)
    assert ci_img.high - ci_img.low < ci_a.high - ci_a.low


def test_same_seed_same_interval():
    y, s = _scores(200, 1)
    a = bs.bootstrap_ci(lambda w: bs.weighted_roc_auc(y, s, w), y, n_boot=100, seed=3)
    b = bs.bootstrap_ci(lambda w: bs.weighted_roc_auc(y, s, w), y, n_boot=100, seed=3)
    assert a == b
    assert "95% CI" in a.format()


INVALID_CASES = [
    (dict(labels=[]), ValueError),
    (dict(labels=[0, 1], n_boot=0), ValueError),
    (dict(labels=[0, 1], confidence=1.5), ValueError),
    (dict(labels=[0, 1], groups=["a"]), ValueError),
    (dict(labels=[0, 1], weights=[1.0]), ValueError),
]


@pytest.mark.parametrize("kwargs, exc", INVALID_CASES)
def test_invalid_inputs(kwargs, exc):
    with pytest.raises(exc):
        bs.bootstrap_ci(lambda w: w.sum(axis=1), **kwargs)
