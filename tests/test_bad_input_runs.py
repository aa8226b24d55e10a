"""Bad input at the training stage: stale checkpoints and results, folds a metric cannot score (issue 10).

- Item 1: a checkpoint (or a finished fold) made on other data is never resumed (or skipped):
  it is keyed by the dataset's manifest.json and the fold's image assignment.
- Item 5: a fold whose validation set lacks a class is refused with a clear error, and the
  metrics never pass off a single-class validation set as a perfect (or silently undefined) score.

The end-to-end cases share one tiny trained run (24 generated 24 px images ingested at 16 px,
fold 0 trained for one epoch); a case that changes the run works on its own copy. The copy's
config names the same (absolute) image folder and relative dataset and output folders, so it
is the same configuration of the same source; the case that changes the source builds its own.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from melanoma_dist.data import folds as fold_io
from melanoma_dist.data import shards
from melanoma_dist.metrics import classification_metrics
from melanoma_dist.report.aggregate import aggregate_cv, format_table
from melanoma_dist.run_files import METRICS_FILE, PREDICTIONS_FILE, fold_dir
from tests.bad_input import assert_accepted, assert_clear_error, assert_unchanged, run_cli, snapshot
from tests.synthetic import write_class_folders

CONFIG = {
    "data": {"sources": [{"kind": "folder", "path": "images", "name": "synthetic", "label_type": "melanoma"}],
             "dataset_dir": "dataset", "label_scheme": "melanoma", "image_size": 16, "encoding": "png",
             "ingest_workers": 1},
    "folds": {"k": 2, "seed": 0},
    "pipeline": {"batch_size": 8, "shuffle_buffer": 32},
    "model": {"backbone": "simple_cnn", "filters": [4, 8], "convs_per_block": 1, "dense_units": 8, "dropout": 0.0},
    "train": {"epochs": 1, "learning_rate": 0.01, "warmup_epochs": 0, "verbose": 0},
    "output_dir": "out",
}
SOURCE = {"other": 18, "melanoma": 6}  # 24 images; 6 melanomas cannot fill 12 folds


def _make_run(root: Path) -> Path:
    """Generate the source, write config.yaml, ingest and train fold 0 in `root`."""
    from melanoma_dist.cli import main

    write_class_folders(root / "images", SOURCE)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["sources"][0]["path"] = str(root / "images")  # absolute: copies of the run share it
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["ingest", "--config", "config.yaml"]) == 0
        assert main(["train", "--config", "config.yaml", "--fold", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (config.yaml, images/, dataset/, out/fold-0/) with fold 0 trained; read-only."""
    return _make_run(tmp_path_factory.mktemp("trained"))


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("images"))
    return root


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained run, made the working directory."""
    root = _copy_run(trained, tmp_path)
    monkeypatch.chdir(root)
    return root


# ---------------------------------------------------------------- item 1: resume only on the same data

def _grow_source_and_reingest(root: Path) -> None:
    """The issue's case: 16 more images in the source, then `melanoma-dist ingest` again."""
    from melanoma_dist.cli import main

    extra = write_class_folders(root / "extra", {"other": 10, "melanoma": 6}, seed=1)
    for p in extra.rglob("*.png"):
        p.rename(root / "images" / p.parent.name / f"extra_{p.name}")
    assert main(["ingest", "--config", "config.yaml"]) == 0


def _move_one_image_between_folds(root: Path) -> None:
    """The same dataset with another fold assignment (as another melanoma-dist version might make)."""
    path = fold_io.folds_path(root / "dataset", 2, 0)
    table = pq.read_table(path)
    folds = table["fold"].to_numpy().copy()
    folds[np.flatnonzero(folds == 1)[0]] = 0
    pq.write_table(pa.table({"image_id": table["image_id"], "fold": pa.array(folds, pa.int32())}), path)


def _forget_fingerprint(root: Path) -> None:
    """A checkpoint written by a melanoma-dist that did not record the data it was made on."""
    state = root / "out" / "fold-0" / "resume" / "state.json"
    s = json.loads(state.read_text())
    s.pop("data_fingerprint")
    state.write_text(json.dumps(s))


RESUME_CASES = [
    # (own source (else a copy of the trained run), change, lines the log must have, lines it must not
    #  have, resumed_from_epoch)
    pytest.param(False, lambda root: None, ["fold 0: resuming after epoch 1"], ["not resuming"], 1,
                 id="unchanged-resumes"),
    pytest.param(True, _grow_source_and_reingest, ["not resuming", "dataset changed", "fold assignment changed"],
                 ["resuming after"], 0, id="source-grew-reingested-starts-fresh"),
    pytest.param(False, _move_one_image_between_folds, ["not resuming", "fold assignment changed"],
                 ["resuming after", "dataset changed"], 0, id="folds-changed-starts-fresh"),
    pytest.param(False, _forget_fingerprint, ["not resuming", "records no data fingerprint"], ["resuming after"], 0,
                 id="checkpoint-without-fingerprint-starts-fresh"),
]


