"""`melanoma-dist tune`: the driver. Outer folds, one Ray Tune search each, the chosen config retrained.

    melanoma-dist tune --config configs/tune-cpu.yaml             # hold out outer fold 0, search on the rest
    melanoma-dist tune --config configs/tune-cpu.yaml --nested    # every outer fold: nested cross-validation
    melanoma-dist tune --config ... --address HEAD:6379 --resume  # on a cluster; resume an interrupted search

For each searched outer fold `o` (`tune.estimate`: holdout = fold 0 only, nested = all,
none = one search on all the data) the driver cuts the outer training part into a dataset
of its own (`outer.py`), runs a Ray Tune search on its inner folds (`folds.k`; one trial =
one cross-validation, `trial.py`), then trains the best trial's config on the outer training
part and scores it on outer fold `o`, as fold `o` of a `cv` run in `output_dir` itself: so
`output_dir` is a cross-validation result of the whole tuning procedure, and `report` works on it.

Resume: a search whose Ray Tune experiment exists is restored (`Tuner.restore`): finished
trials are kept, unfinished and failed ones start again and keep their finished folds.

`output_dir` may be in an object store (`s3://...`): every node then writes there itself. Ray
Tune keeps its experiment there (`storage_path` on the store's filesystem, restored from it),
each trial and fold uploads its own folder (`trial.py`, `cv`), the outer training parts are
uploaded where every trial reads them, and the driver's few files go through `storage.mirrored`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import numpy as np

from melanoma_dist import storage
from melanoma_dist.config import Config
from melanoma_dist.data import shards
from melanoma_dist.data.folds import ensure_folds
from melanoma_dist.data.prepare import prepare
from melanoma_dist.paths import absolute
from melanoma_dist.run_files import SEARCH_DIR
from melanoma_dist.report.aggregate import load_fold_metrics
from melanoma_dist.schedule.cv import FoldFailed, _connect, absolute_paths, run_cv
from melanoma_dist.tune import results
from melanoma_dist.tune.outer import describe, outer_training_dataset
from melanoma_dist.tune.space import largest_epochs, metric_name, parse_space, trial_dict

logger = logging.getLogger(__name__)

EXPERIMENT = "experiment"
"""Ray Tune's experiment directory inside a search directory."""
SEARCH_FILE = "search.json"
"""What a search directory was made for; another search there is refused rather than mixed in."""


def tune_dir(cfg: Config) -> str:
    """`<output_dir>/tune`: an absolute local path, or a URI."""
    return storage.join(absolute(cfg.output_dir), SEARCH_DIR)


def param_space(cfg: Config) -> dict[str, Any]:
    """Ray Tune's param_space: dotted keys to distributions (every one a grid for search_algorithm=grid)."""
    dims = parse_space(cfg.tune.space)
    if cfg.tune.search_algorithm == "grid":
        dims = [dataclasses.replace(d, kind="grid") for d in dims]
    return {d.key: d.to_tune() for d in dims}


def _search_algorithm(cfg: Config) -> Any:
    t = cfg.tune
    if t.search_algorithm == "tpe":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ValueError("tune.search_algorithm=tpe needs the optuna package, which is not installed here: "
                             "install it (pip install optuna) or set tune.search_algorithm=random or grid") from None
        from ray.tune.search import ConcurrencyLimiter

        search = OptunaSearch(seed=t.seed)
        return ConcurrencyLimiter(search, t.max_concurrent_trials) if t.max_concurrent_trials else search
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # The limit goes to the search algorithm itself: Tune ignores TuneConfig.max_concurrent_trials when it
    # is given one. With 1, trials run strictly in their draw (grid) order.
    return BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent_trials)


def _scheduler(cfg: Config) -> Any:
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = cfg.tune.max_epochs or largest_epochs(cfg, parse_space(cfg.tune.space))
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(cfg.tune.grace_period, max_t),
                         reduction_factor=cfg.tune.reduction_factor)


def _check_same_search(search_dir: str, cfg: Config) -> None:
    """Refuse to restore a search directory made for another search (space, algorithm, base config)."""
    tune = {k: v for k, v in cfg.to_dict()["tune"].items() if k not in ("max_concurrent_trials", "folds_in_parallel")}
    base = trial_dict(cfg, {})
    base.pop("distributed")
    key = hashlib.sha256(json.dumps({"tune": tune, "base": base}, sort_keys=True).encode()).hexdigest()[:16]
    path = storage.join(search_dir, SEARCH_FILE)
    if storage.is_file(path) and json.loads(storage.read_bytes(path)).get("key") != key:
        raise ValueError(f"{search_dir} holds a search of another config or space: use another output_dir, or delete "
                         f"{search_dir} to start that search again")
    with storage.mirrored(search_dir, pull=False) as search:
        search.local.mkdir(parents=True, exist_ok=True)
        (search.local / SEARCH_FILE).write_text(json.dumps({"key": key, "tune": tune}, indent=2) + "\n")


