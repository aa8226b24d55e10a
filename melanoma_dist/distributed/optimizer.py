"""A Keras 3 optimizer that averages gradients over Horovod ranks, and checks of the compiled model.

How Keras 3 applies gradients (TensorFlow backend): `Model.fit`'s `train_step`
calls `optimizer.apply_gradients(zip(grads, vars))`, which calls
`optimizer.apply(grads, vars)`. `apply()` is the one entry point shared with
custom loops (and the one `LossScaleOptimizer` overrides), so the averaging is
done there, before anything else looks at the gradients. Compile with
`jit_compile=False`: Horovod ops cannot run under XLA, which
`jit_compile="auto"` turns on when a GPU is present (`broadcast_model()`
refuses such a model). To use XLA anyway, compile only the forward and
backward pass and leave `apply()` outside it: `model/training_model.py`
(`train.jit_compile`).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import horovod.tensorflow as hvd
import keras


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


