"""`melanoma-dist report` on a tiny real cross-validation result, and result-directory errors."""

import json
import re
import shutil

import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma_dist.cli import main
from melanoma_dist.report.build import write_report
from melanoma_dist.report.result import CVResult, ResultError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(cv_result, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    rc = main(["report", str(cv_result.result_dir), "--out", str(out), "--n-boot", "200"])
    assert rc == 0
    return out


def test_html_references_existing_images_and_nothing_remote(report):
    page = (report / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert {"figures/roc.png", "figures/pr.png", "figures/confusion.png", "figures/reliability.png",
            "figures/learning_curves.png", "figures/class_distribution.png"} <= set(srcs)
    for src in srcs:
        assert (report / src).is_file() and (report / src).read_bytes()[:4] == b"\x89PNG"
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Not a medical device" in page and "Leakage audit" in page and "Run manifest" in page


def test_json_holds_every_fold_and_matches_the_predictions(report, cv_result):
    ev = json.loads((report / "report.json").read_text())
    assert [f["fold"] for f in ev["folds"]] == [0, 1] and ev["folds_missing"] == []
    assert sum(f["num_samples"] for f in ev["folds"]) == 50
    assert all(sum(f["class_counts"].values()) == f["num_samples"] for f in ev["folds"])
    assert set(ev["mean_std"]["balanced_accuracy"]) == {"mean", "std", "n"}
    result = CVResult.load(cv_result.result_dir)
    y = result.oof_labels == 1
    auc = ev["pooled"]["ci"]["decision_roc_auc"]
    # A binary model's temperature keeps the ranking: the AUC is the plain out-of-fold AUC.
    assert auc["estimate"] == pytest.approx(skm.roc_auc_score(y, result.oof_probs[:, 1]), abs=1e-9)
    assert auc["low"] <= auc["estimate"] <= auc["high"] and auc["n_boot"] == 200
    summary = json.loads((cv_result.result_dir / "cv_summary.json").read_text())
    assert ev["pooled"]["accuracy"] == pytest.approx(summary["pooled_oof"]["accuracy"])
    op = ev["operating_point"]
    assert op["sensitivity"] >= op["target_sensitivity"] == 0.9
    assert ev["calibration"]["temperature"] > 0 and "ece" in ev["calibration"]["after"]
    assert ev["audit"]["available"] and ev["audit"]["clean"] is True and ev["audit"]["num_images"] == 50
    pv = ev["provenance"]
    assert len(pv["data_manifest_sha256"]) == 64 and pv["seeds"] == {"folds": 42, "train": 1234}
    assert set(pv["fold_wall_time_s"]) == {"0", "1"} and pv["versions"]["keras"]


def test_model_card_written(report):
    card = (report / "model_card.md").read_text()
    for heading in ("## Training data", "## Splits and leakage handling", "## Cross-validation metrics",
                    "## External evaluation", "## Intended use and limits"):
        assert heading in card
    assert "95% CI" in card and "Not a medical device" in card


def test_unfinished_and_missing_results(cv_result, tmp_path):
    with pytest.raises(ResultError, match="does not exist"):
        CVResult.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ResultError, match="not a `melanoma-dist cv` result"):
        CVResult.load(empty)
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(cv_result.result_dir / "config.yaml", started / "config.yaml")
    with pytest.raises(ResultError, match="no finished fold"):
        CVResult.load(started)
    assert main(["report", str(started)]) == 2  # a clear error on the terminal, exit code 2

    # One fold of two finished: the report renders and says so; export refuses.
    partial = tmp_path / "partial"
    shutil.copytree(cv_result.result_dir, partial, ignore=shutil.ignore_patterns("model.keras", "resume"))
    (partial / "fold-1" / "metrics.json").unlink()
    paths = write_report(partial, n_boot=50)
    ev = json.loads(paths["json"].read_text())
    assert ev["folds_missing"] == [1] and [f["fold"] for f in ev["folds"]] == [0]
    assert "have not finished" in paths["html"].read_text()
    assert paths["model_card"] == partial / "model_card.md"
    from melanoma_dist.inference.export import export_model

    with pytest.raises(ResultError, match="have not finished"):
        export_model(partial, tmp_path / "model")
    np.testing.assert_array_equal(CVResult.load(partial).oof_fold, 0)
