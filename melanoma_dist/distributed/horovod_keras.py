"""Horovod data parallelism for Keras 3 models (TensorFlow backend).

Each worker process trains a replica of the model on its own shard of every
global batch; gradients are averaged over all workers before every update, so
the replicas stay identical. This module replaces `horovod.tensorflow.keras`
0.28.1, whose optimizer wrapper silently skips the averaging with Keras 3.

How Keras 3 applies gradients (TensorFlow backend): `Model.fit`'s `train_step`
calls `optimizer.apply_gradients(zip(grads, vars))`, which calls
`optimizer.apply(grads, vars)`. `apply()` is the one entry point shared with
custom loops (and the one `LossScaleOptimizer` overrides), so the averaging is
done there, before anything else looks at the gradients. Compile with
`jit_compile=False`: Horovod ops cannot run under XLA, which
`jit_compile="auto"` turns on when a GPU is present (`broadcast_model()`
refuses such a model).

Mixed precision: under the `mixed_float16` policy, `compile()` wraps a plain
optimizer in a `LossScaleOptimizer`, which checks the gradients for inf/NaN and
skips the step if any. If the averaging sat in the wrapped optimizer, each rank
would decide on its own gradients, and a rank skipping the step would never
join the allreduce of the others (deadlock). `distributed_optimizer()`
therefore returns a distributed `LossScaleOptimizer` (and `compile()` leaves it
alone): the gradients are averaged first, so every rank sees the same averaged
gradients and takes the same skip decision.

Saving and resuming: the model saved with `model.save("x.keras")` loads with
`keras.models.load_model(path, compile=False)`, no custom objects needed (for
evaluation and serving); `compile=True` would need the run-time class
`Distributed<Optimizer>` as a custom object, so it is not the resume path.
To resume a fold, checkpoint on rank 0 with `model.save_weights(path)` (it holds
the model weights and the optimizer variables: iterations, learning rate,
moments, loss scale) plus the epoch number in a small JSON file; then on every
rank: build and compile the model with `distributed_optimizer`, call
`build_optimizer(model)` (Keras skips optimizer variables it has not created
yet, with only a warning), `model.load_weights(path)`, and
`model.fit(..., initial_epoch=epoch)`. Every rank may read the same file
(shared storage), or rank 0 alone reads it and `broadcast_model(model,
include_optimizer=True)` copies it to the others.

Example:

```python
ctx = init_worker()
model.compile(optimizer=distributed_optimizer(keras.optimizers.Adam(1e-3)), loss="mse",
              jit_compile=False)
broadcast_model(model)
model.fit(x, y, callbacks=[MetricAverageCallback(), WarmupScaledLR(1e-3, 1)])
```
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------- workers

@dataclass(frozen=True)
class WorkerContext:
    """Where this process sits in the Horovod world."""

    rank: int
    """Global rank, 0 .. size-1."""
    size: int
    """Number of worker processes."""
    local_rank: int
    """Rank among the workers of this node (selects the GPU)."""
    local_size: int
    """Number of workers on this node."""

    @property
    def is_chief(self) -> bool:
        """True on rank 0, the only rank that logs progress and writes files."""
        return self.rank == 0


def select_gpu(gpus: Sequence[T], local_rank: int, isolated: bool = False) -> T | None:
    """Choose the GPU of the worker with this local rank.

    Args:
        gpus: The GPUs this process sees (e.g. `tf.config.list_physical_devices("GPU")`).
        local_rank: Rank of the worker on its node.
        isolated: The launcher already gave each worker exactly one GPU (e.g. a
            Ray actor with `num_gpus=1`, whose CUDA_VISIBLE_DEVICES names one
            device): use it whatever the local rank. Defaults to `False`.

    Returns:
        The GPU to pin, or None when there is no GPU (CPU training).

    Raises:
        ValueError: local_rank is negative, or there are more workers than GPUs on this node.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0, got {local_rank}")
    if not gpus:
        return None
    if isolated and len(gpus) == 1:
        return gpus[0]
    if local_rank >= len(gpus):
        raise ValueError(
            f"more workers than GPUs on this node: worker with local_rank {local_rank} needs GPU "
            f"#{local_rank} but only {len(gpus)} GPU(s) are visible; start at most {len(gpus)} "
            "workers per node (distributed.workers_per_fold, -H host:slots) or check CUDA_VISIBLE_DEVICES")
    return gpus[local_rank]


