"""TensorBoard event files of a fold's training curves (rank 0 only).

`<fold dir>/tensorboard/{train,validation}/`: per epoch the training loss and accuracy,
the learning rate, and the whole-fold validation metrics (loss, accuracy, balanced
accuracy, ROC-AUC), so that `tensorboard --logdir runs/NAME` shows every fold of a run
(and every fold of every trial of a search, which live below it too).
"""

from __future__ import annotations

from pathlib import Path

import keras

TENSORBOARD_DIR = "tensorboard"


def fold_tensorboard(fold_dir: str | Path) -> keras.callbacks.TensorBoard:
    """The TensorBoard callback of a fold; place it after the callbacks that add metrics to the logs.

    The learning rate is the optimizer's, read by the callback at each epoch's end.
    """
    # No graph, no profiler: a few scalars per epoch, nothing that costs training time.
    return keras.callbacks.TensorBoard(log_dir=str(Path(fold_dir) / TENSORBOARD_DIR), write_graph=False,
                                       update_freq="epoch", profile_batch=0)
