"""Cross-validation folds: stratified by label, grouped by lesion, leak-checked.

All images of one lesion (`group`) land in one fold, and so do exact duplicates
(same `pixel_sha256`) even when their lesion ids differ: otherwise a duplicate
on both sides of a split inflates the validation score. Every fold must hold
every class of the dataset, since a validation set without melanoma has no
ROC-AUC and a meaningless balanced accuracy. Folds are stored beside the shards
as `folds/k{K}-seed{S}.parquet` (image_id, fold), with a JSON summary.

`data_fingerprint` names the data one fold is trained and validated on, so that
checkpoints and finished results of other data are never taken for this fold's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.model_selection import StratifiedGroupKFold

from melanoma_dist import storage
from melanoma_dist.data import shards
from melanoma_dist.storage import ObjectPath, as_path

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ["image_id", "label", "group", "pixel_sha256"]


def merge_duplicate_groups(groups: Sequence[str], pixel_hashes: Sequence[str]) -> np.ndarray:
    """Return one group key per row, where groups sharing a pixel hash are merged.

    Args:
        groups: Lesion (or image) id of each row.
        pixel_hashes: SHA-256 of each row's decoded pixels.

    Returns:
        An int array: rows with the same value must stay on one side of any split.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    first_group_of_hash: dict[str, str] = {}
    for g, h in zip(groups, pixel_hashes):
        find(g)
        if h in first_group_of_hash:
            ra, rb = find(first_group_of_hash[h]), find(g)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # deterministic root
        else:
            first_group_of_hash[h] = g
    roots = [find(g) for g in groups]
    _, keys = np.unique(np.asarray(roots, dtype=object).astype(str), return_inverse=True)
    return keys


def assign_folds(labels: Sequence[int], groups: Sequence[str], pixel_hashes: Sequence[str],
                 k: int, seed: int) -> np.ndarray:
    """Assign each row a fold in [0, k) with StratifiedGroupKFold.

    Args:
        labels: Class index of each row (stratification target).
        groups: Lesion id of each row.
        pixel_hashes: Pixel SHA-256 of each row; exact duplicates are kept together.
        k: Number of folds.
        seed: Shuffling seed; the same inputs and seed give the same folds.

    Raises:
        ValueError: fewer groups than folds.
    """
    keys = merge_duplicate_groups(groups, pixel_hashes)
    n_groups = len(np.unique(keys))
    if n_groups < k:
        raise ValueError(f"cannot make {k} folds from {n_groups} lesion groups: lower folds.k "
                         f"or ingest more images")
    y = np.asarray(labels)
    folds = np.full(len(y), -1, dtype=np.int32)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(y)), y, keys)):
        folds[val_idx] = fold
    assert (folds >= 0).all()
    return folds


@dataclass
class LeakageReport:
    """Groups or pixel hashes found in more than one fold (both lists empty when clean)."""

    groups_across_folds: list[str] = field(default_factory=list)
    hashes_across_folds: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.groups_across_folds and not self.hashes_across_folds

    def to_dict(self) -> dict:
        return {"clean": self.clean,
                "groups_across_folds": self.groups_across_folds,
                "pixel_hashes_across_folds": self.hashes_across_folds}


def check_leakage(folds: Sequence[int], groups: Sequence[str], pixel_hashes: Sequence[str]) -> LeakageReport:
    """Report any lesion group or pixel hash present in more than one fold."""
    report = LeakageReport()
    for values, out in ((groups, report.groups_across_folds), (pixel_hashes, report.hashes_across_folds)):
        seen: dict[str, set[int]] = defaultdict(set)
        for v, f in zip(values, folds):
            seen[v].add(int(f))
        out.extend(sorted(v for v, fs in seen.items() if len(fs) > 1))
    return report


