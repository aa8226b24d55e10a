"""`melanoma-dist export`: package a cross-validation run as one inference model.

Reads the run's K fold models and out-of-fold predictions, fits the temperature and the
decision threshold on those predictions (`report.calibration`), and writes the model
directory described in `inference.ensemble` (fold models, model.json, model card,
evidence). The directory is built beside its target and moved in place at the end, so an
interrupted export leaves no half-written model; an earlier export at the same place is
replaced (its evaluations with it: they belong to the old model). The result directory and the
model directory may be object-store URIs (`s3://...`): the export is built in local copies
(`storage.mirrored`) and uploaded at the end, the old export's objects deleted.

Example:

```python
model_dir = export_model("runs/quick-cpu", target_sensitivity=0.9, tta="dihedral")
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from melanoma_dist import storage
from melanoma_dist.data import shards
from melanoma_dist.data.fingerprint import IMAGE_SETTINGS, with_defaults
from melanoma_dist.inference.tta import tta_mode, view_names
from melanoma_dist.inference.ensemble import (FORMAT, FORMAT_VERSION, MODEL_JSON, NORMALISATION, Ensemble,
                                              ModelDirError)
from melanoma_dist.paths import ensure_replaceable, is_uri
from melanoma_dist.report.audit import DEFAULT_MIN_CORRELATION, DEFAULT_NEAR_DUP_BITS
from melanoma_dist.report.bootstrap import DEFAULT_N_BOOT
from melanoma_dist.report.calibration import DEFAULT_TARGET_SENSITIVITY
from melanoma_dist.report.evidence import summarize
from melanoma_dist.report.model_card import render_model_card
from melanoma_dist.report.result import CONFIG_FILE, RUN_MANIFEST, CVResult, ResultError
from melanoma_dist.run_files import CHECKPOINT_DIR, SEARCH_DIR

logger = logging.getLogger(__name__)

DEFAULT_EXPORT_DIR = "export"
"""Default model directory, inside the result directory."""


def _input_spec(result: CVResult) -> dict[str, Any]:
    """Preprocessing of the training images: the run's data config, checked against the dataset manifest."""
    spec = {"channels": 3, **with_defaults(result.config["data"], IMAGE_SETTINGS), "normalisation": NORMALISATION,
            "steps": "decode, EXIF-orient, RGB; centre-crop (or pad) to a square; bilinear resize; "
                     "colour constancy if set; "
                     "re-encode as at ingest; decode; / 255"}
    try:
        manifest = shards.load_manifest(result.dataset_dir)
    except (FileNotFoundError, ValueError):
        return spec
    for key in IMAGE_SETTINGS:
        if key in manifest and manifest[key] != spec[key]:
            logger.warning("the dataset manifest says %s=%r but the run's config says %r: using the manifest's",
                           key, manifest[key], spec[key])
            spec[key] = manifest[key]
    return spec


def build_model_json(result: CVResult, ev: dict, members: list[str], tta: str | bool,
                     near_dup_bits: int = DEFAULT_NEAR_DUP_BITS,
                     near_dup_corr: float | None = DEFAULT_MIN_CORRELATION) -> dict[str, Any]:
    """The `model.json` of an export (see `inference.ensemble`)."""
    cal, op = ev["calibration"], ev["operating_point"]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "members": members, "folds": [fr.fold for fr in result.folds],
        "label_scheme": result.label_scheme, "class_names": list(result.class_names),
        "decision_index": result.decision_index, "decision_class": result.decision_class,
        "output": "sigmoid (1 unit, P(class 1))" if len(result.class_names) == 2 else "softmax",
        "input": _input_spec(result),
        "ensemble": {"method": "mean over members (and views) of temperature-scaled probabilities "
                               "softmax(log p / T)", "tta": tta_mode(tta),
                     "tta_views": view_names(tta_mode(tta))},
        "calibration": {"method": "temperature scaling on log-probabilities", "temperature": cal["temperature"],
                        "fitted_on": f"pooled out-of-fold predictions of {cal['num_samples']} images",
                        "ece_before": cal["before"]["ece"], "ece_after": cal["after"]["ece"],
                        "brier_before": cal["before"]["brier"], "brier_after": cal["after"]["brier"],
                        "n_bins": cal["n_bins"]},
        "operating_point": {"threshold": op["threshold"], "target_sensitivity": op["target_sensitivity"],
                            "rule": f"{result.decision_class} if P({result.decision_class}) >= threshold",
                            "oof_sensitivity": op["sensitivity"], "oof_specificity": op["specificity"],
                            "chosen_on": op["chosen_on"]},
        "near_duplicates": {"max_bits": near_dup_bits, "min_correlation": near_dup_corr},
        "provenance": {"result_dir": ev["provenance"]["result_dir"], "dataset_dir": str(result.dataset_dir),
                       "data_manifest_sha256": ev["provenance"]["data_manifest_sha256"],
                       "config_sha256": ev["provenance"]["config_sha256"],
                       "seeds": ev["provenance"]["seeds"], "versions": ev["provenance"]["versions"]},
    }


