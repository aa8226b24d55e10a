"""What one trial reserves: the Horovod workers of the folds it trains at once, in one placement group.

How trials and their folds share a cluster without oversubscription or deadlock:

- a trial's placement group holds `folds_in_parallel x workers_per_fold` worker bundles
  (`{CPU: cpus_per_worker, GPU: gpus_per_worker}` each) and an empty head bundle: the trial
  actor itself only waits on files and Ray, and takes no CPU;
- the trial trains at most `folds_in_parallel` folds at once, each as a Horovod group whose
  ranks are placed in those bundles (`run_horovod_group(within=...)`), so a trial's folds
  always fit the bundles it already holds, and never wait on another trial's;
- Ray Tune starts a trial only once its whole placement group is placed: trials run side by
  side as far as the cluster's resources allow and queue otherwise; `tune.max_concurrent_trials`
  can lower that further.

Example:

```python
slots = fold_slots(cfg, {"CPU": 2.0})    # 2 folds at once on 2 CPUs with 1 one-CPU worker per fold
factory = trial_resources(cfg, slots, [{"CPU": 2.0}])  # PlacementGroupFactory([{}, {CPU: 1}, {CPU: 1}])
```
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from melanoma_dist.config import Config
from melanoma_dist.schedule.horovod_group import GroupSpec, placement_strategy


def fold_group(cfg: Config, slots: int = 1) -> GroupSpec:
    """The workers of `slots` folds as one group shape (for sizing only)."""
    d = cfg.distributed
    return GroupSpec(d.workers_per_fold * slots, d.cpus_per_worker, d.gpus_per_worker)


def fold_slots(cfg: Config, cluster: Mapping[str, float]) -> int:
    """How many folds of a trial train at once.

    `tune.folds_in_parallel` when set, else as many folds as the cluster's total resources
    hold (at most `folds.k`, at least 1).

    Args:
        cfg: The search's config.
        cluster: The cluster's total resources (`ray.cluster_resources()`).

    Raises:
        ValueError: the cluster cannot hold even one fold's workers (the trial would wait forever).
    """
    need = fold_group(cfg).bundle()
    fits = min(math.floor(cluster.get(r, 0.0) / (v * cfg.distributed.workers_per_fold)) for r, v in need.items())
    if fits < 1:
        raise ValueError(f"the cluster ({dict(cluster)}) cannot hold one fold of {cfg.distributed.workers_per_fold} "
                         f"worker(s) of {need}: lower distributed.workers_per_fold or cpus_per_worker, or add nodes")
    if cfg.tune.folds_in_parallel:
        if cfg.tune.folds_in_parallel > fits:
            raise ValueError(f"tune.folds_in_parallel={cfg.tune.folds_in_parallel} needs more than the cluster's "
                             f"{dict(cluster)}: at most {fits} fold(s) of this size fit at once")
        return min(cfg.tune.folds_in_parallel, cfg.folds.k)
    return max(1, min(cfg.folds.k, fits))


def trial_resources(cfg: Config, slots: int, nodes: Sequence[Mapping[str, float]]) -> Any:
    """Ray Tune's resource request of one trial: an empty head bundle and the workers of `slots` folds.

    Args:
        cfg: The search's config.
        slots: Folds trained at once (`fold_slots`).
        nodes: Total resources of each alive node: STRICT_PACK when one node holds the whole
            trial (its ranks talk over the fastest links), else PACK.
    """
    from ray import tune

    spec = fold_group(cfg, slots)
    return tune.PlacementGroupFactory([{}] + [spec.bundle()] * spec.num_workers,
                                      strategy=placement_strategy(spec, list(nodes)))
