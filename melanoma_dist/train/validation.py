"""Validation of the whole fold at the end of every epoch, from the predictions of all ranks.

Keras' own validation computes metrics per rank; an AUC averaged over ranks is
not the AUC of the fold. `FoldValidation` predicts this rank's share, gathers
the predictions of every rank (Horovod allgather), and computes on the complete
fold, identically on every rank: `val_loss` (unweighted cross-entropy),
`val_accuracy`, `val_balanced_accuracy` and, for two classes, `val_roc_auc`.
Early stopping, the plateau schedule and the best-epoch choice then read these.
Before predicting, the BatchNorm moving statistics are averaged over ranks, so
the whole fold is predicted by one model: the one rank 0 checkpoints and saves.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from sklearn import metrics as skm

from melanoma_dist import distributed as hk
from melanoma_dist.model.build import probabilities


def monitored_metric(monitor: str, num_classes: int) -> tuple[str, str]:
    """The log key and Keras mode ("min"/"max") of `train.monitor` (`auto` resolved)."""
    if monitor == "auto":
        monitor = "val_roc_auc" if num_classes == 2 else "val_balanced_accuracy"
    if monitor == "val_roc_auc" and num_classes != 2:
        raise ValueError(f"train.monitor=val_roc_auc needs two classes, the dataset has {num_classes}: "
                         "use val_balanced_accuracy or auto")
    return monitor, "min" if monitor == "val_loss" else "max"


def fold_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The validation metrics of a whole fold (`probs`: [N, classes])."""
    p = np.clip(probs, 1e-7, 1.0)
    pred = probs.argmax(1)
    out = {"val_loss": float(-np.mean(np.log(p[np.arange(len(labels)), labels]))),
           "val_accuracy": float(np.mean(pred == labels)),
           # Mean recall over the classes present (scikit-learn's balanced accuracy, without its warning).
           "val_balanced_accuracy": float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))}
    if probs.shape[1] == 2:
        # An undefined AUC (one class only) counts as chance, so it never looks like progress.
        out["val_roc_auc"] = (float(skm.roc_auc_score(labels, probs[:, 1]))
                              if labels.min() != labels.max() else 0.5)
    return out


class FoldValidation(keras.callbacks.Callback):
    """Put whole-fold validation metrics into the epoch logs (every rank gets the same values).

    Place it after `MetricAverageCallback` and before every callback that reads
    validation metrics.

    Args:
        dataset: This rank's validation batches (one pass of `steps` batches).
        steps: Batches in one pass.
        rows: Global row ids of this rank's share, in dataset order.
        labels_of_rows: Label of every global row id.
        num_classes: Number of classes.
    """

    def __init__(self, dataset: tf.data.Dataset, steps: int, rows: np.ndarray, labels_of_rows: np.ndarray,
                 num_classes: int) -> None:
        super().__init__()
        self.dataset, self.steps, self.rows = dataset, steps, rows
        self.labels_of_rows, self.num_classes = labels_of_rows, num_classes

    def predict_fold(self) -> tuple[np.ndarray, np.ndarray]:
        """(global rows, probabilities) of the whole fold, sorted by row, on every rank.

        A collective (every rank calls it). It first averages the BatchNorm moving
        statistics over ranks, here rather than in a separate callback, so that no
        callback order can let a rank predict with its own statistics; the epoch-end
        callbacks after this one (early stopping's best weights, the checkpoint) and
        the final save then see the synced model too.
        """
        # Horovod: one model on every rank (each rank updated the statistics on its own batches).
        hk.sync_batchnorm_statistics(self.model)
        mine = probabilities(self.model.predict(self.dataset, steps=self.steps, verbose=0), self.num_classes)
        # Horovod: every rank gets every rank's predictions, so all compute the same metrics.
        rows, probs = hk.allgather_rows(self.rows), hk.allgather_rows(mine)
        order = np.argsort(rows, kind="stable")
        return rows[order], probs[order]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rows, probs = self.predict_fold()
        if logs is not None:
            logs.update(fold_scores(self.labels_of_rows[rows], probs))