def check_fold_classes(labels: Sequence[int], fold_of_row: Sequence[int], class_names: Sequence[str],
                       folds: Sequence[int]) -> None:
    """Refuse folds whose validation set lacks a class of the dataset.

    Args:
        labels: Class index of each row.
        fold_of_row: Fold of each row.
        class_names: Name of each class, in index order.
        folds: The folds to check.

    Raises:
        ValueError: the dataset has a single class, or a fold lacks one; the message names
            the folds, the missing classes and their counts, and suggests a smaller folds.k.
    """
    y, f = np.asarray(labels), np.asarray(fold_of_row)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"the dataset holds only class {class_names[int(present[0])]!r}: cross-validation "
                         f"metrics need at least two classes; ingest images of the others")
    problems = []
    for fold in folds:
        counts = np.bincount(y[f == fold], minlength=len(class_names))
        missing = [class_names[c] for c in present if counts[c] == 0]
        if missing:
            held = ", ".join(f"{n} {counts[c]}" for c, n in enumerate(class_names) if c in present)
            problems.append(f"fold {fold} has no validation image of class "
                            f"{' or '.join(repr(m) for m in missing)} ({held})")
    if problems:
        rarest = min(present, key=lambda c: (y == c).sum())
        n_rarest = int((y == rarest).sum())
        raise ValueError(f"{'; '.join(problems)}: such a fold has no ROC-AUC and a meaningless balanced accuracy; "
                         f"use a smaller folds.k (the rarest class, {class_names[int(rarest)]!r}, has {n_rarest} "
                         f"images in all, so at most {n_rarest} folds can each hold one) or ingest more images")


def dataset_sha256(dataset_dir: str | Path) -> str:
    """sha256 of the dataset's `manifest.json`: it changes whenever the dataset is re-ingested differently."""
    return hashlib.sha256(storage.read_bytes(shards.manifest_path(dataset_dir))).hexdigest()


def split_sha256(image_ids: Sequence[str] | pa.Array | pa.ChunkedArray, fold_of_row: Sequence[int],
                 fold: int) -> str:
    """sha256 of which images validate `fold` and which train it, whatever the row order.

    The ids are sorted and hashed as Arrow strings, a slice at a time, so that a million rows
    never become a million Python strings at once (Arrow sorts UTF-8 bytes, which is the code
    point order of Python's `sorted`: the hash is the same as from sorted Python strings).
    """
    ids = image_ids if isinstance(image_ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(image_ids), pa.string())
    val = pa.array(np.asarray(fold_of_row) == fold)
    h = hashlib.sha256()
    for part, mask in (("validation", val), ("training", pc.invert(val))):
        h.update(f"[{part}]\n".encode())
        rows = ids.filter(mask)
        rows = rows.take(pc.sort_indices(rows))
        for start in range(0, len(rows), _HASH_SLICE):
            h.update("".join(f"{i}\n" for i in rows.slice(start, _HASH_SLICE).to_pylist()).encode())
    return h.hexdigest()


_HASH_SLICE = 65536
"""Ids turned into Python strings at a time by `split_sha256`."""


def data_fingerprint(dataset_dir: str | Path, fold_of_row: Sequence[int], fold: int,
                     image_ids: Sequence[str] | None = None) -> dict[str, str]:
    """What one fold's training depends on besides the config: the dataset and its split.

    Args:
        dataset_dir: The dataset directory.
        fold_of_row: Fold of each dataset row (as `load_folds` returns it).
        fold: The validation fold.
        image_ids: Image id of each row. Defaults to `None` (read from the shards).

    Returns:
        `{"dataset": dataset_sha256, "folds": split_sha256}`, recorded in a fold's
        checkpoint and metrics.
    """
    if image_ids is None:
        image_ids = shards.read_columns(dataset_dir, ["image_id"])["image_id"].to_pylist()
    return {"dataset": dataset_sha256(dataset_dir), "folds": split_sha256(image_ids, fold_of_row, fold)}


NO_FINGERPRINT = "it records no data fingerprint (made by an older melanoma-dist), so it may come from other data"


def fingerprint_change(recorded: dict | None, expected: dict[str, str]) -> str | None:
    """Why a result recorded with `recorded` is not of the data of `expected`, or None if it is."""
    if not recorded:
        return NO_FINGERPRINT
    changes = []
    if recorded.get("dataset") != expected["dataset"]:
        changes.append(f"the dataset changed (manifest.json sha256 {str(recorded.get('dataset'))[:12]} "
                       f"then, {expected['dataset'][:12]} now)")
    if recorded.get("folds") != expected["folds"]:
        changes.append("the fold assignment changed (other images validate this fold)")
    return " and ".join(changes) or None


