"""Tests of melanoma_dist.distributed with real Horovod (Gloo, CPU, no mocks).

The 2-rank tests share one `horovod.run(np=2, use_gloo=True)` job (worker
bodies in tests/hvd_workers.py); the others run in this process, a Horovod
world of size 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

hvd = pytest.importorskip("horovod.tensorflow", reason="Horovod is not installed")
import keras  # noqa: E402

from melanoma_dist import distributed as hk  # noqa: E402
from tests import hvd_workers  # noqa: E402

def _flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(w) for w in weights])


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Results of hvd_workers.run_all on each of 2 Gloo ranks, in rank order."""
    return hvd_workers.run_two_ranks(hvd_workers.run_all)


# ---------------------------------------------------------------- 2-rank job

@pytest.mark.integration
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_distributed_optimizer_equals_one_rank_on_whole_batches(ranks: list[dict[str, Any]], name: str) -> None:
    r0, r1 = ranks
    assert r0[f"{name}_steps"] == r1[f"{name}_steps"] == hvd_workers.STEPS
    w0, w1, ref = _flat(r0[f"{name}_dist"]), _flat(r1[f"{name}_dist"]), _flat(r0[f"{name}_ref"])
    np.testing.assert_allclose(w0, w1, rtol=0, atol=1e-6)  # replicas stay identical
    np.testing.assert_allclose(w0, ref, rtol=0, atol=1e-5)  # and equal to 1 rank on the whole batch
    assert np.abs(w0 - _flat(r0[f"{name}_init"])).max() > 1e-2  # the test trained for real
    # MetricAverageCallback ran inside fit: every rank logged the same (averaged) loss.
    assert r0[f"{name}_dist_loss"] == r1[f"{name}_dist_loss"]


@pytest.mark.integration
def test_plain_optimizer_lets_ranks_diverge(ranks: list[dict[str, Any]]) -> None:
    # The failure mode distributed_optimizer fixes: without it each rank follows its own half.
    w0, w1 = _flat(ranks[0]["sgd_local"]), _flat(ranks[1]["sgd_local"])
    assert np.abs(w0 - w1).max() > 1e-3


@pytest.mark.integration
def test_broadcast_model_copies_rank0_weights_and_optimizer_state(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks
    assert np.abs(_flat(r0["bcast_before"]) - _flat(r1["bcast_before"])).max() > 1e-2
    np.testing.assert_array_equal(_flat(r1["bcast_after"]), _flat(r0["bcast_after"]))
    assert len(r0["bcast_opt"]) == len(r1["bcast_opt"]) > 2
    for a, b in zip(r0["bcast_opt"], r1["bcast_opt"]):
        np.testing.assert_array_equal(a, b)
    assert int(r1["bcast_opt"][0]) == 1  # iterations: rank 0's single step
    # XLA (jit_compile="auto" on GPU hosts) cannot run Horovod ops: refused with the fix.
    assert all("compile with jit_compile=False" in r.get("xla_error", "") for r in ranks)


@pytest.mark.integration
def test_metric_average_callback_averages_numeric_logs(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        logs = r["metric_logs"]
        assert (logs["loss"], logs["accuracy"], logs["steps"]) == (0.5, 2.0, 1.5)
        assert logs["tag"] == f"rank{r['rank']}"  # non-numeric entries are left alone


@pytest.mark.integration
def test_allgather_rows_uneven_in_rank_order(ranks: list[dict[str, Any]]) -> None:
    expected = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])
    for r in ranks:
        np.testing.assert_array_equal(r["gathered"], expected)
        np.testing.assert_array_equal(r["gathered_bool"], [False] * 3 + [True] * 2)
        assert r["gathered_bool"].dtype == np.bool_


@pytest.mark.integration
@pytest.mark.parametrize("suffix", ["", "_xla"])
def test_mixed_float16_ranks_take_the_same_step_and_skip_decisions(ranks: list[dict[str, Any]], suffix: str) -> None:
    r0, r1 = ranks
    assert r0[f"mixed_optimizer{suffix}"] == "DistributedLossScaleOptimizer"  # compile() did not re-wrap it
    w1 = _flat(r0[f"mixed_w1{suffix}"])
    np.testing.assert_array_equal(w1, _flat(r1[f"mixed_w1{suffix}"]))
    assert np.isfinite(w1).all() and np.abs(w1 - 0.1).max() > 1e-4
    # Rank 1 alone had NaN gradients: both ranks skipped the step and halved the loss scale.
    for r in ranks:
        np.testing.assert_array_equal(_flat(r[f"mixed_w2{suffix}"]), w1)
        assert r[f"mixed_scale2{suffix}"] == r[f"mixed_scale1{suffix}"] / 2
    if suffix:  # the XLA step (loss scaled inside XLA, averaged and checked outside) took Keras' step
        np.testing.assert_allclose(w1, _flat(r0["mixed_w1"]), rtol=0, atol=1e-3)


