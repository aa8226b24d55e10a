"""Train and score one cross-validation fold, on one worker or as one Horovod rank.

The same function runs in a plain process (a Horovod world of size 1), under
`horovodrun -np N`, and inside the Ray-scheduled Horovod groups of `cv`. Every
rank reads its own share of the training rows; validation predictions of all
ranks are gathered so that the metrics cover the whole fold exactly once. Only
rank 0 writes files.

Outputs in `<output_dir>/fold-<K>/`: `model.keras`, `history.csv`,
`predictions.csv` (image_id, group, label, probability per class), and
`metrics.json`, written last (its presence marks the fold as done). The
checkpoint and the metrics record the data the fold was made on (the dataset's
manifest and the fold's image assignment), so that they are never resumed or
taken as done for other data.

With `output_dir` in an object store (`s3://...`), rank 0 works in a local temporary
folder mirrored to `<output_dir>/fold-<K>/`: it downloads it first (to resume), uploads
what changed after every epoch's checkpoint, and uploads `metrics.json` last.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from melanoma_dist import labels as label_schemes
from melanoma_dist import storage
from melanoma_dist.config import Config
from melanoma_dist.data import folds as fold_io
from melanoma_dist.data import shards
from melanoma_dist.data.pipeline import RowIndex, make_dataset, split_rows, steps_per_epoch, worker_rows
from melanoma_dist import distributed as hk
from melanoma_dist.metrics import classification_metrics, format_metric
from melanoma_dist.paths import is_uri
from melanoma_dist.run_files import (CHECKPOINT_DIR, HISTORY_FILE, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE,
                                     fold_dir, fold_name)
from melanoma_dist.model.build import build_model, set_backbone_trainable
from melanoma_dist.model.training_model import training_model
from melanoma_dist.train import checkpoint as ckpt
from melanoma_dist.train.progress import EpochProgress
from melanoma_dist.train.tensorboard import fold_tensorboard
from melanoma_dist.train.validation import FoldValidation, monitored_metric

logger = logging.getLogger(__name__)

def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced class weights n / (C * n_c); classes absent from training get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    n = counts.sum()
    return {c: float(n / (num_classes * counts[c])) if counts[c] else 0.0 for c in range(num_classes)}


@dataclass(frozen=True)
class FoldData:
    """What one rank reads for one fold."""

    index: RowIndex
    class_names: tuple[str, ...]
    image_size: int
    train_rows: np.ndarray  # all ranks' training rows (global ids)
    val_rows: np.ndarray  # all ranks' validation rows (global ids)
    fingerprint: dict[str, str]  # the dataset and split this fold uses (`folds.data_fingerprint`)


def load_fold_data(cfg: Config, fold: int) -> FoldData:
    """Read the manifest, row index and fold assignment, and select one fold's rows.

    Raises:
        ValueError: the fold is outside [0, folds.k), one side of the split is empty, or
            the validation side lacks a class (folds made before `make_folds` refused that).
    """
    if not 0 <= fold < cfg.folds.k:
        raise ValueError(f"fold must be in [0, {cfg.folds.k}) for folds.k={cfg.folds.k}, got {fold}")
    manifest = shards.load_manifest(cfg.data.dataset_dir)
    index = RowIndex.load(cfg.data.dataset_dir)
    fold_of_row = fold_io.load_folds(cfg.data.dataset_dir, cfg.folds.k, cfg.folds.seed)
    train_rows, val_rows = split_rows(fold_of_row, fold, True), split_rows(fold_of_row, fold, False)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"fold {fold} leaves an empty training or validation set "
                         f"({len(train_rows)} / {len(val_rows)} images)")
    # Before any training time is spent: a fold without some class cannot be scored.
    fold_io.check_fold_classes(index.labels, fold_of_row, manifest["class_names"], [fold])
    fingerprint = fold_io.data_fingerprint(cfg.data.dataset_dir, fold_of_row, fold, index.image_ids)
    return FoldData(index, tuple(manifest["class_names"]), int(manifest["image_size"]), train_rows, val_rows,
                    fingerprint)


def make_optimizer(cfg: Config, learning_rate: float) -> keras.optimizers.Optimizer:
    """The configured optimizer, wrapped for Horovod gradient averaging."""
    if cfg.train.optimizer == "adamw":
        base = keras.optimizers.AdamW(learning_rate, weight_decay=cfg.train.weight_decay)
    else:
        base = keras.optimizers.Adam(learning_rate)
    # Horovod: average gradients across ranks before every update (Keras-3-safe wrapper).
    return hk.distributed_optimizer(base)


def compile_model(cfg: Config, model: keras.Model, num_classes: int, learning_rate: float) -> keras.Model:
    """Compile `model` with the configured optimizer (call again after changing what is trainable)."""
    binary = num_classes == 2
    model.compile(
        optimizer=make_optimizer(cfg, learning_rate),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        # Horovod's allreduce ops cannot run inside XLA clusters; Keras would pick XLA on GPUs.
        # train.jit_compile compiles the forward/backward pass alone (model/training_model.py).
        jit_compile=False)
    return model


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one set of trainable layers (freeze-then-unfreeze)."""

    start_epoch: int
    """First epoch of the phase."""
    end_epoch: int
    """First epoch after the phase."""
    trainable_blocks: int
    """Backbone units trained (see `model.fine_tune_blocks`)."""
    fine_tuning: bool = False
    """A phase after the head-only one: smaller learning rate, warmed up from 0."""


