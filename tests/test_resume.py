"""A killed worker costs at most one epoch and never changes the result (issue 11).

- Early stopping resumed after epoch k keeps an earlier best epoch j < k (item 4).
- A fold killed after training but before `metrics.json` scores its best epoch again,
  and a fold that had stopped early trains no further (item 5).
- Rank 0 alone decides where to resume, and every rank resumes there with its weights,
  even when another rank sees a stale checkpoint (item 6; 2 real Gloo ranks).
- The checkpoint is committed by one rename and checksummed: a crash mid-commit keeps the
  previous epoch whole; a partial or corrupt checkpoint starts the fold afresh (item 7).
- Resuming with another number of workers rescales the learning rate (item 8).

The fold cases share one tiny trained run (tests/test_bad_input_runs.py's, for 3 epochs);
a case that changes it works on its own copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

hvd = pytest.importorskip("horovod.tensorflow", reason="Horovod is not installed")
import horovod  # noqa: E402
import keras  # noqa: E402

from melanoma_dist import distributed as hk  # noqa: E402
from melanoma_dist.config import config_from_dict  # noqa: E402
from melanoma_dist.run_files import METRICS_FILE, PREDICTIONS_FILE, fold_dir  # noqa: E402
from melanoma_dist.train import checkpoint as ckpt  # noqa: E402
from tests import hvd_workers  # noqa: E402
from tests.test_bad_input_runs import _copy_run, _make_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = {"dataset": "d" * 64, "folds": "f" * 64}
RAW_CONFIG = {"data": {"sources": [{"kind": "folder", "path": "/images", "name": "s", "label_type": "melanoma"}],
                       "dataset_dir": "/dataset"}, "output_dir": "/out"}
BASE_LR = 0.01
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def world() -> hk.WorkerContext:
    """This process as a Horovod world of size 1."""
    return hk.init_worker(use_gpu=False)


def _compiled(seed: int = 0) -> keras.Model:
    model = hvd_workers.tiny_cnn(seed)
    model.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(BASE_LR)), loss="mse", jit_compile=False)
    return model


class Scripted(keras.callbacks.Callback):
    """Puts a scripted `val_score` of every epoch into the logs (before the callbacks that read it)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs["val_score"] = self.values[epoch]


def _fit(model: keras.Model, resume_dir: Path, values: list[float], mode: str, initial_epoch: int, epochs: int,
         resume: ckpt.Resume | None = None) -> ckpt.ResumableEarlyStopping:
    """Fit epochs [initial_epoch, epochs) of the tiny net, checkpointing every epoch as a fold does."""
    x, y = hvd_workers.data()
    es = ckpt.ResumableEarlyStopping(state=resume.early_stopping if resume else None,
                                     best_weights=resume.best_weights if resume else None,
                                     monitor="val_score", mode=mode, patience=10, restore_best_weights=True)
    model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=[Scripted(values), es,
                         ckpt.FoldCheckpoint(resume_dir, es, None, ckpt.resume_key(_config()), FINGERPRINT)])
    return es


def _config(**sections: Any):
    raw = json.loads(json.dumps(RAW_CONFIG))
    raw.update(sections)
    return config_from_dict(raw)


def _resume(resume_dir: Path) -> ckpt.Resume | None:
    return ckpt.resume_fold(_config(), 0, FINGERPRINT, resume_dir, is_chief=True)


def _assert_same_weights(a: list, b: list) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- item 4: early stopping resumes its best

ES_CASES = [
    # (mode, monitored value per epoch: the best is epoch 1, epochs 2 and 3 are worse)
    pytest.param("max", [0.5, 0.9, 0.7, 0.6], id="max"),
    pytest.param("min", [0.5, 0.1, 0.3, 0.4], id="min"),
    pytest.param("max", [0.5, 0.9, 0.9, 0.9], id="max-ties-are-no-improvement"),
]


