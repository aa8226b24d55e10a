"""`melanoma-dist predict` on a folder of good and bad files; preprocessing identical to ingest."""

import csv
import json
import shutil

import numpy as np
import pytest

from melanoma_dist.cli import main
from melanoma_dist.inference.ensemble import Ensemble
from melanoma_dist.inference.images import decode, load_file
from melanoma_dist.inference.predict import DISCLAIMER, predict_files
from melanoma_dist.report.audit import read_images_by_id

pytestmark = pytest.mark.integration


@pytest.fixture
def mixed_folder(tmp_path, real_jpeg, cv_result):
    d = tmp_path / "inbox"
    (d / "sub").mkdir(parents=True)
    shutil.copy(real_jpeg, d / "ham.jpg")
    shutil.copy(cv_result.images_dir / "melanoma" / "img_melanoma_000.png", d / "sub" / "synthetic.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_text("this is not an image\n")
    (d / ".hidden.jpg").write_bytes(b"")  # hidden files are skipped
    return d


EXPECTED = {"ham.jpg": "", "sub/synthetic.png": "", "empty.jpg": "empty file (0 bytes)",
            "notes.png": "not an image (unrecognised format)"}


def test_mixed_folder_scores_good_files_and_reports_bad_ones(exported_model, mixed_folder):
    model = Ensemble.load(exported_model)
    results = predict_files(model, [mixed_folder, mixed_folder / "missing.jpg"])
    by_name = {r.file.replace(str(mixed_folder) + "/", ""): r for r in results}
    assert set(by_name) == set(EXPECTED) | {"missing.jpg"}
    for name, error in EXPECTED.items():
        r = by_name[name]
        assert r.error == error and r.ok == (not error)
        if r.ok:
            assert sum(r.probabilities.values()) == pytest.approx(1.0)
            assert r.decision == (r.decision_probability >= model.threshold)
    assert by_name["missing.jpg"].error.startswith("cannot read file")


def test_cli_table_csv_json_and_exit_code(exported_model, mixed_folder, tmp_path, capsys):
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    rc = main(["predict", str(exported_model), str(mixed_folder), "--csv", str(out_csv), "--json", str(out_json)])
    assert rc == 1  # some files failed; the others were scored
    text = capsys.readouterr().out
    assert DISCLAIMER in text and "ERROR" in text and "2 file(s) scored, 2 error(s)" in text
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["ok"] for r in rows} == {"0", "1"}
    assert all(r["p_melanoma"] for r in rows if r["ok"] == "1")
    data = json.loads(out_json.read_text())
    assert data["disclaimer"] == DISCLAIMER and data["num_errors"] == 2 and data["num_files"] == 4
    assert data["threshold"] == pytest.approx(Ensemble.load(exported_model).threshold)


def test_file_preprocessing_equals_the_stored_training_image(exported_model, cv_result):
    """A training image read by predict gets exactly the pixels the model trained on."""
    model = Ensemble.load(exported_model)
    stored = read_images_by_id(cv_result.data.dataset_dir, ["img_other_003"])["img_other_003"]
    from_file = load_file(cv_result.images_dir / "other" / "img_other_003.png", model.spec["input"])
    np.testing.assert_array_equal(from_file, decode(stored, 16, model.spec["input"]["encoding"]))
    assert from_file.shape == (16, 16, 3) and from_file.dtype == np.float32 and from_file.max() <= 1.0