@pytest.mark.integration
def test_xla_step_equals_plain_step_on_two_ranks(ranks: list[dict[str, Any]]) -> None:
    """XLA forward/backward with the allreduce outside it == Keras' step, on 2 ranks (issue 13)."""
    runs = [r["xla_equivalence"] for r in ranks]
    for run in runs:
        assert_same_training(run["xla"], run["plain"])
    # Both paths keep the replicas identical (gradients averaged, BatchNorm statistics synced).
    for path in ("xla", "plain"):
        np.testing.assert_array_equal(_flat(runs[0][path]["weights"]), _flat(runs[1][path]["weights"]))
        np.testing.assert_array_equal(_flat(runs[0][path]["bn"]), _flat(runs[1][path]["bn"]))


def assert_same_training(xla: dict[str, Any], plain: dict[str, Any]) -> None:
    """Same steps, weights, BatchNorm statistics and (averaged) logs within float32 tolerance; and trained."""
    assert xla["iterations"] == plain["iterations"] == 2 * hvd_workers.STEPS
    np.testing.assert_allclose(_flat(xla["weights"]), _flat(plain["weights"]), rtol=0, atol=2e-5)
    np.testing.assert_allclose(_flat(xla["bn"]), _flat(plain["bn"]), rtol=0, atol=2e-5)
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(xla["history"][key], plain["history"][key], rtol=1e-5)
    assert np.abs(_flat(plain["weights"]) - _flat(hvd_workers.bn_cnn().get_weights())).max() > 1e-2


# ---------------------------------------------------------------- one process (world of size 1)

@pytest.fixture(scope="module")
def world() -> hk.WorkerContext:
    return hk.init_worker(use_gpu=False)


def test_init_worker_single_process(world: hk.WorkerContext) -> None:
    assert world == hk.WorkerContext(rank=0, size=1, local_rank=0, local_size=1) and world.is_chief
    assert world.rank_seed(5) == 5 and hk.WorkerContext(1, 2, 1, 2).rank_seed(5) == 5 + 7919
    assert hk.allgather_rows(np.arange(3)).tolist() == [0, 1, 2]


SELECT_GPU_CASES = [  # (gpus, local_rank, isolated, expected)
    ([], 0, False, None),
    ([], 3, False, None),
    (["gpu0", "gpu1"], 0, False, "gpu0"),
    (["gpu0", "gpu1"], 1, False, "gpu1"),
    (["gpu3"], 2, True, "gpu3"),  # e.g. a Ray actor given one GPU
]
SELECT_GPU_INVALID = [  # (gpus, local_rank, message)
    (["gpu0", "gpu1"], 2, "more workers than GPUs on this node"),
    (["gpu0"], 1, "more workers than GPUs on this node"),
    (["gpu0"], -1, "local_rank must be >= 0"),
]


@pytest.mark.parametrize("gpus,local_rank,isolated,expected", SELECT_GPU_CASES)
def test_select_gpu(gpus: list, local_rank: int, isolated: bool, expected: Any) -> None:
    assert hk.select_gpu(gpus, local_rank, isolated=isolated) == expected


@pytest.mark.parametrize("gpus,local_rank,message", SELECT_GPU_INVALID)
def test_select_gpu_invalid(gpus: list, local_rank: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hk.select_gpu(gpus, local_rank)


class _LRRecorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def _fit_lr(callbacks: list, epochs: int, steps: int = 4) -> tuple[_LRRecorder, keras.Model]:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    recorder = _LRRecorder()
    x = np.ones((4 * steps, 2), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=epochs, verbose=0, callbacks=[*callbacks, recorder])
    return recorder, model


def test_warmup_scaled_lr_trajectory_and_reduce_lr_on_plateau() -> None:
    # base 0.01, 4 workers, 2 warm-up epochs of 4 batches: 0.01 -> 0.04 linearly, per batch.
    warmup = [0.01 * (1 + 3 * b / 8) for b in range(8)]
    # The loss never "improves" by 1e9: the plateau halves the rate after every epoch from epoch 2 on.
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=1e9)
    recorder, model = _fit_lr([hk.WarmupScaledLR(0.01, warmup_epochs=2, size=4), plateau], epochs=4)
    # Warm-up ends at 0.04, the plateau's reduction at the end of epoch 2 (to 0.02) and the next stay.
    np.testing.assert_allclose(recorder.lrs, warmup + [0.02] * 4 + [0.01] * 4, rtol=1e-6)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 0.005, rtol=1e-6)


