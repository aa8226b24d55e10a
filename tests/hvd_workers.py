"""Worker bodies of the 2-process Horovod jobs in test_horovod_keras.py and test_ranks_agree.py.

`horovod.run` pickles the worker functions by reference, so they live in an
importable module (the workers get the repository root on PYTHONPATH). Each
runs every scenario of its test module in one job (TensorFlow start-up
dominates) and returns plain numpy results, which the tests compare across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GLOBAL_BATCH = 8
STEPS = 4
REPO = Path(__file__).resolve().parents[1]
WORKER_ENV = {  # 2 ranks on 2 cores: one thread each
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Gloo's rendezvous waits 30 s by default for the other rank, which imports TensorFlow first:
    # not enough when the 2 cores are busy.
    "HOROVOD_GLOO_TIMEOUT_SECONDS": "180",
}


def run_two_ranks(fn: Callable[..., dict[str, Any]], *args: Any) -> list[dict[str, Any]]:
    """`fn(*args)` on 2 real Horovod ranks over Gloo; its results in rank order."""
    import horovod
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for key, value in WORKER_ENV.items():
            mp.setenv(key, value)
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        results = horovod.run(fn, args=args, np=2, use_gloo=True, start_timeout=120)
    assert [r["rank"] for r in results] == [0, 1] and results[0]["size"] == 2
    return results


def tiny_cnn(seed: int = 0) -> Any:
    """A conv net without BatchNorm/Dropout (its loss is exactly batch-separable), weights from `seed`."""
    import keras

    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    """STEPS global batches of GLOBAL_BATCH rows."""
    rng = np.random.default_rng(42)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6, 6, 1)).astype("float32")
    y = rng.normal(size=(GLOBAL_BATCH * STEPS, 1)).astype("float32")
    return x, y


def shard(a: np.ndarray, rank: int, size: int) -> np.ndarray:
    """Rows of `rank` in every global batch: complementary slices of each batch."""
    per = GLOBAL_BATCH // size
    idx = [b * GLOBAL_BATCH + rank * per + i for b in range(STEPS) for i in range(per)]
    return a[idx]


def _fit(model: Any, optimizer: Any, x: np.ndarray, y: np.ndarray, batch: int, callbacks: list) -> Any:
    model.compile(optimizer=optimizer, loss="mse")
    return model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)


def run_all() -> dict[str, Any]:
    """Every 2-rank scenario; returns this rank's results."""
    import keras

    from melanoma_dist import distributed as hk

    ctx = hk.init_worker(use_gpu=False)
    rank, size = ctx.rank, ctx.size
    x, y = data()
    xr, yr = shard(x, rank, size), shard(y, rank, size)
    out: dict[str, Any] = {"rank": rank, "size": size}

    # 1. Equivalence: N ranks on halves of each batch == 1 rank on whole batches.
    optimizers = {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(0.01)}
    for name, make in optimizers.items():
        model = tiny_cnn()
        hist = _fit(model, hk.distributed_optimizer(make()), xr, yr, GLOBAL_BATCH // size,
                    [hk.MetricAverageCallback()])
        out[f"{name}_dist"] = model.get_weights()
        out[f"{name}_dist_loss"] = hist.history["loss"]
        out[f"{name}_steps"] = int(model.optimizer.iterations.numpy())
        ref = tiny_cnn()
        _fit(ref, make(), x, y, GLOBAL_BATCH, [])
        out[f"{name}_ref"] = ref.get_weights()
        out[f"{name}_init"] = tiny_cnn().get_weights()
    # The failure mode: a plain optimizer trains each rank on its own half.
    local = tiny_cnn()
    _fit(local, keras.optimizers.SGD(0.1), xr, yr, GLOBAL_BATCH // size, [])
    out["sgd_local"] = local.get_weights()

    # 2. broadcast_model: different seeds, then rank 0's weights (and optimizer state) everywhere.
    model = tiny_cnn(seed=100 + rank)
    out["bcast_before"] = model.get_weights()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    if rank == 0:  # a plain optimizer: only rank 0 steps (stands for "rank 0 loaded a checkpoint")
        model.train_on_batch(x[:4], y[:4])
    hk.broadcast_model(model, include_optimizer=True)
    out["bcast_after"] = model.get_weights()
    out["bcast_opt"] = [np.asarray(v.numpy()) for v in model.optimizer.variables]
    xla = tiny_cnn()
    xla.compile(optimizer=hk.distributed_optimizer("sgd"), loss="mse", jit_compile=True)
    try:  # rejected before any collective, on every rank
        hk.broadcast_model(xla)
    except ValueError as e:
        out["xla_error"] = str(e)

    # 3. MetricAverageCallback on rank-dependent logs.
    logs = {"loss": float(rank), "accuracy": 2.0 * rank + 1.0, "steps": rank + 1, "tag": f"rank{rank}"}
    hk.MetricAverageCallback().on_epoch_end(0, logs)
    out["metric_logs"] = logs

    # 4. allgather_rows with uneven first dimensions; barrier.
    rows = 3 if rank == 0 else 2
    out["gathered"] = hk.allgather_rows(np.array([[rank, i] for i in range(rows)], dtype=np.int64))
    out["gathered_bool"] = hk.allgather_rows(np.full((rows,), rank == 1))
    hk.barrier()

    # 6. The XLA gradient step (TrainingModel) against the plain one, both with the allreduce.
    out["xla_equivalence"] = xla_equivalence(rank, size)

    # 7. mixed_float16: the averaging happens before LossScaleOptimizer's inf/NaN check,
    # in Keras' own step and in the XLA step alike.
    from melanoma_dist.model.training_model import TrainingModel

    keras.config.set_dtype_policy("mixed_float16")
    try:
        for suffix, jit in (("", False), ("_xla", True)):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                                      keras.layers.Dense(1, dtype="float32")])
            model.set_weights([np.full(w.shape, 0.1, "float32") for w in model.get_weights()])
            trainer = TrainingModel(model, jit_gradients=True) if jit else model
            trainer.compile(optimizer=hk.distributed_optimizer(keras.optimizers.SGD(0.1)), loss="mse",
                            jit_compile=False)
            out[f"mixed_optimizer{suffix}"] = type(trainer.optimizer).__name__
            xm = np.random.default_rng(7 + rank).normal(size=(4, 4)).astype("float32")
            ym = np.ones((4, 1), "float32")
            trainer.train_on_batch(xm, ym)  # finite everywhere: a step on averaged gradients
            out[f"mixed_w1{suffix}"] = model.get_weights()
            out[f"mixed_scale1{suffix}"] = float(trainer.optimizer.dynamic_scale.numpy())
            if rank == 1:
                xm[0, 0] = np.nan  # inf/NaN on one rank only: every rank must skip the step
            trainer.train_on_batch(xm, ym)
            out[f"mixed_w2{suffix}"] = model.get_weights()
            out[f"mixed_scale2{suffix}"] = float(trainer.optimizer.dynamic_scale.numpy())
    finally:
        keras.config.set_dtype_policy("float32")
    hk.shutdown()
    return out


