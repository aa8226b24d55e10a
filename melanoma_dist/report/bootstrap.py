"""Bootstrap confidence intervals that resample lesions, not images, stratified by label.

Images of one lesion (`group`) are correlated: resampling images would treat them as
independent and give intervals that are too narrow. Each bootstrap replicate instead
draws, separately for every label, as many groups as that label has, with replacement,
and keeps every image of each drawn group (as often as the group was drawn). A group's
label is its most frequent image label (ties: the smallest).

A replicate is represented by a weight per image (how many times its group was drawn,
times the image's own weight), so the statistics below are weighted and vectorised over
replicates: 2,000 replicates of a 10,000-image ROC-AUC take about a second.

The interval is the percentile interval of the replicates (2.5th and 97.5th percentiles
for 95 %); the point estimate is the statistic on the original data.

Example:

```python
y, s = np.array([0, 0, 1, 1, 0, 1]), np.array([.1, .4, .35, .8, .2, .9])
ci = bootstrap_ci(lambda w: weighted_roc_auc(y, s, w), y, groups=["a", "a", "b", "c", "d", "e"])
ci.estimate, ci.low, ci.high
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_N_BOOT = 2000
"""Bootstrap replicates used by the report and evaluation."""

_CHUNK_CELLS = 4_000_000
"""Replicates are drawn in chunks of about this many (replicate, image) cells (32 MB)."""


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with its bootstrap percentile interval."""

    estimate: float | None
    """The statistic on the original data (None when undefined, e.g. AUC with one class)."""
    low: float | None
    """Lower bound (None when fewer than half the replicates were defined)."""
    high: float | None
    """Upper bound."""
    confidence: float
    """Nominal coverage, e.g. 0.95."""
    n_boot: int
    """Replicates drawn."""
    n_units: int
    """Units resampled: lesion groups, or images when there are no groups."""
    unit: str
    """`group` or `image`."""
    method: str = "percentile bootstrap, stratified by label"

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self, digits: int = 3) -> str:
        """`0.871 (95% CI 0.842-0.897)`, or `n/a`."""
        if self.estimate is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.estimate:.{digits}f}"
        return (f"{self.estimate:.{digits}f} ({self.confidence:.0%} CI "
                f"{self.low:.{digits}f}-{self.high:.{digits}f})")


# ---------------------------------------------------------------- resampling

