"""Average the epoch logs over Horovod ranks, so that every rank takes the same decisions."""

from __future__ import annotations

import numbers
from typing import Any

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace every numeric entry of the epoch logs by its mean over all ranks.

    Put it FIRST in the callback list: before every callback that reads metrics
    (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint, CSVLogger), so that all
    ranks see the same values and take the same decisions (a rank stopping alone
    would deadlock the others). Keras' History and progress bar come after user
    callbacks and see the averages too. The mean of per-rank values is exact for
    sums and means over equal shards, not for a ranking metric: an AUC averaged
    over ranks is not the AUC of the pooled predictions, so a log key naming an
    AUC is refused (gather the predictions with `allgather_rows`, as
    `train.validation.FoldValidation` does, and put that callback after this one).

    Raises:
        ValueError: (at the end of an epoch, on every rank) the logs hold a per-rank AUC.

    Example:

    ```python
    model.fit(x, y, callbacks=[MetricAverageCallback(), keras.callbacks.EarlyStopping()])
    ```
    """

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None or hvd.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        per_rank_auc = [k for k in keys if "auc" in k.lower()]
        if per_rank_auc:  # the same keys on every rank: all raise together, none waits in the allreduce
            raise ValueError(
                f"MetricAverageCallback would average the per-rank AUC(s) {per_rank_auc} over "
                f"{hvd.size()} ranks, which is not the AUC of the pooled predictions: drop the AUC metric "
                "from compile() and compute it on the gathered predictions (train.validation.FoldValidation)")
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], tf.float64)
        # Horovod: one allreduce of all metrics, in sorted-key order on every rank.
        averaged = hvd.allreduce(values, op=hvd.Average, name="metric_average").numpy()
        logs.update(zip(keys, (float(v) for v in averaged)))


def _is_number(value: Any) -> bool:
    """A real scalar (Keras passes epoch logs as Python floats); bools and strings are not."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iuf"