@pytest.mark.parametrize("own_source,change,logged,not_logged,resumed_from", RESUME_CASES)
def test_train_resumes_only_a_checkpoint_of_the_same_data(trained: Path, tmp_path: Path, own_source: bool,
                                                          change: Callable[[Path], None], logged: list[str],
                                                          not_logged: list[str], resumed_from: int,
                                                          monkeypatch: pytest.MonkeyPatch, capsys, caplog) -> None:
    root = _make_run(tmp_path / "run") if own_source else _copy_run(trained, tmp_path)
    monkeypatch.chdir(root)
    change(root)
    caplog.set_level(logging.INFO, logger="melanoma_dist")
    caplog.clear()
    assert_accepted(run_cli(["train", "--config", "config.yaml", "--fold", "0"], capsys))
    for needle in logged:
        assert needle in caplog.text, f"{needle!r} not logged:\n{caplog.text}"
    for needle in not_logged:
        assert needle not in caplog.text, f"{needle!r} logged:\n{caplog.text}"
    metrics = json.loads((root / "out" / "fold-0" / METRICS_FILE).read_text())
    assert metrics["resumed_from_epoch"] == resumed_from
    # The result and the checkpoint now record the data they were made on.
    expected = fold_io.data_fingerprint("dataset", fold_io.load_folds("dataset", 2, 0), 0)
    state = json.loads((root / "out" / "fold-0" / "resume" / "state.json").read_text())
    assert metrics["data_fingerprint"] == state["data_fingerprint"] == expected
    if resumed_from == 0:  # a fresh fold also scores every image of the new validation fold
        assert metrics["num_samples"] == int((fold_io.load_folds("dataset", 2, 0) == 0).sum())


FP = {"dataset": "d" * 64, "folds": "f" * 64}
SKIP_CASES = [
    # (what fold 0's metrics.json records (None: no metrics.json), kept, re-run reason needle)
    pytest.param(None, False, None, id="unfinished-runs"),
    pytest.param({"data_fingerprint": FP}, True, None, id="same-data-skipped"),
    pytest.param({"data_fingerprint": dict(FP, dataset="e" * 64)}, False, "dataset changed",
                 id="dataset-changed-reruns"),
    pytest.param({"data_fingerprint": dict(FP, folds="0" * 64)}, False, "fold assignment changed",
                 id="folds-changed-reruns"),
    pytest.param({}, True, None, id="no-fingerprint-kept-with-warning"),
]


@pytest.mark.parametrize("recorded,kept,reason", SKIP_CASES)
def test_cv_skips_a_finished_fold_only_on_the_same_data(tmp_path: Path, recorded: dict | None, kept: bool,
                                                        reason: str | None, caplog) -> None:
    from melanoma_dist.schedule.cv import split_finished

    if recorded is not None:
        fold_dir(tmp_path, 0).mkdir()
        (fold_dir(tmp_path, 0) / METRICS_FILE).write_text(json.dumps(dict(recorded, fold=0)))
    before = snapshot(tmp_path)
    keep, rerun = split_finished(tmp_path, [0], {0: FP})
    assert keep == ([0] if kept else [])
    if reason is None:
        assert rerun == {}
    else:
        assert list(rerun) == [0] and reason in rerun[0]
    if recorded == {}:
        assert "records no data fingerprint" in caplog.text and "fold 0" in caplog.text
    assert_unchanged(before, tmp_path)  # deciding writes nothing


# ---------------------------------------------------------------- item 5: folds a metric cannot score

def _unchecked_folds(root: Path, k: int) -> tuple[pa.Table, np.ndarray]:
    """The dataset's index and the k folds StratifiedGroupKFold gives it (what make_folds would store)."""
    index = shards.read_columns(root / "dataset", fold_io.INDEX_COLUMNS)
    return index, fold_io.assign_folds(index["label"].to_numpy(), index["group"].to_pylist(),
                                       index["pixel_sha256"].to_pylist(), k, CONFIG["folds"]["seed"])


def _folds_without(root: Path, k: int, class_index: int) -> list[int]:
    """The folds of `_unchecked_folds` without an image of `class_index`."""
    index, folds = _unchecked_folds(root, k)
    labels = index["label"].to_numpy()
    return [f for f in range(k) if not (labels[folds == f] == class_index).any()]


def _write_unchecked_folds(root: Path, k: int) -> None:
    """A k-fold file as a melanoma-dist without the class check stored it."""
    index, folds = _unchecked_folds(root, k)
    path = fold_io.folds_path(root / "dataset", k, CONFIG["folds"]["seed"])
    path.parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image_id": index["image_id"], "fold": pa.array(folds, pa.int32())}), path)


FOLD_CASES = [
    # (prepare the run folder, command; FOLD stands for the first fold without melanoma)
    pytest.param(lambda root: None, ["folds", "--set", "folds.k=12"], id="folds-k12"),
    pytest.param(lambda root: None, ["train", "--fold", "FOLD", "--set", "folds.k=12"], id="train-k12"),
    pytest.param(lambda root: _write_unchecked_folds(root, 12), ["train", "--fold", "FOLD", "--set", "folds.k=12"],
                 id="train-on-an-old-unchecked-k12-folds-file"),
]