def _outer_dataset(cfg: Config, outer_of_row: Any, fold: int, search_dir: str) -> str:
    """The outer training part of outer fold `fold`, in `<search_dir>/dataset` (written or reused); its path or URI.

    In an object store it is cut in a local copy holding only the stored manifest and folds (is
    it reusable?) and uploaded, manifest last, where every node's trials read it.
    """
    with storage.mirrored(storage.join(search_dir, "dataset"), pull_skip=("shard-*.parquet",),
                          push_last=(shards.MANIFEST,)) as subset:
        outer_training_dataset(cfg.data.dataset_dir, outer_of_row, fold, subset.local)
    return subset.uri


def run_search(cfg: Config, search_dir: str, trials_dir: str, label: str, resume: bool = False) -> Any:
    """Run (or restore and finish) one Ray Tune search of `cfg` on its dataset's folds; return the ResultGrid.

    Raises:
        ValueError: `resume` but there is nothing to resume; the directory holds another search;
            the cluster cannot hold a fold; tpe without optuna.
    """
    import ray
    from ray import tune

    from melanoma_dist.tune.progress import TrialProgress
    from melanoma_dist.tune.resources import fold_slots, trial_resources
    from melanoma_dist.tune.trial import CVTrial

    _check_same_search(search_dir, cfg)
    slots = fold_slots(cfg, ray.cluster_resources())
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    trainable = tune.with_resources(
        tune.with_parameters(CVTrial, base=trial_dict(cfg, {}), trials_dir=trials_dir, slots=slots),
        trial_resources(cfg, slots, nodes))
    logger.info("%s: each trial trains %d fold(s) at once (%d worker(s) reserved per trial); %s",
                label, slots, slots * cfg.distributed.workers_per_fold,
                f"at most {cfg.tune.max_concurrent_trials} trial(s) at once" if cfg.tune.max_concurrent_trials
                else "as many trials at once as the cluster holds")
    # Ray Tune reads and writes its experiment through the filesystem of `search_dir` (a local one, or the
    # object store's), on every node: the trials' actors build their own client from the pickled settings.
    path = storage.join(search_dir, EXPERIMENT)
    fs, experiment = storage.filesystem(path)  # Ray Tune takes the path inside the filesystem
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        logger.info("%s: restoring the search in %s (finished trials are kept)", label, path)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(cfg), storage_filesystem=fs)
    elif resume:
        raise ValueError(f"--resume: there is no search to resume in {path}; run without --resume to start it")
    else:
        metric = metric_name(cfg)
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric="score", mode="max", num_samples=cfg.tune.num_samples, search_alg=_search_algorithm(cfg),
                scheduler=_scheduler(cfg),
                reuse_actors=False, trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=storage.filesystem(search_dir)[1], storage_filesystem=fs, verbose=0,
                callbacks=[TrialProgress(metric, label)],
                # A trial whose actor died starts again; its finished folds are kept (trial.py).
                failure_config=tune.FailureConfig(max_failures=cfg.distributed.max_retries)))
    return tuner.fit()


def _outer_score(cfg: Config, fold: int, metric: str) -> float | None:
    m = load_fold_metrics(cfg.output_dir, fold)
    return None if m is None else m.get(metric)


