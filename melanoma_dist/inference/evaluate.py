"""`melanoma-dist evaluate`: score an exported model on an external, ingested test set.

The test set is a dataset directory made by `melanoma-dist ingest` (e.g. the ISIC 2017
test split as a csv source with `label_type: melanoma`). Its stored images are decoded as
in training and scored by the ensemble. Reported, with 95 % bootstrap intervals (lesions
resampled when the set has lesion ids, images otherwise; stratified by label):
ROC-AUC of the decision class, and sensitivity and specificity at the model's stored
threshold; plus calibration (ECE, Brier) of the decision-class probability.

Leakage: every test image is compared with the model's training set (recorded in
model.json): identical pixels, or near duplicates (dHash within `near_dup_bits` bits,
confirmed by thumbnail correlation, see `report.audit`). The metrics are
given twice, on all images and with those images removed (`deduplicated`), and the
evaluation's `statement` says which is which and whether the check could run.

Label schemes: the test set is reduced to the model's decision. A 7-class (`ham7`) or
`melanoma` model is scored by its melanoma probability on a `melanoma` or `ham7` test
set; a `malignant` model needs a `malignant` or `ham7` test set.

Object stores: the model directory, the test set and `out_dir` may be URIs (`s3://...`). The
model is read from a local copy of its directory (`storage.mirrored`), where the evaluation
and the refreshed model card are written and then uploaded; the test set is read in place.

Example:

```python
ev = evaluate("runs/quick-cpu/export", "runs/isic2017-test-64")
ev["metrics"]["deduplicated"]["roc_auc"]   # {'estimate': 0.71, 'low': 0.66, 'high': 0.76, ...}
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from melanoma_dist import labels as label_schemes
from melanoma_dist import storage
from melanoma_dist.data import shards
from melanoma_dist.data.fingerprint import IMAGE_SETTINGS, with_defaults
from melanoma_dist.data.folds import merge_duplicate_groups
from melanoma_dist.data.images import LOSSLESS_ENCODINGS
from melanoma_dist.inference.tta import tta_mode
from melanoma_dist.inference.ensemble import Ensemble
from melanoma_dist.inference.images import decode
from melanoma_dist.metrics import classification_metrics
from melanoma_dist.report import plots
from melanoma_dist.report.audit import (DEFAULT_MIN_CORRELATION, DEFAULT_NEAR_DUP_BITS, ImageSet, audit_set,
                                        audit_train_test)
from melanoma_dist.report.bootstrap import DEFAULT_N_BOOT
from melanoma_dist.report.build import EVALUATION_FILE
from melanoma_dist.report.calibration import brier_score, expected_calibration_error, reliability_bins
from melanoma_dist.report.evidence import binary_metrics_with_ci, json_default, source_licence
from melanoma_dist.report.model_card import render_model_card
from melanoma_dist.report.result import file_sha256

logger = logging.getLogger(__name__)

EVALUATIONS_DIR = "evaluations"
_CHUNK = 256


class DatasetMismatchError(ValueError):
    """The test set's classes or image size do not fit the model."""


def decision_labels(model_scheme: str, data_scheme: str, labels: np.ndarray) -> np.ndarray:
    """1 where a test image belongs to the model's decision class, under the test set's scheme.

    Args:
        model_scheme: The model's label scheme.
        data_scheme: The test set's label scheme (from its manifest).
        labels: The test set's class indices.

    Raises:
        DatasetMismatchError: the test set's labels cannot say what the model decides (e.g. a
            melanoma model on a benign/malignant set).
    """
    y = np.asarray(labels)
    if model_scheme == "malignant":
        if data_scheme == "malignant":
            return (y == 1).astype(int)
        if data_scheme == "ham7":
            malignant = [label_schemes.HAM7_CLASSES.index(d) for d in sorted(label_schemes.MALIGNANT_DX)]
            return np.isin(y, malignant).astype(int)
    else:
        mel = label_schemes.melanoma_index(data_scheme)
        if mel is not None:
            return (y == mel).astype(int)
    raise DatasetMismatchError(
        f"the test set has label scheme {data_scheme!r} ({list(label_schemes.class_names(data_scheme))}) but the "
        f"model decides {'malignant' if model_scheme == 'malignant' else 'melanoma'} "
        f"(scheme {model_scheme!r}); ingest the test set with data.label_scheme="
        f"{'malignant' if model_scheme == 'malignant' else 'melanoma'} (or ham7 from diagnoses)")