def init_worker(use_gpu: bool = True) -> WorkerContext:
    """Initialise Horovod in this process and pin its device.

    Call before TensorFlow creates any tensor. NCCL (GPU) or Gloo (CPU) is chosen
    by the Horovod build and the launcher, not here.

    Args:
        use_gpu: Pin one GPU per worker if GPUs are present; `False` hides all
            GPUs (CPU training). Defaults to `True`.

    Returns:
        The rank, size, local rank and local size of this worker.

    Raises:
        ValueError: there are more workers than GPUs on this node.
        RuntimeError: TensorFlow already initialised its devices (call this first).
    """
    # Horovod: join the job (a process started without a launcher is a world of size 1).
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    cuda_visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # Horovod: one GPU per process, chosen by local rank, so workers on a node don't share a GPU.
    gpu = select_gpu(gpus, hvd.local_rank(), isolated=len(cuda_visible) == 1) if use_gpu else None
    try:
        if gpu is not None:
            # Horovod: grow memory on demand rather than grabbing the whole GPU up front.
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        elif gpus:
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TensorFlow was initialised before init_worker()
        raise RuntimeError(f"init_worker() must run before TensorFlow creates tensors: {e}") from None
    ctx = WorkerContext(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
                        local_size=hvd.local_size())
    logger.info("Horovod worker %d/%d (local %d/%d) on %s", ctx.rank, ctx.size, ctx.local_rank,
                ctx.local_size, gpu.name if gpu is not None else "CPU")
    return ctx


def shutdown() -> None:
    """Leave the Horovod job (end of a worker; `init_worker()` may be called again later)."""
    hvd.shutdown()


# ---------------------------------------------------------------- optimizer

def average_gradients(grads: Sequence[Any]) -> list[Any]:
    """Average gradients over all ranks in one grouped allreduce.

    Usable inside `tf.function` (custom training loops) as well as eagerly.
    Every rank must pass gradients of the same shapes in the same order; None
    entries (variables without a gradient) stay None and must be None on all ranks.

    Args:
        grads: Gradient tensors (or `tf.IndexedSlices`, or None), one per variable.

    Returns:
        The averaged gradients, in the same order (unchanged in a world of size 1).
    """
    grads = list(grads)
    if hvd.size() == 1:
        return grads
    idx = [i for i, g in enumerate(grads) if g is not None]
    # Horovod: one fused allreduce for all gradients; Average = sum over ranks / size.
    averaged = hvd.grouped_allreduce([grads[i] for i in idx], op=hvd.Average)
    for i, g in zip(idx, averaged):
        grads[i] = g
    return grads


def _distributed_class(base: type) -> type:
    """A subclass of the optimizer class `base` whose `apply()` averages gradients first."""

    def apply(self: Any, grads: Sequence[Any], trainable_variables: Any = None) -> Any:
        # Horovod: average before the optimizer (and LossScaleOptimizer's inf/NaN check)
        # sees the gradients, so every rank makes the same update and the same skip decision.
        return base.apply(self, average_gradients(grads), trainable_variables)

    return type(f"Distributed{base.__name__}", (base,), {
        "apply": apply,
        "_melanoma_distributed": True,
        "__module__": __name__,
        "__doc__": f"`{base.__name__}` that averages gradients over Horovod ranks (see `distributed_optimizer`).",
    })


