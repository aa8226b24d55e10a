"""One log line per epoch, naming the fold, for runs where many folds share a terminal."""

from __future__ import annotations

import logging
import time

import keras

logger = logging.getLogger(__name__)


class EpochProgress(keras.callbacks.Callback):
    """Log `fold K epoch e/E: loss ... val_loss ... lr ... (Ns)` at the end of every epoch.

    Args:
        fold: The fold being trained.
        epochs: The last epoch of the run.
    """

    def __init__(self, fold: int, epochs: int) -> None:
        super().__init__()
        self.fold, self.epochs = fold, epochs
        self._start = time.time()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in sorted((logs or {}).items())
                         if isinstance(v, (int, float)))
        logger.info("fold %d epoch %d/%d: %s (%.0fs)", self.fold, epoch + 1, self.epochs, shown,
                    time.time() - self._start)