def _check_input(model: Ensemble, manifest: dict, dataset_dir: Path | storage.ObjectPath) -> list[str]:
    """Raise on an image-size mismatch; return notes on other preprocessing differences."""
    spec = model.spec["input"]
    if int(manifest["image_size"]) != model.image_size:
        raise DatasetMismatchError(
            f"{dataset_dir} holds {manifest['image_size']} px images but the model takes {model.image_size} px: "
            f"ingest the test set again with data.image_size={model.image_size} data.resize={spec['resize']}")
    notes = []
    test, train = with_defaults(manifest, IMAGE_SETTINGS), with_defaults(spec, IMAGE_SETTINGS)
    for key in IMAGE_SETTINGS:
        if key == "encoding" and {test[key], train[key]} <= LOSSLESS_ENCODINGS:
            continue  # png and raw store the same pixels
        if test[key] != train[key]:
            notes.append(f"test images were ingested with {key}={test[key]!r}, training images with "
                         f"{train[key]!r}")
            logger.warning("preprocessing differs from training: %s", notes[-1])
    return notes


def predict_dataset(model: Ensemble, dataset_dir: str | Path, tta: str | bool | None = None) -> np.ndarray:
    """Calibrated ensemble probabilities of every image of an ingested dataset, in row order."""
    encoding = with_defaults(shards.load_manifest(dataset_dir), ("encoding",))["encoding"]
    out = []
    for path in shards.shard_paths(dataset_dir):
        data = shards.read_images(path)
        for start in range(0, len(data), _CHUNK):
            chunk = data[start:start + _CHUNK]
            x = np.stack([decode(b, model.image_size, encoding, str(dataset_dir)) for b in chunk])
            out.append(model.predict(x, tta=tta))
    return np.concatenate(out) if out else np.zeros((0, len(model.class_names)))


def _decision_block(y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray | None,
                    n_boot: int, seed: int, removed: bool, audited: bool) -> dict:
    m = binary_metrics_with_ci(y, p, threshold, groups, n_boot, seed)
    m.update(near_duplicates_removed=removed, duplicate_check_ran=audited,
             ece=expected_calibration_error(y, p) if len(y) else None,
             brier=brier_score(y, p) if len(y) else None, reliability=reliability_bins(y, p))
    return m


def _statement(audit: dict, n: int) -> str:
    if not audit.get("available"):
        return (f"Near-duplicates of training images could NOT be checked ({audit.get('error')}): the numbers "
                f"are on all {n} images and may include images seen in training.")
    return (f"Checked against the {audit['num_train']} training images: {audit['flagged']} of {n} test images "
            f"are identical ({audit['exact_duplicates']}) or near-identical ({audit['near_duplicates']}; "
            f"{audit['method']}) to a training image. 'deduplicated' numbers exclude them; 'all' numbers "
            f"include them.")


