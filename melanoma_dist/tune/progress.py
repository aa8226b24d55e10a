"""One plain log line per trial event, and the running best: readable in a terminal and in `ray job logs`.

    trial 3f2a1_00001 running: epoch 2, folds 2 reporting, 0/3 finished, roc_auc (fold mean) 0.7412 | best: none finished yet
    trial 3f2a1_00001 finished: roc_auc (pooled out-of-fold) 0.7630, 3 epochs | best: 3f2a1_00001 0.7630
    trial 3f2a1_00002 stopped early by ASHA after 1 epoch(s): roc_auc (fold mean) 0.5100 | best: 3f2a1_00001 0.7630
"""

from __future__ import annotations

import logging
from typing import Any

from ray import tune

logger = logging.getLogger(__name__)


def _params(config: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in config.items())


class TrialProgress(tune.Callback):
    """Ray Tune callback logging each trial's start, epochs, end and the best finished trial so far.

    Args:
        metric: Name of the metric in the lines (`roc_auc`, `balanced_accuracy`).
        label: Prefix of every line (e.g. `outer fold 0`). Defaults to `""`.
    """

    def __init__(self, metric: str, label: str = "") -> None:
        self.metric, self.label = metric, label
        self.best: tuple[str, float] | None = None
        self.last: dict[str, dict] = {}

    def _line(self, text: str) -> None:
        best = f"{self.best[0]} {self.best[1]:.4f}" if self.best else "none finished yet"
        logger.info("%s%s | best: %s", f"{self.label}: " if self.label else "", text, best)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"trial {trial.trial_id} started: {_params(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result
        if result.get("cv_complete"):
            if self.best is None or result["score"] > self.best[1]:
                self.best = (trial.trial_id, float(result["score"]))
            self._line(f"trial {trial.trial_id} finished: {self.metric} (pooled out-of-fold) {result['score']:.4f}, "
                       f"{result.get('epoch')} epoch(s)")
            return
        self._line(f"trial {trial.trial_id} running: epoch {result.get('epoch')}, {result.get('folds_reporting')} "
                   f"fold(s) reporting, {result.get('folds_finished')}/{result.get('folds')} finished, {self.metric} "
                   f"(fold mean) {result.get('score', float('nan')):.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = self.last.get(trial.trial_id, {})
        if not last.get("cv_complete"):
            self._line(f"trial {trial.trial_id} stopped early by ASHA after {last.get('epoch', 0)} epoch(s): "
                       f"{self.metric} (fold mean) {last.get('score', float('nan')):.4f}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"trial {trial.trial_id} failed: see {trial.local_path or 'its log'}")
