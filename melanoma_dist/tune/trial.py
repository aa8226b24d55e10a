"""One trial: a cross-validation of one config, reported to Ray Tune epoch by epoch.

The trial (a `tune.Trainable` in an actor without CPUs of its own) trains its folds as
the usual Horovod groups (`schedule.cv.run_fold_with_retries`), placed in the trial's
placement group (see `resources.py`), at most `slots` at once. Its output directory is a
normal `cv` output directory, `<output_dir>/tune/trials/<trial_id>/`, so a trial that
starts again (its actor died, the driver was restarted) keeps its finished folds
(`split_finished`) and resumes the others from their last epoch.

With `output_dir` in an object store, the trial works as `cv`'s driver does: in a local copy
of its folder (`storage.mirrored`), on whatever node its actor runs. The folds upload their
own folders; the trial downloads the files it reads of them (metrics, predictions,
histories: `_sync`) and uploads its own (config, drawn values, the CV files).

The channel from the folds to the trial is the `history.csv` that every fold's rank 0
already appends after each epoch: `step()` waits until every started fold has written
epoch `e`, then reports for `training_iteration = e` the mean over those folds of their
best validation metric up to epoch `e` (a fold keeps its best epoch's weights, so that is
what it would score if stopped there; a fold that ended sooner counts with its best).
Folds still queued inside the trial do not count. Once every fold has finished, the
last report carries the trial's result: the metric of its pooled out-of-fold predictions
(`score`), the mean and sd over folds, and `cv_complete`.

When Ray Tune stops the trial (ASHA), `cleanup()` sets the stop event: the running
Horovod groups are torn down (GroupCancelled) and their bundles freed with the trial's
placement group.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from melanoma_dist import labels as label_schemes
from melanoma_dist import storage
from melanoma_dist.config import config_from_dict
from melanoma_dist.data import folds as fold_io
from melanoma_dist.data import shards
from melanoma_dist.log import setup_logging
from melanoma_dist.report.aggregate import aggregate_cv, load_fold_metrics
from melanoma_dist.run_files import CHECKPOINT_DIR, HISTORY_FILE, discard_fold_result, fold_dir
from melanoma_dist.schedule.cv import STORE_PROGRESS_S, fold_fingerprints, run_fold_with_retries, split_finished
from melanoma_dist.tune.space import metric_name, trial_dict

logger = logging.getLogger(__name__)

_POLL_S = 2.0
"""Seconds between two looks at the folds' histories."""
PARAMS_FILE = "params.json"
"""The trial's drawn values, in its output directory."""
PULL_SKIP = (CHECKPOINT_DIR, "tensorboard", "*.keras")
"""What a trial never reads of its folds' folders in an object store (it reads metrics, predictions, histories)."""


def fold_curve(output_dir: str | Path, fold: int, column: str) -> list[float]:
    """The per-epoch values of `column` in a fold's `history.csv` (epoch order; empty when none yet).

    A row written again for the same epoch (a resumed fold) replaces the earlier one; an
    undefined value counts as NaN.
    """
    path = fold_dir(output_dir, fold) / HISTORY_FILE
    by_epoch: dict[int, float] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    by_epoch[int(row["epoch"])] = float(row.get(column) or "nan")
                except (KeyError, ValueError):  # a row cut short while rank 0 writes it
                    continue
    except FileNotFoundError:
        return []
    return [by_epoch[e] for e in sorted(by_epoch)]


def best_so_far(curve: list[float], epoch: int) -> float:
    """The best (largest) value of the first `epoch` epochs of `curve`; NaN when none is defined."""
    head = [v for v in curve[:epoch] if not math.isnan(v)]
    return max(head) if head else float("nan")


