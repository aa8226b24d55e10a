"""Per-epoch checkpoints of a fold: a killed worker costs at most one epoch and never changes the result.

At the end of every epoch rank 0 writes, in `resume/`:

- `last-<E>.weights.h5`: model weights and optimizer state after epoch E;
- `best-<B>.npz`: model weights of the best epoch B so far (valid in every phase, whatever the optimizer);
- `state.json`, the commit record: the next epoch, the training phase, the early-stopping
  and learning-rate-plateau state, the number of workers (the learning rate is scaled by
  it), a fingerprint of the config and of the data (a checkpoint is never resumed into
  another model or onto other data), and the names and sha256 of the two weight files.

The weight files are written and fsynced first, then `state.json` is replaced by one
rename: that rename commits the epoch. A crash at any point leaves the previous
`state.json` and the files it names, so weights and state are always of one epoch.
A checkpoint that does not verify (unreadable state, a missing, truncated or altered
weight file, a partial first write) is discarded with a warning and the fold starts
afresh: never a crash loop.

Rank 0 alone reads the checkpoint and decides whether to resume; every rank receives
its decision, the best weights, and (`restore_model`) the last weights and optimizer
state, so ranks whose view of storage lags or is node-local never start at another epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from melanoma_dist import distributed as hk
from melanoma_dist.config import Config
from melanoma_dist.data import folds as fold_io
from melanoma_dist.run_files import discard_fold_result

logger = logging.getLogger(__name__)

STATE = "state.json"
_TMP = "tmp-"  # prefix of files being written: never named by a committed state


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: partial, corrupt, or of an older format."""


def resume_key(cfg: Config) -> str:
    """Fingerprint of what a checkpoint depends on; more epochs or other workers may still resume.

    Only settings that differ from their defaults count, so that a newer melanoma-dist, which
    adds settings at their defaults, still resumes the unfinished folds of an older one.
    """
    d = _non_default(cfg.to_dict(), Config().to_dict())
    for volatile in ("epochs", "verbose"):
        d.get("train", {}).pop(volatile, None)
    d.pop("distributed", None)  # another number of workers resumes too: `restore_model` rescales the learning rate
    d.pop("tune", None)  # the search settings do not shape a fold's training
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config dict that differ from the defaults', sections compared entry by entry."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            value = _non_default(value, default)
            if value:
                out[key] = value
        elif key not in defaults or value != default:
            out[key] = value
    return out


# ---------------------------------------------------------------- files

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    # A rename is only durable once the data it points to (and the directory entry) reached the disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Path], Any]) -> None:
    """Write `path` through `write(tmp_path)` under a temporary name, fsync it, rename it."""
    tmp = path.with_name(_TMP + path.name)  # keeps the .weights.h5 suffix Keras requires
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _save_npz(weights: list, path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, *weights)


def load_best_weights(path: Path) -> list:
    """The `get_weights()` list stored in a `best-<B>.npz` file."""
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def load_state(resume_dir: str | Path) -> dict[str, Any] | None:
    """The committed, verified state of a fold's checkpoint, or None if it never finished an epoch.

    Raises:
        CheckpointError: the checkpoint is partial, corrupt, or of an older format (why, in the message).
    """
    resume_dir = Path(resume_dir)
    path = resume_dir / STATE
    if not path.is_file():
        partial = sorted(p.name for p in resume_dir.glob("*")) if resume_dir.is_dir() else []
        if partial:
            raise CheckpointError(f"no committed {STATE} beside {', '.join(partial)} (a first write cut short)")
        return None
    try:
        state = json.loads(path.read_text())
        files, sums = state["files"], state["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable or of an older format ({type(e).__name__}: {e})") from None
    for role in ("last", "best"):
        file = resume_dir / str(files.get(role))
        if not file.is_file():
            raise CheckpointError(f"{file.name}, named by {STATE}, is missing")
        if _sha256(file) != sums.get(role):
            raise CheckpointError(f"{file.name} does not match the sha256 in {STATE} (truncated or altered)")
    return state


def last_weights(resume_dir: str | Path) -> Path:
    """The weights-and-optimizer file of a committed checkpoint (`load_state` must have verified it)."""
    return Path(resume_dir) / load_state(resume_dir)["files"]["last"]