def run_tune(cfg: Config, address: str = "", resume: bool = False) -> dict[str, Any]:
    """Search, choose, retrain and score; write `<output_dir>/tune/` and return the summary.

    Args:
        cfg: The base config with its `tune` section.
        address: Ray cluster address. Defaults to `""` (RAY_ADDRESS, else a local Ray).
        resume: Insist on restoring the searches (fail when there is none). Defaults to `False`
            (restore what exists, start the rest).
    """
    import ray

    start = time.time()
    cfg = absolute_paths(cfg)
    t = cfg.tune
    metric = metric_name(cfg)
    keys = list(t.space)
    prepare(cfg, address)  # the driver is the only writer of the dataset and its folds
    out = tune_dir(cfg)
    trials_dir = storage.join(out, "trials")
    outer_folds: list[int | None] = [None] if t.estimate == "none" else (
        list(range(t.outer_k)) if t.estimate == "nested" else [0])
    outer_of_row = None if t.estimate == "none" else ensure_folds(cfg.data.dataset_dir, t.outer_k, cfg.folds.seed)
    _, started_ray = _connect(address or cfg.distributed.address)
    rows: list[dict] = []
    outer: list[dict] = []
    try:
        for o in outer_folds:
            label = "search on all data" if o is None else f"outer fold {o}"
            search_dir = storage.join(out, "all" if o is None else f"outer-{o}")
            inner = cfg
            if o is not None:
                subset = _outer_dataset(cfg, outer_of_row, o, search_dir)
                inner = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(), dataset_dir=subset))
                prepare(inner)  # the inner folds, of the outer training part only
            grid = run_search(inner, search_dir, trials_dir, label, resume)
            search_rows = results.trial_rows(grid, "all" if o is None else o, keys)
            rows += search_rows
            best = results.best_row(search_rows)
            params = {k: best[k] for k in keys}
            record = {"outer_fold": o, "best_trial": best["trial_id"], "params": params, "inner_oof": best["oof"]}
            if o is not None:
                final = results.chosen_config(cfg, params, folds={"k": t.outer_k, "seed": cfg.folds.seed},
                                              output_dir=cfg.output_dir)
                logger.info("%s: best trial %s (%s %.4f on the inner folds); training it on the outer training "
                            "part, scoring it on outer fold %d", label, best["trial_id"], metric, best["oof"], o)
                try:
                    run_cv(final, folds=[o], address=address)
                except FoldFailed as e:
                    logger.error("%s: the chosen config failed on the outer fold: %s", label, e)
                record["outer_score"] = _outer_score(cfg, o, metric)
            outer.append(record)
    finally:
        if started_ray:
            ray.shutdown()
    return _write_outputs(cfg, out, rows, outer, keys, metric, outer_folds, time.time() - start)


def _write_outputs(cfg: Config, out: str, rows: list[dict], outer: list[dict], keys: list[str], metric: str,
                   outer_folds: list, wall_time_s: float) -> dict[str, Any]:
    t = cfg.tune
    line = describe(t.estimate, t.outer_k, outer_folds)
    scores = [r["outer_score"] for r in outer if r.get("outer_score") is not None]
    chosen = max(outer, key=lambda r: r["inner_oof"])  # nested: the choice of the best inner search
    summary = {"estimate": t.estimate, "estimate_description": line, "metric": metric, "outer_k": t.outer_k,
               "search_algorithm": t.search_algorithm, "scheduler": t.scheduler, "num_trials": len(rows),
               "outer_folds": outer, "chosen": chosen,
               "estimate_mean": float(np.mean(scores)) if scores else None,
               "estimate_sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
               "wall_time_s": round(wall_time_s, 1)}
    if t.estimate == "none":
        line += f" (best trial {chosen['best_trial']}: {chosen['inner_oof']:.4f})"
    elif scores:
        line += f"; {metric} " + (f"{summary['estimate_mean']:.4f}" + (f" ± {summary['estimate_sd']:.4f}"
                                                                         if summary["estimate_sd"] else ""))
    best_cfg = results.chosen_config(cfg, chosen["params"], output_dir=storage.join(cfg.output_dir, "best"))
    with storage.mirrored(out, pull=False) as files:
        files.local.mkdir(parents=True, exist_ok=True)
        results.write_trials(files.local, rows, keys, metric, line)
        (files.local / results.BEST_YAML).write_text(best_cfg.to_yaml())
        results.write_summary(files.local, summary)
    return summary


def format_summary(cfg: Config, summary: dict[str, Any]) -> str:
    """A few lines for the terminal: the estimate, the chosen values, where the files are."""
    out = tune_dir(cfg)
    lines = [storage.read_bytes(storage.join(out, results.TRIALS_MD)).decode().rstrip(), "",
             f"chosen: {summary['chosen']['params']} (trial {summary['chosen']['best_trial']})",
             f"{summary['num_trials']} trial(s) in {summary['wall_time_s']:.0f}s; results in {out} "
             f"(trials.csv, trials.md, best.yaml, tune_summary.json); "
             f"`tensorboard --logdir {absolute(cfg.output_dir)}` shows every fold and trial"]
    return "\n".join(lines)
