"""`melanoma-dist export`: the model directory, its model.json, and the errors of bad model dirs."""

import json
import shutil

import keras
import pytest

from melanoma_dist.cli import main
from melanoma_dist.inference.ensemble import MODEL_JSON, Ensemble, ModelDirError, read_model_json
from melanoma_dist.report.evidence import summarize
from melanoma_dist.report.result import CVResult

pytestmark = pytest.mark.integration


def test_model_dir_contents(exported_model, cv_result):
    spec = read_model_json(exported_model)
    assert spec["members"] == ["folds/fold-0.keras", "folds/fold-1.keras"]
    assert spec["class_names"] == ["other", "melanoma"] and spec["decision_index"] == 1
    assert spec["input"] == {**spec["input"], "image_size": 16, "resize": "crop", "encoding": "png", "channels": 3}
    assert spec["ensemble"]["tta"] == "none" and spec["near_duplicates"] == {"max_bits": 4, "min_correlation": 0.97}
    for name in ("model_card.md", "evidence.json", "run_manifest.json", "config.yaml"):
        assert (exported_model / name).is_file()
    # Members are inference models: the fold's optimizer state is left behind.
    member = exported_model / spec["members"][0]
    assert getattr(keras.models.load_model(member), "optimizer", None) is None
    assert member.stat().st_size < (cv_result.result_dir / "fold-0" / "model.keras").stat().st_size
    assert "Artifact: an ensemble of the 2 fold models" in (exported_model / "model_card.md").read_text()
    # The stored calibration is the one fitted on the run's out-of-fold predictions.
    ev = summarize(CVResult.load(cv_result.result_dir), n_boot=20, audit=False)
    assert spec["calibration"]["temperature"] == pytest.approx(ev["calibration"]["temperature"])
    assert spec["operating_point"]["threshold"] == pytest.approx(ev["operating_point"]["threshold"])
    assert spec["operating_point"]["oof_sensitivity"] >= 0.9
    prov = spec["provenance"]
    assert prov["dataset_dir"] == str(cv_result.data.dataset_dir) and len(prov["config_sha256"]) == 64


def test_export_cli_with_tta_and_refusals(cv_result, tmp_path):
    out = tmp_path / "m"
    assert main(["export", str(cv_result.result_dir), "--out", str(out), "--tta", "--target-sensitivity", "0.8",
                 "--n-boot", "20"]) == 0
    spec = json.loads((out / MODEL_JSON).read_text())
    assert spec["ensemble"]["tta"] == "flip" and spec["operating_point"]["target_sensitivity"] == 0.8
    assert main(["export", str(cv_result.result_dir), "--out", str(out), "--n-boot", "20"]) == 0  # replaced
    assert json.loads((out / MODEL_JSON).read_text())["ensemble"]["tta"] == "none"
    assert not list(tmp_path.glob(".m.*"))  # no leftovers of the swap
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(cv_result.result_dir), "--out", str(other), "--n-boot", "20"]) == 2
    assert (other / "notes.txt").read_text() == "keep me"


def _broken(exported_model, tmp_path, change):
    d = tmp_path / "broken"
    shutil.copytree(exported_model, d)
    change(d)
    return d


BAD_MODEL_DIRS = [
    ("no model.json", lambda d: (d / MODEL_JSON).unlink(), "has no model.json"),
    ("other format", lambda d: (d / MODEL_JSON).write_text('{"format": "x", "format_version": 1}'), "format 'x'"),
    ("missing member", lambda d: (d / "folds" / "fold-1.keras").unlink(), "lacks the member"),
    ("not json", lambda d: (d / MODEL_JSON).write_text("{"), "not valid JSON"),
]


@pytest.mark.parametrize("case, change, message", BAD_MODEL_DIRS, ids=[c[0] for c in BAD_MODEL_DIRS])
def test_bad_model_dirs(exported_model, tmp_path, case, change, message):
    with pytest.raises(ModelDirError, match=message):
        Ensemble.load(_broken(exported_model, tmp_path, change))


def test_cv_result_dir_is_not_a_model(cv_result):
    with pytest.raises(ModelDirError, match="a cv result directory is not a model"):
        Ensemble.load(cv_result.result_dir)
