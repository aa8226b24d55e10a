"""The outer split of an honest search: the outer training part as a dataset of its own.

The outer folds are the dataset's usual folds for `k = tune.outer_k` (stratified by label,
grouped by lesion, identical images together: `data/folds.py`). For outer fold `o`, the
search sees only the rows of the other outer folds: they are copied into a dataset of
their own (Parquet shards and a manifest, in `<output_dir>/tune/outer-<o>/dataset/`),
whose inner folds `prepare` then makes like any dataset's. No image of outer fold `o`
can reach a trial, because no trial can read it. The best config is then trained on the
outer training part and scored on outer fold `o`: that is the usual fold `o` of the
outer split (`run_cv(..., folds=[o])` with `folds.k = outer_k`).

Example:

```python
outer = ensure_folds(cfg.data.dataset_dir, 5, cfg.folds.seed)
inner_dir = outer_training_dataset(cfg.data.dataset_dir, outer, 0, "runs/x/tune/outer-0/dataset")
```
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from melanoma_dist.data import folds as fold_io
from melanoma_dist.data import shards

logger = logging.getLogger(__name__)

SUBSET_KEY = "outer_training_part"
"""Manifest entry of a derived dataset: what it was cut from."""


def _subset_record(dataset_dir: str | Path, outer_of_row: Sequence[int], fold: int) -> dict:
    ids = shards.read_columns(dataset_dir, [shards.IMAGE_ID])[shards.IMAGE_ID].to_pylist()
    return {"parent_dataset": fold_io.dataset_sha256(dataset_dir), "outer_fold": int(fold),
            "outer_split": fold_io.split_sha256(ids, outer_of_row, fold)}


def outer_training_dataset(dataset_dir: str | Path, outer_of_row: Sequence[int], fold: int,
                           out_dir: str | Path) -> Path:
    """Write (or reuse) the dataset of every row outside outer fold `fold`.

    Args:
        dataset_dir: The full dataset.
        outer_of_row: Outer fold of each row of `dataset_dir` (`load_folds(..., outer_k, seed)`).
        fold: The outer fold held out.
        out_dir: Where to write the derived dataset. Reused when it was cut from the same
            dataset and split, else replaced.

    Returns:
        `out_dir`.
    """
    out = Path(out_dir)
    record = _subset_record(dataset_dir, outer_of_row, fold)
    try:
        if shards.load_manifest(out).get(SUBSET_KEY) == record:
            return out
    except (FileNotFoundError, ValueError):
        pass
    parent = shards.load_manifest(dataset_dir)
    keep = np.asarray(outer_of_row) != fold
    counts = np.zeros(len(parent["class_names"]), np.int64)

    def tables() -> Iterator[pa.Table]:
        start = 0
        for path in shards.shard_paths(dataset_dir):  # a shard at a time: memory stays bounded by one
            table = shards.parquet_file(path).read()
            part = table.filter(pa.array(keep[start:start + table.num_rows]))
            start += table.num_rows
            counts[:] += np.bincount(part[shards.LABEL].to_numpy(), minlength=len(counts))
            yield part

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    names = shards.write_shards(tables(), tmp, int(parent.get("rows_per_shard", 2048)), parent.get("shard_bytes"),
                                compress_images=parent.get("encoding") != "raw")
    manifest = {**parent, "shards": names, "num_shards": len(names), "num_images": int(counts.sum()),
                "counts": {n: int(counts[i]) for i, n in enumerate(parent["class_names"])},
                "num_skipped": 0, "skipped": [], SUBSET_KEY: record}
    shards.write_manifest(tmp, manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("outer fold %d held out: the search sees %d of %d images (%s)", fold, int(counts.sum()),
                len(keep), out)
    return out


def held_out_ids(dataset_dir: str | Path, outer_of_row: Sequence[int], fold: int) -> set[str]:
    """Image ids of outer fold `fold` (never seen by its search)."""
    ids = shards.read_columns(dataset_dir, [shards.IMAGE_ID])[shards.IMAGE_ID]
    return set(pc.filter(ids, pa.array(np.asarray(outer_of_row) == fold)).to_pylist())


def describe(estimate: str, outer_k: int, folds: Sequence[int]) -> str:
    """One sentence saying how the reported estimate was made."""
    if estimate == "nested":
        return (f"nested cross-validation: {outer_k} outer folds, a search on the inner folds of each outer "
                f"training part; the estimate is the outer folds' score of the config each search chose")
    if estimate == "holdout":
        return (f"held-out outer fold {folds[0]} of {outer_k} (lesion-grouped), never seen by the search; the "
                f"estimate is its score of the chosen config retrained on the rest")
    return "none: the search ran on all the data, so the best trial's score is optimistic"
