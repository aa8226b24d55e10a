"""Make sure a config's dataset and folds exist before training reads them.

Only a single process (the CLI, or the `cv` driver) may call this: it writes the
dataset and the fold file, which training workers then only read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from melanoma_dist.config import Config, DataConfig
from melanoma_dist.data import shards
from melanoma_dist.data.folds import ensure_folds
from melanoma_dist.data.ingest import ingest

logger = logging.getLogger(__name__)


def ensure_dataset(cfg: Config) -> dict:
    """Return the dataset manifest, ingesting first when the dataset does not exist yet.

    Raises:
        ValueError: no dataset and nothing to ingest, or the existing dataset was
            made with another image size, label scheme, resize, encoding or colour constancy.
    """
    if not (Path(cfg.data.dataset_dir) / shards.MANIFEST).is_file():
        if not cfg.data.sources:
            raise ValueError(f"no dataset in {cfg.data.dataset_dir} and no data.sources to ingest: "
                             f"set data.sources in the config, or data.dataset_dir to an ingested dataset")
        logger.info("no dataset in %s yet: ingesting %d source(s) first", cfg.data.dataset_dir, len(cfg.data.sources))
        return ingest(cfg.data)
    manifest = shards.load_manifest(cfg.data.dataset_dir)
    # Size and labels shape the model; how images were made matters when the config says how to make them.
    keys = ("image_size", "label_scheme") + (("resize", "encoding", "color_constancy") if cfg.data.sources else ())
    for key in keys:
        # Datasets written before a setting existed were made with its default.
        if manifest.get(key, DataConfig.__dataclass_fields__[key].default) != getattr(cfg.data, key):
            raise ValueError(f"the dataset in {cfg.data.dataset_dir} has {key}={manifest.get(key)!r} but the config "
                             f"says data.{key}={getattr(cfg.data, key)!r}: run `melanoma-dist ingest` again, or "
                             f"point data.dataset_dir elsewhere")
    return manifest


def prepare(cfg: Config) -> tuple[dict, np.ndarray]:
    """Ensure the dataset and the folds of `cfg.folds` exist; return the manifest and each row's fold."""
    manifest = ensure_dataset(cfg)
    return manifest, ensure_folds(cfg.data.dataset_dir, cfg.folds.k, cfg.folds.seed)