def training_phases(cfg: Config) -> list[Phase]:
    """Head-only epochs first (pretrained backbones with `train.head_epochs`), then fine-tuning."""
    epochs, head = cfg.train.epochs, cfg.train.head_epochs
    if cfg.model.backbone != "simple_cnn" and head > 0 and cfg.model.fine_tune_blocks != 0:
        head = min(head, epochs)
        return [Phase(0, head, 0), Phase(head, epochs, cfg.model.fine_tune_blocks, fine_tuning=True)]
    return [Phase(0, epochs, cfg.model.fine_tune_blocks)]


def learning_rate_schedule(cfg: Config, phase: Phase, size: int, steps: int) -> hk.WarmupScaledLR:
    """The phase's learning-rate callback: warm-up (scaled by the number of workers), then cosine or constant."""
    t = cfg.train
    return hk.WarmupScaledLR(
        t.learning_rate * (t.fine_tune_lr_scale if phase.fine_tuning else 1.0), warmup_epochs=t.warmup_epochs,
        size=size, steps_per_epoch=steps, cosine_epochs=phase.end_epoch if t.lr_schedule == "cosine" else None,
        min_ratio=t.min_lr_ratio, start_epoch=phase.start_epoch,
        # A fresh optimizer on pretrained weights: Adam's first steps are ~lr in size, so start from 0.
        initial_ratio=0.0 if phase.fine_tuning else None)


def _write_predictions(path: Path, data: FoldData, rows: np.ndarray, probs: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "group", "label", "label_name", "pred"] + [f"prob_{c}" for c in data.class_names])
        ids, groups = data.index.image_ids.take(rows).to_pylist(), data.index.groups.take(rows).to_pylist()
        for r, image_id, group, p in zip(rows, ids, groups, probs):
            y = int(data.index.labels[r])
            w.writerow([image_id, group, y, data.class_names[y], int(p.argmax())]
                       + [f"{v:.6f}" for v in p])


@dataclass(frozen=True)
class _Inputs:
    """One rank's batches and fit settings for a fold."""

    train_ds: tf.data.Dataset
    steps: int
    validation: FoldValidation
    class_weight: dict[int, float] | None


MIXED_POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
"""Keras dtype policy of each `train.mixed_precision` setting."""


def _start_worker(cfg: Config) -> hk.WorkerContext:
    """Join Horovod, set the precision policy and the seed."""
    # Horovod: one process per GPU, pinned by local rank; a plain process is rank 0 of 1.
    ctx = hk.init_worker(use_gpu=cfg.distributed.gpus_per_worker > 0)
    if cfg.train.mixed_precision != "none":
        if tf.config.list_physical_devices("GPU"):
            # fp16 gets a loss-scale optimizer from hk.distributed_optimizer; bf16 needs none.
            keras.mixed_precision.set_global_policy(MIXED_POLICIES[cfg.train.mixed_precision])
        else:
            logger.warning("train.mixed_precision is set but no GPU is visible: training in float32")
    # Horovod: a seed per rank, so unseeded randomness differs between ranks (reproducible per world size).
    keras.utils.set_random_seed(ctx.rank_seed(cfg.train.seed))
    return ctx


def _rank_inputs(cfg: Config, data: FoldData, ctx: hk.WorkerContext) -> _Inputs:
    """This rank's share of the fold: training batches, and the whole-fold validation callback."""
    num_classes = len(data.class_names)
    # Horovod: each rank reads a disjoint share; shuffling/augmentation seeds differ per rank.
    my_train = worker_rows(data.train_rows, ctx.rank, ctx.size)
    my_val = worker_rows(data.val_rows, ctx.rank, ctx.size)
    train_ds = make_dataset(data.index, my_train, cfg.pipeline, data.image_size, training=True,
                            seed=cfg.train.seed + 7919 * ctx.rank)
    val_ds = make_dataset(data.index, my_val, cfg.pipeline, data.image_size, training=False)
    val_steps = math.ceil(len(my_val) / cfg.pipeline.batch_size)  # one exact pass over this rank's share
    weights = (class_weights(data.index.labels[data.train_rows], num_classes)
               if cfg.train.class_weight == "balanced" else None)
    return _Inputs(train_ds, steps_per_epoch(len(data.train_rows), ctx.size, cfg.pipeline.batch_size),
                   FoldValidation(val_ds, val_steps, my_val, data.index.labels, num_classes), weights)


