"""Average BatchNorm moving statistics over Horovod ranks, so that every rank holds the same model.

Gradient averaging keeps the trainable weights identical on every rank, but a
BatchNorm layer's moving mean and variance are not trained: each rank updates
them from its own batches. Without a sync, each rank would validate and predict
with its own statistics (W slightly different models), and the model saved by
rank 0 would not reproduce the other ranks' predictions.

We average the moving means, and the moving variances, over ranks (as Horovod's
examples and Keras' cross-replica BatchNorm approximations do). The mean of the
variances leaves out the spread of the per-rank means (law of total variance);
with shards drawn from the same distribution that term is small, and the plain
mean keeps the result a convex combination of values every rank actually saw.
Training itself is unaffected: in training mode BatchNorm normalises with the
statistics of the current (per-rank) batch.
"""

from __future__ import annotations

from typing import Any

import keras

from melanoma_dist.distributed.collectives import average_variables


def batchnorm_statistics(model: keras.Model) -> list[keras.Variable]:
    """The moving means and variances of the model's trainable BatchNorm layers, in layer order.

    Frozen BatchNorm layers (`trainable=False`, e.g. a pretrained backbone with
    `model.freeze_batchnorm`) are left out: Keras runs them in inference mode, so
    their statistics never change and are already the same on every rank.
    """
    return [v for layer in _nested_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for v in (layer.moving_mean, layer.moving_variance)]


def _nested_layers(model: keras.Layer) -> list[keras.Layer]:
    """Every layer of `model`, nested models (a backbone) included, depth first."""
    out = []
    for layer in getattr(model, "layers", []):
        out += [layer, *_nested_layers(layer)]
    return out


def sync_batchnorm_statistics(model: keras.Model) -> None:
    """Replace the BatchNorm moving statistics on every rank by their mean over ranks.

    A collective: every rank must call it. Call before every pass that uses the
    moving statistics (validation, prediction) and before saving the model.
    """
    # Horovod: identical statistics everywhere, so every rank validates, predicts and saves one model.
    average_variables(batchnorm_statistics(model))


class SyncBatchNormStatistics(keras.callbacks.Callback):
    """Average the BatchNorm moving statistics over ranks before validation and at every epoch end.

    Two hooks, because Keras validates at two places: `fit(validation_data=...)`
    runs its validation inside the epoch, before `on_epoch_end`, and passes the
    fit callbacks to `evaluate`, so `on_test_begin` is the last point before it;
    callbacks that validate, checkpoint or keep best weights at the epoch end
    read the model in `on_epoch_end`, so put this callback before them.
    (`train.validation.FoldValidation` syncs by itself before it predicts.)

    Example:

    ```python
    callbacks = [MetricAverageCallback(), SyncBatchNormStatistics(), keras.callbacks.EarlyStopping()]
    model.fit(train_ds, validation_data=val_ds, callbacks=callbacks)
    ```
    """

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        sync_batchnorm_statistics(self.model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        sync_batchnorm_statistics(self.model)
