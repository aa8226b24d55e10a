"""Per-epoch checkpoints of a fold, so that a restarted fold resumes where it stopped.

At the end of every epoch rank 0 writes `resume/last.weights.h5` (model weights
and optimizer state), `resume/best.weights.h5` when val_loss improved, and
`resume/state.json` (the next epoch, the early-stopping and
learning-rate-plateau counters, and a fingerprint of the config, so that a
checkpoint is never loaded into a different model). A restarted fold loads them, so patience, the
best weights so far and the learning rate carry over as if it had never stopped.
Files are written under a temporary name and renamed: a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras

STATE = "state.json"
LAST = "last.weights.h5"
BEST = "best.weights.h5"


def load_state(resume_dir: str | Path) -> dict[str, Any] | None:
    """The saved state of a fold, or None if it never finished an epoch."""
    path = Path(resume_dir) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _save_weights(model: keras.Model, path: Path) -> None:
    tmp = path.with_name("tmp-" + path.name)  # keeps the .weights.h5 suffix Keras requires
    model.save_weights(tmp)
    os.replace(tmp, path)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that can start from a saved state (best value, wait, best weights).

    Args:
        state: `state()` of an earlier run, or None. Defaults to `None`.
        best_weights: The model weights at the earlier best epoch. Defaults to `None`.
        **kwargs: As for `keras.callbacks.EarlyStopping`.
    """

    def __init__(self, state: dict | None = None, best_weights: list | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resume, self._resume_weights = state, best_weights

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)  # resets the counters; then put the saved ones back
        if self._resume:
            self.best, self.wait, self.best_epoch = (self._resume["best"], self._resume["wait"],
                                                     self._resume["best_epoch"])
            self.best_weights = self._resume_weights

    def state(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {"best": best, "wait": int(self.wait), "best_epoch": int(self.best_epoch)}


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that can start from a saved state (best value, wait, cooldown)."""

    def __init__(self, state: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resume = state

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if self._resume:
            self.best, self.wait, self.cooldown_counter = (self._resume["best"], self._resume["wait"],
                                                           self._resume["cooldown_counter"])

    def state(self) -> dict:
        return {"best": float(self.best), "wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter)}


class FoldCheckpoint(keras.callbacks.Callback):
    """Write the resume checkpoint at the end of every epoch (use on rank 0 only).

    Must come after the early-stopping and plateau callbacks in the list, so that
    it saves their state for the epoch that just ended.
    """

    def __init__(self, resume_dir: str | Path, early_stopping: ResumableEarlyStopping,
                 reduce_lr: ResumableReduceLROnPlateau, config_key: str) -> None:
        super().__init__()
        self.dir = Path(resume_dir)
        self.early_stopping, self.reduce_lr = early_stopping, reduce_lr
        self.config_key = config_key

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.early_stopping.best_epoch == epoch:
            _save_weights(self.model, self.dir / BEST)
        _save_weights(self.model, self.dir / LAST)
        state = {"epoch": epoch + 1, "config_key": self.config_key, "early_stopping": self.early_stopping.state(),
                 "reduce_lr": self.reduce_lr.state()}
        tmp = self.dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.dir / STATE)
