"""Fold metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma_dist.metrics import classification_metrics


def test_binary_known_case():
    y = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # one false positive, one false negative
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), ["other", "melanoma"])
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["roc_auc"] == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered right
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["num_samples"] == 4


def test_multiclass_equals_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 300)
    logits = rng.normal(size=(300, 7)) + 2.0 * np.eye(7)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    m = classification_metrics(y, probs, names, melanoma_index=4)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["melanoma_roc_auc"] == pytest.approx(skm.roc_auc_score(y == 4, probs[:, 4]))
    assert m["per_class"]["mel"]["f1"] == pytest.approx(skm.f1_score(y == 4, pred == 4))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_absent_class_gives_undefined_auc_not_a_crash():
    y = [0, 0, 1, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["roc_auc"] is None and m["per_class"]["c"]["support"] == 0
    assert m["roc_auc"] == pytest.approx(1.0)  # macro over the classes present


@pytest.mark.parametrize("y,probs,message", [
    ([0, 1], np.ones((3, 2)) / 2, "probs must have shape (2, 2)"),
    ([0, 2], np.ones((2, 2)) / 2, "labels must be in [0, 2)"),
    ([], np.ones((0, 2)), "no samples"),
])
def test_invalid(y, probs, message):
    with pytest.raises(ValueError) as e:
        classification_metrics(y, probs, ["a", "b"])
    assert message in str(e.value)