def commit(resume_dir: Path, state: dict[str, Any], model: keras.Model, best_weights: list | None) -> dict:
    """Write one epoch's checkpoint: weight files first, then `state.json` in one rename.

    Args:
        resume_dir: Where the checkpoint goes.
        state: The state to record (`epoch`, `phase`, ...), without `files` and `sha256`.
        model: Its weights and optimizer state become the `last` file.
        best_weights: New best weights to write, or None to keep naming the best file of the
            committed state (the monitored metric did not improve).

    Returns:
        The committed state.
    """
    resume_dir.mkdir(parents=True, exist_ok=True)
    epoch = int(state["epoch"])
    last = resume_dir / f"last-{epoch:04d}.weights.h5"
    _write_durably(last, model.save_weights)
    if best_weights is None:
        best = resume_dir / json.loads((resume_dir / STATE).read_text())["files"]["best"]
    else:
        best = resume_dir / f"best-{epoch:04d}.npz"
        _write_durably(best, lambda p: _save_npz(best_weights, p))
    state = dict(state, files={"last": last.name, "best": best.name},
                 sha256={"last": _sha256(last), "best": _sha256(best)})
    _write_durably(resume_dir / STATE, lambda p: p.write_text(json.dumps(state, indent=2) + "\n"))
    _fsync(resume_dir)
    for old in resume_dir.iterdir():  # only now: until the rename, the previous checkpoint needed them
        if old.name not in (STATE, last.name, best.name):
            old.unlink()
    return state


# ---------------------------------------------------------------- callbacks