# ---------------------------------------------------------------- test_ranks_agree.py

SEED = 3
VAL_ROWS = 16
AGREE_MODEL = {"filters": (4,), "convs_per_block": 1, "dense_units": 0, "dropout": 0.5}


def agreement_data(rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(this rank's training images and labels, the whole validation fold's images and labels).

    Rank 1's images are brighter, so BatchNorm statistics differ between ranks;
    validation row i belongs to rank i % 2 and is brightened the same way, and
    both classes occur on both ranks.
    """
    rng = np.random.default_rng(rank)
    x = (rng.random((24, 8, 8, 3)) * 0.5 + 0.4 * rank).astype("float32")
    y = (np.arange(24) % 2).astype("float32")
    val_rng = np.random.default_rng(99)
    val_y = np.array([0, 0, 1, 1] * (VAL_ROWS // 4))
    val_x = val_rng.random((VAL_ROWS, 8, 8, 3)) * 0.5 + 0.4 * (np.arange(VAL_ROWS) % 2)[:, None, None, None]
    val_x += 0.1 * val_y[:, None, None, None]  # a learnable, rank-independent signal
    return x, y, val_x.astype("float32"), val_y


def run_agreement(out_dir: str) -> dict[str, Any]:
    """One epoch of a BatchNorm + dropout CNN on rank-specific data; what must agree (or not) across ranks."""
    import keras
    import tensorflow as tf

    from melanoma_dist import distributed as hk
    from melanoma_dist.config import ModelConfig
    from melanoma_dist.model.build import build_model
    from melanoma_dist.train.validation import FoldValidation

    ctx = hk.init_worker(use_gpu=False)
    out: dict[str, Any] = {"rank": ctx.rank, "size": ctx.size}
    cfg = ModelConfig(**AGREE_MODEL)

    def model_of_this_rank() -> Any:  # as train/fold.py builds it
        return build_model(cfg, 8, 2, seed=SEED, dropout_seed=ctx.rank_seed(SEED))

    # Dropout in training mode on the same input: rank-specific masks, reproducible from the seed.
    ones = np.ones((4, 4), "float32")
    out["dropout"] = [np.asarray(model_of_this_rank().get_layer("head_dropout1")(ones, training=True))
                      for _ in range(2)]

    # One epoch on rank-specific data, validated on the whole fold, as train/fold.py does.
    x, y, val_x, val_y = agreement_data(ctx.rank)
    model = model_of_this_rank()
    model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(0.01)), loss="binary_crossentropy",
                  metrics=["accuracy"], jit_compile=False)
    hk.broadcast_model(model)
    mine = np.arange(ctx.rank, VAL_ROWS, ctx.size)
    validation = FoldValidation(tf.data.Dataset.from_tensor_slices(val_x[mine]).batch(4), 2, mine, val_y, 2)
    history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                        callbacks=[hk.MetricAverageCallback(), validation])
    out["history"] = history.history
    out["weights"] = model.get_weights()
    out["bn_stats"] = [np.asarray(v.numpy()) for v in hk.batchnorm_statistics(model)]
    out["rows"], out["probs"] = validation.predict_fold()
    if ctx.is_chief:  # Horovod: rank 0 saves, as train/fold.py does after scoring
        model.save(Path(out_dir) / "model.keras")

    # fit(validation_data=...): SyncBatchNormStatistics syncs in on_test_begin, before Keras validates,
    # so both ranks validate one model (same val_loss with no MetricAverageCallback).
    model = model_of_this_rank()
    model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(0.01)), loss="binary_crossentropy",
                  jit_compile=False)
    hk.broadcast_model(model)
    history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, validation_data=(val_x, val_y),
                        callbacks=[hk.SyncBatchNormStatistics()])
    out["keras_val_loss"] = history.history["val_loss"]

    # A per-rank AUC in the logs would be averaged over ranks: refused, on every rank alike.
    try:
        hk.MetricAverageCallback().on_epoch_end(0, {"loss": 1.0, "val_auc": 0.5 + 0.1 * ctx.rank})
    except ValueError as e:
        out["auc_error"] = str(e)
    hk.shutdown()
    return out


# ---------------------------------------------------------------- XLA step (test_horovod_keras.py, test_training_model.py)

CLASS_WEIGHT = {0: 1.0, 1: 3.0}


def bn_cnn(seed: int = 0) -> Any:
    """A sigmoid conv net with a trainable BatchNorm (moving statistics updated in the step), weights from `seed`."""
    import keras

    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        # No bias before BatchNorm: its gradient is rounding noise, which Adam would scale up to full steps.
        keras.layers.Conv2D(2, 3, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(1, activation="sigmoid", dtype="float32"),
    ])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") if "gamma" not in w.name
                       and "variance" not in w.name else np.ones(w.shape, "float32") for w in model.weights])
    return model


def train_step_run(jit: bool, x: np.ndarray, y: np.ndarray, batch: int, epochs: int = 2) -> dict[str, Any]:
    """Fit `bn_cnn` through `TrainingModel` (XLA gradients or not) with the distributed optimizer,
    class weights, an accuracy metric and metric averaging; its weights, BatchNorm statistics and logs."""
    import keras

    from melanoma_dist import distributed as hk
    from melanoma_dist.model.training_model import TrainingModel

    model = bn_cnn()
    trainer = TrainingModel(model, jit_gradients=jit)
    trainer.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(0.01)), loss="binary_crossentropy",
                    metrics=["accuracy"], jit_compile=False)
    hk.broadcast_model(trainer)
    history = trainer.fit(x, (y > 0).astype("float32"), batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
                          class_weight=CLASS_WEIGHT, callbacks=[hk.MetricAverageCallback()])
    hk.sync_batchnorm_statistics(trainer)
    return {"weights": model.get_weights(), "history": history.history,
            "bn": [np.asarray(v.numpy()) for v in hk.batchnorm_statistics(model)],
            "iterations": int(trainer.optimizer.iterations.numpy())}


def xla_equivalence(rank: int, size: int) -> dict[str, Any]:
    """The XLA and the plain step on this rank's half of every batch (2 ranks) or all of it (1 rank)."""
    x, y = data()
    xr, yr = shard(x, rank, size), shard(y, rank, size)
    return {("xla" if jit else "plain"): train_step_run(jit, xr, yr, GLOBAL_BATCH // size) for jit in (False, True)}
