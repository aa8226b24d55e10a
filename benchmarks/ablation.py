"""Model-quality ablations: one option changed at a time on one fold, scored out-of-fold and externally.

Not a speed benchmark and not part of `run_all.py`. A full 5-fold CV of `pretrained-cpu` takes
about an hour on 2 cores, so each option is measured on the same single fold (fold 0 by
default: same training and validation lesions, same seed) and its fold model is scored on the
ISIC 2017 test set. Differences of about 0.01 AUC are within the noise of one fold; the 95 %
intervals are lesion-level bootstrap intervals of that fold's 2,433 validation images.

    .venv/bin/python benchmarks/ablation.py                     # every variant below (hours)
    .venv/bin/python benchmarks/ablation.py --only base,colour  # some of them

Each variant is `melanoma-dist cv --config CONFIG --folds F --set REFERENCE... --set VARIANT...`
into `<out-root>/<variant>`: the reference is the config at 96 px (a fold takes about 15 min
there, against 25 at the config's 128 px). `cv` keeps finished folds, so rerunning the script
only scores what already ran. The external test
set is ingested on demand with the variant's image size and colour constancy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.model_quality import melanoma_auc, oof_rows, roc_auc_text  # noqa: E402

from melanoma_dist.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

REFERENCE = ["data.image_size=96", "data.dataset_dir=runs/ham-isic-96", "pipeline.augment_on=pipeline"]
"""What every variant starts from: the config at 96 px, augmenting in tf.data as the reference fold did
(before `pipeline.augment_on` existed), so that the variants differ from it by one option only."""

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the reference: pretrained-cpu at 96 px", []),
    "scratch": ("EfficientNet-Lite0 from random weights, every layer trained",
                ["model.pretrained=false", "train.head_epochs=0", "model.fine_tune_blocks=-1",
                 "model.freeze_batchnorm=false"]),
    "px128": ("128 px instead of 96 px", ["data.image_size=128", "data.dataset_dir=runs/ham-isic-128"]),
    "colour": ("colour augmentation: brightness 0.1, saturation 0.2, hue 0.02, channel gain 0.1",
               ["pipeline.augment.brightness=0.1", "pipeline.augment.saturation=0.2",
                "pipeline.augment.hue=0.02", "pipeline.augment.channel_gain=0.1"]),
    "aspect": ("aspect-ratio jitter 0.2", ["pipeline.augment.aspect=0.2"]),
    "sog": ("Shades of Gray colour constancy (p=6) at ingest and inference",
            ["data.color_constancy=shades_of_gray", "data.dataset_dir=runs/ham-isic-96-sog"]),
}


def run_variant(base: Path, name: str, overrides: list[str], fold: int, out_root: Path) -> Path:
    """Run (or resume) the variant's fold; return its result directory."""
    sets = REFERENCE + overrides + [f"output_dir={out_root / name}"]
    out = REPO / load_config(base, sets).output_dir
    if not (out / f"fold-{fold}" / "model.keras").is_file():
        cmd = [sys.executable, "-m", "melanoma_dist", "cv", "--config", str(base), "--folds", str(fold)]
        cmd += [a for s in sets for a in ("--set", s)]
        print(f"[{name}] running: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    return out


def external_dataset(base: Path, overrides: list[str], test_config: Path) -> Path:
    """The test set ingested like the variant's training images (ingested now if missing)."""
    data = load_config(base, REFERENCE + overrides).data
    path = REPO / "runs" / f"isic2017-test-{data.image_size}" if data.color_constancy == "none" else \
        REPO / "runs" / f"isic2017-test-{data.image_size}-{data.color_constancy}"
    if not (path / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "melanoma_dist", "ingest", "--config", str(test_config),
                        "--set", f"data.image_size={data.image_size}",
                        "--set", f"data.color_constancy={data.color_constancy}",
                        "--set", f"data.dataset_dir={path}"], check=True, cwd=REPO)
    return path


def external_auc(model_path: Path, scheme: str, dataset: Path, n_boot: int) -> str:
    """Melanoma ROC-AUC (95 % CI) of one fold model on an ingested test set, without TTA."""
    import keras

    from melanoma_dist.data import shards
    from melanoma_dist.inference.evaluate import decision_labels
    from melanoma_dist.inference.images import decode
    from melanoma_dist.labels import class_names, melanoma_index
    from melanoma_dist.model.build import probabilities

    model = keras.models.load_model(model_path, compile=False)
    manifest = shards.load_manifest(dataset)
    scores = []
    for path in shards.shard_paths(dataset):
        images = shards.read_images(path)
        for start in range(0, len(images), 256):
            x = np.stack([decode(b, int(manifest["image_size"]), manifest["encoding"], str(dataset))
                          for b in images[start:start + 256]])
            probs = probabilities(np.asarray(model(x, training=False)), len(class_names(scheme)))
            scores.append(probs[:, melanoma_index(scheme)])
    table = shards.read_columns(dataset, [shards.LABEL, shards.GROUP])
    y = decision_labels(scheme, manifest["label_scheme"], np.asarray(table[shards.LABEL].to_pylist()))
    s = np.concatenate(scores)
    groups = np.asarray(table[shards.GROUP].to_pylist()).astype(str)
    return roc_auc_text(y, s, groups, n_boot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "pretrained-cpu.yaml")
    ap.add_argument("--test-config", type=Path, default=REPO / "configs" / "isic2017-test.yaml")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--out-root", type=Path, default=REPO / "runs" / "ablation")
    ap.add_argument("--only", help="comma-separated variants (default: all): " + ", ".join(VARIANTS))
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        what, overrides = VARIANTS[name]
        out = run_variant(args.config, name, overrides, args.fold, args.out_root)
        oof = oof_rows(out, fold=args.fold)
        ham = oof["source"] == "ham10000"
        wall = json.loads((out / f"fold-{args.fold}" / "metrics.json").read_text()).get("wall_time_s")
        row = {"variant": name, "what": what, "ham10000": melanoma_auc(oof, ham, args.n_boot),
               "all": melanoma_auc(oof, np.ones(len(ham), bool), args.n_boot),
               "isic2017_test": external_auc(out / f"fold-{args.fold}" / "model.keras", oof["scheme"],
                                             external_dataset(args.config, overrides, args.test_config), args.n_boot),
               "fold_wall_min": None if wall is None else round(wall / 60, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| variant | change | HAM10000 fold-{args.fold} ROC-AUC | all fold-{args.fold} images | "
          "ISIC 2017 test ROC-AUC (fold model, no TTA) | fold wall time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['what']} | {r['ham10000']} | {r['all']} | {r['isic2017_test']} | "
              f"{r['fold_wall_min']} min |")


if __name__ == "__main__":
    main()
