"""Tiny generated image collections, ingested by the real ingest code.

Class 1 images are brighter than class 0 images, so a model can learn the
difference in a few steps; noise makes every image (and its pixel hash) unique.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_dist.config import DataConfig, SourceConfig
from melanoma_dist.data.folds import make_folds
from melanoma_dist.data.ingest import ingest


def write_class_folders(root: Path, n_per_class: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """Write `root/<class>/img_<class>_<i>.png` noise images, brighter for later classes."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(sorted(n_per_class.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = 40 + 150 * c / max(1, len(n_per_class) - 1)
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img_{name}_{i:03d}.png")
    return root


def make_dataset(tmp: Path, n_per_class: dict[str, int] | None = None, image_size: int = 16,
                 k: int = 2, seed: int = 0, encoding: str = "png") -> DataConfig:
    """Ingest a generated melanoma-vs-other collection into `tmp/dataset` and make k folds.

    The same arguments give the same images, whatever the `encoding` they are stored in.
    """
    n_per_class = n_per_class or {"other": 24, "melanoma": 16}
    root = write_class_folders(tmp / "images", n_per_class, seed=seed)
    cfg = DataConfig(sources=(SourceConfig(kind="folder", path=str(root), name="synthetic",
                                           label_type="melanoma"),),
                     dataset_dir=str(tmp / "dataset"), label_scheme="melanoma", image_size=image_size,
                     encoding=encoding, rows_per_shard=7, ingest_workers=1)
    ingest(cfg, progress=False)
    make_folds(cfg.dataset_dir, k, seed=42)
    return cfg


def tiny_run(data: DataConfig, out: Path, **sections: dict) -> dict:
    """The raw config of a tiny real run on `data`: a 4/8-filter CNN, 2 folds, 2 epochs, 1 worker per fold.

    Each keyword updates that section (`train={"epochs": 3}`), or adds one (`tune={...}`).
    """
    raw: dict = {
        "data": {"dataset_dir": data.dataset_dir, "image_size": data.image_size, "label_scheme": "melanoma"},
        "folds": {"k": 2, "seed": 42},
        "pipeline": {"batch_size": 4, "shuffle_buffer": 32},
        "model": {"filters": [4, 8], "convs_per_block": 1, "dense_units": 8, "dropout": 0.0},
        "train": {"epochs": 2, "learning_rate": 0.01, "warmup_epochs": 1, "verbose": 0},
        "distributed": {"workers_per_fold": 1, "cpus_per_worker": 1, "max_retries": 1},
        "output_dir": str(out),
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw
