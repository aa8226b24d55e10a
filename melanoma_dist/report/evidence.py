"""The numbers of a cross-validation report (`report.json`), computed from a `CVResult`.

Per fold: the fold's metrics, class counts, epochs, node, host and wall time. Over
folds: mean and sample standard deviation. Pooled out-of-fold: every metric of
`metrics.classification_metrics`, with 95 % bootstrap intervals (lesions resampled,
stratified by label) for ROC-AUC of the decision class, accuracy, balanced accuracy and
sensitivity/specificity at the chosen threshold. Then temperature scaling, the
operating point, the leakage audit of the training data, and the run's provenance.

The threshold is chosen on the same out-of-fold predictions it is scored on, so its
sensitivity is met by construction and its specificity is optimistic; an external test
set (`melanoma-dist evaluate`) gives the unbiased figures.

Example:

```python
evidence = summarize(CVResult.load("runs/quick-cpu"), target_sensitivity=0.9)
evidence["pooled"]["ci"]["decision_roc_auc"]  # {'estimate': 0.86, 'low': 0.84, 'high': 0.88, ...}
```
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from melanoma_dist import labels as label_schemes
from melanoma_dist.data import shards
from melanoma_dist.metrics import classification_metrics
from melanoma_dist.report import bootstrap as bs
from melanoma_dist.report.aggregate import SCALAR_METRICS, mean_std
from melanoma_dist.report.audit import DEFAULT_MIN_CORRELATION, DEFAULT_NEAR_DUP_BITS, ImageSet, audit_set
from melanoma_dist.report.calibration import (DEFAULT_BINS, DEFAULT_TARGET_SENSITIVITY, apply_temperature,
                                              calibrate)
from melanoma_dist.report.result import CVResult, file_sha256

logger = logging.getLogger(__name__)

FOLD_FIELDS = ("fold", "num_samples") + SCALAR_METRICS + (
    "epochs_run", "best_epoch", "workers", "attempts", "node_id", "host", "wall_time_s")

LICENCES = {
    "ham10000": "HAM10000 (Tschandl et al., Sci. Data 5:180161, 2018): CC BY-NC 4.0",
    "isic": "ISIC Archive / ISIC 2017 challenge (Codella et al., arXiv:1710.05006): CC-0 / CC BY-NC",
}


def source_licence(source: dict) -> str:
    """The licence of a dataset source (from its kind, name or path), or a request to check it."""
    text = " ".join(str(source.get(k, "")) for k in ("kind", "name", "path")).lower()
    for key, licence in LICENCES.items():
        if key in text:
            return licence
    return "unknown: check the terms of this collection before use"


def binary_metrics_with_ci(y_binary: np.ndarray, scores: np.ndarray, threshold: float,
                           groups: Sequence[str] | None, n_boot: int = bs.DEFAULT_N_BOOT,
                           seed: int = 0) -> dict:
    """ROC-AUC, average precision, sensitivity and specificity at `threshold`, with bootstrap CIs.

    Args:
        y_binary: 1 for the decision class (e.g. melanoma).
        scores: Probability of the decision class.
        threshold: Decision rule `score >= threshold`.
        groups: Lesion id of each image (resampled whole). `None` resamples images.
        n_boot: Bootstrap replicates. Defaults to `2000`.
        seed: Bootstrap seed. Defaults to `0`.
    """
    y = np.asarray(y_binary).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    called = (s >= threshold).astype(int)

    def ci(stat):  # one seed for all: the replicates are the same resampled lesions
        return bs.bootstrap_ci(stat, y, groups, n_boot=n_boot, seed=seed).to_dict()

    both = 0 < y.sum() < len(y)
    tn, fp, fn, tp = skm.confusion_matrix(y, called, labels=[0, 1]).ravel().tolist()
    return {
        "num_samples": int(len(y)), "num_positives": int(y.sum()), "prevalence": float(y.mean()),
        "threshold": float(threshold),
        "roc_auc": ci(lambda w: bs.weighted_roc_auc(y, s, w)) if both else None,
        "average_precision": float(skm.average_precision_score(y, s)) if both else None,
        "sensitivity": ci(lambda w: bs.weighted_recall(y, called, w)) if y.any() else None,
        "specificity": ci(lambda w: bs.weighted_recall(1 - y, 1 - called, w)) if (1 - y).any() else None,
        "confusion_at_threshold": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def _fold_rows(result: CVResult) -> list[dict]:
    rows = []
    for fr in result.folds:
        m = fr.metrics
        row = {k: m.get(k) for k in FOLD_FIELDS}
        mask = result.oof_fold == fr.fold
        row["class_counts"] = {name: int((result.oof_labels[mask] == c).sum())
                               for c, name in enumerate(result.class_names)}
        row["decision_roc_auc"] = (m.get("roc_auc") if len(result.class_names) == 2
                                   else m.get("melanoma_roc_auc"))
        rows.append(row)
    return rows


def _dataset_info(result: CVResult) -> dict:
    try:
        manifest = shards.load_manifest(result.dataset_dir)
    except (FileNotFoundError, ValueError) as e:
        return {"dataset_dir": str(result.dataset_dir), "available": False, "error": str(e),
                "sources": [dict(s, licence=source_licence(s)) for s in result.config["data"].get("sources", [])]}
    return {"dataset_dir": str(result.dataset_dir), "available": True,
            "manifest_sha256": file_sha256(result.dataset_dir / shards.MANIFEST),
            "num_images": manifest["num_images"], "counts": manifest["counts"],
            "num_skipped": manifest["num_skipped"], "image_size": manifest["image_size"],
            "resize": manifest["resize"], "encoding": manifest["encoding"],
            "sources": [dict(s, licence=source_licence(s)) for s in manifest["sources"]]}


def audit_training_data(result: CVResult, near_dup_bits: int = DEFAULT_NEAR_DUP_BITS,
                        near_dup_corr: float | None = DEFAULT_MIN_CORRELATION) -> dict:
    """Duplicate audit of the run's dataset and folds, or the reason it could not run."""
    try:
        images = ImageSet.from_dataset(result.dataset_dir, folds=(result.k, int(result.config["folds"]["seed"])),
                                       name=result.dataset_dir.name)
    except (FileNotFoundError, ValueError) as e:
        logger.warning("leakage audit skipped: %s", e)
        return {"available": False, "error": str(e), "max_bits": near_dup_bits, "min_correlation": near_dup_corr}
    return dict(audit_set(images, near_dup_bits, near_dup_corr), available=True)