@pytest.mark.parametrize("prepare,argv", FOLD_CASES)
def test_a_fold_without_melanoma_is_refused(run_copy: Path, prepare: Callable[[Path], None], argv: list[str],
                                            capsys) -> None:
    empty = _folds_without(run_copy, 12, class_index=1)
    assert empty, "the case needs folds without melanoma"
    prepare(run_copy)
    before = snapshot(run_copy / "dataset", run_copy / "out")
    argv = [empty[0] if a == "FOLD" else a for a in argv]
    line = assert_clear_error(run_cli([*argv, "--config", "config.yaml"], capsys),
                              f"fold {empty[0]} ", "'melanoma'", "folds.k")
    assert "smaller folds.k" in line
    assert_unchanged(before, run_copy / "dataset", run_copy / "out")  # no folds file, the finished fold intact


def test_folds_report_every_class_per_fold(run_copy: Path, capsys) -> None:
    """`melanoma-dist folds` with enough melanomas: each fold's class counts are printed."""
    before = snapshot(run_copy / "out")
    outcome = run_cli(["folds", "--config", "config.yaml", "--set", "folds.k=3"], capsys)
    assert_accepted(outcome)
    lines = [ln for ln in outcome.out.splitlines() if ln.startswith("fold ")]
    assert len(lines) == 3 and all("other " in ln and "melanoma " in ln and "melanoma 0)" not in ln for ln in lines)
    assert_unchanged(before, run_copy / "out")


def _probs(pred: list[int], n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[pred] * 0.8 + 0.2 / n_classes


METRIC_CASES = [
    # (labels, predictions, class names, absent classes, balanced accuracy (None: undefined))
    pytest.param([0, 0, 0], [0, 0, 0], ["other", "melanoma"], ["melanoma"], None, id="binary-no-melanoma"),
    pytest.param([1, 1], [1, 0], ["other", "melanoma"], ["other"], None, id="binary-only-melanoma"),
    pytest.param([1, 1], [1, 1], ["a", "b", "c"], ["a", "c"], None, id="multiclass-one-class"),
    pytest.param([0, 0, 1, 1], [0, 0, 1, 0], ["a", "b", "c"], ["c"], 0.75, id="multiclass-one-absent-flagged"),
    pytest.param([0, 1, 1], [0, 1, 0], ["other", "melanoma"], [], 0.75, id="binary-both-classes"),
]


@pytest.mark.parametrize("y,pred,names,absent,balanced", METRIC_CASES)
def test_single_class_validation_is_never_a_perfect_score(y, pred, names, absent, balanced, caplog) -> None:
    m = classification_metrics(y, _probs(pred, len(names)), names)
    assert m["absent_classes"] == absent
    assert m["balanced_accuracy"] == (pytest.approx(balanced) if balanced is not None else None)
    for name in absent:
        assert m["per_class"][name]["recall"] is None and m["per_class"][name]["roc_auc"] is None
    if len(set(y)) == 1:
        assert m["roc_auc"] is None
    assert (f"no image of class {absent[0]!r}" in caplog.text) if absent else not caplog.text


def _write_fold(out: Path, fold: int, y: list[int], p1: list[float], **metrics) -> None:
    d = fold_dir(out, fold)
    d.mkdir(parents=True)
    probs = np.stack([1 - np.array(p1), np.array(p1)], 1)
    m = dict(classification_metrics(y, probs, ["other", "melanoma"]), fold=fold, **metrics)
    (d / METRICS_FILE).write_text(json.dumps(m))
    rows = ["image_id,group,label,label_name,pred,prob_other,prob_melanoma"]
    rows += [f"f{fold}-{i},g{fold}-{i},{t},x,{int(p > .5)},{1 - p:.6f},{p:.6f}" for i, (t, p) in enumerate(zip(y, p1))]
    (d / PREDICTIONS_FILE).write_text("\n".join(rows) + "\n")


def test_cv_aggregate_leaves_out_a_fold_without_melanoma(tmp_path: Path, caplog) -> None:
    """A finished fold of an older run with no melanoma (scored 1.0 then) stays out of mean ± sd, loudly."""
    _write_fold(tmp_path, 0, [0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])
    _write_fold(tmp_path, 1, [0, 1, 1, 0], [0.2, 0.8, 0.6, 0.3])
    _write_fold(tmp_path, 2, [0, 0, 0], [0.1, 0.2, 0.3], balanced_accuracy=1.0)  # as older versions wrote it
    summary = aggregate_cv(tmp_path, 3)
    assert summary["mean_std"]["balanced_accuracy"]["n"] == 2 and summary["mean_std"]["accuracy"]["n"] == 2
    assert summary["mean_std"]["balanced_accuracy"]["mean"] == pytest.approx(0.875)
    assert summary["folds_missing_classes"] == [{"fold": 2, "classes": ["melanoma"]}]
    assert summary["num_oof_predictions"] == 11  # its predictions still count in the pooled metrics
    assert "fold 2" in caplog.text and "melanoma" in caplog.text
    assert "fold 2 left out of mean±sd" in format_table(tmp_path, summary)