def distributed_optimizer(optimizer: keras.optimizers.Optimizer | str,
                          loss_scale: bool | None = None) -> keras.optimizers.Optimizer:
    """Make a Keras 3 optimizer that averages gradients over all Horovod ranks.

    Returns a new optimizer with the same configuration (`optimizer` itself is
    not changed), of a subclass `Distributed<Class>` whose `apply()` averages the
    gradients with one grouped allreduce before applying them, so it works with
    `model.compile()` + `model.fit()` and with custom loops. Gradient clipping,
    weight decay and loss-scale checks see the averaged gradients.

    Args:
        optimizer: A fresh (not yet built) Keras optimizer or its name, e.g. `"adam"`.
        loss_scale: Wrap in a `LossScaleOptimizer` (averaging outside it). None
            follows the global dtype policy (`mixed_float16` -> True). With False
            under `mixed_float16`, compile with `auto_scale_loss=False`, or
            `compile()` wraps the distributed optimizer the wrong way round.
            Defaults to `None`.

    Returns:
        The distributed optimizer; pass it to `model.compile(optimizer=...,
        jit_compile=False)`: Horovod ops do not run under XLA, which
        `jit_compile="auto"` turns on when a GPU is present.

    Raises:
        ValueError: the optimizer already has variables (it was built or used).
    """
    optimizer = keras.optimizers.get(optimizer)
    if getattr(type(optimizer), "_melanoma_distributed", False):
        return optimizer
    if optimizer.built:
        raise ValueError(
            f"optimizer {optimizer.name!r} is already built (it has variables); pass a fresh optimizer, "
            "then restore its state after compile (see build_optimizer and model.load_weights)")
    if loss_scale is None:
        loss_scale = keras.config.dtype_policy().name == "mixed_float16"
    lso = keras.optimizers.LossScaleOptimizer
    scaled = optimizer if isinstance(optimizer, lso) else None
    inner = scaled.inner_optimizer if scaled is not None else optimizer
    if scaled is None and not loss_scale:
        return _distributed_class(type(inner)).from_config(inner.get_config())
    inner = type(inner).from_config(inner.get_config())  # a fresh copy; the caller's is untouched
    # Horovod: the allreduce goes in the LossScaleOptimizer, ahead of its inf/NaN check
    # (compile() does not wrap an optimizer that is already a LossScaleOptimizer).
    cls = _distributed_class(type(scaled) if scaled is not None else lso)
    if scaled is None:
        return cls(inner, name="loss_scale_optimizer")
    return cls(inner, initial_scale=scaled.initial_scale,
               dynamic_growth_steps=scaled.dynamic_growth_steps, name=scaled.name)