class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that can start from a saved state (best value, wait, best epoch, stop, best weights).

    Keras resets the counters in `on_train_begin` and, with `restore_best_weights`,
    takes the current weights as the best at the first epoch if it holds none: the
    saved state is put back after the reset, and the saved best weights with it, so a
    resumed run compares the next epoch with the saved best, as an uninterrupted one
    would. It keeps the best weights but does not put them back at the end of `fit()`:
    the fold does that after its last phase.

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
            self.stopped_epoch = int(self._resume.get("stopped_epoch", 0))
            self.best_weights = self._resume_weights

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)  # resets the counters; then put the saved ones back
        self._restore()

    def on_train_end(self, logs: dict | None = None) -> None:
        # The caller restores `best_weights` once, after the last phase: a fit that ends a phase
        # leaves the last epoch's weights, as a run resumed from the last checkpoint would have them.
        pass

    def state(self) -> dict:
        """The counters to save: `best`, `wait`, `best_epoch` and `stopped_epoch` (0: not stopped)."""
        best = None if self.best is None else float(self.best)
        return {"best": best, "wait": int(self.wait), "best_epoch": int(self.best_epoch),
                "stopped_epoch": int(self.stopped_epoch)}


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that can start from a saved state (best value, wait, cooldown).

    The reduced learning rate itself is part of the optimizer state (`last-<E>.weights.h5`).

    Args:
        state: `state()` of an earlier run, or None. Defaults to `None`.
        **kwargs: As for `keras.callbacks.ReduceLROnPlateau`.
    """

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
        """The counters to save: `best`, `wait` and `cooldown_counter`."""
        best = None if self.best is None else float(self.best)
        return {"best": best, "wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter)}


class FoldCheckpoint(keras.callbacks.Callback):
    """Commit the resume checkpoint at the end of every epoch (use on rank 0 only).

    Must come after the early-stopping and plateau callbacks in the list, so that
    it saves their state for the epoch that just ended.

    Args:
        resume_dir: Where the checkpoint goes.
        early_stopping: Its state and best weights are saved.
        reduce_lr: Its state is saved, if there is one.
        config_key: Fingerprint of the config (`resume_key`).
        data_fingerprint: The data the fold trains on (`data.folds.data_fingerprint`).
        phase: The training phase running. Defaults to `0`.
        workers: Number of Horovod workers (the learning rate is scaled by it). Defaults to `1`.
    """

    def __init__(self, resume_dir: str | Path, early_stopping: ResumableEarlyStopping,
                 reduce_lr: ResumableReduceLROnPlateau | None, config_key: str, data_fingerprint: dict[str, str],
                 phase: int = 0, workers: int = 1) -> None:
        super().__init__()
        self.dir = Path(resume_dir)
        self.early_stopping, self.reduce_lr = early_stopping, reduce_lr
        self.config_key, self.data_fingerprint, self.phase, self.workers = config_key, data_fingerprint, phase, workers

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        es = self.early_stopping
        improved = es.best_epoch == epoch or not (self.dir / STATE).is_file()
        state = {"epoch": epoch + 1, "phase": self.phase, "workers": self.workers, "config_key": self.config_key,
                 "data_fingerprint": self.data_fingerprint, "early_stopping": es.state(),
                 "reduce_lr": self.reduce_lr.state() if self.reduce_lr is not None else None}
        commit(self.dir, state, self.model,
               (es.best_weights if es.best_weights is not None else self.model.get_weights()) if improved else None)


# ---------------------------------------------------------------- resuming

@dataclass(frozen=True)
class Resume:
    """Where a fold resumes, the same on every rank (`resume_fold`)."""

    epoch: int
    """The next epoch to train (epochs before it are done)."""
    phase: int
    """The training phase of the last finished epoch."""
    workers: int
    """Number of workers that wrote the checkpoint."""
    early_stopping: dict
    """`ResumableEarlyStopping.state()` after that epoch."""
    reduce_lr: dict | None
    """`ResumableReduceLROnPlateau.state()`, if the plateau schedule ran."""
    best_weights: list
    """Model weights of the best epoch so far."""
    last_weights: Path | None
    """Weights and optimizer state after that epoch (rank 0 only; None on other ranks)."""


def checkpoint_to_resume(cfg: Config, fold: int, fingerprint: dict[str, str], resume_dir: Path) -> dict | None:
    """The verified state the fold resumes from, or None to start it afresh (call on rank 0 only).

    A partial or corrupt checkpoint, or one of other data (the dataset was re-ingested,
    the folds re-made, or it records no data at all), is not resumed: the fold starts
    afresh with a warning saying why. A checkpoint of other data also discards the
    fold's old `metrics.json`, which no longer describes this fold.

    Args:
        cfg: The job's config.
        fold: The validation fold.
        fingerprint: The fold's data (`data.folds.data_fingerprint`).
        resume_dir: Where the fold's checkpoint is.

    Raises:
        ValueError: the checkpoint is of another configuration.
    """
    try:
        state = load_state(resume_dir)
    except CheckpointError as e:
        logger.warning("fold %d: not resuming the checkpoint in %s: %s; starting the fold afresh",
                       fold, resume_dir, e)
        return None
    if state is None:
        return None
    if state.get("config_key") != resume_key(cfg):
        raise ValueError(f"{resume_dir} holds a checkpoint of another configuration (model, data or training "
                         f"settings differ): use another output_dir, or delete {resume_dir.parent} to start this "
                         f"fold afresh")
    why = fold_io.fingerprint_change(state.get("data_fingerprint"), fingerprint)
    if why is None:
        return state
    logger.warning("fold %d: not resuming the checkpoint in %s after epoch %d: %s; starting the fold afresh",
                   fold, resume_dir, state["epoch"], why)
    discard_fold_result(resume_dir.parent.parent, fold)  # <output_dir>/fold-K/resume (or its local mirror)
    return None


def resume_fold(cfg: Config, fold: int, fingerprint: dict[str, str], resume_dir: Path,
                is_chief: bool) -> Resume | None:
    """Rank 0 decides whether and where the fold resumes; every rank gets the same answer.

    Every rank must call it. Only rank 0 reads `resume_dir`: with stale or node-local
    storage, ranks deciding alone would start at different epochs and deadlock.

    Args:
        cfg: The job's config.
        fold: The validation fold.
        fingerprint: The fold's data (`data.folds.data_fingerprint`).
        resume_dir: Where the fold's checkpoint is (read on rank 0 only).
        is_chief: Whether this rank is rank 0.

    Returns:
        The resume point with the best weights so far, or None to start afresh.

    Raises:
        ValueError: on every rank, if rank 0 found a checkpoint of another configuration.
    """
    decision: tuple[dict | None, list | None, str | None] = (None, None, None)
    if is_chief:
        try:
            state = checkpoint_to_resume(cfg, fold, fingerprint, resume_dir)
            best = load_best_weights(resume_dir / state["files"]["best"]) if state else None
            decision = (state, best, None)
        except ValueError as e:  # raised on every rank below, so that none waits for the others
            decision = (None, None, str(e))
    # Horovod: rank 0 alone decided; every rank follows its decision.
    state, best, error = hk.broadcast_object(decision, "resume_fold")
    if error:
        raise ValueError(error)
    if state is None:
        return None
    if is_chief:
        logger.info("fold %d: resuming after epoch %d", fold, state["epoch"])
    return Resume(epoch=int(state["epoch"]), phase=int(state["phase"]), workers=int(state["workers"]),
                  early_stopping=state["early_stopping"], reduce_lr=state["reduce_lr"], best_weights=best,
                  last_weights=resume_dir / state["files"]["last"] if is_chief else None)


def rescale_learning_rate(optimizer: keras.optimizers.Optimizer, recorded_workers: int, workers: int) -> None:
    """Rescale a restored learning rate from the number of workers that saved it to the current one.

    The learning rate is scaled by the number of workers (`WarmupScaledLR`); after warm-up
    the optimizer keeps the restored value (and any plateau reductions of it), so resuming
    with other workers multiplies it by `workers / recorded_workers`, keeping the reductions.
    """
    if recorded_workers == workers:
        return
    old = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    optimizer.learning_rate = old * workers / recorded_workers
    logger.info("resuming with %d worker(s) instead of %d: learning rate %.3g -> %.3g", workers,
                recorded_workers, old, old * workers / recorded_workers)


def restore_model(model: keras.Model, resume: Resume, workers: int) -> None:
    """Load the last checkpoint into the compiled `model` on rank 0, and copy it to every rank.

    Every rank must call it. The optimizer state comes too, its learning rate rescaled
    to `workers` (`rescale_learning_rate`).
    """
    hk.build_optimizer(model)  # create the optimizer variables, so the checkpoint restores them
    if resume.last_weights is not None:
        model.load_weights(resume.last_weights)
    # Horovod: rank 0 alone read the checkpoint: its weights and optimizer state go to every rank.
    hk.broadcast_model(model, root_rank=0, include_optimizer=True)
    rescale_learning_rate(model.optimizer, resume.workers, workers)