def _write_member(fold_model: Path, member: Path) -> None:
    """Save a fold model without its optimizer state, which inference never reads (it was 2/3 of the file)."""
    import keras

    try:
        model = keras.models.load_model(fold_model, compile=False)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ResultError(f"fold model {fold_model} is unreadable ({type(e).__name__}: {e}): delete its "
                          f"metrics.json and run `melanoma-dist cv` again to retrain that fold") from None
    model.save(member)


def export_model(result_dir: str | Path, out_dir: str | Path | None = None,
                 target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, tta: str | bool = "none",
                 near_dup_bits: int = DEFAULT_NEAR_DUP_BITS, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                 near_dup_corr: float | None = DEFAULT_MIN_CORRELATION) -> Path | str:
    """Export the K fold models of a finished run as one calibrated ensemble.

    Args:
        result_dir: The `output_dir` of a finished `melanoma-dist cv` run: a folder or an object-store URI.
        out_dir: The model directory to write: a folder or a URI. Defaults to `None` (`<result_dir>/export`).
        target_sensitivity: Decision-class sensitivity of the stored threshold. Defaults to `0.90`.
        tta: The stored test-time augmentation: `none`, `flip` or `dihedral`. Defaults to `"none"`.
        near_dup_bits: Near-duplicate candidates (dHash bits) of the audits. Defaults to `4`.
        n_boot: Bootstrap replicates for the card's intervals. Defaults to `2000`.
        seed: Bootstrap seed. Defaults to `0`.
        near_dup_corr: Thumbnail correlation confirming a near duplicate (None: dHash only);
            stored in model.json for `evaluate`. Defaults to `0.97`.

    Returns:
        The model directory (a URI when it is in an object store).

    Raises:
        ResultError: the run is missing, unfinished (some fold has no model) or inconsistent.
        FileExistsError: `out_dir` exists and is not an exported model.
        ModelDirError: a fold model's shape does not match the run's classes or image size.
    """
    inside = _inside(out_dir, result_dir) if out_dir is not None else DEFAULT_EXPORT_DIR
    with contextlib.ExitStack() as stack:  # what was written is uploaded on the way out
        # Not pulled: checkpoints, and a `tune` run's search (trials, models, outer datasets), which export never reads.
        run = stack.enter_context(storage.mirrored(result_dir, pull_skip=(CHECKPOINT_DIR, SEARCH_DIR)))
        # Built beside its target and renamed into place: the mirror is named like out_dir, in a folder of its own.
        # A target inside the result is in the result's mirror already: a mirror of its own would download it twice.
        dest = stack.enter_context(storage.mirrored(out_dir)) if inside is None else run
        result = CVResult.load(run.local, origin=run.uri if run.remote else "")
        out = dest.local if inside is None else run.local / inside
        spec = _export(result, out, target_sensitivity, tta, near_dup_bits, n_boot, seed, near_dup_corr)
        named = dest.name_of(out)
    logger.info("exported %d fold models to %s (T=%.3f, threshold %.4f)", len(spec["members"]), named,
                spec["calibration"]["temperature"], spec["operating_point"]["threshold"])
    return named


def _inside(out_dir: str | Path, result_dir: str | Path) -> str | None:
    """`out_dir` relative to `result_dir` when both are URIs and the first lies inside the other, else None."""
    out, run = (posixpath.normpath(str(p)).replace(":/", "://", 1) for p in (out_dir, result_dir))
    if is_uri(out) and is_uri(run) and out.startswith(run + "/"):
        return out[len(run) + 1:]
    return None


def _export(result: CVResult, out: Path, target_sensitivity: float, tta: str | bool, near_dup_bits: int,
            n_boot: int, seed: int, near_dup_corr: float | None) -> dict[str, Any]:
    """`export_model` of a loaded result, into the local folder `out`; return its model.json."""
    if not result.complete:
        raise ResultError(f"folds {result.missing_folds} of {result.location} have not finished: an ensemble "
                          f"needs every fold; finish the run with `melanoma-dist cv --config "
                          f"{storage.join(result.location, CONFIG_FILE)}` (finished folds are kept)")
    absent = [fr.fold for fr in result.folds if not fr.model_path.is_file()]
    if absent:
        raise ResultError(f"the model of fold(s) {absent} is missing in {result.location}: re-run those folds")
    ensure_replaceable(out, MODEL_JSON, "--out", "an exported model")
    ev = summarize(result, target_sensitivity, near_dup_bits, n_boot, seed, near_dup_corr=near_dup_corr)
    members = [f"folds/fold-{fr.fold}.keras" for fr in result.folds]
    spec = build_model_json(result, ev, members, tta, near_dup_bits, near_dup_corr)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    (tmp / "folds").mkdir(parents=True)
    try:
        for fr, member in zip(result.folds, members):
            _write_member(fr.model_path, tmp / member)
        for name in (RUN_MANIFEST, CONFIG_FILE):
            if (result.result_dir / name).is_file():
                shutil.copy2(result.result_dir / name, tmp / name)
        (tmp / MODEL_JSON).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / "evidence.json").write_text(json.dumps(ev, indent=2) + "\n")
        (tmp / "model_card.md").write_text(render_model_card(ev, model=spec))
        Ensemble.load(tmp)  # every member loads and fits model.json
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


__all__ = ["export_model", "build_model_json", "ModelDirError", "DEFAULT_EXPORT_DIR"]