def _group_codes(labels: np.ndarray, groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Group index of each image (sorted group ids) and the stratum (label) of each group."""
    if groups is None:
        return np.arange(len(labels)), labels.copy()
    g = np.asarray(groups, dtype=object).astype(str)
    if len(g) != len(labels):
        raise ValueError(f"groups has {len(g)} entries but labels has {len(labels)}: give one group per image")
    _, codes = np.unique(g, return_inverse=True)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    # Most frequent label of each group, ties to the smallest label.
    classes, y = np.unique(labels, return_inverse=True)
    counts = np.zeros((n_groups, len(classes)), dtype=np.int64)
    np.add.at(counts, (codes, y), 1)
    return codes, classes[counts.argmax(axis=1)]


def resample_weights(labels: Sequence[int], groups: Sequence[str] | None = None,
                     weights: Sequence[float] | None = None, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = 0) -> Iterator[np.ndarray]:
    """Yield image weights of bootstrap replicates, in chunks of shape [b, N].

    Args:
        labels: Class of each image; the resampling is stratified by it.
        groups: Lesion id of each image; groups are resampled whole. Defaults to `None`
            (each image is its own group).
        weights: Weight of each image (e.g. how many identical images it stands for).
            Defaults to `None` (all 1).
        n_boot: Number of replicates, over all chunks. Defaults to `2000`.
        seed: Seed of the random draws; the same inputs and seed give the same replicates.
            Defaults to `0`.

    Raises:
        ValueError: empty input, lengths that differ, or n_boot < 1.
    """
    y = np.asarray(labels)
    if len(y) == 0:
        raise ValueError("no samples to bootstrap")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    base = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    if base.shape != y.shape:
        raise ValueError(f"weights has shape {base.shape} but labels has {y.shape}: give one weight per image")
    codes, group_label = _group_codes(y, groups)
    n_groups = len(group_label)
    strata = [np.flatnonzero(group_label == c) for c in np.unique(group_label)]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_CELLS // max(len(y), n_groups)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = np.zeros((b, n_groups))
        for members in strata:
            n = len(members)
            draws = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
            counts[:, members] = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)
        yield counts[:, codes] * base
        done += b


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], labels: Sequence[int],
                 groups: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                 n_boot: int = DEFAULT_N_BOOT, confidence: float = 0.95, seed: int = 0) -> ConfidenceInterval:
    """Point estimate and percentile bootstrap interval of a weighted statistic.

    Args:
        statistic: Maps image weights of shape [b, N] to b values (NaN where undefined),
            e.g. `lambda w: weighted_roc_auc(y, scores, w)`.
        labels: Class of each image (the strata).
        groups: Lesion id of each image. Defaults to `None` (images are resampled).
        weights: Base weight of each image. Defaults to `None` (all 1).
        n_boot: Replicates. Defaults to `2000`.
        confidence: Coverage of the interval, in (0, 1). Defaults to `0.95`.
        seed: Seed of the draws. Defaults to `0`.

    Raises:
        ValueError: `confidence` outside (0, 1), or see `resample_weights`.

    Example:

    ```python
    ci = bootstrap_ci(lambda w: weighted_recall(y, pred, w), y, groups=lesion_ids)
    ```
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y = np.asarray(labels)
    base = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    estimate = float(np.asarray(statistic(base[None, :]), dtype=np.float64).reshape(-1)[0])
    values = np.concatenate([np.asarray(statistic(w), dtype=np.float64).reshape(-1)
                             for w in resample_weights(y, groups, weights, n_boot, seed)])
    defined = values[np.isfinite(values)]
    n_units = len(np.unique(np.asarray(groups, dtype=object).astype(str))) if groups is not None else len(y)
    unit = "group" if groups is not None else "image"
    if not np.isfinite(estimate):
        return ConfidenceInterval(None, None, None, confidence, n_boot, n_units, unit)
    if len(defined) < n_boot / 2:
        logger.warning("bootstrap: the statistic is undefined in %d of %d replicates; no interval",
                       n_boot - len(defined), n_boot)
        return ConfidenceInterval(estimate, None, None, confidence, n_boot, n_units, unit)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(defined, [alpha, 1 - alpha])
    return ConfidenceInterval(estimate, float(low), float(high), confidence, n_boot, n_units, unit)


# ---------------------------------------------------------------- weighted statistics, vectorised

def _rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w[None, :] if w.ndim == 1 else w


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_roc_auc(y_binary: Sequence[int], scores: Sequence[float], w: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of weights (ties count one half); NaN where a class has no weight.

    Equals `sklearn.metrics.roc_auc_score(y, scores, sample_weight=w_row)`.

    Args:
        y_binary: 1 for positives, 0 for negatives.
        scores: Higher means more likely positive.
        w: Weights of shape [N] or [b, N].
    """
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    w = _rows(w)
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # first index of each tied score
    wp = np.add.reduceat(w[:, order] * y[order], starts, axis=1)  # positive weight per distinct score
    wn = np.add.reduceat(w[:, order] * ~y[order], starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    num = (wp * (neg_below + 0.5 * wn)).sum(axis=1)
    return _ratio(num, wp.sum(axis=1) * wn.sum(axis=1))


def weighted_recall(y_binary: Sequence[int], predicted: Sequence[int], w: np.ndarray) -> np.ndarray:
    """Weighted share of positives predicted positive (sensitivity) per row of weights.

    Pass `1 - y` and `1 - predicted` for the specificity.
    """
    y = np.asarray(y_binary).astype(bool)
    hit = y & np.asarray(predicted).astype(bool)
    w = _rows(w)
    return _ratio(w @ hit.astype(np.float64), w @ y.astype(np.float64))


def weighted_accuracy(y_true: Sequence[int], predicted: Sequence[int], w: np.ndarray) -> np.ndarray:
    """Weighted share of correct predictions per row of weights."""
    correct = (np.asarray(y_true) == np.asarray(predicted)).astype(np.float64)
    w = _rows(w)
    return _ratio(w @ correct, w.sum(axis=1))


def weighted_balanced_accuracy(y_true: Sequence[int], predicted: Sequence[int], num_classes: int,
                               w: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present (weight > 0) in each row of weights.

    Equals `sklearn.metrics.balanced_accuracy_score(y, pred, sample_weight=w_row)`.
    """
    y = np.asarray(y_true)
    p = np.asarray(predicted)
    w = _rows(w)
    return _nanmean(np.stack([weighted_recall(y == c, p == c, w) for c in range(num_classes)], axis=1))


def weighted_macro_roc_auc(y_true: Sequence[int], probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Macro average of one-vs-rest ROC-AUCs over the classes where it is defined."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    w = _rows(w)
    return _nanmean(np.stack([weighted_roc_auc(y == c, p[:, c], w) for c in range(p.shape[1])], axis=1))


def _nanmean(a: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; NaN for a row with none (no warning)."""
    finite = np.isfinite(a)
    n = finite.sum(axis=1)
    return _ratio(np.where(finite, a, 0.0).sum(axis=1), n.astype(np.float64))
