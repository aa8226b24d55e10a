"""Start one Horovod group through Ray, run a function on every rank, tear it down.

This is the one place that knows which Ray/Horovod integration starts the
workers (today `horovod.ray.RayExecutor`; Ray Train's `HorovodTrainer` would fit
behind the same function). RayExecutor reserves a placement group of
`num_workers` bundles ({CPU: cpus_per_worker, GPU: gpus_per_worker}) with the
PACK strategy: a fold's workers share one node when it has room, which keeps
NCCL traffic on NVLink/PCIe; a pending placement group waits in Ray's queue
until resources free up, so folds queue instead of failing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    """Shape of one Horovod group."""

    num_workers: int
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    start_timeout_s: int = 300
    """Seconds for the workers to start and rendezvous once placed."""
    queue_timeout_s: int = 86400
    """Seconds a group may wait for cluster resources before failing."""

    def worker_env(self) -> dict[str, str]:
        """Environment of each worker: thread pools sized to its CPU reservation."""
        threads = str(self.cpus_per_worker)
        # Without this, every worker sizes its pools to all cores of the node and
        # co-located workers oversubscribe the CPU.
        return {"OMP_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def run_horovod_group(fn: Callable[..., Any], args: Sequence[Any], spec: GroupSpec) -> list[Any]:
    """Run `fn(*args)` on each rank of a new Horovod group; return the results in rank order.

    The group is shut down (actors killed, placement group removed) whatever happens.

    Raises:
        Whatever a worker raised, or a Ray error when a worker process or node died.
    """
    from horovod.ray import RayExecutor

    settings = RayExecutor.create_settings(timeout_s=spec.start_timeout_s,
                                           placement_group_timeout_s=spec.queue_timeout_s)
    executor = RayExecutor(settings, num_workers=spec.num_workers, cpus_per_worker=spec.cpus_per_worker,
                           use_gpu=spec.gpus_per_worker > 0, gpus_per_worker=spec.gpus_per_worker or None,
                           use_current_placement_group=False)
    executor.start(extra_env_vars=spec.worker_env())
    try:
        return executor.run(fn, args=list(args))
    finally:
        executor.shutdown()
