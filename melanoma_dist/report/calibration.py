"""Calibration (temperature scaling, ECE, Brier score) and the decision threshold.

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted by
minimising the negative log-likelihood on held-out predictions; here the out-of-fold
predictions of a cross-validation. The models store probabilities, so the logits are
recovered as `log p` (clipped at 1e-6, the precision of the prediction files): for a
sigmoid model, softmax([log(1-p), log p] / T) is sigmoid(logit(p) / T), so one code
path serves binary and multi-class models. T > 1 softens over-confident predictions,
T < 1 sharpens under-confident ones; the ranking (and so ROC-AUC) is unchanged.

The decision threshold is then chosen on the calibrated probability of the decision
class (melanoma, or `malignant` for the malignant scheme): the highest threshold whose
sensitivity on those predictions reaches the target. A case is called positive when its
probability is >= the threshold.

Example:

```python
t = fit_temperature(y, probs)                      # e.g. 1.8
calibrated = apply_temperature(probs, t)
op = threshold_for_sensitivity(y == 1, calibrated[:, 1], target=0.90)
op.threshold, op.specificity
```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

logger = logging.getLogger(__name__)

PROB_EPS = 1e-6
"""Probabilities are clipped to [eps, 1] before the log (prediction files hold 6 decimals)."""
DEFAULT_BINS = 10
"""Equal-width bins of the reliability diagram and ECE."""
DEFAULT_TARGET_SENSITIVITY = 0.90
"""Melanoma sensitivity the decision threshold is chosen for, unless told otherwise."""
TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Search range of the temperature."""


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape [N, num_classes >= 2], got {p.shape}")
    return p


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: softmax(log(p) / T), row-wise.

    Args:
        probs: Probabilities of shape [N, C] (C = 2 for a sigmoid model: [1 - p, p]).
        temperature: T > 0; 1 leaves the probabilities unchanged (up to the clipping).

    Raises:
        ValueError: T <= 0 or not finite, or `probs` is not [N, C>=2].
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    z = np.log(np.clip(_check_probs(probs), PROB_EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(y: Sequence[int], probs: np.ndarray) -> float:
    """Mean -log p(true class), with p clipped at 1e-6."""
    p = _check_probs(probs)
    yi = np.asarray(y, dtype=np.int64)
    return float(-np.log(np.clip(p[np.arange(len(yi)), yi], PROB_EPS, 1.0)).mean())


def fit_temperature(y: Sequence[int], probs: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of `probs` on labels `y`.

    Args:
        y: True class index of each sample.
        probs: Held-out probabilities [N, C] (e.g. the pooled out-of-fold predictions).

    Raises:
        ValueError: no samples, or labels outside the classes.
    """
    p = _check_probs(probs)
    yi = np.asarray(y, dtype=np.int64)
    if len(yi) == 0 or len(yi) != len(p):
        raise ValueError(f"need one label per prediction row, got {len(yi)} labels and {len(p)} rows")
    if yi.min() < 0 or yi.max() >= p.shape[1]:
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got values in [{yi.min()}, {yi.max()}]")
    lo, hi = TEMPERATURE_BOUNDS
    res = minimize_scalar(lambda log_t: negative_log_likelihood(yi, apply_temperature(p, math.exp(log_t))),
                          bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-5})
    t = float(math.exp(res.x))
    if min(abs(t - lo), abs(t - hi)) < 1e-3 * t:
        logger.warning("temperature %.3g is at the edge of its search range %s: the predictions may be "
                       "degenerate (e.g. all one class)", t, TEMPERATURE_BOUNDS)
    return t


def brier_score(y_binary: Sequence[int], p: Sequence[float]) -> float:
    """Mean squared difference between the probability and the 0/1 outcome (sklearn's brier_score_loss)."""
    y = np.asarray(y_binary, dtype=np.float64)
    return float(np.mean((np.asarray(p, dtype=np.float64) - y) ** 2))


def reliability_bins(y_binary: Sequence[int], p: Sequence[float], n_bins: int = DEFAULT_BINS) -> dict:
    """Equal-width bins of a probability: count, mean probability and observed frequency per bin.

    Args:
        y_binary: 1 where the event happened (e.g. the image is a melanoma).
        p: Predicted probability of the event.
        n_bins: Bins over [0, 1]. Defaults to `10`.

    Returns:
        `edges` (n_bins + 1), and per bin `count`, `mean_prob`, `frac_pos` (None for empty bins).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y = np.asarray(y_binary, dtype=np.float64)
    q = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(q, edges[1:-1], right=True), 0, n_bins - 1)  # bins (a, b], the first [0, b]
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=q, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    return {"edges": edges.tolist(), "count": count.tolist(),
            "mean_prob": [float(s / c) if c else None for s, c in zip(sum_p, count)],
            "frac_pos": [float(s / c) if c else None for s, c in zip(sum_y, count)]}


def expected_calibration_error(y_binary: Sequence[int], p: Sequence[float], n_bins: int = DEFAULT_BINS) -> float:
    """ECE of a probability: sum over equal-width bins of (bin share) x |observed frequency - mean probability|.

    Raises:
        ValueError: no samples.
    """
    bins = reliability_bins(y_binary, p, n_bins)
    n = sum(bins["count"])
    if n == 0:
        raise ValueError("no samples to compute the ECE of")
    return float(sum(c / n * abs(f - m) for c, f, m in zip(bins["count"], bins["frac_pos"], bins["mean_prob"]) if c))


def top_label_ece(y: Sequence[int], probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of the top-label confidence (Guo et al.): is the argmax right as often as its probability says?"""
    p = _check_probs(probs)
    return expected_calibration_error(p.argmax(axis=1) == np.asarray(y), p.max(axis=1), n_bins)


# ---------------------------------------------------------------- operating point

@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and what it achieved on the data it was chosen on."""

    threshold: float
    """Call the decision class when its probability is >= this."""
    target_sensitivity: float
    sensitivity: float
    specificity: float | None
    """None when there are no negatives."""
    num_positives: int
    num_negatives: int

    def to_dict(self) -> dict:
        return asdict(self)


def sensitivity_specificity(y_binary: Sequence[int], scores: Sequence[float],
                            threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of the rule `score >= threshold` (None where a class is absent)."""
    y = np.asarray(y_binary).astype(bool)
    called = np.asarray(scores, dtype=np.float64) >= threshold
    sens = float(called[y].mean()) if y.any() else None
    spec = float((~called[~y]).mean()) if (~y).any() else None
    return sens, spec


def threshold_for_sensitivity(y_binary: Sequence[int], scores: Sequence[float],
                              target: float = DEFAULT_TARGET_SENSITIVITY) -> OperatingPoint:
    """The highest threshold whose sensitivity on these scores is at least `target`.

    With P positives, the threshold is the ceil(target x P)-th highest positive score, so
    that at least that many positives score >= it; a higher threshold would miss one more.

    Args:
        y_binary: 1 for the decision class (e.g. melanoma), 0 otherwise.
        scores: Probability of the decision class.
        target: Sensitivity to reach, in (0, 1]. Defaults to `0.90`.

    Raises:
        ValueError: `target` outside (0, 1], or no positives.

    Example:

    ```python
    op = threshold_for_sensitivity([0, 1, 1, 0, 1], [.2, .9, .6, .7, .4], target=0.66)
    op.threshold, op.sensitivity  # 0.6, 0.667
    ```
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if not y.any():
        raise ValueError("cannot choose a threshold for a sensitivity: there are no positive cases")
    pos = np.sort(s[y])[::-1]
    needed = max(1, math.ceil(target * len(pos) - 1e-9))
    threshold = float(pos[needed - 1])
    sens, spec = sensitivity_specificity(y, s, threshold)
    return OperatingPoint(threshold, float(target), float(sens), spec, int(y.sum()), int((~y).sum()))


# ---------------------------------------------------------------- the whole step

@dataclass(frozen=True)
class Calibration:
    """Temperature scaling of held-out predictions and the threshold chosen on them."""

    temperature: float
    decision_index: int
    """Class whose probability is thresholded (melanoma, or the positive class)."""
    n_bins: int
    num_samples: int
    before: dict
    """ece (decision class), ece_top_label, brier, nll before scaling."""
    after: dict
    """The same after scaling."""
    operating_point: OperatingPoint

    def to_dict(self) -> dict:
        d = asdict(self)
        d["operating_point"] = self.operating_point.to_dict()
        return d


def _calibration_stats(y: np.ndarray, probs: np.ndarray, k: int, n_bins: int) -> dict:
    yk = (y == k).astype(int)
    return {"ece": expected_calibration_error(yk, probs[:, k], n_bins),
            "ece_top_label": top_label_ece(y, probs, n_bins),
            "brier": brier_score(yk, probs[:, k]),
            "nll": negative_log_likelihood(y, probs),
            "reliability": reliability_bins(yk, probs[:, k], n_bins)}


def calibrate(y: Sequence[int], probs: np.ndarray, decision_index: int,
              target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, n_bins: int = DEFAULT_BINS) -> Calibration:
    """Fit the temperature on held-out predictions and choose the threshold on the scaled ones.

    Args:
        y: True class of each sample.
        probs: Held-out probabilities [N, C].
        decision_index: Class whose probability is thresholded.
        target_sensitivity: Sensitivity the threshold must reach. Defaults to `0.90`.
        n_bins: Bins of the ECE. Defaults to `10`.

    Raises:
        ValueError: see `fit_temperature` and `threshold_for_sensitivity`.
    """
    yi = np.asarray(y, dtype=np.int64)
    p = _check_probs(probs)
    if not 0 <= decision_index < p.shape[1]:
        raise ValueError(f"decision_index must be in [0, {p.shape[1]}), got {decision_index}")
    t = fit_temperature(yi, p)
    scaled = apply_temperature(p, t)
    op = threshold_for_sensitivity(yi == decision_index, scaled[:, decision_index], target_sensitivity)
    return Calibration(t, decision_index, n_bins, len(yi), _calibration_stats(yi, p, decision_index, n_bins),
                       _calibration_stats(yi, scaled, decision_index, n_bins), op)