class CVTrial(tune.Trainable):
    """A Ray Tune trainable: one cross-validation of the base config with this trial's values.

    `tune.with_parameters(CVTrial, base=..., trials_dir=..., slots=...)` gives it its fixed
    arguments; the drawn values arrive as the trial's `config` (dotted keys).
    """

    def setup(self, config: dict, base: dict, trials_dir: str, slots: int) -> None:
        import ray

        setup_logging()
        self.params = dict(config)
        raw = trial_dict(base, self.params)
        raw["output_dir"] = storage.join(trials_dir, self.trial_id)
        self.cfg = config_from_dict(raw)  # a drawn combination must be a valid config, like any other
        self.files = contextlib.ExitStack()  # closed by cleanup(): the last upload of an object-store folder
        self.mirror = self.files.enter_context(storage.mirrored(self.cfg.output_dir, pull_skip=PULL_SKIP))
        self.out = self.mirror.local
        self.metric = metric_name(self.cfg)
        self.column = f"val_{self.metric}"
        self.folds = list(range(self.cfg.folds.k))
        try:
            done = self._start_files()
        except BaseException:  # cleanup() will not run: upload what was written and remove the local copy now
            self.files.close()
            raise
        self.fold_ended = threading.Event()  # a fold's files are to be downloaded now
        self.pulled_at = time.monotonic()
        if done:
            logger.info("trial %s: folds %s already finished: not re-running them", self.trial_id, done)
        self.started: set[int] = set(done)
        self.started_lock = threading.Lock()  # fold threads add to `started` while step() reads it
        self.errors: dict[int, BaseException] = {}
        self.stop_event = threading.Event()
        self.iteration_epoch = 0
        slots_free = threading.Semaphore(slots)
        pg = ray.util.get_current_placement_group()  # the trial's: its bundles hold `slots` folds' workers

        def run(fold: int) -> None:
            with slots_free:
                if self.stop_event.is_set():
                    return
                with self.started_lock:
                    self.started.add(fold)
                try:
                    run_fold_with_retries(self.cfg, fold, stop=self.stop_event, within=pg)
                except BaseException as e:  # reported by step(), on the trial's thread
                    self.errors[fold] = e
                finally:
                    self.fold_ended.set()

        # Daemon threads: they only wait on Ray, and must not keep a stopped trial's actor alive.
        self.threads = [threading.Thread(target=run, args=(f,), daemon=True, name=f"fold-{f}")
                        for f in self.folds if f not in done]
        for t in self.threads:
            t.start()

    def _start_files(self) -> list[int]:
        """Write the trial's config and drawn values, drop stale fold results; return the finished folds."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(self.cfg.to_yaml())
        (self.out / PARAMS_FILE).write_text(json.dumps(self.params, indent=2, default=str) + "\n")
        # The driver made the dataset and the folds; a trial only reads them.
        manifest = shards.load_manifest(self.cfg.data.dataset_dir)
        fold_of_row = fold_io.load_folds(self.cfg.data.dataset_dir, self.cfg.folds.k, self.cfg.folds.seed)
        done, stale = split_finished(self.out, self.folds, fold_fingerprints(self.cfg, manifest, fold_of_row,
                                                                             self.folds))
        for f in stale:
            discard_fold_result(self.out, f)
        self.mirror.push()  # the config, and stale results gone from the store, before any fold starts again
        return done

    def _sync(self) -> None:
        """Download what the folds uploaded to an object-store trial folder (nothing for a local one).

        At once after a fold ended (its metrics and predictions); else at most every
        `STORE_PROGRESS_S`, for the running folds' histories (each look lists the folder: a billed request).
        All on the trial's thread: the local copy is never read while it is written.
        """
        if not self.mirror.remote or (not self.fold_ended.is_set()
                                      and time.monotonic() - self.pulled_at < STORE_PROGRESS_S):
            return
        self.fold_ended.clear()  # before the download: a fold ending during it is fetched on the next look
        self.pulled_at = time.monotonic()
        self.mirror.pull(skip=PULL_SKIP)

    def _finished(self) -> list[int]:
        return [f for f in self.folds if load_fold_metrics(self.out, f) is not None]

    def step(self) -> dict[str, Any]:
        """Wait for the next epoch of every started fold and report it (the last report: the CV result)."""
        epoch = self.iteration_epoch + 1
        while True:
            self._sync()
            if self.errors and not self.stop_event.is_set():
                fold, error = sorted(self.errors.items())[0]
                raise RuntimeError(f"trial {self.trial_id}: fold {fold} failed: {error}") from error
            finished = self._finished()
            with self.started_lock:
                started = sorted(self.started)
            curves = {f: fold_curve(self.out, f, self.column) for f in started}
            longest = max((len(c) for c in curves.values()), default=0)
            if len(finished) == len(self.folds) and epoch >= longest:
                return self._final(epoch, curves)
            if curves and epoch <= longest and all(len(c) >= epoch or f in finished for f, c in curves.items()):
                if epoch >= self.cfg.train.epochs:
                    # The last epoch is reported with the CV result, once every fold has scored: ASHA stops
                    # every trial at max_t, so an epoch-only report there would cut the trial before its result.
                    time.sleep(_POLL_S)
                    continue
                self.iteration_epoch = epoch
                return self._epoch_result(epoch, curves, finished)
            time.sleep(_POLL_S)

    def _epoch_result(self, epoch: int, curves: dict[int, list[float]], finished: list[int]) -> dict[str, Any]:
        values = {f: best_so_far(c, epoch) for f, c in curves.items()}
        defined = [v for v in values.values() if not math.isnan(v)]
        return {"score": float(np.mean(defined)) if defined else 0.0, "epoch": epoch,
                "fold_mean": float(np.mean(defined)) if defined else float("nan"),
                "fold_sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else float("nan"),
                "folds_reporting": len(curves), "folds_finished": len(finished), "folds": len(self.folds),
                "cv_complete": False}

    def _final(self, epoch: int, curves: dict[int, list[float]]) -> dict[str, Any]:
        # aggregate_cv writes the trial's CV files (cv_summary.json, oof_predictions.csv) itself.
        summary = aggregate_cv(self.out, self.cfg.folds.k, label_schemes.reported_melanoma_index(
            self.cfg.data.label_scheme))
        self.mirror.push()  # in the store before the trial reports its result (cleanup() would be later)
        pooled = summary["pooled_oof"].get(self.metric)
        ms = summary["mean_std"].get(self.metric, {})
        self.iteration_epoch = epoch
        return {"score": float(pooled) if pooled is not None else 0.0, "epoch": epoch,
                "fold_mean": ms.get("mean"), "fold_sd": ms.get("std"), "oof": pooled,
                "folds_reporting": len(self.folds), "folds_finished": len(self.folds), "folds": len(self.folds),
                "cv_complete": True, "done": True}

    def cleanup(self) -> None:
        """Stopped (ASHA, the end, an error): tear the running fold groups down before the actor goes."""
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=60)  # `run_horovod_group` looks at the event every second
        self.files.close()

    def reset_config(self, new_config: dict) -> bool:
        return False  # a new trial gets a new actor: fold threads are not reused

    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        # The folds checkpoint themselves in the trial's output directory; Tune needs nothing more.
        return {"epoch": self.iteration_epoch}

    def load_checkpoint(self, checkpoint: dict) -> None:
        pass