def _train_phases(cfg: Config, fold: int, ctx: hk.WorkerContext, model: keras.Model, data: FoldData,
                  inputs: _Inputs, resume: ckpt.Resume | None, out: Path,
                  mirror: storage.FolderMirror | None = None) -> ckpt.ResumableEarlyStopping:
    """Train the phases not yet done, from `resume` if any; returns the early stopping of the last phase run.

    `out` is the fold's folder; `mirror` (an object-store output_dir) is pushed after each epoch,
    once its checkpoint is written.
    """
    resume_dir = out / CHECKPOINT_DIR
    num_classes = len(data.class_names)
    monitor, mode = monitored_metric(cfg.train.monitor, num_classes)
    initial_epoch, first_phase = (resume.epoch, resume.phase) if resume else (0, 0)
    es_state, rl_state = (resume.early_stopping, resume.reduce_lr) if resume else (None, None)
    best_weights = resume.best_weights if resume else None
    phases = training_phases(cfg)
    for p, phase in enumerate(phases[first_phase:], start=first_phase):
        set_backbone_trainable(model, cfg.model, phase.trainable_blocks)
        compile_model(cfg, model, num_classes, cfg.train.learning_rate)
        if p == first_phase:
            if resume:  # rank 0 loads the checkpoint and broadcasts it, optimizer state included
                ckpt.restore_model(model, resume, ctx.size)
            else:
                # Horovod: start every rank from rank 0's weights.
                hk.broadcast_model(model, root_rank=0)
        early_stopping = ckpt.ResumableEarlyStopping(
            state=es_state, best_weights=best_weights, monitor=monitor, mode=mode,
            patience=cfg.train.early_stopping_patience, restore_best_weights=True)
        reduce_lr = (ckpt.ResumableReduceLROnPlateau(
            state=rl_state, monitor=monitor, mode=mode, factor=cfg.train.reduce_lr_factor,
            patience=cfg.train.reduce_lr_patience) if cfg.train.lr_schedule == "plateau" else None)
        callbacks: list[keras.callbacks.Callback] = [
            # Horovod: average training metrics over ranks, then validate on the whole fold, so
            # every rank takes the same early-stopping and learning-rate decisions below.
            hk.MetricAverageCallback(),
            inputs.validation,
            # Horovod: scale the learning rate by the number of workers, after a warm-up.
            learning_rate_schedule(cfg, phase, ctx.size, inputs.steps),
            *([reduce_lr] if reduce_lr is not None else []),
            early_stopping,
        ]
        if ctx.is_chief:  # Horovod: only rank 0 writes checkpoints and logs.
            callbacks += [EpochProgress(fold, cfg.train.epochs),
                          keras.callbacks.CSVLogger(str(out / HISTORY_FILE), append=initial_epoch > 0),
                          ckpt.FoldCheckpoint(resume_dir, early_stopping, reduce_lr, ckpt.resume_key(cfg),
                                              data.fingerprint, phase=p, workers=ctx.size),
                          fold_tensorboard(out)]
            if mirror is not None:  # after FoldCheckpoint: the epoch's checkpoint goes up with it
                callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: mirror.push()))
        # A fold that stopped early before a crash is done: training on would change its result.
        if initial_epoch < phase.end_epoch and not early_stopping.stopped_epoch:
            # shuffle=False: the dataset shuffles itself.
            model.fit(inputs.train_ds, epochs=phase.end_epoch, initial_epoch=initial_epoch,
                      steps_per_epoch=inputs.steps, shuffle=False, class_weight=inputs.class_weight,
                      callbacks=callbacks, verbose=cfg.train.verbose if ctx.is_chief else 0)
            initial_epoch = phase.end_epoch
        es_state = early_stopping.state()
        rl_state = reduce_lr.state() if reduce_lr is not None else None
        best_weights = early_stopping.best_weights
        if early_stopping.stopped_epoch > 0:
            break
    return early_stopping


def _write_results(out: Path, data: FoldData, model: keras.Model, rows: np.ndarray,
                   probs: np.ndarray, metrics: dict) -> None:
    """Write the model, predictions and, last (it marks the fold as done), `metrics.json` (rank 0) in `out`."""
    model.save(out / MODEL_FILE)
    _write_predictions(out / PREDICTIONS_FILE, data, rows, probs)
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / METRICS_FILE)


