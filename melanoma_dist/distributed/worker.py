"""Join the Horovod job and pin this worker's device: where the process sits in the world."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import horovod.tensorflow as hvd
import tensorflow as tf

logger = logging.getLogger(__name__)

T = TypeVar("T")

RANK_SEED_STRIDE = 7919
"""Distance between the seeds of consecutive ranks (a prime, far above the few seeds a layer stack uses)."""


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

    def rank_seed(self, seed: int) -> int:
        """This rank's own seed derived from the job's `seed`, for dropout and augmentation.

        Ranks that drew the same dropout masks and augmentations would waste the
        extra workers on correlated noise; a seed per rank keeps runs reproducible
        for the same seed and world size.

        Example:

        ```python
        WorkerContext(rank=1, size=2, local_rank=1, local_size=2).rank_seed(42)  # 7961
        ```
        """
        return seed + RANK_SEED_STRIDE * self.rank


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