def folds_path(dataset_dir: str | Path, k: int, seed: int) -> Path | ObjectPath:
    """Where the fold assignment for (k, seed) is stored (an ObjectPath when the dataset is in an object store)."""
    return as_path(str(dataset_dir)) / "folds" / f"k{k}-seed{seed}.parquet"


def make_folds(dataset_dir: str | Path, k: int, seed: int) -> dict:
    """Compute, check and store folds for a dataset; return the JSON summary.

    Writes `folds/k{k}-seed{seed}.parquet` and `.json` (counts per fold and class,
    leakage report), only once the folds pass their checks.

    Raises:
        ValueError: a fold lacks a class of the dataset (see `check_fold_classes`), or
            the leakage check fails, which would be a bug.
    """
    index = shards.read_columns(dataset_dir, INDEX_COLUMNS)
    labels = index["label"].to_numpy()
    groups = index["group"].to_pylist()
    hashes = index["pixel_sha256"].to_pylist()
    folds = assign_folds(labels, groups, hashes, k, seed)
    leakage = check_leakage(folds, groups, hashes)
    if not leakage.clean:  # cannot happen with merged groups; guard the invariant anyway
        raise ValueError(f"fold assignment leaks across folds: {leakage.to_dict()}")
    class_names = shards.load_manifest(dataset_dir)["class_names"]
    check_fold_classes(labels, folds, class_names, range(k))
    per_fold = []
    for f in range(k):
        m = folds == f
        per_fold.append({
            "fold": f, "num_images": int(m.sum()), "num_groups": len(set(np.asarray(groups, dtype=object)[m])),
            "counts": {name: int((labels[m] == i).sum()) for i, name in enumerate(class_names)}})
    summary = {"k": k, "seed": seed, "num_images": len(folds), "folds": per_fold, "leakage": leakage.to_dict()}

    out = folds_path(dataset_dir, k, seed)
    table = pa.table({"image_id": index["image_id"], "fold": pa.array(folds, pa.int32())})
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    if isinstance(out, ObjectPath):  # an object appears whole when its upload completes: no temporary name
        fs, inner = storage.filesystem(str(out))
        pq.write_table(table, inner, filesystem=fs, compression="zstd")
        storage.write_bytes(str(out)[:-len(".parquet")] + ".json", text.encode())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(out)
        out.with_suffix(".json").write_text(text)
    logger.info("wrote %s: %s", out, ", ".join(f"fold {p['fold']}: {p['num_images']}" for p in per_fold))
    return summary


def load_folds(dataset_dir: str | Path, k: int, seed: int) -> np.ndarray:
    """Fold of each dataset row, in shard order.

    Raises:
        FileNotFoundError: the folds were not made; the message gives the command.
        ValueError: the folds file does not match the shards (re-ingested since).
    """
    path = folds_path(dataset_dir, k, seed)
    if not path.is_file():
        raise FileNotFoundError(f"no folds for k={k}, seed={seed} in {dataset_dir}: run "
                                f"`melanoma-dist folds --config ...` (or ingest) with folds.k={k} folds.seed={seed}")
    table = shards.parquet_file(str(path)).read()
    ids = shards.read_columns(dataset_dir, ["image_id"])["image_id"]
    if len(ids) != table.num_rows or not ids.equals(table["image_id"]):
        raise ValueError(f"{path} does not match the shards in {dataset_dir} (the dataset was re-ingested): "
                         f"delete it and run `melanoma-dist folds` again")
    return table["fold"].to_numpy()


def ensure_folds(dataset_dir: str | Path, k: int, seed: int) -> np.ndarray:
    """Load the folds for (k, seed), making them first if they do not exist yet."""
    if not folds_path(dataset_dir, k, seed).is_file():
        make_folds(dataset_dir, k, seed)
    return load_folds(dataset_dir, k, seed)
