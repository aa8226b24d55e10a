"""A tiny but real cross-validation result, for the report, export, evaluate and predict tests.

`make_cv_result` ingests generated images (`tests.synthetic`), then runs the real
`run_cv` on a local Ray with one worker per fold: two folds of a 4/8-filter CNN on 16 px
images, in about 20-30 s on 2 CPUs. The `cv_result` fixture in conftest.py builds it once
per session and every test reads it (tests that write go to their own tmp dirs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from melanoma_dist.config import DataConfig, config_from_dict
from tests.synthetic import make_dataset

N_PER_CLASS = {"other": 30, "melanoma": 20}
K = 2


@dataclass(frozen=True)
class CVRun:
    """A finished tiny run: its data config, result directory and image folder."""

    data: DataConfig
    result_dir: Path
    images_dir: Path
    """`<class>/img_<class>_<i>.png` files the dataset was ingested from."""


def tiny_cv_config(data: DataConfig, out: Path) -> object:
    """The config of the tiny run (as in tests/test_cv.py, one worker per fold)."""
    return config_from_dict({
        "data": {"dataset_dir": data.dataset_dir, "image_size": data.image_size, "label_scheme": "melanoma",
                 "encoding": "png", "resize": "crop"},
        "folds": {"k": K, "seed": 42},
        "pipeline": {"batch_size": 8, "shuffle_buffer": 64},
        "model": {"filters": [4, 8], "convs_per_block": 1, "dense_units": 8, "dropout": 0.0},
        "train": {"epochs": 3, "learning_rate": 0.01, "warmup_epochs": 0, "verbose": 0},
        "distributed": {"workers_per_fold": 1, "cpus_per_worker": 1, "max_retries": 0},
        "output_dir": str(out),
    })


def make_cv_result(tmp: Path) -> CVRun:
    """Ingest generated images and cross-validate on a local 2-CPU Ray (stopped afterwards)."""
    import ray

    from melanoma_dist.schedule.cv import run_cv

    data = make_dataset(tmp, n_per_class=N_PER_CLASS, k=K)
    out = tmp / "run"
    # Each fold's worker gets one thread pool, so the two folds share 2 cores fairly.
    os.environ.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    try:
        run_cv(tiny_cv_config(data, out))
    finally:
        # Stop it now: other test modules start their own clusters, and run_cv would
        # otherwise reuse this Ray instead of theirs.
        ray.shutdown()
    return CVRun(data, out, tmp / "images")