def build_optimizer(model: keras.Model) -> None:
    """Create the compiled optimizer's variables for the model's trainable weights.

    Needed before `model.load_weights()` restores optimizer state (resume) and
    before broadcasting it; a no-op if the optimizer is already built.

    Raises:
        ValueError: the model is not compiled or has no weights yet.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(f"model {model.name!r} has no optimizer: compile it first")
    if not model.trainable_variables:
        raise ValueError(f"model {model.name!r} has no trainable weights yet: build it first "
                         "(keras.Input, or call it on a batch)")
    if not optimizer.built:
        optimizer.build(model.trainable_variables)


def check_compiled_model(model: keras.Model) -> None:
    """Reject compile settings under which the gradient allreduce cannot work.

    `broadcast_model()` calls it. It catches:
    - a distributed optimizer that `compile()` wrapped in a `LossScaleOptimizer`
      (mixed_float16 with `distributed_optimizer(..., loss_scale=False)`): each
      rank would skip steps on its own gradients and the allreduce would hang;
    - XLA (`jit_compile=True`, which `jit_compile="auto"` picks on GPU hosts)
      with more than one rank: Horovod ops cannot be compiled by XLA.

    Raises:
        ValueError: one of the above, naming the fix.
    """
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", None)
    if (isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            and not getattr(type(optimizer), "_melanoma_distributed", False)
            and getattr(type(inner), "_melanoma_distributed", False)):
        raise ValueError(
            f"model {model.name!r}: compile() wrapped the distributed optimizer {type(inner).__name__} in a "
            "LossScaleOptimizer, so ranks would decide on inf/NaN gradients before averaging (deadlock); "
            "build it with distributed_optimizer(opt) (loss_scale=None or True) under mixed_float16, "
            "or compile with auto_scale_loss=False")
    if getattr(model, "compiled", False) and hvd.size() > 1 and model.jit_compile:
        raise ValueError(
            f"model {model.name!r} is compiled with jit_compile=True (XLA; jit_compile='auto' picks it on "
            "GPU hosts), but Horovod's allreduce cannot run inside XLA: compile with jit_compile=False")


# ---------------------------------------------------------------- broadcast

def broadcast_variables(variables: Sequence[Any], root_rank: int = 0) -> None:
    """Overwrite `variables` on every rank with their values on `root_rank`.

    Args:
        variables: Keras or TensorFlow variables, in the same order on all ranks.
        root_rank: Rank whose values are kept. Defaults to `0`.
    """
    if hvd.size() == 1 or not variables:
        return
    # Horovod: broadcast the backing tf.Variable (`.value`): Keras 3 variables have no `.ref()`.
    tf_vars = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    hvd.broadcast_variables(tf_vars, root_rank=root_rank)


def broadcast_model(model: keras.Model, root_rank: int = 0, include_optimizer: bool = False) -> None:
    """Copy the model weights (and optionally the optimizer state) from `root_rank` to all ranks.

    Call after building (and compiling) the model and before training, so that
    every rank starts from the same point whatever its seed. Seed-generator
    states (augmentation) are not copied: ranks keep their own randomness.

    Args:
        model: A built model, identical in architecture on all ranks.
        root_rank: Rank whose values are kept. Defaults to `0`.
        include_optimizer: Also copy the optimizer variables (iterations, learning
            rate, moments, loss scale), e.g. after rank 0 alone loaded a checkpoint;
            builds the optimizer if needed. Defaults to `False`.

    Raises:
        ValueError: the model has no weights yet, or include_optimizer without an optimizer.
    """
    if not model.weights:
        raise ValueError(f"model {model.name!r} has no weights yet: build it before broadcast_model()")
    check_compiled_model(model)
    # Horovod: every rank starts from rank 0's weights, so the replicas never differ.
    broadcast_variables(model.weights, root_rank)
    if include_optimizer:
        build_optimizer(model)
        # Horovod: same optimizer state everywhere (after resuming from a checkpoint on rank 0).
        broadcast_variables(model.optimizer.variables, root_rank)


# ---------------------------------------------------------------- collectives on numbers

def allreduce_mean(value: float) -> float:
    """Mean of a number over all ranks (every rank must call it)."""
    if hvd.size() == 1:
        return float(value)
    # Horovod: float64 so that averaging metrics adds no rounding of its own.
    out = hvd.allreduce(tf.constant([value], tf.float64), op=hvd.Average, name="allreduce_mean")
    return float(out.numpy()[0])


def min_over_ranks(n: int) -> int:
    """Smallest `n` over all ranks, e.g. steps per epoch: unequal step counts deadlock the allreduce."""
    if hvd.size() == 1:
        return int(n)
    # Horovod: Min reduction so no rank runs a step the others don't.
    out = hvd.allreduce(tf.constant([n], tf.int64), op=hvd.Min, name="min_over_ranks")
    return int(out.numpy()[0])


def barrier() -> None:
    """Wait until every rank reaches this point (e.g. rank 0 finished writing a file)."""
    if hvd.size() > 1:
        # Horovod: a tiny allreduce completes only when all ranks have submitted it.
        hvd.allreduce(tf.zeros([1], tf.int32), op=hvd.Sum, name="barrier").numpy()


def allgather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenate arrays from all ranks along axis 0, in rank order, on every rank.

    Ranks may hold different numbers of rows (e.g. uneven validation shards):
    every row appears exactly once. Use it to compute metrics such as AUC on the
    predictions of all ranks.

    Args:
        array: Rows of this rank, shape (n_rank, ...); the trailing shape and the
            dtype must be the same on all ranks.

    Returns:
        Array of shape (sum of n over ranks, ...).

    Raises:
        ValueError: the array is a scalar or holds strings/objects.
    """
    arr = np.asarray(array)
    if arr.ndim == 0:
        raise ValueError(f"allgather_rows needs an array with a first (row) dimension, got a scalar {arr!r}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"allgather_rows supports bool and numeric arrays, got dtype {arr.dtype}; "
                         "gather integer ids instead of strings")
    if hvd.size() == 1:
        return arr.copy()
    wire = arr.astype(np.uint8) if arr.dtype == np.bool_ else arr
    # Horovod: allgather accepts a different first dimension on each rank.
    out = hvd.allgather(tf.convert_to_tensor(wire), name="allgather_rows").numpy()
    return out.astype(np.bool_) if arr.dtype == np.bool_ else out