def evaluate(model_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path | None = None,
             tta: str | bool | None = None, near_dup_bits: int | None = None, n_boot: int = DEFAULT_N_BOOT,
             seed: int = 0, near_dup_corr: float | None | str = "model") -> dict:
    """Evaluate an exported model on an ingested test set; write evaluation.json and figures.

    Args:
        model_dir: The exported model directory: a folder or an object-store URI.
        dataset_dir: An ingested dataset (manifest.json + shards): a folder or a URI.
        out_dir: Where to write: a folder or a URI. Defaults to `None` (`<model_dir>/evaluations/<dataset name>/`).
        tta: Test-time augmentation: `none`, `flip` or `dihedral`. Defaults to `None` (the model's setting).
        near_dup_bits: Near-duplicate candidates, dHash bits. Defaults to `None` (the model's, else 4).
        n_boot: Bootstrap replicates. Defaults to `2000`.
        seed: Bootstrap seed. Defaults to `0`.
        near_dup_corr: Thumbnail correlation confirming a near duplicate; None for dHash only.
            Defaults to `"model"` (the model's setting, else 0.97).

    Returns:
        The evaluation dict (also written to `evaluation.json`).

    Raises:
        ModelDirError: the model directory is not an export.
        FileNotFoundError: the dataset is not ingested.
        DatasetMismatchError: its classes or image size do not fit the model.
    """
    with contextlib.ExitStack() as stack:  # what was written is uploaded on the way out
        model = stack.enter_context(storage.mirrored(model_dir))
        dest = stack.enter_context(storage.mirrored(out_dir)) if out_dir is not None else None
        return _evaluate(model.local, storage.as_path(str(dataset_dir)), dest.local if dest else None, tta,
                         near_dup_bits, n_boot, seed, near_dup_corr, shown_model_dir=model.uri if model.remote else "")


def _evaluate(model_dir: Path, data_dir: Path | storage.ObjectPath, out_dir: Path | None, tta: str | bool | None,
              near_dup_bits: int | None, n_boot: int, seed: int, near_dup_corr: float | None | str,
              shown_model_dir: str) -> dict:
    """`evaluate` with the model (and `out_dir`) in local folders; `shown_model_dir`: the model's URI, if a copy."""
    start = time.perf_counter()
    model = Ensemble.load(model_dir)
    manifest = shards.load_manifest(data_dir)
    table = shards.read_columns(data_dir, [shards.IMAGE_ID, shards.LABEL, shards.GROUP, shards.PIXEL_SHA256])
    labels = table[shards.LABEL].to_numpy()
    y = decision_labels(model.spec["label_scheme"], manifest["label_scheme"], labels)
    notes = _check_input(model, manifest, data_dir)
    stored = model.spec.get("near_duplicates", {})
    bits = near_dup_bits if near_dup_bits is not None else int(stored.get("max_bits", DEFAULT_NEAR_DUP_BITS))
    corr = stored.get("min_correlation", DEFAULT_MIN_CORRELATION) if near_dup_corr == "model" else near_dup_corr
    ids = np.asarray(table[shards.IMAGE_ID].to_pylist(), dtype=object)
    # Bootstrap units: lesions, with identical images merged into one unit (as the folds do).
    groups = merge_duplicate_groups(table[shards.GROUP].to_pylist(), table[shards.PIXEL_SHA256].to_pylist())
    use_groups = groups.astype(str) if len(set(groups)) < len(groups) else None

    probs = predict_dataset(model, data_dir, tta)
    p = probs[:, model.decision_index]

    test_set = ImageSet.from_dataset(data_dir, name=data_dir.name)
    train_dir = storage.as_path(model.spec["provenance"].get("dataset_dir", ""))
    try:
        audit = dict(audit_train_test(ImageSet.from_dataset(train_dir, name=train_dir.name), test_set, bits, corr),
                     available=True, train_dataset_dir=str(train_dir))
    except (FileNotFoundError, ValueError) as e:
        logger.warning("duplicate check against the training data skipped: %s", e)
        audit = {"available": False, "error": str(e), "train_dataset_dir": str(train_dir), "max_bits": bits,
                 "min_correlation": corr}
    within = audit_set(test_set, bits, corr)

    metrics = {"all": _decision_block(y, p, model.threshold, use_groups, n_boot, seed, False, audit["available"])}
    if audit["available"]:
        keep = ~np.isin(ids, audit["flagged_image_ids"])
        if keep.any() and 0 < y[keep].sum() < keep.sum():
            metrics["deduplicated"] = _decision_block(y[keep], p[keep], model.threshold,
                                                      use_groups[keep] if use_groups is not None else None,
                                                      n_boot, seed, True, True)
    if manifest["label_scheme"] == model.spec["label_scheme"]:
        metrics["classification_all"] = classification_metrics(
            labels, probs, model.class_names, label_schemes.reported_melanoma_index(manifest["label_scheme"]))

    name = data_dir.name
    ev = {
        "kind": "melanoma-dist external evaluation",
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset_name": name, "dataset_dir": str(data_dir.resolve() if isinstance(data_dir, Path) else data_dir),
        "data_manifest_sha256": file_sha256(data_dir / shards.MANIFEST),
        "data_label_scheme": manifest["label_scheme"], "data_counts": manifest["counts"],
        "data_sources": [dict(s, licence=source_licence(s)) for s in manifest["sources"]],
        "model_dir": shown_model_dir or str(model_dir.resolve()), "model_label_scheme": model.spec["label_scheme"],
        "decision_class": model.decision_class, "threshold": model.threshold,
        "temperature": model.temperature, "tta": model.tta if tta is None else tta_mode(tta),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "lesion group (identical images merged)"
                      if use_groups is not None else "image"},
        "statement": _statement(audit, len(y)),
        "headline": "deduplicated" if "deduplicated" in metrics else "all",
        "preprocessing_notes": notes,
        "metrics": metrics,
        "audit_vs_training": audit,
        "audit_within_test_set": within,
    }
    out = out_dir if out_dir is not None else model_dir / EVALUATIONS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    curves = [("all images", y, p)]
    if "deduplicated" in metrics:
        keep = ~np.isin(ids, audit["flagged_image_ids"])
        curves.append(("deduplicated", y[keep], p[keep]))
    figs = {"roc": plots.roc_curves(out / "roc.png", curves[:-1], curves[-1],
                                    title=f"ROC of P({model.decision_class}) on {name}"),
            "reliability": plots.reliability_diagram(out / "reliability.png", metrics[ev["headline"]],
                                                     class_name=model.decision_class)}
    ev["figures"] = {k: v.name for k, v in figs.items()}
    ev["elapsed_s"] = round(time.perf_counter() - start, 2)
    (out / EVALUATION_FILE).write_text(json.dumps(ev, indent=2, default=json_default) + "\n")
    refresh_model_card(model_dir)
    return json.loads(json.dumps(ev, default=json_default))


