"""The outputs of a search in `<output_dir>/tune/`: the trials table, the best config, the summary.

- `trials.csv` / `trials.md`: one row per trial: outer fold, trial id, state (finished,
  stopped early by ASHA, error), the drawn values, the metric of its pooled out-of-fold
  predictions, its mean ± sd over folds, epochs run and folds finished;
- `best.yaml`: the chosen config, complete, for `melanoma-dist cv --config` as it is;
- `tune_summary.json`: how the estimate was made, each outer fold's choice and score.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from melanoma_dist import storage
from melanoma_dist.config import Config, config_from_dict
from melanoma_dist.tune.space import trial_dict

TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
BEST_YAML = "best.yaml"
SUMMARY_JSON = "tune_summary.json"
FIXED_COLUMNS = ("outer_fold", "trial_id", "state")
SCORE_COLUMNS = ("oof", "fold_mean", "fold_sd", "epochs", "folds_finished")


def _number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def trial_rows(results: Iterable[Any], outer_fold: int | str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial of a Ray Tune `ResultGrid` (its last result, its error)."""
    rows = []
    for r in results:
        m = r.metrics or {}
        state = ("error" if r.error else "finished" if m.get("cv_complete") else
                 "stopped early" if m else "not started")
        rows.append({"outer_fold": outer_fold, "trial_id": m.get("trial_id", ""), "state": state,
                     **{k: (r.config or {}).get(k) for k in keys},
                     "oof": _number(m.get("oof")), "fold_mean": _number(m.get("fold_mean")),
                     "fold_sd": _number(m.get("fold_sd")), "epochs": int(m.get("training_iteration") or 0),
                     "folds_finished": m.get("folds_finished", 0)})
    return sorted(rows, key=lambda row: row["trial_id"])


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The finished trial with the best pooled out-of-fold metric.

    Raises:
        RuntimeError: no trial finished (all stopped or failed).
    """
    finished = [r for r in rows if r["state"] == "finished" and r["oof"] is not None]
    if not finished:
        states = ", ".join(f"{r['trial_id']}: {r['state']}" for r in rows)
        raise RuntimeError(f"no trial finished its cross-validation ({states}); see the trials' logs above")
    return max(finished, key=lambda r: r["oof"])


def chosen_config(base: Config, params: dict[str, Any], **top: Any) -> Config:
    """`base` with the chosen values and no search section; `top` replaces top-level sections or keys."""
    raw = trial_dict(base, params)
    raw.update(top)
    return config_from_dict(raw)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def write_trials(tune_dir: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str,
                 estimate_line: str) -> tuple[Path, Path]:
    """Write `trials.csv` and `trials.md` (with the line saying how the estimate was made)."""
    columns = [*FIXED_COLUMNS, *keys, *SCORE_COLUMNS]
    with (tune_dir / TRIALS_CSV).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    head = ["outer fold", "trial", "state", *keys, f"{metric} (pooled OOF)", f"{metric} mean ± sd over folds",
            "epochs", "folds finished"]
    lines = [f"Estimate: {estimate_line}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = f"{_fmt(r['fold_mean'])} ± {_fmt(r['fold_sd'])}" if r["fold_mean"] is not None else "-"
        cells = [r["outer_fold"], r["trial_id"], r["state"], *[r[k] for k in keys], r["oof"], spread, r["epochs"],
                 r["folds_finished"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    (tune_dir / TRIALS_MD).write_text("\n".join(lines) + "\n")
    return tune_dir / TRIALS_CSV, tune_dir / TRIALS_MD


def write_summary(tune_dir: Path, summary: dict[str, Any]) -> Path:
    path = tune_dir / SUMMARY_JSON
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def read_trials(tune_dir: str | Path) -> list[dict[str, str]]:
    """The rows of `trials.csv` (strings), for the report; `tune_dir` may be a URI."""
    with storage.open_text(storage.join(str(tune_dir), TRIALS_CSV)) as f:
        return list(csv.DictReader(f))
