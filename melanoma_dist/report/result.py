"""Read a finished (or partly finished) cross-validation result directory.

`melanoma-dist cv` writes `config.yaml`, `run_manifest.json`, `cv_summary.json` and, per
fold, `fold-K/{metrics.json, predictions.csv, history.csv, model.keras}`. `CVResult.load`
reads them into one object; the out-of-fold predictions are rebuilt from the finished
folds' `predictions.csv` (so a run whose aggregation was interrupted still loads).

Example:

```python
result = CVResult.load("runs/quick-cpu")
result.class_names, result.decision_index, result.oof_probs.shape  # ('other', 'melanoma'), 1, (10015, 2)
```
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from melanoma_dist import labels as label_schemes
from melanoma_dist import storage
from melanoma_dist.run_files import METRICS_FILE, PREDICTIONS_FILE, fold_dir
from melanoma_dist.storage import ObjectPath, as_path

logger = logging.getLogger(__name__)

RUN_MANIFEST = "run_manifest.json"
CONFIG_FILE = "config.yaml"


class ResultError(ValueError):
    """A result directory is missing, unfinished or inconsistent."""


def decision_index(scheme: str) -> int:
    """The class whose probability is thresholded: melanoma (`ham7`, `melanoma`) or `malignant`.

    Raises:
        ValueError: unknown scheme.
    """
    mel = label_schemes.melanoma_index(scheme)
    return mel if mel is not None else 1


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()  # a local path, or a URI


def read_history(path: str | Path) -> dict[str, list[float]]:
    """A Keras CSVLogger file as {column: values} (empty when the file is missing)."""
    p = Path(path)
    if not p.is_file():
        return {}
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out: dict[str, list[float]] = {}
    for key in rows[0]:
        try:
            out[key] = [float(r[key]) for r in rows]
        except (TypeError, ValueError):
            continue
    return out


@dataclass
class FoldResult:
    """One finished fold."""

    fold: int
    metrics: dict[str, Any]
    history: dict[str, list[float]]
    model_path: Path


@dataclass
class CVResult:
    """Everything the report, export and model card read from a result directory."""

    result_dir: Path
    config: dict[str, Any]
    """The run's config as a plain dict (paths absolute, as the run used them)."""
    run_manifest: dict[str, Any]
    summary: dict[str, Any]
    folds: list[FoldResult]
    k: int
    class_names: tuple[str, ...]
    label_scheme: str
    oof_fold: np.ndarray
    oof_image_ids: np.ndarray
    oof_groups: np.ndarray
    oof_labels: np.ndarray
    oof_probs: np.ndarray
    missing_folds: list[int] = field(default_factory=list)
    origin: str = ""
    """Where the result lives when `result_dir` is a local copy of it (an object-store URI); else empty."""

    @property
    def decision_index(self) -> int:
        """Index of the class whose probability is thresholded (see `decision_index`)."""
        return decision_index(self.label_scheme)

    @property
    def decision_class(self) -> str:
        return self.class_names[self.decision_index]

    @property
    def dataset_dir(self) -> Path | ObjectPath:
        return as_path(self.config["data"]["dataset_dir"])  # an ObjectPath for a dataset in an object store

    @property
    def location(self) -> str:
        """The result directory as the user named it: `origin`, else `result_dir` made absolute."""
        return self.origin or str(self.result_dir.resolve())

    @property
    def complete(self) -> bool:
        return not self.missing_folds

    @classmethod
    def load(cls, result_dir: str | Path, origin: str = "") -> "CVResult":
        """Load a result directory written by `melanoma-dist cv`.

        Args:
            result_dir: The result directory (a local one, or a local copy: `storage.mirrored`).
            origin: The object-store URI `result_dir` is a copy of, named in errors and the
                evidence. Defaults to `""` (`result_dir` is the result itself).

        Raises:
            ResultError: the directory or its config is missing, no fold has finished,
                or the folds disagree on the classes.
        """
        out = Path(result_dir)
        shown = origin or out  # errors name the result, not a temporary copy of it
        if not out.is_dir() or (origin and not any(out.iterdir())):  # an empty copy: nothing under the URI
            raise ResultError(f"result directory {shown} does not exist: give the output_dir of a "
                              f"`melanoma-dist cv` run")
        manifest_path = out / RUN_MANIFEST
        run_manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if "config" in run_manifest:
            config = run_manifest["config"]
        elif (out / CONFIG_FILE).is_file():
            config = yaml.safe_load((out / CONFIG_FILE).read_text()) or {}
        else:
            raise ResultError(f"{shown} has neither {RUN_MANIFEST} nor {CONFIG_FILE}: it is not a "
                              f"`melanoma-dist cv` result directory")
        k = int(config.get("folds", {}).get("k", 0))
        scheme = config.get("data", {}).get("label_scheme", "")
        if k < 2 or scheme not in label_schemes.SCHEMES:
            raise ResultError(f"{shown}: the run's config has folds.k={k!r} and data.label_scheme={scheme!r}; "
                              f"expected k >= 2 and one of {list(label_schemes.SCHEMES)}")
        folds = []
        for f in range(k):
            d = fold_dir(out, f)
            if (d / METRICS_FILE).is_file():
                folds.append(FoldResult(f, json.loads((d / METRICS_FILE).read_text()),
                                        read_history(d / "history.csv"), d / "model.keras"))
        if not folds:
            raise ResultError(f"no finished fold in {shown} (no fold-K/{METRICS_FILE}): run or finish "
                              f"`melanoma-dist cv --config {storage.join(shown, CONFIG_FILE)}` first")
        missing = [f for f in range(k) if f not in {fr.fold for fr in folds}]
        if missing:
            logger.warning("%s: folds %s have not finished; reporting on folds %s only", shown, missing,
                           [fr.fold for fr in folds])
        names = tuple(folds[0].metrics["class_names"])
        for fr in folds:
            if tuple(fr.metrics["class_names"]) != names:
                raise ResultError(f"fold {fr.fold} has classes {fr.metrics['class_names']} but fold "
                                  f"{folds[0].fold} has {list(names)}: the folds come from different runs")
        if names != label_schemes.class_names(scheme):
            raise ResultError(f"{shown}: the folds have classes {list(names)} but label scheme {scheme!r} "
                              f"has {list(label_schemes.class_names(scheme))}")
        fold_col, ids, groups, labels, probs = [], [], [], [], []
        for fr in folds:
            path = fold_dir(out, fr.fold) / PREDICTIONS_FILE
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            cols = [f"prob_{c}" for c in names]
            if rows and any(c not in rows[0] for c in cols):
                raise ResultError(f"{path} lacks the columns {cols}: it was written by another version")
            fold_col += [fr.fold] * len(rows)
            ids += [r["image_id"] for r in rows]
            groups += [r.get("group") or r["image_id"] for r in rows]
            labels += [int(r["label"]) for r in rows]
            probs += [[float(r[c]) for c in cols] for r in rows]
        summary_path = out / "cv_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        return cls(out, config, run_manifest, summary, folds, k, names, scheme,
                   np.asarray(fold_col, dtype=np.int64), np.asarray(ids, dtype=object),
                   np.asarray(groups, dtype=object), np.asarray(labels, dtype=np.int64),
                   np.asarray(probs, dtype=np.float64).reshape(-1, len(names)), missing, origin)

    def config_sha256(self) -> str:
        """SHA-256 of the run's config (canonical JSON), identifying how the models were trained."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