@pytest.mark.parametrize("mode,values", ES_CASES)
def test_resumed_early_stopping_keeps_the_earlier_best(world, tmp_path: Path, mode: str, values: list[float]) -> None:
    """Resume after epoch 3 (best: epoch 2), a worse epoch 4: the best stays epoch 2, as without the stop."""
    through = _compiled()
    es_through = _fit(through, tmp_path / "through", values, mode, 0, 4)

    model = _compiled()
    _fit(model, tmp_path / "resumed", values, mode, 0, 3)
    best_at_stop = ckpt.load_best_weights(tmp_path / "resumed" / ckpt.load_state(tmp_path / "resumed")["files"]["best"])
    resume = _resume(tmp_path / "resumed")
    assert resume is not None and resume.epoch == 3 and resume.early_stopping["best_epoch"] == 1
    resumed = _compiled(seed=1)  # a fresh process: other initial weights, overwritten by the checkpoint
    ckpt.restore_model(resumed, resume, workers=1)
    es = _fit(resumed, tmp_path / "resumed", values, mode, 3, 4, resume)

    assert es.best_epoch == es_through.best_epoch == 1
    assert es.state() == es_through.state()
    _assert_same_weights(es.best_weights, best_at_stop)
    _assert_same_weights(es.best_weights, es_through.best_weights)
    state = ckpt.load_state(tmp_path / "resumed")
    assert state["epoch"] == 4 and state["files"]["best"] == "best-0002.npz"  # the best file was not overwritten
    _assert_same_weights(ckpt.load_best_weights(tmp_path / "resumed" / "best-0002.npz"), best_at_stop)


# ---------------------------------------------------------------- item 7: one atomic, checksummed unit

def test_a_crash_mid_commit_keeps_the_previous_epoch_whole(world, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = _compiled()
    _fit(model, tmp_path, [0.5, 0.9], "max", 0, 1)
    after_epoch_1 = model.get_weights()
    real_replace = os.replace

    class Killed(Exception):
        pass

    def crash_at_commit(src: Any, dst: Any) -> None:  # the process dies as it commits epoch 2
        if Path(dst).name == ckpt.STATE:
            raise Killed()
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_at_commit)
    with pytest.raises(Killed):
        _fit(model, tmp_path, [0.5, 0.9], "max", 1, 2)
    monkeypatch.undo()
    assert (tmp_path / "last-0002.weights.h5").is_file()  # the new epoch's files were written, not committed
    resume = _resume(tmp_path)
    assert resume.epoch == 1
    restored = _compiled(seed=1)
    ckpt.restore_model(restored, resume, workers=1)
    _assert_same_weights(restored.get_weights(), after_epoch_1)  # weights and state of the same epoch


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _named(role: str) -> Callable[[Path], Path]:
    return lambda d: d / ckpt.load_state(d)["files"][role]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _uncommitted_first_epoch(d: Path) -> None:
    """What a process killed while writing its first checkpoint leaves: weight files, no state.json."""
    (d / ckpt.STATE).unlink()
    (d / "tmp-state.json").write_text('{"epoch": 1, "pha')


CORRUPT_CASES = [
    # (damage to the fold's resume/ folder, reason logged)
    pytest.param(lambda d: _truncate(_named("last")(d)), "does not match the sha256", id="truncated-weights"),
    pytest.param(lambda d: _flip_byte(_named("best")(d)), "does not match the sha256", id="checksum-mismatch"),
    pytest.param(lambda d: _named("last")(d).unlink(), "is missing", id="weights-file-missing"),
    pytest.param(lambda d: _truncate(d / ckpt.STATE), "unreadable", id="truncated-state"),
    pytest.param(_uncommitted_first_epoch, "no committed state.json", id="leftover-temp-files-only"),
]


# ---------------------------------------------------------------- fold runs (items 5 and 7)

EPOCHS = "train.epochs=3"


