"""Start one Horovod group through Ray, run a function on every rank, tear it down.

This is the one place that knows which Ray/Horovod integration starts the
workers (today Horovod's Ray adapter, `horovod.ray.runner.StaticAdapter`, the
engine of `RayExecutor`; Ray Train's `HorovodTrainer` would fit behind the same
function). The group's placement group of `num_workers` bundles
({CPU: cpus_per_worker, GPU: gpus_per_worker}) is made here, not by Horovod, so
that every path out (a queue timeout, an error, a hang, Ctrl-C) removes it:

- STRICT_PACK when some node of the cluster can hold the whole group, PACK
  otherwise: a fold's ranks share as few nodes as possible, which keeps NCCL
  traffic on NVLink/PCIe. A pending placement group waits in Ray's queue until
  resources free up, so folds queue instead of failing.
- Horovod's strategy then gives the co-located ranks of a node all of the
  group's GPUs on that node in CUDA_VISIBLE_DEVICES (not only their own, as Ray
  does), and `HOROVOD_LOCAL_RANK`; each rank pins the GPU of its local rank
  (`distributed.horovod_keras.init_worker`), and NCCL can use peer-to-peer.
- While the ranks run, the driver watches them: the first rank error ends the
  group at once, and so does a group that makes no progress for
  `progress_timeout_s` (a hung rank); Horovod's stall check shuts down a
  collective that some rank never joins.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

_POLL_S = 1.0
"""Seconds between two looks at a placement, a run, its progress and the stop event."""


class GroupHung(RuntimeError):
    """A group made no progress for `progress_timeout_s`; it was torn down."""


class PlacementTimeout(TimeoutError):
    """A group's placement group was not placed within `queue_timeout_s`; it was removed."""


