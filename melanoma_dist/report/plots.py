"""The report's figures, drawn with matplotlib's Agg canvas and saved as PNG.

Each function draws one figure into a file and returns its path. Figures are made with
`matplotlib.figure.Figure` on a `FigureCanvasAgg`, not pyplot, so no global backend or
figure state is touched (safe in servers and tests, and no display is needed).

Example:

```python
roc_curves(Path("report/roc.png"), [(f"fold {k}", y_k, s_k) for k, ...], ("pooled", y, s))
```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

DPI = 110
Curve = tuple[str, np.ndarray, np.ndarray]
"""(label, y_binary, scores)."""


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _has_both(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def roc_curves(path: Path, folds: Sequence[Curve], pooled: Curve | None = None,
               operating_point: tuple[float, float] | None = None, title: str = "ROC") -> Path:
    """ROC curves of the decision class: one thin line per fold, a thick pooled one.

    Args:
        path: PNG file to write.
        folds: (label, y_binary, scores) per fold.
        pooled: The pooled curve. Defaults to `None`.
        operating_point: (1 - specificity, sensitivity) to mark. Defaults to `None`.
        title: Axes title. Defaults to `"ROC"`.
    """
    fig, ax = _figure(5.2, 4.8)
    ax = ax[0, 0]
    for label, y, s in folds:
        if _has_both(y):
            fpr, tpr, _ = skm.roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"{label} (AUC {skm.roc_auc_score(y, s):.3f})")
    if pooled is not None and _has_both(pooled[1]):
        fpr, tpr, _ = skm.roc_curve(pooled[1], pooled[2])
        auc = skm.roc_auc_score(pooled[1], pooled[2])
        ax.plot(fpr, tpr, lw=2.5, color="black", label=f"{pooled[0]} (AUC {auc:.3f})")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="crimson", ms=8, label="operating point")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def pr_curves(path: Path, folds: Sequence[Curve], pooled: Curve | None = None,
              title: str = "Precision-recall") -> Path:
    """Precision-recall curves (one per fold, pooled in black) with average precision and prevalence."""
    fig, ax = _figure(5.2, 4.8)
    ax = ax[0, 0]
    for label, y, s in folds:
        if _has_both(y):
            prec, rec, _ = skm.precision_recall_curve(y, s)
            ax.plot(rec, prec, lw=1, alpha=0.7, label=f"{label} (AP {skm.average_precision_score(y, s):.3f})")
    if pooled is not None and _has_both(pooled[1]):
        prec, rec, _ = skm.precision_recall_curve(pooled[1], pooled[2])
        ax.plot(rec, prec, lw=2.5, color="black",
                label=f"{pooled[0]} (AP {skm.average_precision_score(pooled[1], pooled[2]):.3f})")
        ax.axhline(float(np.mean(pooled[1])), ls="--", color="grey", lw=1, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="upper right", fontsize=7)
    return _save(fig, path)


def one_vs_rest_roc(path: Path, y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Path:
    """Pooled one-vs-rest ROC curve of every class (multi-class schemes)."""
    fig, ax = _figure(5.2, 4.8)
    ax = ax[0, 0]
    for c, name in enumerate(class_names):
        yc = (y == c).astype(int)
        if _has_both(yc):
            fpr, tpr, _ = skm.roc_curve(yc, probs[:, c])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {skm.roc_auc_score(yc, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title="One-vs-rest ROC, pooled out-of-fold")
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def confusion_matrices(path: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str],
                       title: str = "Confusion matrix") -> Path:
    """Counts and row-normalised (per true class: recall on the diagonal) side by side."""
    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    fig, axes = _figure(4.2 * 2 + 0.2 * n, 3.6 + 0.25 * n, ncols=2)
    for ax, data, fmt, sub in ((axes[0, 0], cm, "{:.0f}", "counts"), (axes[0, 1], norm, "{:.2f}", "row-normalised")):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)  # both coloured by the row share
        for i in range(n):
            for j in range(n):
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=f"{title} ({sub})")
        ax.set_xticklabels(class_names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticklabels(class_names)
        if sub == "row-normalised":
            fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def reliability_diagram(path: Path, before: Mapping, after: Mapping | None = None,
                        class_name: str = "melanoma", temperature: float | None = None) -> Path:
    """Observed frequency against mean predicted probability per bin, before and after scaling.

    Args:
        path: PNG file to write.
        before: Calibration stats before scaling (`reliability` bins, `ece`, `brier`).
        after: The same after temperature scaling. Defaults to `None`.
        class_name: The class whose probability is shown. Defaults to `"melanoma"`.
        temperature: T, shown in the legend. Defaults to `None`.
    """
    fig, axes = _figure(5.2, 6.0, nrows=2, height_ratios=[3, 1], sharex=True)
    ax, hist = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    edges = np.asarray(before["reliability"]["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    series = [("uncalibrated", before, "tab:orange")]
    if after is not None:
        t = f", T={temperature:.2f}" if temperature else ""
        series.append((f"temperature-scaled{t}", after, "tab:blue"))
    for k, (label, stats, colour) in enumerate(series):
        rel = stats["reliability"]
        m = [i for i, c in enumerate(rel["count"]) if c]
        ax.plot([rel["mean_prob"][i] for i in m], [rel["frac_pos"][i] for i in m], "o-", color=colour,
                label=f"{label}: ECE {stats['ece']:.3f}, Brier {stats['brier']:.3f}")
        offset = (k - (len(series) - 1) / 2) * width / len(series)
        hist.bar(centres + offset, rel["count"], width=width / len(series), color=colour, alpha=0.7)
    ax.set(ylabel=f"observed frequency of {class_name}", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability of P({class_name})")
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel=f"predicted P({class_name})", ylabel="images")
    hist.set_yscale("symlog")
    return _save(fig, path)


def learning_curves(path: Path, histories: Mapping[int, Mapping[str, Sequence[float]]]) -> Path | None:
    """Loss and a score (AUC or accuracy) per epoch, training solid and validation dashed, per fold.

    Returns:
        The path, or None when no fold has a history.
    """
    histories = {f: h for f, h in histories.items() if h.get("loss")}
    if not histories:
        return None
    score = next((m for m in ("roc_auc", "auc", "accuracy")
                  if all(m in h or f"val_{m}" in h for h in histories.values())), None)
    fig, axes = _figure(10, 4, ncols=2 if score else 1)
    colours = [f"C{i}" for i in range(10)]
    for n, (fold, h) in enumerate(sorted(histories.items())):
        epochs = np.arange(1, len(h["loss"]) + 1)
        c = colours[n % 10]
        panels = [("loss", axes[0, 0])] + ([(score, axes[0, 1])] if score else [])
        for metric, ax in panels:
            if metric in h:  # whole-fold metrics such as ROC-AUC exist for validation only
                ax.plot(epochs, h[metric], color=c, lw=1.2, label=f"fold {fold} train")
            if f"val_{metric}" in h:
                ax.plot(epochs, h[f"val_{metric}"], color=c, lw=1.2, ls="--", label=f"fold {fold} val")
    for k, metric in enumerate(["loss"] + ([score] if score else [])):
        ax = axes[0, k]
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (solid: training, dashed: validation)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def class_distribution(path: Path, counts: Mapping[str, Mapping[str, int]], class_names: Sequence[str]) -> Path:
    """Stacked bars: images of each class in each fold."""
    groups = list(counts)
    fig, ax = _figure(max(4.5, 1.0 * len(groups) + 2), 4)
    ax = ax[0, 0]
    bottom = np.zeros(len(groups))
    for c, name in enumerate(class_names):
        v = np.array([counts[g].get(name, 0) for g in groups], dtype=np.float64)
        ax.bar(groups, v, bottom=bottom, label=name, color=f"C{c % 10}")
        bottom += v
    ax.set(ylabel="images", title="Class distribution per fold")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


def image_pairs(path: Path, pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], max_pairs: int = 8) -> Path | None:
    """A grid of image pairs (e.g. near duplicates), each captioned.

    Args:
        path: PNG file to write.
        pairs: (uint8 RGB image a, image b, caption) per pair (see `audit.read_pixels_by_id`).
        max_pairs: Pairs drawn at most. Defaults to `8`.

    Returns:
        The path, or None when there are no pairs.
    """
    pairs = list(pairs)[:max_pairs]
    if not pairs:
        return None
    fig, axes = _figure(2 * 2.2, 2.3 * len(pairs), ncols=2, nrows=len(pairs))
    for r, (a, b, caption) in enumerate(pairs):
        for c, data in enumerate((a, b)):
            ax = axes[r, c]
            ax.imshow(data)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_title(caption, fontsize=7, loc="left")
    return _save(fig, path)


def tune_trials(path: Path, rows: Sequence[Mapping[str, str]], params: Sequence[str], metric: str) -> Path | None:
    """The search's metric against each searched parameter (one panel each): finished trials by their pooled
    out-of-fold value, trials stopped early by ASHA (hollow) by their last fold mean.

    Returns:
        The path, or None when no trial has a value.
    """
    def value(r: Mapping[str, str]) -> float | None:
        v = r.get("oof") or r.get("fold_mean")
        return float(v) if v not in (None, "") else None

    rows = [r for r in rows if value(r) is not None]
    if not rows or not params:
        return None
    fig, axes = _figure(4 * len(params), 3.5, ncols=len(params))
    for ax, p in zip(axes[0], params):
        for finished, style in ((True, {"color": "C0"}), (False, {"facecolors": "none", "edgecolors": "C3"})):
            sel = [r for r in rows if (r["state"] == "finished") == finished]
            xs = [r.get(p, "") for r in sel]
            numeric = all(_is_float(x) for x in xs)
            ax.scatter([float(x) for x in xs] if numeric else xs, [value(r) for r in sel], s=30,
                       label="finished (pooled OOF)" if finished else "stopped early (fold mean)", **style)
        if p.endswith("learning_rate"):
            ax.set_xscale("log")
        ax.set(xlabel=p, ylabel=metric, title=f"{metric} vs {p.split('.')[-1]}")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def _is_float(x: object) -> bool:
    try:
        float(x)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False
