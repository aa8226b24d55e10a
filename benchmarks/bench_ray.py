"""Ray fold scheduling: K=2 tiny folds run concurrently by `run_cv` versus one at a time; start-up overhead.

Questions:

1. Wall time of a 2-fold cross-validation through `melanoma_dist.schedule.cv.run_cv` when
   Ray runs both folds at once (a 2-CPU cluster, 1 worker x 1 CPU per fold) versus the same
   folds one at a time (`run_cv(folds=[0])`, then `run_cv(folds=[1])`, as `cv --folds 0`
   then `cv --folds 1` would). Speed-up, and efficiency against the ideal 2x.
2. The fixed overhead: seconds from `run_cv` being called to the first training step of
   each fold, split into scheduling (dataset check, placement group, actor start, Horovod
   set-up), imports in the worker, and set-up up to the first step; plus `ray.init` of a
   local cluster and a Horovod group that runs a no-op function (start + run + shutdown).

    python benchmarks/bench_ray.py              # full: 1,000 HAM10000 images at 64 px, 1 epoch
    python benchmarks/bench_ray.py --images 2000 --epochs 2 --repeats 3
    python benchmarks/bench_ray.py --smoke

How: one local Ray with 2 logical CPUs (`ray.init(num_cpus=2)`), started by this script
(timed) and reused by every `run_cv` call (run_cv only joins it). The driver's one-off import of the
libraries whose versions `run_cv` records is measured on its first call in this process
(before anything imports TensorFlow), next to reading the same versions with
`importlib.metadata`, and so paid once before the timed runs. Each run writes to a fresh
output directory (finished folds would be skipped). The workers run
`benchmarks._workers.timed_fold_worker`, a thin wrapper of the real `_fold_worker` that
records wall-clock timestamps (worker entered, imports done, first and second
`on_train_batch_begin`, end of fit) in `fold-K/bench_timing_rank0.json`; it is swapped in
for `melanoma_dist.schedule.cv._fold_worker` in this process only. Concurrent and
sequential runs alternate over `--repeats`; medians are reported.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (REPO, Report, base_parser, bench_config, count_images, ensure_dataset, jpeg_tree,
                                main_guard, median, print_environment, setup_logging, thread_env)


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--images", type=int, help="HAM10000 images in the dataset (default 1000; smoke 40)")
    p.add_argument("--size", type=int, help="image size in px (default 64; smoke 32)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per fold. Defaults to 1")
    return p.parse_args(argv)


def fold_timings(out: Path, calls: dict[int, tuple[float, float]]) -> list[dict[str, float]]:
    """Per fold: phases in seconds, from the timestamps its worker wrote.

    `calls` maps each fold to the (start, end) wall-clock times of the run_cv call that ran it.
    """
    import json

    rows = []
    for path in sorted(out.glob("fold-*/bench_timing_rank0.json")):
        t = json.loads(path.read_text())
        t0, t_done = calls[t["fold"]]
        first = t.get("first_step_begin")
        rows.append({
            "fold": t["fold"],
            "cv_start_to_worker": t["t_enter"] - t0,
            "worker_imports": t["t_imported"] - t["t_enter"],
            "imports_to_first_step": (first - t["t_imported"]) if first else None,
            "cv_start_to_first_step": (first - t0) if first else None,
            "first_step": (t["second_step_begin"] - first) if first and "second_step_begin" in t else None,
            "fit": (t["fit_end"] - first) if first and "fit_end" in t else None,
            "after_fit": (t["t_return"] - t["fit_end"]) if "fit_end" in t else None,
            "worker_return_to_cv_done": t_done - t["t_return"],
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    smoke = args.smoke
    n_wanted = args.images or (40 if smoke else 1000)
    size = args.size or (32 if smoke else 64)
    repeats = args.repeats or (1 if smoke else 2)
    work = args.work_dir
    tree = jpeg_tree(work, n_wanted)
    dataset = ensure_dataset(work, tree, size)
    n = count_images(tree)
    overrides = ["folds.k=2", f"train.epochs={args.epochs}", "train.verbose=0", "distributed.workers_per_fold=1",
                 "distributed.cpus_per_worker=1", "distributed.max_retries=0"]
    if smoke:
        overrides += ["pipeline.batch_size=8", "pipeline.shuffle_buffer=64"]
    report = Report("bench_ray", smoke, {"images": n, "size": size, "epochs": args.epochs, "repeats": repeats,
                                         "ray_cpus": 2, "overrides": overrides})
    print_environment(report.env)

    # Ray workers must import `benchmarks` (the timing wrapper); they inherit this environment.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    os.environ.update(thread_env(1))  # as GroupSpec.worker_env sets it for 1-CPU workers
    import ray

    from benchmarks import _workers
    from melanoma_dist.schedule import cv as folds_mod
    from melanoma_dist.schedule.horovod_group import GroupSpec, run_horovod_group

    results: dict[str, Any] = {}
    # The driver's one-off cost of recording library versions in run_manifest.json, measured on
    # its first call in this process (which has not imported TensorFlow), next to reading the
    # same versions with importlib.metadata; paid here, so that no timed run_cv below includes it.
    if "tensorflow" in sys.modules:
        report.notes.append("TensorFlow was already imported before the driver's version recording was timed: "
                            "that row understates its cost")
    results["driver_versions"] = {"metadata": _workers.driver_versions({"mode": "metadata"}),
                                  "ours": _workers.driver_versions({"mode": "ours"})}
    start = time.perf_counter()
    # address="local": always a new cluster of our own, even if another Ray runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    results["ray_init_s"] = time.perf_counter() - start
    print(f"== ray.init (local, 2 CPUs): {results['ray_init_s']:.1f}s", flush=True)
    try:
        noop = {}
        for workers in (1, 2):
            t0 = time.time()
            res = run_horovod_group(_workers.noop, [], GroupSpec(num_workers=workers, cpus_per_worker=1))
            t1 = time.time()
            entered = [r["t_enter"] for r in res]
            noop[f"{workers}_workers"] = {"total_s": t1 - t0, "start_s": max(entered) - t0,
                                          "shutdown_s": t1 - max(entered)}
            print(f"== no-op Horovod group of {workers}: {t1 - t0:.1f}s (start {max(entered) - t0:.1f}s)", flush=True)
        results["noop_group"] = noop

        folds_mod._fold_worker = _workers.timed_fold_worker  # this process only; see the module docstring
        runs: dict[str, list[dict[str, Any]]] = {"concurrent": [], "sequential": []}
        for r in range(repeats):
            for mode in (["concurrent", "sequential"] if r % 2 == 0 else ["sequential", "concurrent"]):
                out = work / "ray" / f"{mode}-{os.getpid()}-{r}"
                cfg, _ = bench_config(size, dataset, out, overrides)
                calls: dict[int, tuple[float, float]] = {}
                for group in ([[0, 1]] if mode == "concurrent" else [[0], [1]]):
                    t0 = time.time()
                    folds_mod.run_cv(cfg, folds=group)
                    calls.update({f: (t0, time.time()) for f in group})
                wall = max(end for _, end in calls.values()) - min(start for start, _ in calls.values())
                run = {"wall_s": wall, "folds": fold_timings(out, calls), "output_dir": str(out)}
                runs[mode].append(run)
                print(f"== {mode} run {r}: {run['wall_s']:.1f}s", flush=True)
        results["runs"] = runs
    finally:
        t = time.perf_counter()
        ray.shutdown()
        results["ray_shutdown_s"] = time.perf_counter() - t

    conc = median([x["wall_s"] for x in runs["concurrent"]])
    seq = median([x["wall_s"] for x in runs["sequential"]])
    speedup = seq / conc
    phases = {}
    for key in ("cv_start_to_worker", "worker_imports", "imports_to_first_step", "cv_start_to_first_step",
                "first_step", "fit", "after_fit"):
        values = [f[key] for run in runs["sequential"] for f in run["folds"] if f.get(key) is not None]
        phases[key] = median(values) if values else None
    results["summary"] = {"concurrent_s": conc, "sequential_s": seq, "speedup": speedup,
                          "sequential_fold_phases_s": phases}
    report.results = results
    report.row("K=2 folds: concurrent vs one at a time (wall)", conc, seq, "s", ratio_value=speedup,
               ratio_label="speed-up; ideal 2 on 2 idle cores")
    report.row("cv start to first training step (per fold, one at a time)", phases["cv_start_to_first_step"],
               seq / 2, "s", ratio_label="share of a fold's wall time")
    report.row("  scheduling: cv start to worker running", phases["cv_start_to_worker"], None, "s")
    report.row("  worker imports (TensorFlow, Keras, Horovod)", phases["worker_imports"], None, "s")
    report.row("  set-up to first step (hvd.init, index, model, datasets)", phases["imports_to_first_step"], None, "s")
    report.row("  first step (tracing, shuffle-buffer fill)", phases["first_step"], None, "s")
    dv = results["driver_versions"]
    report.row("driver: record library versions (run_manifest.json)", dv["ours"]["seconds"],
               dv["metadata"]["seconds"], "s", ratio_label="ours/importlib.metadata")
    report.row("driver: memory added by recording versions", dv["ours"]["rss_added_bytes"] / 2**20,
               dv["metadata"]["rss_added_bytes"] / 2**20, "MiB")
    report.row("ray.init, local, 2 CPUs (once per cv)", results["ray_init_s"], None, "s")
    if phases["cv_start_to_first_step"] is not None:
        report.row("cold `cv` start to first step (ray.init + version imports + cv start to first step)",
                   results["ray_init_s"] + dv["ours"]["seconds"] + phases["cv_start_to_first_step"], None, "s")
    for w in (1, 2):
        g = results["noop_group"][f"{w}_workers"]
        report.row(f"no-op Horovod group of {w}: start+run+shutdown", g["total_s"], None, "s")
    report.notes.append("sequential runs call run_cv once per fold, so they also pay run_cv's own set-up twice "
                        "(dataset check, run manifest, aggregation), as `cv --folds 0` then `cv --folds 1` would.")
    report.write(args.out_dir)


if __name__ == "__main__":
    sys.exit(main_guard(main))