# ---------------------------------------------------------------- callbacks

class MetricAverageCallback(keras.callbacks.Callback):
    """Replace every numeric entry of the epoch logs by its mean over all ranks.

    Put it FIRST in the callback list: before every callback that reads metrics
    (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint, CSVLogger), so that all
    ranks see the same values and take the same decisions (a rank stopping alone
    would deadlock the others). Keras' History and progress bar come after user
    callbacks and see the averages too. The mean of per-rank values is exact for
    sums and means over equal shards; for AUC and the like gather the
    predictions with `allgather_rows` instead.

    Example:

    ```python
    model.fit(x, y, callbacks=[MetricAverageCallback(), keras.callbacks.EarlyStopping()])
    ```
    """

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None or hvd.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], tf.float64)
        # Horovod: one allreduce of all metrics, in sorted-key order on every rank.
        averaged = hvd.allreduce(values, op=hvd.Average, name="metric_average").numpy()
        logs.update(zip(keys, (float(v) for v in averaged)))


def _is_number(value: Any) -> bool:
    """A real scalar (Keras passes epoch logs as Python floats); bools and strings are not."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iuf"


class WarmupScaledLR(keras.callbacks.Callback):
    """Linear learning-rate warm-up from `base_lr` to `base_lr * size` (Goyal et al., 2017).

    With `size` workers the global batch is `size` times larger, so the learning
    rate is scaled by `size`; starting at that rate diverges early on, hence the
    ramp. During the first `warmup_epochs` epochs the rate is set before every
    batch: `base_lr * (1 + (size - 1) * t)`, t the fraction of warm-up batches done.
    At the end of the last warm-up epoch it is set to `base_lr * size` once, and
    never touched again: a later ReduceLROnPlateau reduction stays in place, and
    a learning rate restored from a checkpoint after warm-up is kept. With
    `warmup_epochs=0` the scaled rate is set at the start of epoch 0.

    Put it before ReduceLROnPlateau in the callback list (it sets the scaled rate
    at the end of warm-up, then the plateau callback may reduce it). Needs a
    float learning rate, not a LearningRateSchedule.

    Args:
        base_lr: Learning rate of one worker.
        warmup_epochs: Epochs of warm-up; 0 for none.
        size: Number of workers. Defaults to `None` (`hvd.size()`).
        steps_per_epoch: Batches per epoch. Defaults to `None` (from `fit`'s params).
        verbose: Log the rate at each epoch boundary of the warm-up. Defaults to `0`.
        cosine_epochs: After warm-up, decay the rate along a half cosine, per batch, to
            `min_ratio * base_lr * size` at the end of epoch `cosine_epochs` (the run's or
            the phase's last). Defaults to `None` (no decay: the rate stays for ReduceLROnPlateau).
        min_ratio: Final rate of the cosine decay as a fraction of the peak. Defaults to `0.0`.
        start_epoch: First epoch of the schedule: warm-up covers epochs `start_epoch` to
            `start_epoch + warmup_epochs - 1` (a fine-tuning phase starts later than 0).
            Defaults to `0`.
        initial_ratio: Warm up from `initial_ratio * base_lr * size` instead of `base_lr`,
            e.g. 0 to let a fresh optimizer start gently. Defaults to `None`.

    Raises:
        ValueError: a negative warm-up or a non-positive rate or size; or (at the
            start of training) an unknown number of steps per epoch.

    Example:

    ```python
    callbacks = [MetricAverageCallback(), WarmupScaledLR(1e-3, warmup_epochs=1),
                 keras.callbacks.ReduceLROnPlateau(patience=2)]
    ```
    """

    def __init__(self, base_lr: float, warmup_epochs: int, size: int | None = None,
                 steps_per_epoch: int | None = None, verbose: int = 0, cosine_epochs: int | None = None,
                 min_ratio: float = 0.0, start_epoch: int = 0, initial_ratio: float | None = None) -> None:
        super().__init__()
        if base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.base_lr = float(base_lr)
        self.warmup_epochs = int(warmup_epochs)
        self.size = size
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.cosine_epochs = cosine_epochs
        self.min_ratio = float(min_ratio)
        self.start_epoch = int(start_epoch)
        self.initial_ratio = initial_ratio
        self._epoch = 0

    @property
    def target_lr(self) -> float:
        """The learning rate after warm-up: `base_lr * size`."""
        # Horovod: scale the learning rate by the number of workers (the global batch grows with it).
        return self.base_lr * (self.size if self.size is not None else hvd.size())

    def lr_at(self, epoch: int, batch: int) -> float:
        """Learning rate of `batch` in `epoch` during warm-up."""
        t = ((epoch - self.start_epoch) * self._steps() + batch) / (self.warmup_epochs * self._steps())
        start = self.base_lr if self.initial_ratio is None else self.initial_ratio * self.target_lr
        return start + (self.target_lr - start) * min(t, 1.0)

    def _in_warmup(self, epoch: int) -> bool:
        return self.start_epoch <= epoch < self.start_epoch + self.warmup_epochs

    def _steps(self) -> int:
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError("WarmupScaledLR needs the number of steps per epoch: pass steps_per_epoch= "
                             "to the callback or to fit() (a tf.data dataset of unknown length has none)")
        return int(steps)

    def _set(self, lr: float) -> None:
        self.model.optimizer.learning_rate = lr

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.warmup_epochs > 0:
            self._steps()  # fail before the first batch, not in the middle of it

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        if self.warmup_epochs == 0 and epoch == self.start_epoch:
            self._set(self.target_lr)
        elif self.verbose and self._in_warmup(epoch):
            logger.info("epoch %d: warm-up learning rate %.3g", epoch + 1, self.lr_at(epoch, 0))

    def cosine_lr_at(self, epoch: int, batch: int) -> float:
        """Learning rate of `batch` in `epoch` after warm-up, on the cosine schedule."""
        first = self.start_epoch + self.warmup_epochs
        span = max(1, (self.cosine_epochs - first) * self._steps())
        t = min(1.0, ((epoch - first) * self._steps() + batch) / span)
        return self.target_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._in_warmup(self._epoch):
            self._set(self.lr_at(self._epoch, batch))
        elif self.cosine_epochs is not None and self._epoch >= self.start_epoch:
            self._set(self.cosine_lr_at(self._epoch, batch))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == self.start_epoch + self.warmup_epochs - 1:
            self._set(self.target_lr)
            if self.verbose:
                logger.info("epoch %d: warm-up done, learning rate %.3g", epoch + 1, self.target_lr)
