"""Worker bodies of the 2-process Horovod job in test_horovod_keras.py.

`horovod.run` pickles `run_all` by reference, so it lives in an importable module
(the workers get the repository root on PYTHONPATH). It runs every scenario in
one job (TensorFlow start-up dominates) and returns plain numpy results, which
the tests compare across ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GLOBAL_BATCH = 8
STEPS = 4


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

    from melanoma_dist.distributed import horovod_keras as hk

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
    logs = {"loss": float(rank), "auc": 2.0 * rank + 1.0, "steps": rank + 1, "tag": f"rank{rank}"}
    hk.MetricAverageCallback().on_epoch_end(0, logs)
    out["metric_logs"] = logs

    # 4. allgather_rows with uneven first dimensions; scalar helpers.
    rows = 3 if rank == 0 else 2
    out["gathered"] = hk.allgather_rows(np.array([[rank, i] for i in range(rows)], dtype=np.int64))
    out["gathered_bool"] = hk.allgather_rows(np.full((rows,), rank == 1))
    out["min_steps"] = hk.min_over_ranks(5 if rank == 0 else 3)
    out["mean"] = hk.allreduce_mean(float(rank))
    hk.barrier()

    # 7. mixed_float16: the averaging happens before LossScaleOptimizer's inf/NaN check.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        model.set_weights([np.full(w.shape, 0.1, "float32") for w in model.get_weights()])
        model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.SGD(0.1)), loss="mse")
        out["mixed_optimizer"] = type(model.optimizer).__name__
        xm = np.random.default_rng(7 + rank).normal(size=(4, 4)).astype("float32")
        ym = np.ones((4, 1), "float32")
        model.train_on_batch(xm, ym)  # finite everywhere: a step on averaged gradients
        out["mixed_w1"] = model.get_weights()
        out["mixed_scale1"] = float(model.optimizer.dynamic_scale.numpy())
        if rank == 1:
            xm[0, 0] = np.nan  # inf/NaN on one rank only: every rank must skip the step
        model.train_on_batch(xm, ym)
        out["mixed_w2"] = model.get_weights()
        out["mixed_scale2"] = float(model.optimizer.dynamic_scale.numpy())
    finally:
        keras.config.set_dtype_policy("float32")
    hk.shutdown()
    return out