def test_warmup_scaled_lr_without_warmup_and_size_one() -> None:
    recorder, _ = _fit_lr([hk.WarmupScaledLR(0.01, warmup_epochs=0, size=3)], epochs=2)
    np.testing.assert_allclose(recorder.lrs, [0.03] * 8, rtol=1e-6)
    recorder, _ = _fit_lr([hk.WarmupScaledLR(0.01, warmup_epochs=1, size=1)], epochs=2)
    np.testing.assert_allclose(recorder.lrs, [0.01] * 8, rtol=1e-6)


def test_warmup_then_cosine_decay_per_batch() -> None:
    # base 0.01 x 2 workers, 1 warm-up epoch of 4 batches, cosine over epochs 2-3 (8 batches) to 10 %.
    recorder, _ = _fit_lr([hk.WarmupScaledLR(0.01, warmup_epochs=1, size=2, cosine_epochs=3, min_ratio=0.1)],
                          epochs=3)
    warmup = [0.01 * (1 + b / 4) for b in range(4)]
    cosine = [0.02 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t / 8))) for t in range(8)]
    np.testing.assert_allclose(recorder.lrs, warmup + cosine, rtol=1e-6)
    assert recorder.lrs[4] == pytest.approx(0.02) and recorder.lrs[-1] < 0.005


def test_a_later_phase_warms_up_from_zero_then_decays() -> None:
    # Fine-tuning phase from epoch 1: epoch 0 untouched, warm-up 0 -> 0.01 over epoch 1, cosine over epoch 2.
    recorder, _ = _fit_lr([hk.WarmupScaledLR(0.01, warmup_epochs=1, size=1, cosine_epochs=3, start_epoch=1,
                                             initial_ratio=0.0)], epochs=3)
    untouched = recorder.lrs[:4]
    assert len(set(untouched)) == 1  # the optimizer's own rate, not set by the callback
    np.testing.assert_allclose(recorder.lrs[4:8], [0.01 * b / 4 for b in range(4)], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(recorder.lrs[8:], [0.01 * 0.5 * (1 + np.cos(np.pi * b / 4)) for b in range(4)],
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"base_lr": 0.0, "warmup_epochs": 1}, "base_lr must be > 0"),
    ({"base_lr": 0.1, "warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ({"base_lr": 0.1, "warmup_epochs": 1, "size": 0}, "size must be >= 1"),
])
def test_warmup_scaled_lr_invalid(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hk.WarmupScaledLR(**kwargs)


def test_mixed_float16_one_process_step(world: hk.WorkerContext) -> None:
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = hvd_workers.tiny_cnn()  # float16 compute, float32 weights
        # An explicit LossScaleOptimizer is made distributed as is (the averaging goes outside it).
        scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01), initial_scale=2.0**8)
        model.compile(optimizer=hk.distributed_optimizer(scaled), loss="mse")
        assert type(model.optimizer).__name__ == "DistributedLossScaleOptimizer"
        assert model.optimizer.initial_scale == 2.0**8 and model.layers[0].compute_dtype == "float16"
        before = _flat(model.get_weights())
        x, y = hvd_workers.data()
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
        after = _flat(model.get_weights())
        assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**8  # the step was not skipped
        assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4
    finally:
        keras.config.set_dtype_policy("float32")


def test_wrong_loss_scale_order_is_rejected(world: hk.WorkerContext) -> None:
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, dtype="float32")])
        # loss_scale=False: compile() wraps the distributed optimizer in a LossScaleOptimizer.
        model.compile(optimizer=hk.distributed_optimizer("sgd", loss_scale=False), loss="mse")
        with pytest.raises(ValueError, match="auto_scale_loss=False"):
            hk.broadcast_model(model)
    finally:
        keras.config.set_dtype_policy("float32")


def test_distributed_optimizer_keeps_config_and_rejects_built() -> None:
    adam = keras.optimizers.Adam(0.003, beta_1=0.8, clipnorm=1.0)
    dist = hk.distributed_optimizer(adam)
    assert type(dist).__name__ == "DistributedAdam" and isinstance(dist, keras.optimizers.Adam)
    assert (dist.beta_1, dist.clipnorm) == (0.8, 1.0) and np.isclose(float(dist.learning_rate), 0.003)
    assert hk.distributed_optimizer(dist) is dist
    adam.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="already built"):
        hk.distributed_optimizer(adam)


def test_save_load_and_resume(world: hk.WorkerContext, tmp_path: Path) -> None:
    x, y = hvd_workers.data()

    def compiled() -> keras.Model:
        model = hvd_workers.tiny_cnn()
        model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(0.01)), loss="mse")
        return model

    model = compiled()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)  # no custom objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    # Resume: weights + optimizer state from save_weights, into a freshly compiled model.
    model.save_weights(tmp_path / "ckpt.weights.h5")
    resumed = compiled()
    hk.build_optimizer(resumed)
    resumed.load_weights(tmp_path / "ckpt.weights.h5")
    assert int(resumed.optimizer.iterations.numpy()) == hvd_workers.STEPS
    for a, b in zip(model.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
