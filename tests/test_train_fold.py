"""One fold, end to end through the CLI: real HAM10000 images, real Horovod (1 and 2 ranks)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from melanoma_dist.cli import main
from melanoma_dist.data.folds import load_folds
from melanoma_dist.data.pipeline import RowIndex
from melanoma_dist.train.fold import class_weights

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING = {
    "folds": {"k": 2, "seed": 0},
    "pipeline": {"batch_size": 8, "shuffle_buffer": 64},
    "model": {"filters": [4, 8], "convs_per_block": 1, "dense_units": 8, "dropout": 0.0},
    "train": {"epochs": 2, "learning_rate": 0.01, "warmup_epochs": 0, "verbose": 0},
}


def write_config(tmp: Path, data: dict, **sections) -> Path:
    raw = {"data": data, **json.loads(json.dumps(TINY_TRAINING)), "output_dir": str(tmp / "out")}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def ham_config(ham_subset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = {"sources": [{"kind": "ham10000", "path": str(ham_subset), "name": "ham"}],
            "dataset_dir": str(tmp / "dataset"), "label_scheme": "ham7", "image_size": 32, "ingest_workers": 1}
    return tmp, write_config(tmp, data)


def test_class_weights():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[0] == pytest.approx(4 / 9) and w[1] == pytest.approx(4 / 3) and w[2] == 0.0


def test_cli_train_one_fold_end_to_end(ham_config, capsys):
    tmp, config = ham_config
    assert main(["train", "--config", str(config), "--fold", "1"]) == 0  # ingests, makes folds, trains
    out = tmp / "out" / "fold-1"
    assert {p.name for p in out.iterdir()} >= {"model.keras", "history.csv", "predictions.csv", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == metrics["accuracy"]

    # The whole validation fold is scored, each image once, with the 7 HAM classes.
    folds = load_folds(tmp / "dataset", 2, 0)
    index = RowIndex.load(tmp / "dataset")
    image_ids = np.asarray(index.image_ids.to_pylist())
    expected_ids = sorted(image_ids[folds == 1])
    with (out / "predictions.csv").open() as f:
        preds = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in preds) == expected_ids
    assert metrics["num_samples"] == len(expected_ids) and len(metrics["confusion_matrix"]) == 7
    assert "melanoma_roc_auc" in metrics and metrics["epochs_run"] == 2
    assert sum(map(sum, metrics["confusion_matrix"])) == len(expected_ids)
    with (out / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]

    # The saved model reproduces the stored probabilities.
    model = keras.models.load_model(out / "model.keras", compile=False)
    from melanoma_dist.data.pipeline import decode_image
    from melanoma_dist.data.shards import read_columns

    table = read_columns(tmp / "dataset", ["image_id", "image"])
    by_id = dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))
    x = np.stack([decode_image(by_id[r["image_id"]], 32, index.encoding).numpy() for r in preds[:4]])
    stored = np.array([[float(r[f"prob_{c}"]) for c in metrics["class_names"]] for r in preds[:4]])
    np.testing.assert_allclose(model.predict(x, verbose=0), stored, atol=1e-5)


def test_rerun_resumes_and_extends(ham_config):
    tmp, config = ham_config
    out = tmp / "out" / "fold-1"
    if not (out / "metrics.json").exists():
        pytest.skip("needs test_cli_train_one_fold_end_to_end")
    assert main(["train", "--config", str(config), "--fold", "1", "--set", "train.epochs=3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 2 and metrics["epochs_run"] == 3
    with (out / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]
    # A checkpoint is never loaded into a different model.
    assert main(["train", "--config", str(config), "--fold", "1", "--set", "model.dense_units=4"]) == 2


def test_cli_errors(tmp_path, capsys):
    missing = {"sources": [{"kind": "ham10000", "path": str(tmp_path / "nowhere")}],
               "dataset_dir": str(tmp_path / "ds")}
    assert main(["train", "--config", str(write_config(tmp_path, missing)), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "HAM10000_metadata.csv" in err
    assert main(["train", "--config", str(write_config(tmp_path, missing)), "--fold", "0",
                 "--set", "train.epochs=-1"]) == 2
    assert "train.epochs must be >= 1" in capsys.readouterr().err


def test_wrong_fold(ham_config, capsys):
    # (A dataset made at another image size is re-ingested or refused: tests/test_bad_input_data.py.)
    tmp, config = ham_config
    assert main(["train", "--config", str(config), "--fold", "2"]) == 2
    assert "fold must be in [0, 2)" in capsys.readouterr().err


@pytest.mark.integration
def test_horovodrun_two_ranks_score_the_whole_fold(ham_config, tmp_path):
    """`horovodrun -np 2 --gloo melanoma-dist train`: two real ranks, one set of outputs from rank 0."""
    tmp, config = ham_config
    horovodrun = Path(sys.executable).parent / "horovodrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = tmp_path / "hvd-out"
    cmd = [str(horovodrun), "-np", "2", "--gloo", "-H", "localhost:2", str(Path(sys.executable).parent / "melanoma-dist"),
           "train", "--config", str(config), "--fold", "0", "--set", f"output_dir={out}"]
    # Under horovodrun the dataset and folds must exist already: the module fixture's ingest made them.
    if not (tmp / "dataset" / "folds" / "k2-seed0.parquet").exists():
        pytest.skip("needs the dataset made by test_cli_train_one_fold_end_to_end")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "fold-0" / "metrics.json").read_text())
    folds = load_folds(tmp / "dataset", 2, 0)
    assert metrics["workers"] == 2 and metrics["num_samples"] == int((folds == 0).sum())
    with (out / "fold-0" / "predictions.csv").open() as f:
        ids = [r["image_id"] for r in csv.DictReader(f)]
    assert len(ids) == len(set(ids)) == int((folds == 0).sum())
    # The monitored metric is of the whole fold (both ranks' predictions), not a mean over ranks:
    # at the kept epoch it equals the metric of the gathered predictions.
    with (out / "fold-0" / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    kept = history[metrics["best_epoch"] - 1]
    assert float(kept["val_balanced_accuracy"]) == pytest.approx(metrics["balanced_accuracy"], abs=1e-9)
    assert float(kept["val_balanced_accuracy"]) == max(float(r["val_balanced_accuracy"]) for r in history)


def test_pretrained_backbone_freeze_then_unfreeze_resumes_at_the_phase_boundary(ham_subset, tmp_path):
    """Head-only epoch, then the head conv unfrozen; a rerun with more epochs resumes into phase 2."""
    from melanoma_dist.config import load_config
    from melanoma_dist import distributed as hk
    from melanoma_dist.model.build import backbone_of, build_model, set_backbone_trainable
    from melanoma_dist.train import checkpoint as ckpt
    from melanoma_dist.model.training_model import training_model
    from melanoma_dist.train.fold import compile_model

    data = {"sources": [{"kind": "ham10000", "path": str(ham_subset), "name": "ham"}],
            "dataset_dir": str(tmp_path / "dataset"), "label_scheme": "melanoma", "image_size": 32,
            "ingest_workers": 1}
    config = write_config(tmp_path, data,
                          model={"backbone": "efficientnet_lite0", "pretrained": True, "fine_tune_blocks": 1,
                                 "dense_units": 0},
                          train={"epochs": 1, "head_epochs": 1, "optimizer": "adamw", "weight_decay": 1e-4,
                                 "lr_schedule": "cosine", "learning_rate": 0.003})
    out = tmp_path / "out" / "fold-0"
    pretrained = build_model(load_config(config).model, 32, 2)

    def last_checkpoint(epochs: int):
        cfg = load_config(config, [f"train.epochs={epochs}"])
        model = build_model(cfg.model, 32, 2)
        trainer = training_model(model, cfg, seed=cfg.train.seed)  # the checkpoint holds what fit() trained
        set_backbone_trainable(trainer, cfg.model, ckpt.load_state(out / "resume")["phase"])
        compile_model(cfg, trainer, 2, cfg.train.learning_rate)
        hk.build_optimizer(trainer)
        trainer.load_weights(ckpt.last_weights(out / "resume"))
        return backbone_of(model)

    def same(a, b, layer):
        return all(np.array_equal(x, y) for x, y in zip(a.get_layer(layer).get_weights(),
                                                        b.get_layer(layer).get_weights()))

    assert main(["train", "--config", str(config), "--fold", "0"]) == 0
    assert ckpt.load_state(out / "resume")["phase"] == 0
    backbone = last_checkpoint(1)
    assert same(backbone, backbone_of(pretrained), "head_conv") and same(backbone, backbone_of(pretrained), "stem_conv")

    assert main(["train", "--config", str(config), "--fold", "0", "--set", "train.epochs=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs_run"] == 2
    assert ckpt.load_state(out / "resume")["phase"] == 1
    backbone = last_checkpoint(2)
    assert not same(backbone, backbone_of(pretrained), "head_conv")  # unfrozen in phase 2 ...
    assert same(backbone, backbone_of(pretrained), "stem_conv")  # ... the rest stays frozen,
    assert all(same(backbone, backbone_of(pretrained), layer.name)  # and so does every BatchNorm
               for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(0 <= float(r["val_roc_auc"]) <= 1 for r in rows)
    # The kept epoch is the best whole-fold ROC-AUC, and the fold's ROC-AUC is that epoch's.
    best = max(range(2), key=lambda e: float(rows[e]["val_roc_auc"]))
    assert metrics["best_epoch"] == best + 1
    assert metrics["roc_auc"] == pytest.approx(float(rows[best]["val_roc_auc"]), abs=1e-6)
