"""Collectives on model variables and arrays: broadcast, average, gather, barrier.

Every function here is a collective: every rank must call it, in the same
order, with variables or arrays of the same shapes (except `allgather_rows`'
first dimension). In a world of size 1 they return at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

from melanoma_dist.distributed.optimizer import build_optimizer, check_compiled_model


def _tf_variables(variables: Sequence[Any]) -> list[Any]:
    """The backing tf.Variables: Keras 3 variables have no `.ref()`, which Horovod needs."""
    return [v.value if isinstance(v, keras.Variable) else v for v in variables]


def broadcast_object(obj: Any, name: str, root_rank: int = 0) -> Any:
    """`obj` of `root_rank` (any picklable value), returned on every rank.

    Args:
        obj: The value; only `root_rank`'s is used.
        name: A fixed name for the collective, the same on every rank (other ranks'
            `obj` may be of another type, e.g. None, so Horovod cannot derive one).
        root_rank: Rank whose value is kept. Defaults to `0`.
    """
    if hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name)


def broadcast_variables(variables: Sequence[Any], root_rank: int = 0) -> None:
    """Overwrite `variables` on every rank with their values on `root_rank`.

    Args:
        variables: Keras or TensorFlow variables, in the same order on all ranks.
        root_rank: Rank whose values are kept. Defaults to `0`.
    """
    if hvd.size() == 1 or not variables:
        return
    hvd.broadcast_variables(_tf_variables(variables), root_rank=root_rank)


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


def average_variables(variables: Sequence[Any]) -> None:
    """Overwrite `variables` on every rank with their mean over all ranks (one grouped allreduce).

    Args:
        variables: Keras or TensorFlow float variables, in the same order on all ranks.
    """
    if hvd.size() == 1 or not variables:
        return
    tf_vars = _tf_variables(variables)
    # Horovod: one fused allreduce; Average = sum over ranks / size, bit-identical on every rank.
    averaged = hvd.grouped_allreduce([tf.convert_to_tensor(v) for v in tf_vars], op=hvd.Average)
    for v, a in zip(tf_vars, averaged):
        v.assign(a)


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


def barrier() -> None:
    """Wait until every rank reaches this point (e.g. rank 0 finished writing a file)."""
    if hvd.size() > 1:
        # Horovod: a tiny allreduce completes only when all ranks have submitted it.
        hvd.allreduce(tf.zeros([1], tf.int32), op=hvd.Sum, name="barrier").numpy()
