"""The `--smoke-test` run: a tiny generated image collection and a config that trains on it in about a minute.

Melanoma images are brighter than the others, so even 1 epoch of a 2-block CNN learns
something; noise makes every image unique (no duplicate across folds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from melanoma_dist.config import Config, config_from_dict

CLASS_SIZES = {"other": 24, "melanoma": 16}


def write_images(root: Path, seed: int = 0, size: int = 24) -> Path:
    """Write `root/<class>/<class>_<i>.png` noise images; return root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in sorted(CLASS_SIZES.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        base = 190 if name == "melanoma" else 40
        for i in range(n):
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")
    return root


def smoke_config(workdir: Path, overrides: Sequence[str] = ()) -> Config:
    """Write the images under `workdir` and return a tiny 2-fold config whose data and results live there.

    Args:
        workdir: An empty, writable directory.
        overrides: `section.key=value` overrides applied on top. Defaults to `()`.
    """
    images = write_images(Path(workdir) / "images")
    raw = {
        "data": {"sources": [{"kind": "folder", "path": str(images), "name": "smoke", "label_type": "melanoma"}],
                 "dataset_dir": str(Path(workdir) / "dataset"), "label_scheme": "melanoma", "image_size": 16,
                 "encoding": "png", "rows_per_shard": 16, "ingest_workers": 1},
        "folds": {"k": 2, "seed": 42},
        "pipeline": {"batch_size": 8, "shuffle_buffer": 64},
        "model": {"filters": [4, 8], "convs_per_block": 1, "dense_units": 8},
        "train": {"epochs": 1, "warmup_epochs": 0},
        "distributed": {"workers_per_fold": 1, "cpus_per_worker": 1, "max_retries": 0},
        "output_dir": str(Path(workdir) / "cv"),
    }
    return config_from_dict(raw, overrides)
