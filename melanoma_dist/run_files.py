"""Where a run's results live: the layout of an output directory (no heavy imports)."""

from __future__ import annotations

from pathlib import Path

METRICS_FILE = "metrics.json"
"""Written last by a fold: its presence marks the fold as done."""
PREDICTIONS_FILE = "predictions.csv"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "resume"
"""In a fold's folder: the checkpoints to resume from (never read by the driver, a report or an export)."""
SEARCH_DIR = "tune"
"""In an output directory: the searches of `melanoma-dist tune` (trials, Ray Tune's experiment, outer datasets)."""


def fold_name(fold: int) -> str:
    """Name of one fold's result folder: `fold-<fold>`."""
    return f"fold-{fold}"


def fold_dir(output_dir: str | Path, fold: int) -> Path:
    """Result folder of one fold: `<output_dir>/fold-<fold>`."""
    return Path(output_dir) / fold_name(fold)


def discard_fold_result(output_dir: str | Path, fold: int) -> bool:
    """Mark a fold as not done by removing its `metrics.json`; True if there was one.

    For a result of other data: a fold that fails on its re-run is then missing, not stale.
    """
    path = fold_dir(output_dir, fold) / METRICS_FILE
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed
