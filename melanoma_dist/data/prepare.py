"""Make sure a config's dataset and folds exist, and match the config, before training reads them.

Only a single process (the CLI, or the `cv` driver) may call this: it writes the
dataset and the fold file, which training workers then only read.

A dataset is reused when its fingerprint (`data.fingerprint`: the sources, their files,
the image settings) matches the config's; otherwise it is ingested again, the log saying
what changed. A config without sources only points at a dataset: then only its image size
and label scheme must match, since there is nothing to ingest it again from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from melanoma_dist import storage
from melanoma_dist.config import Config, DataConfig
from melanoma_dist.data import fingerprint, shards
from melanoma_dist.data.folds import ensure_folds
from melanoma_dist.data.ingest import ingest

logger = logging.getLogger(__name__)

MODEL_SHAPING: tuple[str, ...] = ("image_size", "label_scheme")
"""Settings a dataset must share with a config that only points at it: they shape the model."""


def ensure_dataset(cfg: Config, address: str = "") -> dict:
    """Return the dataset manifest, ingesting first when the dataset is missing or does not match the config.

    Args:
        cfg: the config.
        address: the command's Ray cluster address, where ingest may prepare the images (see
            `data.ingest_ray.use_ray`). Defaults to `""` (`distributed.address`).

    Raises:
        ValueError: no dataset and nothing to ingest; the config has no sources and the
            dataset was made with another image size or label scheme; or the manifest is damaged.
    """
    data = cfg.data
    address = address or cfg.distributed.address
    if not storage.is_file(shards.manifest_path(data.dataset_dir)):
        if not data.sources:
            raise ValueError(f"no dataset in {data.dataset_dir} and no data.sources to ingest: "
                             f"set data.sources in the config, or data.dataset_dir to an ingested dataset")
        logger.info("no dataset in %s yet: ingesting %d source(s) first", data.dataset_dir, len(data.sources))
        return ingest(data, address=address)
    manifest = shards.load_manifest(data.dataset_dir)
    changes = dataset_changes(data, manifest)
    if changes and not data.sources:
        raise ValueError(f"the dataset in {data.dataset_dir} does not match the config ({'; '.join(changes)}) and "
                         f"the config lists no data.sources to ingest it again from: run `melanoma-dist ingest` "
                         f"with its sources, or point data.dataset_dir elsewhere")
    if changes:
        logger.warning("the dataset in %s does not match the config (%s): ingesting again",
                       data.dataset_dir, "; ".join(changes))
        return ingest(data, address=address)
    return manifest


def dataset_changes(data: DataConfig, manifest: Mapping[str, Any]) -> list[str]:
    """What differs between how a dataset was made (its manifest) and how `data` says to make it.

    With sources, every input and setting is compared (only settings and source options for
    manifests from before the fingerprint, logged); without, only `MODEL_SHAPING`.

    Returns:
        One phrase per difference, e.g. `"image_size: 64 in the dataset, 128 in the config"`; empty when it matches.
    """
    stored = fingerprint.stored(manifest)
    if not data.sources:  # the config only points at the dataset
        return fingerprint.differences(stored, {"settings": fingerprint.settings(vars(data), MODEL_SHAPING)})
    if "fingerprint" not in manifest:
        logger.warning("the dataset in %s has no fingerprint (ingested by an older melanoma-dist): only its settings "
                       "and source paths are compared with the config, not its files; run `melanoma-dist ingest` "
                       "to rebuild it if the source files changed", data.dataset_dir)
    return fingerprint.differences(stored, fingerprint.current(data))


def prepare(cfg: Config, address: str = "") -> tuple[dict, np.ndarray]:
    """Ensure the dataset and the folds of `cfg.folds` exist; return the manifest and each row's fold.

    `address`: see `ensure_dataset`.
    """
    manifest = ensure_dataset(cfg, address)
    return manifest, ensure_folds(cfg.data.dataset_dir, cfg.folds.k, cfg.folds.seed)
