"""`melanoma-dist evaluate` on tiny external sets, with duplicates of training images planted."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from melanoma_dist.cli import main
from melanoma_dist.config import DataConfig, SourceConfig
from melanoma_dist.data.ingest import ingest
from melanoma_dist.inference.evaluate import DatasetMismatchError, decision_labels, evaluate
from tests.synthetic import write_class_folders

pytestmark = pytest.mark.integration


def _ingest_folder(root, out, label_type="melanoma", size=16, encoding="png"):
    cfg = DataConfig(sources=(SourceConfig(kind="folder", path=str(root), name=root.name, label_type=label_type),),
                     dataset_dir=str(out), label_scheme=label_type, image_size=size, encoding=encoding,
                     rows_per_shard=8, ingest_workers=1)
    ingest(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def model_copy(exported_model, tmp_path_factory):
    """A private copy: evaluate writes its results and the card into the model directory."""
    d = tmp_path_factory.mktemp("eval") / "model"
    shutil.copytree(exported_model, d)
    return d


@pytest.fixture(scope="module", params=["png", "raw"])
def external(cv_result, tmp_path_factory, request):
    """14 new generated images, plus an exact and a near copy (4 grey levels brighter) of training images.

    Stored as PNG, like the training set, and as raw pixels: the same pixels, read by every reader
    of stored images (inference, the duplicate audit's thumbnails).

    (The generated images are pure noise, so a re-encoded copy would not stay near: its
    compression noise is as strong as their content. A brightness shift keeps the structure.)
    """
    tmp = tmp_path_factory.mktemp("external")
    root = write_class_folders(tmp / "ext", {"other": 8, "melanoma": 6}, seed=1)
    train = cv_result.images_dir
    shutil.copy(train / "melanoma" / "img_melanoma_001.png", root / "melanoma" / "copy_exact.png")
    px = np.asarray(Image.open(train / "other" / "img_other_002.png"), dtype=np.int16)
    Image.fromarray(np.clip(px + 4, 0, 255).astype(np.uint8)).save(root / "other" / "copy_near.png")
    return _ingest_folder(root, tmp / f"ext-ds-{request.param}", encoding=request.param)


def test_evaluate_reports_all_and_deduplicated(model_copy, external):
    ev = evaluate(model_copy, external, n_boot=200)
    audit = ev["audit_vs_training"]
    assert audit["available"] and audit["exact_duplicates"] == 1 and audit["near_duplicates"] == 1
    assert audit["flagged_image_ids"] == ["copy_exact", "copy_near"]
    all_, dedup = ev["metrics"]["all"], ev["metrics"]["deduplicated"]
    assert (all_["num_samples"], all_["num_positives"]) == (16, 7)
    assert (dedup["num_samples"], dedup["num_positives"]) == (14, 6)
    assert dedup["near_duplicates_removed"] is True and all_["near_duplicates_removed"] is False
    assert ev["headline"] == "deduplicated" and "2 of 16 test images" in ev["statement"]
    auc = dedup["roc_auc"]
    assert auc["low"] <= auc["estimate"] <= auc["high"]
    c = dedup["confusion_at_threshold"]
    assert dedup["sensitivity"]["estimate"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    assert ev["threshold"] == json.loads((model_copy / "model.json").read_text())["operating_point"]["threshold"]
    assert ev["metrics"]["classification_all"]["num_samples"] == 16  # same scheme: full metrics too
    assert ev["preprocessing_notes"] == []  # raw and png (the training set's) store the same pixels
    out = model_copy / "evaluations" / external.name
    assert (out / "evaluation.json").is_file() and (out / "roc.png").is_file()
    card = (model_copy / "model_card.md").read_text()
    assert f"### {external.name}" in card and "near-duplicates of training removed" in card


def test_evaluate_isic_subset_with_the_melanoma_scheme(model_copy, isic_subset, tmp_path, capsys):
    cfg = DataConfig(sources=(SourceConfig(kind="csv", path=str(isic_subset), name="isic2017",
                                           label_type="melanoma", label_column="melanoma"),),
                     dataset_dir=str(tmp_path / "isic"), label_scheme="melanoma", image_size=16, encoding="png",
                     ingest_workers=1)
    ingest(cfg, progress=False)
    assert main(["evaluate", str(model_copy), cfg.dataset_dir, "--out", str(tmp_path / "ev"),
                 "--n-boot", "100", "--tta", "dihedral"]) == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert ev["metrics"]["all"]["num_samples"] == 12 and ev["metrics"]["all"]["num_positives"] == 6
    assert ev["audit_vs_training"]["flagged"] == 0 and ev["tta"] == "dihedral"
    assert ev["data_sources"][0]["licence"].startswith("ISIC")
    assert "ROC-AUC" in capsys.readouterr().out


def test_evaluate_rejects_mismatched_sets(model_copy, tmp_path):
    root = write_class_folders(tmp_path / "mal", {"benign": 3, "malignant": 3}, seed=2)
    with pytest.raises(DatasetMismatchError, match="model decides melanoma"):
        evaluate(model_copy, _ingest_folder(root, tmp_path / "mal-ds", label_type="malignant"), n_boot=10)
    root = write_class_folders(tmp_path / "big", {"other": 3, "melanoma": 3}, seed=3)
    with pytest.raises(DatasetMismatchError, match="data.image_size=16"):
        evaluate(model_copy, _ingest_folder(root, tmp_path / "big-ds", size=20), n_boot=10)
    assert main(["evaluate", str(model_copy), str(tmp_path / "nothing")]) == 2


DECISION_CASES = [  # model scheme, data scheme, labels, expected (None: mismatch)
    ("melanoma", "melanoma", [0, 1, 1], [0, 1, 1]),
    ("ham7", "melanoma", [0, 1], [0, 1]),  # a 7-class model is scored by its mel probability
    ("melanoma", "ham7", [4, 5, 0], [1, 0, 0]),  # mel is class 4 of ham7
    ("malignant", "ham7", [0, 1, 2, 4, 5], [1, 1, 0, 1, 0]),  # akiec, bcc, mel are malignant
    ("malignant", "malignant", [1, 0], [1, 0]),
    ("melanoma", "malignant", [0, 1], None),
    ("malignant", "melanoma", [0, 1], None),
]


@pytest.mark.parametrize("model_scheme, data_scheme, labels, expected", DECISION_CASES)
def test_decision_labels(model_scheme, data_scheme, labels, expected):
    if expected is None:
        with pytest.raises(DatasetMismatchError):
            decision_labels(model_scheme, data_scheme, np.array(labels))
    else:
        assert decision_labels(model_scheme, data_scheme, np.array(labels)).tolist() == expected
