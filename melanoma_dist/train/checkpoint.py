"""Per-epoch checkpoints of a fold, so that a restarted fold resumes where it stopped.

At the end of every epoch rank 0 writes `resume/last.weights.h5` (model weights
and optimizer state), `resume/best.npz` (model weights only) when the monitored
metric improved, and `resume/state.json` (the next epoch, the training phase,
the early-stopping and learning-rate-plateau counters, a fingerprint of the
config, so that a checkpoint is never loaded into a different model, and one of
the data, so that it is never resumed on another dataset or fold assignment). A
restarted fold loads them, so patience, the best weights so far and the learning
rate carry over as if it had never stopped.
Files are written under a temporary name and renamed: a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

STATE = "state.json"
LAST = "last.weights.h5"
BEST = "best.npz"  # model weights only: valid in every phase, whatever the optimizer


def load_state(resume_dir: str | Path) -> dict[str, Any] | None:
    """The saved state of a fold, or None if it never finished an epoch."""
    path = Path(resume_dir) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _save_weights(model: keras.Model, path: Path) -> None:
    tmp = path.with_name("tmp-" + path.name)  # keeps the .weights.h5 suffix Keras requires
    model.save_weights(tmp)
    os.replace(tmp, path)


def save_best_weights(weights: list, path: Path) -> None:
    """Write model weights (a `get_weights()` list) atomically."""
    tmp = path.with_name("tmp-" + path.name)
    with tmp.open("wb") as f:
        np.savez(f, *weights)
    os.replace(tmp, path)


def load_best_weights(path: Path) -> list:
    """The `get_weights()` list written by `save_best_weights`."""
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that can start from a saved state (best value, wait, best weights).

    It keeps the best weights but does not put them back at the end of `fit()`: the
    fold does that after its last phase.

    Args:
        state: `state()` of an earlier run, or None. Defaults to `None`.
        best_weights: The model weights at the earlier best epoch. Defaults to `None`.
        **kwargs: As for `keras.callbacks.EarlyStopping`.
    """

    def __init__(self, state: dict | None = None, best_weights: list | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resume, self._resume_weights = state, best_weights
        self.best, self.best_epoch = None, 0
        self._restore()  # state() is valid even if fit() never runs (a phase already finished)

    def _restore(self) -> None:
        if self._resume:
            self.best, self.wait, self.best_epoch = (self._resume["best"], self._resume["wait"],
                                                     self._resume["best_epoch"])
            self.best_weights = self._resume_weights

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)  # resets the counters; then put the saved ones back
        self._restore()

    def on_train_end(self, logs: dict | None = None) -> None:
        # The caller restores `best_weights` once, after the last phase: a fit that ends a phase
        # leaves the last epoch's weights, as a run resumed from the last checkpoint would have them.
        pass

    def state(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {"best": best, "wait": int(self.wait), "best_epoch": int(self.best_epoch)}


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that can start from a saved state (best value, wait, cooldown)."""

    def __init__(self, state: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resume = state
        self.best = None
        self._restore()  # state() is valid even if fit() never runs (the fold already finished)

    def _restore(self) -> None:
        if self._resume:
            self.best, self.wait, self.cooldown_counter = (self._resume["best"], self._resume["wait"],
                                                           self._resume["cooldown_counter"])

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self._restore()

    def state(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {"best": best, "wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter)}


class FoldCheckpoint(keras.callbacks.Callback):
    """Write the resume checkpoint at the end of every epoch (use on rank 0 only).

    Must come after the early-stopping and plateau callbacks in the list, so that
    it saves their state for the epoch that just ended.

    Args:
        resume_dir: Where the checkpoint goes.
        early_stopping: Its state is saved.
        reduce_lr: Its state is saved, if there is one.
        config_key: Fingerprint of the config (`train.fold.resume_key`).
        data_fingerprint: The data the fold trains on (`data.folds.data_fingerprint`).
        phase: The training phase running. Defaults to `0`.
    """

    def __init__(self, resume_dir: str | Path, early_stopping: ResumableEarlyStopping,
                 reduce_lr: ResumableReduceLROnPlateau | None, config_key: str, data_fingerprint: dict[str, str],
                 phase: int = 0) -> None:
        super().__init__()
        self.dir = Path(resume_dir)
        self.early_stopping, self.reduce_lr = early_stopping, reduce_lr
        self.config_key, self.data_fingerprint, self.phase = config_key, data_fingerprint, phase

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.early_stopping.best_epoch == epoch:
            save_best_weights(self.model.get_weights(), self.dir / BEST)
        _save_weights(self.model, self.dir / LAST)
        state = {"epoch": epoch + 1, "phase": self.phase, "config_key": self.config_key,
                 "data_fingerprint": self.data_fingerprint,
                 "early_stopping": self.early_stopping.state(),
                 "reduce_lr": self.reduce_lr.state() if self.reduce_lr is not None else None}
        tmp = self.dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.dir / STATE)