def _provenance(result: CVResult) -> dict:
    rm = result.run_manifest
    nodes = sorted({str(fr.metrics.get("node_id")) for fr in result.folds if fr.metrics.get("node_id")})
    hosts = sorted({str(fr.metrics.get("host")) for fr in result.folds if fr.metrics.get("host")})
    return {
        "result_dir": result.location,
        "command": rm.get("command"), "ray_address": rm.get("ray_address"),
        "versions": rm.get("versions", {}), "data_manifest_sha256": rm.get("data_manifest_sha256"),
        "config_sha256": result.config_sha256(), "seeds": rm.get("seeds", {
            "folds": result.config.get("folds", {}).get("seed"), "train": result.config.get("train", {}).get("seed")}),
        "nodes": nodes, "hosts": hosts,
        "fold_wall_time_s": {str(fr.fold): fr.metrics.get("wall_time_s") for fr in result.folds},
        "cv_wall_time_s": result.summary.get("wall_time_s"),
        "config": result.config,
    }


def summarize(result: CVResult, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
              near_dup_bits: int = DEFAULT_NEAR_DUP_BITS, n_boot: int = bs.DEFAULT_N_BOOT,
              seed: int = 0, n_bins: int = DEFAULT_BINS, audit: bool = True,
              near_dup_corr: float | None = DEFAULT_MIN_CORRELATION) -> dict:
    """Compute the report's numbers (JSON-ready) from a loaded result.

    Args:
        result: The cross-validation result.
        target_sensitivity: Decision-class sensitivity the threshold is chosen for. Defaults to `0.90`.
        near_dup_bits: Near-duplicate candidates of the audit: dHash distance in bits. Defaults to `4`.
        n_boot: Bootstrap replicates for the intervals. Defaults to `2000`.
        seed: Bootstrap seed. Defaults to `0`.
        n_bins: Bins of the ECE and reliability diagram. Defaults to `10`.
        audit: Run the duplicate audit of the training data. Defaults to `True`.
        near_dup_corr: Thumbnail correlation confirming a near duplicate (None: dHash only).
            Defaults to `0.97`.

    Raises:
        ValueError: the out-of-fold predictions have no case of the decision class.
    """
    start = time.perf_counter()
    names = result.class_names
    k_dec = result.decision_index
    y, probs, groups = result.oof_labels, result.oof_probs, result.oof_groups
    binary = len(names) == 2
    mel_index = label_schemes.reported_melanoma_index(result.label_scheme)
    pooled = classification_metrics(y, probs, names, mel_index)

    cal = calibrate(y, probs, k_dec, target_sensitivity, n_bins)
    scaled = apply_temperature(probs, cal.temperature)
    pred = probs.argmax(axis=1)
    ci = {
        "accuracy": bs.bootstrap_ci(lambda w: bs.weighted_accuracy(y, pred, w), y, groups,
                                    n_boot=n_boot, seed=seed).to_dict(),
        "balanced_accuracy": bs.bootstrap_ci(lambda w: bs.weighted_balanced_accuracy(y, pred, len(names), w),
                                             y, groups, n_boot=n_boot, seed=seed).to_dict(),
    }
    if not binary:
        ci["macro_roc_auc"] = bs.bootstrap_ci(lambda w: bs.weighted_macro_roc_auc(y, probs, w), y, groups,
                                              n_boot=n_boot, seed=seed).to_dict()
    decision = binary_metrics_with_ci((y == k_dec).astype(int), scaled[:, k_dec], cal.operating_point.threshold,
                                      groups, n_boot, seed)
    ci["decision_roc_auc"] = decision["roc_auc"]  # on the calibrated probabilities the model outputs
    pooled["ci"] = ci
    pooled["decision"] = decision
    pooled["average_precision"] = decision["average_precision"]

    fold_rows = _fold_rows(result)
    evidence = {
        "kind": "melanoma-dist cross-validation report",
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label_scheme": result.label_scheme,
        "class_names": list(names),
        "decision_class": result.decision_class,
        "decision_index": k_dec,
        "k": result.k,
        "folds_finished": [fr.fold for fr in result.folds],
        "folds_missing": result.missing_folds,
        "folds": fold_rows,
        "mean_std": {name: mean_std([r.get(name) for r in fold_rows])
                     for name in SCALAR_METRICS + ("decision_roc_auc",)
                     if any(r.get(name) is not None for r in fold_rows)},
        "pooled": pooled,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "confidence": 0.95,
                      "unit": "lesion group" if len(set(groups)) < len(groups) else "image (one per group)",
                      "stratified_by": "label", "method": "percentile"},
        "calibration": cal.to_dict(),
        "operating_point": dict(cal.operating_point.to_dict(), calibrated=True,
                                chosen_on="pooled out-of-fold predictions (optimistic: scored on the same data)",
                                sensitivity_ci=decision["sensitivity"], specificity_ci=decision["specificity"]),
        "data": _dataset_info(result),
        "audit": audit_training_data(result, near_dup_bits, near_dup_corr) if audit else {"available": False,
                                                                          "error": "not run"},
        "provenance": _provenance(result),
    }
    evidence["elapsed_s"] = round(time.perf_counter() - start, 2)
    return json.loads(json.dumps(evidence, default=json_default))


def json_default(o: object) -> object:
    """`json.dumps` default for NumPy scalars and arrays."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
