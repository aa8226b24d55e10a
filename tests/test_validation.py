"""Whole-fold validation metrics and the monitored metric."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from melanoma_dist.train.validation import fold_scores, monitored_metric


def test_fold_scores_binary():
    y = np.array([0, 0, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.7, 0.4, 0.2])
    s = fold_scores(y, np.stack([1 - p1, p1], 1))
    assert s["val_roc_auc"] == pytest.approx(roc_auc_score(y, p1))
    assert s["val_accuracy"] == pytest.approx(3 / 5)
    assert s["val_balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["val_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.4, 0.8])))


def test_fold_scores_one_class_and_multiclass():
    assert fold_scores(np.zeros(3, int), np.tile([[0.8, 0.2]], (3, 1)))["val_roc_auc"] == 0.5
    probs = np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3
    s = fold_scores(np.array([0, 1, 2, 1]), probs)
    assert "val_roc_auc" not in s and s["val_balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_monitored_metric():
    assert monitored_metric("auto", 2) == ("val_roc_auc", "max")
    assert monitored_metric("auto", 7) == ("val_balanced_accuracy", "max")
    assert monitored_metric("val_loss", 2) == ("val_loss", "min")
    with pytest.raises(ValueError, match="needs two classes"):
        monitored_metric("val_roc_auc", 7)
