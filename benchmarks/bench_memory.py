"""Peak memory: peak RSS of one training worker at 64 and 128 px with the config's batch size.

Question: how much memory does one training worker (one Horovod rank) need, next to a
plain Keras worker doing the same training from the JPEG folder, and next to the floor
(TensorFlow, Keras, Horovod and the compiled model, no data)?

    python benchmarks/bench_memory.py            # full: all 10,015 HAM10000 images
    python benchmarks/bench_memory.py --sizes 128 --steps 50
    python benchmarks/bench_memory.py --smoke

How: every worker is a fresh Python process with the thread settings of a 1-CPU Ray
worker (`GroupSpec(1).worker_env()`); the parent reads its peak RSS from `wait4`
(`ru_maxrss`, the kernel's high-water mark), and the child samples its own RSS every
20 ms (psutil) to split it into phases (after imports, at the start of fit, at the end).

- ours: `train.fold.train_fold(cfg, fold=0)` (the real worker body: Parquet row index,
  the tf.data pipeline, the CNN with the distributed optimizer and every callback,
  prediction of the whole validation fold, gathering, saving), with `Model.fit` capped to
  `--steps` training and `--val-steps` validation batches of one epoch;
- baseline: `image_dataset_from_directory` over the same JPEGs with the same augmentation
  layers, the same CNN with plain Adam, the same number of steps, and a prediction of as
  many images as ours predicts;
- floor: the imports, `hvd.init`, the compiled model and one training step on zeros.

Config: quick-cpu.yaml at 64 px (batch 64), full.yaml at 128 px (batch 32, shuffle buffer 4096).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (int_list, Report, base_parser, bench_config, count_images, ensure_dataset, jpeg_tree,
                                main_guard, median, print_environment, run_child, setup_logging)

MODES = ("floor", "baseline", "ours")


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--sizes", type=int_list, help="image sizes (default 64,128; smoke 32)")
    p.add_argument("--images", type=int, help="HAM10000 images (default all 10,015; smoke 48)")
    p.add_argument("--steps", type=int, help="training steps (default 20; smoke 2)")
    p.add_argument("--val-steps", type=int, help="validation steps in fit (default 5; smoke 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    smoke = args.smoke
    sizes = args.sizes or ([32] if smoke else [64, 128])
    n_wanted = args.images or (48 if smoke else None)
    steps = args.steps or (2 if smoke else 20)
    val_steps = args.val_steps or (1 if smoke else 5)
    repeats = args.repeats or 1  # peak RSS barely varies between runs; raise it to check
    work = args.work_dir
    tree = jpeg_tree(work, n_wanted)
    n = count_images(tree)
    report = Report("bench_memory", smoke, {"sizes": sizes, "images": n, "steps": steps, "val_steps": val_steps,
                                            "repeats": repeats})
    print_environment(report.env)

    from melanoma_dist.data.folds import ensure_folds
    from melanoma_dist.schedule.horovod_group import GroupSpec

    worker_env = GroupSpec(num_workers=1, cpus_per_worker=1).worker_env()
    results: dict[str, Any] = {}
    for size in sizes:
        dataset = ensure_dataset(work, tree, size)
        overrides = ["train.epochs=1", "train.verbose=0"] + (["pipeline.batch_size=8"] if smoke else [])
        cfg, cfg_name = bench_config(size, dataset, "unused", overrides)
        ensure_folds(dataset, cfg.folds.k, cfg.folds.seed)  # the worker only reads them
        per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        def one(mode: str) -> dict[str, Any]:
            out = work / "memory" / f"{size}px-{mode}-{time.monotonic_ns()}"
            spec = {"mode": mode, "size": size, "dataset": str(dataset), "output_dir": str(out),
                    "overrides": overrides, "steps": steps, "val_steps": val_steps, "jpeg_tree": str(tree),
                    "val_images": n // cfg.folds.k}
            child = run_child("memory", spec, work, env=worker_env)
            print(f"   {size}px {mode:8s} peak RSS {child.max_rss_bytes / 2**20:7.0f} MiB "
                  f"({child.seconds:.0f}s)", flush=True)
            return {"max_rss_bytes": child.max_rss_bytes, "seconds": child.seconds, **child.result}

        for r in range(repeats):
            if smoke:  # only checks that it runs: the three workers at once to save time
                with ThreadPoolExecutor(len(MODES)) as pool:
                    recs = dict(zip(MODES, pool.map(one, MODES)))
            else:  # one at a time, so that page-cache and allocator effects stay per worker
                recs = {mode: one(mode) for mode in MODES}
            for mode, rec in recs.items():
                per_mode[mode].append(rec)
        peak = {m: median([x["max_rss_bytes"] for x in runs]) / 2**20 for m, runs in per_mode.items()}
        results[f"{size}px"] = {"config": cfg_name, "batch_size": cfg.pipeline.batch_size,
                                "shuffle_buffer": cfg.pipeline.shuffle_buffer, "peak_rss_mib": peak, "runs": per_mode}
        label = f"{size}px ({cfg_name}, batch {cfg.pipeline.batch_size})"
        report.row(f"{label}: peak RSS of a training worker", peak["ours"], peak["baseline"], "MiB")
        report.row(f"{label}: above the floor (data path + training state)", peak["ours"] - peak["floor"],
                   peak["baseline"] - peak["floor"], "MiB")
        report.row(f"{label}: floor (TF + Horovod + compiled model)", peak["floor"], None, "MiB")
    report.results = results
    report.write(args.out_dir)


if __name__ == "__main__":
    sys.exit(main_guard(main))
