"""The model that `fit()` trains: the inference model, augmentation in front of it, an optional XLA step.

Two things differ between training and inference, and both live here so that the
model that is saved and exported (`TrainingModel.classifier`) never carries them:

- **Augmentation as the model's first block** (`pipeline.augment_on: model`): the
  tf.data side only reads, decodes and batches, and hands over uint8 batches; the
  training step scales them to [0, 1] and runs the Keras preprocessing layers of
  `data/augment.py` on them, on the accelerator where there is one. They are the identity outside training and hold no
  weights, so validation, `predict`, the weights and the checkpoints are those of
  the classifier alone.
- **XLA for the forward and backward pass** (`train.jit_compile`): Horovod's
  allreduce cannot run inside an XLA cluster, which is why the models compile with
  `jit_compile=False`. `train_step` calls a `tf.function(jit_compile=True)` that
  computes the loss and the gradients only; the gradient allreduce (in the
  distributed optimizer's `apply()`), the loss-scale check and the update run
  outside it, as do the augmentation (its image transforms have no XLA kernels)
  and the metrics.

Randomness: the augmentation layers take the seed given here; give each Horovod
rank its own (`WorkerContext.rank_seed`), as the tf.data path does, or every rank
would draw the same flips and rotations. `broadcast_model` copies weights only,
never seed states, so the ranks keep their own streams.

Example:

```python
model = build_model(cfg.model, size, classes)
trainer = training_model(model, cfg, seed=ctx.rank_seed(cfg.train.seed))
trainer.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(lr)), loss=..., jit_compile=False)
trainer.fit(train_ds, ...)
model.save("model.keras")   # no augmentation in it
```
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from melanoma_dist.config import Config
from melanoma_dist.data.augment import build_augmenter
from melanoma_dist.data.pipeline import to_unit_range

logger = logging.getLogger(__name__)


class TrainingModel(keras.Model):
    """Train `classifier` with `augmenter` in front (training only) and, optionally, an XLA gradient step.

    Takes float images in [0, 1], or uint8 images in [0, 255] (the training batches of
    `augment_on: model`), which it scales first.

    The weights are the classifier's (the augmentation layers have none), in the
    same order, so `get_weights`, `set_weights`, early stopping's best weights and
    checkpoints move between this model and the classifier unchanged.

    Args:
        classifier: The built inference model (takes [0, 1] images).
        augmenter: Augmentation layers applied to training batches (`build_augmenter`).
            Defaults to `None` (none: the pipeline augments, or nothing does).
        jit_gradients: Compute the loss and gradients in an XLA cluster; the optimizer
            (and with it the Horovod allreduce) runs outside. Defaults to `False`.

    Example:

    ```python
    trainer = TrainingModel(model, build_augmenter(cfg.pipeline.augment, seed=7), jit_gradients=True)
    trainer.compile(optimizer=hk.distributed_optimizer("adam"), loss="binary_crossentropy", jit_compile=False)
    ```
    """

    def __init__(self, classifier: keras.Model, augmenter: keras.Layer | None = None,
                 jit_gradients: bool = False, **kwargs: Any) -> None:
        super().__init__(name=kwargs.pop("name", f"{classifier.name}_training"), **kwargs)
        if not classifier.built:
            raise ValueError(f"classifier {classifier.name!r} is not built: build it (keras.Input) first")
        self.classifier = classifier
        self.augmenter = augmenter
        self.jit_gradients = bool(jit_gradients)
        if augmenter is not None:
            augmenter.build(classifier.input_shape)
        self.built = True

    def call(self, images: Any, training: bool | None = None) -> Any:
        images = _unit_range(images)
        if training and self.augmenter is not None:
            images = self.augmenter(images, training=True)
        return self.classifier(images, training=training)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        # Horovod: not Keras' "auto", which picks XLA for the whole step (allreduce included) on GPU hosts.
        kwargs.setdefault("jit_compile", False)
        if kwargs["jit_compile"] is not False and self.jit_gradients:
            raise ValueError(f"model {self.name!r} compiles its gradients with XLA itself (jit_gradients=True): "
                             "compile with jit_compile=False, which keeps the Horovod allreduce outside XLA")
        super().compile(*args, **kwargs)

    def train_step(self, data: Any) -> dict[str, Any]:
        if not self.jit_gradients:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = _unit_range(x)
        if self.augmenter is not None:  # outside XLA: the image transforms have no XLA kernels
            x = self.augmenter(x, training=True)
        # Traced anew with every train function (after each compile), so it sees the current trainable set.
        trainable = self.trainable_weights
        y_pred, loss, gradients = self._xla_gradients(trainable)(x, y, sample_weight)
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        # Horovod: the distributed optimizer averages the gradients here, outside the XLA cluster.
        self.optimizer.apply_gradients(zip(gradients, trainable))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _xla_gradients(self, trainable: list[keras.Variable]) -> Any:
        """A `tf.function(jit_compile=True)`: (x, y, sample_weight) -> (y_pred, loss, gradients)."""

        @tf.function(jit_compile=True)
        def forward_backward(x: Any, y: Any, sample_weight: Any) -> Any:
            with tf.GradientTape() as tape:
                y_pred = self.classifier(x, training=True)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
                # Loss scaling (mixed_float16): scaled here, unscaled and checked by the optimizer outside.
                scaled = self.optimizer.scale_loss(loss)
            return y_pred, loss, tape.gradient(scaled, trainable)

        return forward_backward


def _unit_range(images: Any) -> Any:
    """uint8 batches (tf.data with `augment_on: model`) to float32 in [0, 1]; float images unchanged."""
    return to_unit_range(images) if images.dtype == tf.uint8 else images


def training_model(model: keras.Model, cfg: Config, seed: int) -> keras.Model:
    """The model to compile and fit for `cfg`: `model` itself when nothing differs from inference.

    Args:
        model: The built inference model (`build_model`).
        cfg: The job's config (`pipeline.augment_on`, `pipeline.augment`, `train.jit_compile`).
        seed: Seed of the augmentation layers; this rank's own (`WorkerContext.rank_seed`).

    Returns:
        A `TrainingModel` around `model` that scales (uint8 training batches) and augments
        (`augment_on: model`) and/or takes the XLA gradient step (`train.jit_compile`); with neither,
        `model` itself.
    """
    in_model = cfg.pipeline.augment_on == "model"
    augmenter = build_augmenter(cfg.pipeline.augment, seed) if in_model else None
    if not in_model and not cfg.train.jit_compile:
        return model
    return TrainingModel(model, augmenter, jit_gradients=cfg.train.jit_compile)