class GroupCancelled(RuntimeError):
    """The caller asked the group to stop (e.g. the driver got Ctrl-C); it was torn down."""


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
    progress_timeout_s: int = 3600
    """Seconds the running group may go without progress before it is torn down; 0 disables."""
    stall_shutdown_s: int = 1800
    """Seconds Horovod lets a collective wait for a missing rank before it shuts down; 0 disables."""
    name: str = ""
    """Name of the placement group (shown by `ray status` and the state API)."""

    def worker_env(self) -> dict[str, str]:
        """Environment of each worker: thread pools sized to its CPU reservation, Horovod's stall check."""
        threads = str(self.cpus_per_worker)
        # Without this, every worker sizes its pools to all cores of the node and
        # co-located workers oversubscribe the CPU.
        env = {"OMP_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1",
               "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        if self.stall_shutdown_s > 0:
            # Horovod: warn about a rank that misses a collective, then shut Horovod down so that the
            # other ranks raise instead of waiting forever (the fold is then retried).
            env.update(HOROVOD_STALL_CHECK_DISABLE="0",
                       HOROVOD_STALL_CHECK_TIME_SECONDS=str(min(60, self.stall_shutdown_s)),
                       HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=str(self.stall_shutdown_s))
        return env

    def bundle(self) -> dict[str, float]:
        """Resources of one rank."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}


def placement_strategy(spec: GroupSpec, node_resources: Sequence[dict[str, float]]) -> str:
    """STRICT_PACK when one node can hold every rank of the group, else PACK.

    Args:
        spec: The group.
        node_resources: Total resources of each alive node (`ray.nodes()[i]["Resources"]`).

    Example:
        >>> placement_strategy(GroupSpec(2, 1, 1), [{"CPU": 8, "GPU": 2}])
        'STRICT_PACK'
    """
    need = {k: v * spec.num_workers for k, v in spec.bundle().items()}
    fits = any(all(node.get(k, 0) >= v for k, v in need.items()) for node in node_resources)
    return "STRICT_PACK" if fits else "PACK"


def _place(spec: GroupSpec) -> tuple[Any, str]:
    """Ask Ray for the group's placement group (placed or not, the caller removes it)."""
    import ray
    from ray.util.placement_group import placement_group

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    strategy = placement_strategy(spec, nodes)
    pg = placement_group([spec.bundle() for _ in range(spec.num_workers)], strategy=strategy, name=spec.name)
    return pg, strategy


def _wait_placed(pg: Any, spec: GroupSpec, stop: threading.Event | None) -> None:
    import ray

    deadline = time.monotonic() + spec.queue_timeout_s
    ready = pg.ready()
    while not ray.wait([ready], timeout=_POLL_S)[0]:
        _check_stop(stop)
        if time.monotonic() > deadline:
            raise PlacementTimeout(
                f"the {spec.num_workers} worker(s) of {spec.name or 'a Horovod group'} ({spec.bundle()} each) "
                f"were not placed within {spec.queue_timeout_s}s; the cluster has {ray.available_resources()} "
                "free: add nodes, or lower distributed.workers_per_fold")


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise GroupCancelled("stopped by the driver")


def _adapter(settings: Any, spec: GroupSpec, pg: Any) -> Any:
    """Horovod's adapter, to start its workers in our placement group."""
    from horovod.ray.runner import StaticAdapter
    from horovod.ray.strategy import PGStrategy

    class _Adapter(StaticAdapter):
        def _create_strategy(self) -> PGStrategy:
            # Horovod: with use_gpu, the strategy gives the ranks of a node all the group's GPUs
            # there (CUDA_VISIBLE_DEVICES), so that NCCL can go peer-to-peer between them.
            return PGStrategy(settings=self.settings, num_workers=self.num_workers, use_gpu=self.use_gpu,
                              cpus_per_worker=self.cpus_per_worker, gpus_per_worker=self.gpus_per_worker,
                              placement_group=pg)

    return _Adapter(settings, num_workers=spec.num_workers, cpus_per_worker=spec.cpus_per_worker,
                    use_gpu=spec.gpus_per_worker > 0, gpus_per_worker=spec.gpus_per_worker or None,
                    use_current_placement_group=False)


def _wait_ranks(refs: list, spec: GroupSpec, progress: Callable[[], float] | None,
                stop: threading.Event | None) -> list[Any]:
    """Results of every rank; raise the first rank error, or GroupHung when progress stops."""
    import ray

    last = time.time()  # the clock starts once the group is up: queueing is not a hang
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
        ray.get(done)  # a failed rank raises now, not after the others (which may wait for it forever)
        _check_stop(stop)
        if spec.progress_timeout_s > 0 and pending:
            last = max(last, progress() if progress else 0.0)
            if time.time() - last > spec.progress_timeout_s:
                raise GroupHung(f"{spec.name or 'the Horovod group'} made no progress for "
                                f"{spec.progress_timeout_s}s (a rank hangs); raise distributed.progress_timeout_s "
                                "if an epoch takes longer, or set it to 0 to wait forever")
    return ray.get(refs)


def _teardown(adapter: Any, pg: Any) -> None:
    """Kill the group's actors and remove its placement group, whatever state they are in."""
    import ray
    from ray.util.placement_group import remove_placement_group

    strategy = getattr(adapter, "strategy", None)  # holds the workers of a start that failed half-way
    for worker in [*(getattr(adapter, "workers", None) or []), *(getattr(strategy, "workers", None) or [])]:
        try:
            ray.kill(worker, no_restart=True)
        except Exception as e:  # already dead
            logger.debug("killing a worker: %s", e)
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception as e:  # already removed
            logger.debug("removing %s: %s", pg.id, e)


def run_horovod_group(fn: Callable[..., Any], args: Sequence[Any], spec: GroupSpec,
                      progress: Callable[[], float] | None = None,
                      stop: threading.Event | None = None, within: Any = None) -> list[Any]:
    """Run `fn(*args)` on each rank of a new Horovod group; return the results in rank order.

    The group is torn down (actors killed, placement group removed) whatever
    happens, including a KeyboardInterrupt in this thread.

    Args:
        fn: The body of every rank.
        args: Its arguments.
        spec: The group's shape and timeouts.
        progress: Returns when the group last made progress (a `time.time()`), e.g. the newest
            write in its output directory. Defaults to `None` (the start of the run: then
            `progress_timeout_s` bounds the whole run).
        stop: When set (by another thread), the group is torn down. Defaults to `None`.
        within: A placed placement group that the caller owns and that has free bundles for the
            ranks (a Ray Tune trial's): the ranks go there, and it is neither made nor removed
            here. Defaults to `None` (a placement group of the group's own).

    Raises:
        Whatever a worker raised (as a `ray.exceptions.RayTaskError`), a Ray error when a worker
        process or node died, PlacementTimeout, GroupHung or GroupCancelled.
    """
    from horovod.ray import RayExecutor

    settings = RayExecutor.create_settings(timeout_s=spec.start_timeout_s,
                                           placement_group_timeout_s=spec.queue_timeout_s)
    pg = adapter = None
    try:
        if within is None:
            pg, strategy = _place(spec)
            _wait_placed(pg, spec, stop)
            logger.debug("%s placed (%s)", spec.name or "group", strategy)
        adapter = _adapter(settings, spec, within or pg)  # assigned before start: a failed start is torn down too
        adapter.start(extra_env_vars=spec.worker_env())
        refs = adapter.run_remote(fn, args=list(args))
        return _wait_ranks(refs, spec, progress, stop)
    finally:
        _teardown(adapter, pg)  # the caller's placement group (`within`) stays
