"""Model quality of finished runs: out-of-fold and external melanoma ROC-AUC with 95 % CIs, one table row a run.

Not a speed benchmark: it reads what `melanoma-dist cv` and `melanoma-dist evaluate` wrote and
prints the rows of docs/model-results.md, so every number there can be recomputed:

    .venv/bin/python benchmarks/model_quality.py runs/pretrained-cpu \\
        --eval runs/pretrained-cpu/export/evaluations/isic2017-test-96/evaluation.json

Out-of-fold ROC-AUC is given pooled over every image and per source (HAM10000 and ISIC 2017
images of the training set), with a lesion-level stratified bootstrap (2,000 replicates);
the external number comes from evaluation.json (the exported ensemble on the test set).
For multi-class runs the balanced accuracy (mean per-class recall) and per-class recall are
printed as well.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from melanoma_dist.data import shards
from melanoma_dist.labels import melanoma_index
from melanoma_dist.report.bootstrap import bootstrap_ci, weighted_roc_auc


def roc_auc_text(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int) -> str:
    """`0.850 (0.824–0.874)`: ROC-AUC with its lesion-grouped 95 % bootstrap interval."""
    ci = bootstrap_ci(lambda w: weighted_roc_auc(y, scores, w), y, groups, n_boot=n_boot)
    return f"{ci.estimate:.3f} ({ci.low:.3f}–{ci.high:.3f})" if ci.low is not None else f"{ci.estimate:.3f}"


def oof_rows(result_dir: Path, fold: int | None = None) -> dict:
    """Out-of-fold predictions of a cv run (or of one of its folds), with each image's source."""
    path = result_dir / "oof_predictions.csv" if fold is None else result_dir / f"fold-{fold}" / "predictions.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    config = json.loads((result_dir / "run_manifest.json").read_text())["config"]
    table = shards.read_columns(config["data"]["dataset_dir"], [shards.IMAGE_ID, "source"])
    source = dict(zip(table[shards.IMAGE_ID].to_pylist(), table["source"].to_pylist()))
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    return {"scheme": config["data"]["label_scheme"], "classes": classes,
            "label": np.array([int(r["label"]) for r in rows]),
            "probs": np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]),
            "group": np.array([r["group"] for r in rows], dtype=object),
            "source": np.array([source[r["image_id"]] for r in rows], dtype=object)}


def melanoma_auc(oof: dict, mask: np.ndarray, n_boot: int) -> str:
    m = melanoma_index(oof["scheme"])
    y = (oof["label"][mask] == m).astype(int)
    scores = oof["probs"][mask, m]
    return roc_auc_text(y, scores, oof["group"][mask].astype(str), n_boot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result_dir", type=Path)
    ap.add_argument("--eval", type=Path, action="append", default=[], help="evaluation.json of the export")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    oof = oof_rows(args.result_dir)
    summary = json.loads((args.result_dir / "cv_summary.json").read_text())
    print(f"run: {args.result_dir}  ({len(oof['label'])} out-of-fold images, cv wall time "
          f"{summary.get('wall_time_s', float('nan')) / 60:.1f} min)")
    everything = np.ones(len(oof["label"]), bool)
    print(f"  OOF melanoma ROC-AUC, all images: {melanoma_auc(oof, everything, args.n_boot)}")
    for source in sorted(set(oof["source"])):
        mask = oof["source"] == source
        print(f"  OOF melanoma ROC-AUC, {source} images ({mask.sum()}): {melanoma_auc(oof, mask, args.n_boot)}")
    if len(oof["classes"]) > 2:
        pred = oof["probs"].argmax(1)
        recalls = {c: float(np.mean(pred[oof["label"] == i] == i)) for i, c in enumerate(oof["classes"])}
        print(f"  OOF balanced accuracy: {np.mean(list(recalls.values())):.3f}; per-class recall: "
              + ", ".join(f"{c} {r:.3f}" for c, r in recalls.items()))
    for path in args.eval:
        ev = json.loads(path.read_text())
        for block in ("all", "deduplicated"):
            if block in ev["metrics"]:
                m = ev["metrics"][block]
                auc = m["roc_auc"]
                print(f"  external {path.parent.name} ({block}, {m['num_samples']} images, TTA {ev['tta']}): "
                      f"ROC-AUC {auc['estimate']:.3f} ({auc['low']:.3f}–{auc['high']:.3f}); at the stored "
                      f"threshold sensitivity {m['sensitivity']['estimate']:.3f}, specificity "
                      f"{m['specificity']['estimate']:.3f}")


if __name__ == "__main__":
    main()