def refresh_model_card(model_dir: str | Path) -> Path | None:
    """Rewrite `<model_dir>/model_card.md` with every evaluation found in `<model_dir>/evaluations/`.

    Returns:
        The card's path, or None when the model has no `evidence.json` to build it from.
    """
    d = Path(model_dir)
    if not (d / "evidence.json").is_file():
        logger.warning("%s has no evidence.json: model card not updated", d)
        return None
    evaluations = [json.loads(p.read_text()) for p in sorted(d.glob(f"{EVALUATIONS_DIR}/*/{EVALUATION_FILE}"))]
    card = render_model_card(json.loads((d / "evidence.json").read_text()),
                             model=json.loads((d / "model.json").read_text()), evaluations=evaluations)
    (d / "model_card.md").write_text(card)
    return d / "model_card.md"


def within_statement(within: dict) -> str:
    """One sentence on duplicates inside the test set itself."""
    ex, near = within["exact"], within["near"]
    return (f"Within the test set: {ex['sets']} set(s) of identical images ({ex['images']} images; resampled together "
            f"in the bootstrap) and {near['pairs']} near-duplicate pair(s).")


def summary_lines(ev: dict) -> str:
    """A few lines for the terminal."""
    from melanoma_dist.report.html import ci_text

    lines = [ev["statement"], within_statement(ev["audit_within_test_set"])]
    for key in ("all", "deduplicated"):
        m = ev["metrics"].get(key)
        if m:
            lines.append(f"{key:>12}: n={m['num_samples']} ({m['num_positives']} {ev['decision_class']}), "
                         f"ROC-AUC {ci_text(m['roc_auc'])}, at threshold {ev['threshold']:.4f}: "
                         f"sensitivity {ci_text(m['sensitivity'])}, specificity {ci_text(m['specificity'])}")
    return "\n".join(lines)
