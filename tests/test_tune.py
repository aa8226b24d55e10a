"""`melanoma-dist tune` on a real local Ray (2 CPUs) with real Horovod groups over Gloo, on tiny images.

One search (2 trials x 2 folds, ASHA, a held-out outer fold) checks the outputs, ASHA and the
placement; a second one is killed mid-run (its driver process) and resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from melanoma_dist.config import config_from_dict, load_config
from melanoma_dist.data import shards
from melanoma_dist.data.folds import load_folds
from melanoma_dist.tune.experiment import run_tune
from melanoma_dist.tune.outer import held_out_ids
from melanoma_dist.tune.results import read_trials
from tests.synthetic import make_dataset, tiny_run

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration
CPUS = 2


@pytest.fixture(scope="module")
def local_ray():
    # Workers inherit these: one thread pool each, so two workers fit 2 cores.
    os.environ.update(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tune"), n_per_class={"other": 30, "melanoma": 18}, k=2)


def tune_raw(data, out, tune, **train):
    return tiny_run(data, out, tune=tune, train={"epochs": 3, "warmup_epochs": 0, "early_stopping_patience": 5,
                                                 **train})


class PlacementSampler(threading.Thread):
    """Samples the CPUs held by placed placement groups and Ray's free CPUs while a search runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.held: list[float] = []
        self.free: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pgs = ray.util.placement_group_table().values()
            self.held.append(sum(b.get("CPU", 0.0) for pg in pgs if pg["state"] == "CREATED"
                                 for b in pg["bundles"].values()))
            self.free.append(ray.available_resources().get("CPU", 0.0))
            time.sleep(0.5)


def test_search_writes_table_and_best_config_asha_stops_the_bad_trial(local_ray, data, tmp_path):
    out = tmp_path / "run"
    # Trials one at a time in grid order: the good learning rate sets ASHA's bar, the bad one falls below it.
    cfg = config_from_dict(tune_raw(data, out, {
        "space": {"train.learning_rate": "grid([0.02, 10.0])"}, "search_algorithm": "grid", "num_samples": 1,
        "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1, "estimate": "holdout", "outer_k": 3}))
    sampler = PlacementSampler()
    sampler.start()
    try:
        summary = run_tune(cfg)
    finally:
        sampler.done.set()
        sampler.join()

    rows = {float(r["train.learning_rate"]): r for r in read_trials(out / "tune")}
    good, bad = rows[0.02], rows[10.0]
    assert good["state"] == "finished" and int(good["epochs"]) == 3 and int(good["folds_finished"]) == 2
    assert bad["state"] == "stopped early" and int(bad["epochs"]) < int(good["epochs"])
    assert float(good["oof"]) > 0.5 and "mean ± sd" in (out / "tune" / "trials.md").read_text()

    # The best config is a complete config that `cv` loads as it is, on the full dataset.
    best = load_config(out / "tune" / "best.yaml")
    assert best.train.learning_rate == 0.02 and best.data.dataset_dir == data.dataset_dir
    assert best.folds.k == 2 and best.tune.space == {}

    # Honest estimate: outer fold 0 was trained with the chosen config and scored, never searched on.
    assert summary["estimate"] == "holdout" and summary["outer_folds"][0]["outer_score"] is not None
    outer = load_folds(data.dataset_dir, 3, 42)
    held = held_out_ids(data.dataset_dir, outer, 0)
    searched = shards.read_columns(out / "tune" / "outer-0" / "dataset", ["image_id"])["image_id"].to_pylist()
    assert held and not held & set(searched)
    assert (out / "fold-0" / "metrics.json").is_file() and not (out / "fold-1").exists()

    # TensorBoard: fold curves (with the learning rate) and Tune's trial logs, all below output_dir.
    trial = good["trial_id"]
    assert list((out / "tune" / "trials" / trial / "fold-0" / "tensorboard" / "train").glob("events.out.tfevents*"))
    assert list((out / "tune" / "outer-0" / "experiment").rglob("events.out.tfevents*"))

    # Placement: never more CPUs held than the cluster has, and a trial did hold its two folds' CPUs.
    assert sampler.held and max(sampler.held) <= CPUS and min(sampler.free) >= 0
    assert CPUS in sampler.held
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) != CPUS and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == CPUS  # every trial's and fold's resources came back


def test_killed_search_resumes_without_retraining_finished_folds(local_ray, data, tmp_path):
    out = tmp_path / "run"
    raw = tune_raw(data, out, {"space": {"train.learning_rate": "grid([0.02])"}, "search_algorithm": "grid",
                               "num_samples": 1, "scheduler": "none", "folds_in_parallel": 1, "estimate": "none"},
                   epochs=2)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    driver = subprocess.Popen([sys.executable, "-m", "melanoma_dist", "tune", "--config", str(path), "--address",
                               local_ray], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    experiment = out / "tune" / "all" / "experiment"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (list((out / "tune" / "trials").glob("*/fold-0/metrics.json"))
                                               and list(experiment.glob("experiment_state*.json"))):
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.5)
        finished = list((out / "tune" / "trials").glob("*/fold-0/metrics.json"))
        assert finished, "fold 0 never finished"
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies mid-run: fold 1 is running or queued
        driver.wait()
    first = finished[0].stat().st_mtime_ns
    trial = finished[0].parents[1].name
    assert not (out / "tune" / "trials" / trial / "fold-1" / "metrics.json").exists()

    run_tune(config_from_dict(raw), resume=True)
    rows = read_trials(out / "tune")
    assert [(r["trial_id"], r["state"]) for r in rows] == [(trial, "finished")]  # restored, not a new trial
    assert finished[0].stat().st_mtime_ns == first  # fold 0 was not trained again
    assert (out / "tune" / "trials" / trial / "fold-1" / "metrics.json").is_file()
