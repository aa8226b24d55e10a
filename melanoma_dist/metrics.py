"""Classification metrics of a fold, computed with scikit-learn on the full fold.

Metrics are always computed from the complete set of predictions (gathered from
every worker), never averaged from per-batch or per-worker values. A metric that
needs a class the samples lack is None (undefined), never a number that looks
like a score, and the missing classes are listed and logged.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

logger = logging.getLogger(__name__)


def _auc_or_none(y_binary: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC, or None when only one class is present (AUC is undefined)."""
    if y_binary.min() == y_binary.max():
        return None
    return float(skm.roc_auc_score(y_binary, scores))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str],
                           melanoma_index: int | None = None) -> dict:
    """Accuracy, balanced accuracy, precision/recall/F1 (per class and macro), ROC-AUC, confusion matrix.

    Args:
        y_true: True class index of each sample.
        probs: Probabilities, shape [N, num_classes]; predictions are their argmax.
        class_names: Name of each class, in index order.
        melanoma_index: Index of the melanoma class, for a melanoma-vs-rest AUC in
            multi-class schemes. Defaults to `None` (not reported).

    Returns:
        A JSON-ready dict. `absent_classes` lists the classes without a sample (a
        warning is logged when there are any); their recall and AUC are None
        (undefined). With fewer than two classes present, `balanced_accuracy` and
        `roc_auc` are None too: balanced accuracy over one class is that class's
        recall, 1.0 for a constant prediction. Otherwise `roc_auc` is the macro
        average of one-vs-rest AUCs over the classes present (scikit-learn's
        `multi_class="ovr", average="macro"` when all are present).

    Raises:
        ValueError: shapes disagree, or a label is outside the classes.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), n_classes):
        raise ValueError(f"probs must have shape ({len(y)}, {n_classes}), got {p.shape}")
    if len(y) == 0:
        raise ValueError("no samples to score")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got values in [{y.min()}, {y.max()}]")
    labels = list(range(n_classes))
    y_pred = p.argmax(axis=1)
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    per_class_auc = {name: _auc_or_none((y == c).astype(int), p[:, c]) for c, name in enumerate(class_names)}
    absent = [name for c, name in enumerate(class_names) if support[c] == 0]
    if absent:
        logger.warning("no image of class %s among the %d scored: %s", " or ".join(map(repr, absent)), len(y),
                       "balanced accuracy and ROC-AUC are undefined" if len(absent) >= n_classes - 1
                       else "its recall and ROC-AUC are undefined")
    # Recall of an absent class is 0/0, not the 0 scikit-learn's zero_division puts there.
    recall = [float(rec[c]) if support[c] else None for c in labels]
    out: dict = {
        "num_samples": int(len(y)),
        "class_names": list(class_names),
        "absent_classes": absent,
        "accuracy": float(skm.accuracy_score(y, y_pred)),
        "balanced_accuracy": (float(skm.balanced_accuracy_score(y, y_pred))
                              if len(absent) < n_classes - 1 else None),
        "precision_macro": float(prec.mean()),
        "recall_macro": float(rec.mean()),
        "f1_macro": float(f1.mean()),
        "per_class": {name: {"precision": float(prec[c]), "recall": recall[c], "f1": float(f1[c]),
                             "support": int(support[c]), "roc_auc": per_class_auc[name]}
                      for c, name in enumerate(class_names)},
        "confusion_matrix": skm.confusion_matrix(y, y_pred, labels=labels).tolist(),
    }
    if n_classes == 2:
        # Binary schemes: precision/recall/F1 and AUC of the positive class (index 1).
        out.update(precision=float(prec[1]), recall=recall[1], f1=float(f1[1]), roc_auc=per_class_auc[class_names[1]])
    else:
        defined = [v for v in per_class_auc.values() if v is not None]
        out["roc_auc"] = float(np.mean(defined)) if defined else None
        if melanoma_index is not None:
            out["melanoma_roc_auc"] = per_class_auc[class_names[melanoma_index]]
    return out


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def format_metric(v: float | None, digits: int = 3) -> str:
    """A metric for a log line: `digits` decimals, or "undefined" for None."""
    return f"{v:.{digits}f}" if is_number(v) else "undefined"
