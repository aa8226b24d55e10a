"""The model card (`model_card.md`): what the model is, what it was tested on, and its limits.

Written by `melanoma-dist report` into the result directory (from the cross-validation
evidence), by `export` into the model directory (adding the stored calibration and
threshold), and again by `evaluate` (adding external results).

Example:

```python
Path("model_card.md").write_text(render_model_card(evidence, model=json.load(open("model.json"))))
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from melanoma_dist.inference.tta import tta_mode
from melanoma_dist.report.html import DISCLAIMER


def _ci(ci: Mapping | None, digits: int = 3) -> str:
    if not ci or ci.get("estimate") is None:
        return "n/a"
    if ci.get("low") is None:
        return f"{ci['estimate']:.{digits}f}"
    return f"{ci['estimate']:.{digits}f} (95% CI {ci['low']:.{digits}f}–{ci['high']:.{digits}f})"


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _skin_type_note(sources: Sequence[Mapping]) -> str:
    known = " ".join(str(s.get("licence", "")) for s in sources)
    if "HAM10000" in known or "ISIC" in known:
        return ("- Skin types: HAM10000 (Vienna, Austria and Queensland, Australia) and the ISIC archive come "
                "mostly from fair-skinned (Fitzpatrick I–III) patients; performance on darker skin is unknown.")
    return "- Skin types: the skin-type mix of the training data is not documented; check it before any use."


def render_model_card(ev: Mapping, model: Mapping | None = None, evaluations: Sequence[Mapping] = ()) -> str:
    """The model card as Markdown.

    Args:
        ev: Cross-validation evidence (`evidence.summarize`).
        model: The exported `model.json`, when there is a model. Defaults to `None`.
        evaluations: External evaluations (`evaluate.evaluate` results). Defaults to `()`.
    """
    dc = ev["decision_class"]
    pv, data, op, cal = ev["provenance"], ev["data"], ev["operating_point"], ev["calibration"]
    cfg = pv["config"]
    model_cfg, train_cfg = cfg.get("model", {}), cfg.get("train", {})
    lines = [f"# Model card: {dc} detection from dermoscopic images", "",
             f"> **{DISCLAIMER}**", ""]

    lines += ["## Model", "",
              f"- Task: {ev['label_scheme']} scheme, classes {', '.join(ev['class_names'])}; the decision is "
              f"**{dc}** vs the rest.",
              f"- Architecture: {_architecture_text(model_cfg, train_cfg)}, {train_cfg.get('epochs')} epochs max "
              f"with early stopping on {train_cfg.get('monitor', 'val_loss')}, class weights "
              f"{train_cfg.get('class_weight')}.",
              f"- Input: dermoscopic RGB image, centre-{cfg.get('data', {}).get('resize', 'crop')} to a square, "
              f"resized to {cfg.get('data', {}).get('image_size')} px, scaled to [0, 1]."]
    if model:
        lines += [f"- Artifact: an ensemble of the {len(model['members'])} fold models; it averages their "
                  f"temperature-scaled probabilities (T = {model['calibration']['temperature']:.3f})"
                  f"{_tta_text(model['ensemble']['tta'])}.",
                  f"- Decision: **{dc} if P({dc}) ≥ {model['operating_point']['threshold']:.4f}** "
                  f"(chosen for sensitivity {model['operating_point']['target_sensitivity']:.2f} on the "
                  f"out-of-fold predictions).",
                  f"- Provenance: data manifest SHA-256 `{model['provenance']['data_manifest_sha256']}`, "
                  f"config SHA-256 `{model['provenance']['config_sha256']}`."]
    else:
        lines += [f"- Provenance: data manifest SHA-256 `{pv.get('data_manifest_sha256')}`, config SHA-256 "
                  f"`{pv.get('config_sha256')}`; not exported yet (`melanoma-dist export`)."]

    lines += ["", "## Training data", ""]
    lines += _md_table(["source", "kind", "images", "licence"],
                       [[s.get("name"), s.get("kind"), s.get("num_images", "?"), s.get("licence")]
                        for s in data.get("sources", [])])
    if data.get("counts"):
        total = sum(data["counts"].values())
        lines += ["", "Class balance: " + ", ".join(f"{k} {v} ({v / total:.1%})" for k, v in data["counts"].items())
                  + f"; {data.get('num_skipped', 0)} unreadable files skipped at ingest."]
    if any("BY-NC" in str(s.get("licence")) for s in data.get("sources", [])):
        lines += ["", "Some or all images are licensed for non-commercial use only (CC BY-NC): models trained on "
                      "them and their outputs are bound by those terms."]
    lines += [""]

    audit = ev["audit"]
    lines += ["## Splits and leakage handling", "",
              f"- {ev['k']}-fold cross-validation (seed {cfg.get('folds', {}).get('seed')}), stratified by label "
              f"and grouped by lesion: all images of one lesion, and all identical images (same pixel hash), "
              f"are in one fold.",
              "- Reported numbers are out-of-fold: every image is scored by the model that did not train on it."]
    if audit.get("available"):
        near = audit["near"]
        lines += [f"- Duplicate audit (near duplicate: {near['method']}): "
                  f"{audit['exact']['sets']} sets of identical images "
                  f"({audit['exact'].get('sets_across_folds', 0)} across folds), {near['pairs']} near-duplicate "
                  f"pairs of which {near['pairs_different_groups']} between different lesion ids and "
                  f"{near.get('pairs_across_folds', 0)} across folds ({near['candidate_pairs']} dHash candidates "
                  f"before confirmation). "
                  + ("Clean." if audit.get("clean") else "**Possible leakage across folds: see the report.**")]
    else:
        lines += [f"- Duplicate audit not available: {audit.get('error')}."]
    if ev["folds_missing"]:
        lines += [f"- **Folds {ev['folds_missing']} did not finish; the metrics cover the others only.**"]

    ci = ev["pooled"]["ci"]
    d = ev["pooled"]["decision"]
    lines += ["", "## Cross-validation metrics (pooled out-of-fold, 95% bootstrap CI over lesions)", ""]
    rows = [[f"{dc} ROC-AUC", _ci(ci.get("decision_roc_auc"))],
            [f"{dc} average precision", _f(d.get("average_precision"))],
            ["balanced accuracy (argmax)", _ci(ci.get("balanced_accuracy"))],
            ["accuracy (argmax)", _ci(ci.get("accuracy"))]]
    if "macro_roc_auc" in ci:
        rows.append(["macro one-vs-rest ROC-AUC", _ci(ci["macro_roc_auc"])])
    rows += [[f"sensitivity at threshold {op['threshold']:.4f}", _ci(op["sensitivity_ci"]) + " (chosen on these data)"],
             [f"specificity at threshold {op['threshold']:.4f}", _ci(op["specificity_ci"]) + " (optimistic)"]]
    ms = ev["mean_std"].get("decision_roc_auc")
    if ms and ms.get("mean") is not None:
        rows.append([f"{dc} ROC-AUC, mean ± sd over folds",
                     f"{ms['mean']:.3f} ± {_f(ms['std'])} ({ms['n']} folds)"])
    lines += _md_table(["metric", "value"], rows)
    lines += ["", f"Calibration: temperature T = {cal['temperature']:.3f}; ECE of P({dc}) "
                  f"{cal['before']['ece']:.3f} before, {cal['after']['ece']:.3f} after; Brier "
                  f"{cal['before']['brier']:.3f} → {cal['after']['brier']:.3f}.",
              f"Out-of-fold test set: {d['num_samples']} images, {d['num_positives']} {dc} "
              f"({d['prevalence']:.1%})."]

    lines += ["", "## External evaluation", ""]
    if evaluations:
        for e in evaluations:
            within = e.get("audit_within_test_set")
            extra = (f" Within the test set: {within['exact']['sets']} set(s) of identical images and "
                     f"{within['near']['pairs']} near-duplicate pair(s).") if within else ""
            lines += [f"### {e.get('dataset_name')}", "", e.get("statement", "") + extra, ""]
            rows = []
            for key, label in (("all", "all images"), ("deduplicated", "near-duplicates of training removed")):
                m = e.get("metrics", {}).get(key)
                if m:
                    rows.append([label, m["num_samples"], f"{m['num_positives']} ({m['prevalence']:.1%})",
                                 _ci(m.get("roc_auc")), _ci(m.get("sensitivity")), _ci(m.get("specificity"))])
            lines += _md_table(["images", "n", dc, "ROC-AUC", "sensitivity", "specificity"], rows) + [""]
    else:
        lines += ["None yet. Evaluate on an external set with `melanoma-dist evaluate MODEL DATASET`; "
                  "cross-validation on one collection overestimates performance on other clinics and cameras.", ""]

    lines += ["## Intended use and limits", "",
              "- Intended use: research on, and software testing of, melanoma detection from **dermoscopic** "
              "images. Not for diagnosis, triage or any other clinical decision.",
              "- Not for clinical images taken without a dermatoscope, non-skin images, or lesions outside the "
              "training classes (e.g. nail, mucosal or acral lesions are rare or absent in the training data).",
              _skin_type_note(data.get("sources", [])),
              "- Artefacts (rulers, ink markings, hair, air bubbles, vignetting, colour charts) can drive "
              "predictions; images with heavy artefacts may be misclassified.",
              f"- Class balance: {dc} prevalence in the test sets above differs from clinical practice, so "
              "positive and negative predictive values do not transfer; sensitivity and specificity at the "
              "stored threshold are the transferable figures, with their intervals.",
              "- Confidence intervals account for several images per lesion but not for patients with several "
              "lesions or for differences between clinics.", ""]
    return "\n".join(lines)


def _tta_text(tta: str | bool) -> str:
    mode = tta_mode(tta)
    return {"none": "", "flip": ", with horizontal-flip test-time augmentation",
            "dihedral": ", with test-time augmentation over the 8 flips and rotations"}[mode]


def _architecture_text(model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any]) -> str:
    backbone = model_cfg.get("backbone", "simple_cnn")
    head = f"dense {model_cfg.get('dense_units')}, dropout {model_cfg.get('dropout')}"
    if backbone == "simple_cnn":
        return (f"a plain Keras CNN (conv blocks {model_cfg.get('filters')}, {model_cfg.get('convs_per_block')} "
                f"conv(s) per block, {head}), trained from scratch")
    if not model_cfg.get("pretrained", True):
        return f"{backbone} ({head}), trained from scratch"
    blocks = model_cfg.get("fine_tune_blocks", -1)
    tuned = "the whole backbone" if blocks < 0 else "no backbone layer" if blocks == 0 else \
        f"the top {blocks} backbone units"
    return (f"{backbone} from ImageNet weights ({head}); {train_cfg.get('head_epochs', 0)} head-only epoch(s), "
            f"then {tuned} fine-tuned, BatchNorm statistics "
            f"{'frozen' if model_cfg.get('freeze_batchnorm', True) else 're-estimated'}")