def _train(root: Path, *overrides: str) -> dict:
    """`melanoma-dist train --fold 0` in `root` (relative paths: copies of the run are the same config)."""
    from melanoma_dist.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["train", "--config", "config.yaml", "--fold", "0",
                     *[a for o in overrides for a in ("--set", o)]]) == 0
    return json.loads((fold_dir(root / "out", 0) / METRICS_FILE).read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bad-input tests' run (24 generated images at 16 px) with fold 0 trained for 3 epochs; read-only."""
    root = _make_run(tmp_path_factory.mktemp("resume-run"))
    _train(root, EPOCHS)
    return root


VOLATILE = ("wall_time_s", "resumed_from_epoch")  # metrics a rerun may change


@pytest.mark.parametrize("patience", [pytest.param(10, id="all-epochs-run"), pytest.param(1, id="stopped-early")])
def test_a_fold_killed_before_metrics_json_scores_its_best_epoch_again(trained: Path, tmp_path: Path,
                                                                        patience: int) -> None:
    """Crash between the end of fit and metrics.json: the rerun trains no epoch and gives the same result."""
    root = _copy_run(trained, tmp_path)
    shutil.rmtree(root / "out")  # a run of its own: the patience is part of the config
    out = fold_dir(root / "out", 0)
    first = _train(root, f"train.early_stopping_patience={patience}", "train.epochs=4")
    predictions, history = (out / PREDICTIONS_FILE).read_text(), (out / "history.csv").read_text()
    assert first["best_epoch"] < first["epochs_run"]  # the best epoch is not the last one
    if patience == 1:  # ROC-AUC 1.0 (the classes differ in brightness) cannot improve: it stops
        assert first["epochs_run"] < 4
    (out / METRICS_FILE).unlink()  # the crash: resume/ says training is done, there is no result

    again = _train(root, f"train.early_stopping_patience={patience}", "train.epochs=4")
    assert again["resumed_from_epoch"] == first["epochs_run"]
    assert {k: v for k, v in again.items() if k not in VOLATILE} == {k: v for k, v in first.items()
                                                                    if k not in VOLATILE}
    assert (out / PREDICTIONS_FILE).read_text() == predictions  # the best epoch's weights, not the last ones
    assert (out / "history.csv").read_text() == history  # no epoch trained again, none added


@pytest.mark.parametrize("damage,reason", CORRUPT_CASES)
def test_a_corrupt_checkpoint_starts_the_fold_afresh(trained: Path, tmp_path: Path, damage: Callable[[Path], None],
                                                     reason: str, caplog) -> None:
    root = _copy_run(trained, tmp_path)
    resume_dir = fold_dir(root / "out", 0) / "resume"
    (fold_dir(root / "out", 0) / METRICS_FILE).unlink()
    damage(resume_dir)
    caplog.set_level(logging.INFO, logger="melanoma_dist")
    metrics = _train(root, EPOCHS)  # no crash, and no crash loop: the rerun commits a good checkpoint
    assert metrics["resumed_from_epoch"] == 0 and metrics["epochs_run"] == 3
    assert "not resuming the checkpoint" in caplog.text and reason in caplog.text, caplog.text
    assert "starting the fold afresh" in caplog.text
    assert ckpt.load_state(resume_dir)["epoch"] == 3
    assert sorted(p.name for p in resume_dir.iterdir()) == sorted(
        [ckpt.STATE, *ckpt.load_state(resume_dir)["files"].values()])  # the damaged files are gone


def test_leftover_files_beside_a_good_checkpoint_resume_it(trained: Path, tmp_path: Path) -> None:
    root = _copy_run(trained, tmp_path)
    resume_dir = fold_dir(root / "out", 0) / "resume"
    (resume_dir / "tmp-last-0004.weights.h5").write_bytes(b"cut short")
    (resume_dir / "best-0004.npz").write_bytes(b"never committed")
    metrics = _train(root, "train.epochs=4")
    assert metrics["resumed_from_epoch"] == 3 and metrics["epochs_run"] == 4


# ---------------------------------------------------------------- items 6 and 8: two real ranks

def _two_rank_body(dirs: list[str]) -> dict[str, Any]:
    """One rank of the 2-rank job: resume from its own view of storage, then a checkpointed 2-rank fit."""
    ctx = hk.init_worker(use_gpu=False)
    cfg = _config()
    # 1. Only rank 0's folder holds the current checkpoint; rank 1 sees a stale one.
    model = _compiled(seed=100 + ctx.rank)
    resume = ckpt.resume_fold(cfg, 0, FINGERPRINT, Path(dirs[ctx.rank]), ctx.is_chief)
    ckpt.restore_model(model, resume, ctx.size)
    out = {"rank": ctx.rank, "epoch": resume.epoch, "weights": model.get_weights(),
           "optimizer": [np.asarray(v.numpy()) for v in model.optimizer.variables],
           "best": resume.best_weights, "lr": float(model.optimizer.learning_rate.numpy())}
    # 2. A 2-rank epoch that rank 0 checkpoints: the learning rate is scaled by 2 workers.
    x, y = hvd_workers.data()
    model = _compiled()
    hk.broadcast_model(model)
    es = ckpt.ResumableEarlyStopping(monitor="loss", mode="min", patience=5, restore_best_weights=True)
    callbacks = [hk.MetricAverageCallback(), hk.WarmupScaledLR(BASE_LR, 0, size=ctx.size, steps_per_epoch=4), es]
    if ctx.is_chief:
        callbacks.append(ckpt.FoldCheckpoint(dirs[2], es, None, ckpt.resume_key(cfg), FINGERPRINT,
                                             workers=ctx.size))
    model.fit(hvd_workers.shard(x, ctx.rank, ctx.size), hvd_workers.shard(y, ctx.rank, ctx.size),
              batch_size=hvd_workers.GLOBAL_BATCH // ctx.size, epochs=1, shuffle=False, verbose=0,
              callbacks=callbacks)
    out["fit_lr"] = float(model.optimizer.learning_rate.numpy())
    hk.shutdown()
    return out


@pytest.fixture(scope="module")
def two_ranks(world, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Results of `_two_rank_body` on 2 Gloo ranks, and the folders: current, stale, written by the job."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    dirs = {"current": tmp / "rank0-resume", "stale": tmp / "rank1-resume", "job": tmp / "job-resume"}
    model = _compiled()
    _fit(model, dirs["current"], [0.5, 0.9, 0.7], "max", 0, 1)
    shutil.copytree(dirs["current"], dirs["stale"])  # rank 1's storage stops here
    _fit(model, dirs["current"], [0.5, 0.9, 0.7], "max", 1, 3)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in WORKER_ENV.items():
            mp.setenv(key, value)
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        results = horovod.run(_two_rank_body, args=([str(dirs[k]) for k in ("current", "stale", "job")],),
                              np=2, use_gloo=True, start_timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    return results, dirs


@pytest.mark.integration
def test_rank_0_decides_where_every_rank_resumes(two_ranks) -> None:
    (r0, r1), dirs = two_ranks
    assert ckpt.load_state(dirs["stale"])["epoch"] == 1  # what rank 1 alone would have resumed
    assert r0["epoch"] == r1["epoch"] == 3
    _assert_same_weights(r0["weights"], r1["weights"])
    _assert_same_weights(r0["optimizer"], r1["optimizer"])
    _assert_same_weights(r0["best"], r1["best"])
    restored = _compiled()  # the checkpoint rank 0 read, restored here
    ckpt.restore_model(restored, _resume(dirs["current"]), workers=1)
    _assert_same_weights(r0["weights"], restored.get_weights())
    assert int(r1["optimizer"][0]) == 3 * hvd_workers.STEPS  # the optimizer's step count of epoch 3


@pytest.mark.integration
def test_resuming_with_other_workers_rescales_the_learning_rate(two_ranks) -> None:
    (r0, _), dirs = two_ranks
    assert r0["fit_lr"] == pytest.approx(2 * BASE_LR)  # scaled by the 2 workers that wrote the checkpoint
    resume = _resume(dirs["job"])
    assert resume.workers == 2
    model = _compiled()
    ckpt.restore_model(model, resume, workers=1)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(BASE_LR)


@pytest.mark.parametrize("restored,recorded,workers,expected", [
    pytest.param(2 * BASE_LR, 2, 2, 2 * BASE_LR, id="same-workers-unchanged"),
    pytest.param(2 * BASE_LR, 2, 4, 4 * BASE_LR, id="more-workers"),
    pytest.param(0.5 * 4 * BASE_LR, 4, 1, 0.5 * BASE_LR, id="plateau-reduction-kept"),
])
def test_rescale_learning_rate(restored: float, recorded: int, workers: int, expected: float) -> None:
    optimizer = keras.optimizers.Adam(restored)
    ckpt.rescale_learning_rate(optimizer, recorded, workers)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(expected)


def test_resume_key_follows_the_training_settings_not_new_defaults() -> None:
    base = config_from_dict({"train": {"epochs": 3, "learning_rate": 0.01}})
    # More epochs, other workers or search settings resume the same checkpoint; another learning rate does not.
    assert ckpt.resume_key(base) == ckpt.resume_key(config_from_dict(
        {"train": {"epochs": 9, "learning_rate": 0.01}, "distributed": {"workers_per_fold": 4}}))
    assert ckpt.resume_key(base) != ckpt.resume_key(config_from_dict({"train": {"epochs": 3, "learning_rate": 0.02}}))
    # A setting a newer version adds at its default is not in the key: the old key still matches.
    assert ckpt._non_default({"train": {"lr": 0.01, "added": "x"}, "new": {"k": 1}},
                             {"train": {"lr": 0.002, "added": "x"}, "new": {"k": 1}}) == {"train": {"lr": 0.01}}
