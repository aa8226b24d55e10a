"""Gather the folds of a cross-validation run into one result.

Reads each `fold-K/metrics.json` and `fold-K/predictions.csv` and writes, in the
run's output directory:

- `cv_folds.csv`: one row per fold (scalar metrics, epochs, wall time, node);
- `oof_predictions.csv`: every out-of-fold prediction, with its fold;
- `cv_summary.json`: mean and sample standard deviation (ddof=1) of every scalar
  metric over folds, and the metrics of the pooled out-of-fold predictions.

A fold whose validation set lacks a class that the run has (possible only in runs
made before `make_folds` refused such folds) is left out of the mean and standard
deviation, with a warning: its balanced accuracy and ROC-AUC are undefined (older
versions wrote 1.0 and None). Its predictions still count in the pooled metrics.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from melanoma_dist import storage
from melanoma_dist.metrics import classification_metrics
from melanoma_dist.run_files import METRICS_FILE, PREDICTIONS_FILE, fold_dir, fold_name

logger = logging.getLogger(__name__)

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "precision_macro",
                  "recall_macro", "f1_macro", "roc_auc", "melanoma_roc_auc")
FOLD_COLUMNS = ("fold", "num_samples") + SCALAR_METRICS + ("epochs_run", "workers", "node_id", "host",
                                                           "attempts", "wall_time_s")


def load_fold_metrics(output_dir: str | Path, fold: int) -> dict | None:
    """A finished fold's metrics, or None if the fold has not finished; `output_dir` may be a URI."""
    path = storage.join(str(output_dir), fold_name(fold), METRICS_FILE)
    return json.loads(storage.read_bytes(path)) if storage.is_file(path) else None


def _read_predictions(path: Path) -> tuple[list[dict], list[str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean and sample standard deviation of the defined values (None where too few)."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return {"mean": float(v.mean()) if len(v) else None,
            "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": int(len(v))}


def missing_classes(fold_metrics: dict, classes: Sequence[str]) -> list[str]:
    """The classes of `classes` that a fold's validation set has no image of."""
    per_class = fold_metrics.get("per_class", {})
    return [c for c in classes if c in per_class and per_class[c].get("support") == 0]


def aggregate_cv(output_dir: str | Path, k: int, melanoma_index: int | None = None) -> dict:
    """Aggregate the finished folds of a run; write the CV files; return the summary.

    Folds lacking a class of the run are left out of `mean_std` and listed in
    `folds_missing_classes`, with a warning.

    Args:
        output_dir: The run's output directory (holding `fold-K/`).
        k: Number of folds of the run.
        melanoma_index: Index of the melanoma class for multi-class schemes.

    Raises:
        ValueError: no fold has finished, or an image appears in two folds' predictions.
    """
    out = Path(output_dir)
    per_fold = {f: m for f in range(k) if (m := load_fold_metrics(out, f)) is not None}
    if not per_fold:
        raise ValueError(f"no finished fold in {out}: nothing to aggregate")

    with (out / "cv_folds.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FOLD_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for fold, m in sorted(per_fold.items()):
            w.writerow({c: m.get(c, "") for c in FOLD_COLUMNS})

    oof: list[dict] = []
    fields: list[str] = []
    for fold in sorted(per_fold):
        rows, fields = _read_predictions(fold_dir(out, fold) / PREDICTIONS_FILE)
        oof += [dict(r, fold=fold) for r in rows]
    ids = [r["image_id"] for r in oof]
    if len(set(ids)) != len(ids):
        raise ValueError("an image has out-of-fold predictions in two folds: the folds overlap")
    with (out / "oof_predictions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["fold"] + fields)
        w.writeheader()
        w.writerows(oof)

    class_names = next(iter(per_fold.values()))["class_names"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in oof])
    pooled = classification_metrics([int(r["label"]) for r in oof], probs, class_names, melanoma_index)
    run_classes = [c for c in class_names if c not in pooled["absent_classes"]]
    lacking = [{"fold": f, "classes": cs} for f, m in sorted(per_fold.items())
               if (cs := missing_classes(m, run_classes))]
    for entry in lacking:
        logger.warning("fold %d has no validation image of class %s: its balanced accuracy and ROC-AUC are "
                       "undefined, so it is left out of the mean and sd over folds; re-make the folds with a "
                       "smaller folds.k and run it again", entry["fold"], " or ".join(map(repr, entry["classes"])))
    scored = [m for f, m in per_fold.items() if f not in {e["fold"] for e in lacking}]
    summary = {
        "k": k,
        "folds_finished": sorted(per_fold),
        "folds_missing": [f for f in range(k) if f not in per_fold],
        "folds_missing_classes": lacking,
        "mean_std": {name: mean_std([m.get(name) for m in scored])
                     for name in SCALAR_METRICS if any(name in m for m in per_fold.values())},
        "pooled_oof": pooled,
        "num_oof_predictions": len(oof),
    }
    (out / "cv_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


TABLE_METRICS = {True: ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc"),
                 False: ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "melanoma_roc_auc")}
"""Metrics shown on the terminal, for binary (True) and multi-class schemes; the files hold all."""


def format_table(output_dir: str | Path, summary: dict) -> str:
    """The per-fold table, mean ± sd and pooled out-of-fold metrics as aligned text."""
    with storage.open_text(storage.join(output_dir, "cv_folds.csv")) as f:  # output_dir may be a URI
        rows = list(csv.DictReader(f))
    binary = len(summary["pooled_oof"]["class_names"]) == 2
    shown = [m for m in TABLE_METRICS[binary] if m in summary["mean_std"]]

    def num(v: object, digits: int = 4) -> str:
        try:
            return f"{float(v):.{digits}f}"  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return "-"

    ms, pooled = summary["mean_std"], summary["pooled_oof"]
    table = [["fold", "images"] + shown + ["epochs", "node", "seconds"]]
    table += [[r["fold"], r["num_samples"]] + [num(r.get(m)) for m in shown]
              + [r.get("epochs_run", ""), (r.get("node_id") or "-")[:8], num(r.get("wall_time_s"), 0)]
              for r in rows]
    table.append(["mean±sd", ""] + [f"{num(ms[m]['mean'])}±{num(ms[m]['std'])}" for m in shown] + ["", "", ""])
    table.append(["pooled", str(pooled["num_samples"])] + [num(pooled.get(m)) for m in shown] + ["", "", ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    notes = [f"fold {e['fold']} left out of mean±sd: no validation image of class {' or '.join(e['classes'])}"
             for e in summary.get("folds_missing_classes", [])]
    return "\n".join(["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table] + notes)
