"""Learning rate scaled by the number of Horovod workers, after a linear warm-up, then optionally cosine."""

from __future__ import annotations

import logging
import math
from typing import Any

import horovod.tensorflow as hvd
import keras

logger = logging.getLogger(__name__)


class WarmupScaledLR(keras.callbacks.Callback):
    """Linear learning-rate warm-up from `base_lr` to `base_lr * size` (Goyal et al., 2017).

    With `size` workers the global batch is `size` times larger, so the learning
    rate is scaled by `size`; starting at that rate diverges early on, hence the
    ramp. During the first `warmup_epochs` epochs the rate is set before every
    batch: `base_lr * (1 + (size - 1) * t)`, t the fraction of warm-up batches done.
    At the end of the last warm-up epoch it is set to `base_lr * size` once, and
    never touched again: a later ReduceLROnPlateau reduction stays in place, and
    a learning rate restored from a checkpoint after warm-up is kept. With
    `warmup_epochs=0` the scaled rate is set at the start of epoch 0.

    Put it before ReduceLROnPlateau in the callback list (it sets the scaled rate
    at the end of warm-up, then the plateau callback may reduce it). Needs a
    float learning rate, not a LearningRateSchedule.

    Args:
        base_lr: Learning rate of one worker.
        warmup_epochs: Epochs of warm-up; 0 for none.
        size: Number of workers. Defaults to `None` (`hvd.size()`).
        steps_per_epoch: Batches per epoch. Defaults to `None` (from `fit`'s params).
        verbose: Log the rate at each epoch boundary of the warm-up. Defaults to `0`.
        cosine_epochs: After warm-up, decay the rate along a half cosine, per batch, to
            `min_ratio * base_lr * size` at the end of epoch `cosine_epochs` (the run's or
            the phase's last). Defaults to `None` (no decay: the rate stays for ReduceLROnPlateau).
        min_ratio: Final rate of the cosine decay as a fraction of the peak. Defaults to `0.0`.
        start_epoch: First epoch of the schedule: warm-up covers epochs `start_epoch` to
            `start_epoch + warmup_epochs - 1` (a fine-tuning phase starts later than 0).
            Defaults to `0`.
        initial_ratio: Warm up from `initial_ratio * base_lr * size` instead of `base_lr`,
            e.g. 0 to let a fresh optimizer start gently. Defaults to `None`.

    Raises:
        ValueError: a negative warm-up or a non-positive rate or size; or (at the
            start of training) an unknown number of steps per epoch.

    Example:

    ```python
    callbacks = [MetricAverageCallback(), WarmupScaledLR(1e-3, warmup_epochs=1),
                 keras.callbacks.ReduceLROnPlateau(patience=2)]
    ```
    """

    def __init__(self, base_lr: float, warmup_epochs: int, size: int | None = None,
                 steps_per_epoch: int | None = None, verbose: int = 0, cosine_epochs: int | None = None,
                 min_ratio: float = 0.0, start_epoch: int = 0, initial_ratio: float | None = None) -> None:
        super().__init__()
        if base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.base_lr = float(base_lr)
        self.warmup_epochs = int(warmup_epochs)
        self.size = size
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.cosine_epochs = cosine_epochs
        self.min_ratio = float(min_ratio)
        self.start_epoch = int(start_epoch)
        self.initial_ratio = initial_ratio
        self._epoch = 0

    @property
    def target_lr(self) -> float:
        """The learning rate after warm-up: `base_lr * size`."""
        # Horovod: scale the learning rate by the number of workers (the global batch grows with it).
        return self.base_lr * (self.size if self.size is not None else hvd.size())

    def lr_at(self, epoch: int, batch: int) -> float:
        """Learning rate of `batch` in `epoch` during warm-up."""
        t = ((epoch - self.start_epoch) * self._steps() + batch) / (self.warmup_epochs * self._steps())
        start = self.base_lr if self.initial_ratio is None else self.initial_ratio * self.target_lr
        return start + (self.target_lr - start) * min(t, 1.0)

    def _in_warmup(self, epoch: int) -> bool:
        return self.start_epoch <= epoch < self.start_epoch + self.warmup_epochs

    def _steps(self) -> int:
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError("WarmupScaledLR needs the number of steps per epoch: pass steps_per_epoch= "
                             "to the callback or to fit() (a tf.data dataset of unknown length has none)")
        return int(steps)

    def _set(self, lr: float) -> None:
        self.model.optimizer.learning_rate = lr

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.warmup_epochs > 0:
            self._steps()  # fail before the first batch, not in the middle of it

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        if self.warmup_epochs == 0 and epoch == self.start_epoch:
            self._set(self.target_lr)
        elif self.verbose and self._in_warmup(epoch):
            logger.info("epoch %d: warm-up learning rate %.3g", epoch + 1, self.lr_at(epoch, 0))

    def cosine_lr_at(self, epoch: int, batch: int) -> float:
        """Learning rate of `batch` in `epoch` after warm-up, on the cosine schedule."""
        first = self.start_epoch + self.warmup_epochs
        span = max(1, (self.cosine_epochs - first) * self._steps())
        t = min(1.0, ((epoch - first) * self._steps() + batch) / span)
        return self.target_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._in_warmup(self._epoch):
            self._set(self.lr_at(self._epoch, batch))
        elif self.cosine_epochs is not None and self._epoch >= self.start_epoch:
            self._set(self.cosine_lr_at(self._epoch, batch))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == self.start_epoch + self.warmup_epochs - 1:
            self._set(self.target_lr)
            if self.verbose:
                logger.info("epoch %d: warm-up done, learning rate %.3g", epoch + 1, self.target_lr)