def train_fold(cfg: Config, fold: int, extra: dict | None = None) -> dict | None:
    """Train on every fold but `fold`, validate and score on `fold`.

    A fold that was interrupted resumes from its last finished epoch, if that
    checkpoint is intact and of the same config and data (`checkpoint.resume_fold`);
    a fold that had finished training is scored again from its best epoch. An
    object-store `output_dir` is mirrored by a local temporary folder (module docstring).

    Args:
        cfg: The job's config.
        fold: The validation fold.
        extra: Entries added to the metrics (e.g. the Ray node and attempt). Defaults to `None`.

    Returns:
        The metrics dict on rank 0, None on other ranks.
    """
    if not is_uri(cfg.output_dir):
        return _train_fold(cfg, fold, extra)
    # The config keeps the URI: it is part of the checkpoint's key (`checkpoint.resume_key`). Horovod: rank 0
    # alone pulls (in `_train_fold`) and writes; the other ranks' folders stay empty, so their push sends nothing.
    with storage.mirrored(storage.join(cfg.output_dir, fold_name(fold)), pull=False,
                          push_last=(METRICS_FILE,)) as mirror:
        return _train_fold(cfg, fold, extra, mirror)


def _train_fold(cfg: Config, fold: int, extra: dict | None = None,
                mirror: storage.FolderMirror | None = None) -> dict | None:
    """`train_fold`, writing the fold's files in `mirror.local` when given, else in `<output_dir>/fold-K`."""
    start = time.time()
    ctx = _start_worker(cfg)

    data = load_fold_data(cfg, fold)
    if data.image_size != cfg.data.image_size:
        raise ValueError(f"the dataset in {cfg.data.dataset_dir} holds {data.image_size}px images but "
                         f"data.image_size is {cfg.data.image_size}: re-ingest or set data.image_size={data.image_size}")
    out = mirror.local if mirror is not None else fold_dir(cfg.output_dir, fold)
    if ctx.is_chief:
        if mirror is not None:  # Horovod: rank 0 alone reads the checkpoint, so it alone downloads it
            mirror.pull()
        out.mkdir(parents=True, exist_ok=True)
        logger.info("fold %d: %d training / %d validation images, %d worker(s), host %s%s",
                    fold, len(data.train_rows), len(data.val_rows), ctx.size, socket.gethostname(),
                    f", node {str(extra['node_id'])[:8]}" if extra and "node_id" in extra else "")
    inputs = _rank_inputs(cfg, data, ctx)
    # Horovod: same initial weights (broadcast anyway), but each rank draws its own dropout masks.
    model = build_model(cfg.model, data.image_size, len(data.class_names), seed=cfg.train.seed,
                        dropout_seed=ctx.rank_seed(cfg.train.seed))

    # Horovod: rank 0 alone reads the checkpoint and decides; every rank resumes at its epoch.
    resume = ckpt.resume_fold(cfg, fold, data.fingerprint, out / CHECKPOINT_DIR, ctx.is_chief)
    # Augmentation as the first block (pipeline.augment_on: model) and/or the XLA step (train.jit_compile):
    # fit trains `trainer`, which shares `model`'s weights; `model` alone is scored and saved.
    # Horovod: augmentation seeded per rank, as the pipeline's.
    trainer = training_model(model, cfg, seed=ctx.rank_seed(cfg.train.seed))
    early_stopping = _train_phases(cfg, fold, ctx, trainer, data, inputs, resume, out, mirror)

    # Score with the best epoch's weights (the same on every rank: the metrics are whole-fold).
    if early_stopping.best_weights is not None:
        model.set_weights(early_stopping.best_weights)
    inputs.validation.set_model(model)  # fit() did not, when the fold had already run all its epochs
    # Score the full fold: each rank predicts its share, rank 0 gets them all.
    rows, probs = inputs.validation.predict_fold()
    if not ctx.is_chief:
        return None
    if not np.array_equal(rows, data.val_rows):  # every validation image exactly once
        raise RuntimeError(f"gathered predictions cover {len(rows)} rows, expected {len(data.val_rows)}")
    metrics = classification_metrics(data.index.labels[rows], probs, data.class_names,
                                     label_schemes.reported_melanoma_index(cfg.data.label_scheme))
    metrics.update(extra or {})
    metrics.update(fold=fold, data_fingerprint=data.fingerprint, resumed_from_epoch=resume.epoch if resume else 0,
                   workers=ctx.size, host=socket.gethostname(),
                   epochs_run=int(ckpt.load_state(out / CHECKPOINT_DIR)["epoch"]),
                   best_epoch=early_stopping.best_epoch + 1, wall_time_s=round(time.time() - start, 1))
    _write_results(out, data, model, rows, probs, metrics)
    logger.info("fold %d done in %.0fs: accuracy %.3f, balanced accuracy %s, ROC-AUC %s", fold,
                metrics["wall_time_s"], metrics["accuracy"], format_metric(metrics["balanced_accuracy"]),
                format_metric(metrics["roc_auc"]))
    return metrics
