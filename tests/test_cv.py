"""Cross-validation on a real (simulated two-node) Ray cluster with real Horovod groups over Gloo.

Each node has 2 logical CPUs and each fold needs 2 workers x 1 CPU, so Ray must
put the two folds on different nodes to run them at once.
"""

import csv
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from melanoma_dist.config import config_from_dict
from melanoma_dist.data.folds import load_folds
from melanoma_dist.data.pipeline import RowIndex
from melanoma_dist.schedule.cv import run_cv
from tests.synthetic import make_dataset, tiny_run

ray = pytest.importorskip("ray")
from tests.clusters import simulated_cluster  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(cpus_per_node=2) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    return make_dataset(tmp, n_per_class={"other": 30, "melanoma": 18}, k=2)


def cv_config(data, out, **train):
    return config_from_dict(tiny_run(data, out, train=train, distributed={"workers_per_fold": 2, "max_retries": 2}))


def _fold_metrics(out, fold):
    return json.loads((out / f"fold-{fold}" / "metrics.json").read_text())


def test_two_folds_on_two_nodes_aggregated(cluster, data, tmp_path):
    c, nodes = cluster
    out = tmp_path / "run"
    summary = run_cv(cv_config(data, out), address=c.address)

    per_fold = [_fold_metrics(out, f) for f in range(2)]
    assert all(m["workers"] == 2 for m in per_fold)
    # Resources force the folds apart: each fold's group filled one node.
    assert per_fold[0]["node_id"] != per_fold[1]["node_id"]
    assert {m["node_id"] for m in per_fold} <= {n.node_id for n in nodes}

    # The aggregate table holds exactly the per-fold values.
    with (out / "cv_folds.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row, m in zip(rows, per_fold):
        assert int(row["fold"]) == m["fold"]
        assert float(row["balanced_accuracy"]) == pytest.approx(m["balanced_accuracy"])
        assert float(row["roc_auc"]) == pytest.approx(m["roc_auc"])
    ms = summary["mean_std"]["balanced_accuracy"]
    values = [m["balanced_accuracy"] for m in per_fold]
    assert ms["mean"] == pytest.approx(np.mean(values)) and ms["std"] == pytest.approx(np.std(values, ddof=1))

    # Out-of-fold predictions cover every image exactly once, each in its own fold.
    image_ids = RowIndex.load(data.dataset_dir).image_ids.to_pylist()
    folds = dict(zip(image_ids, load_folds(data.dataset_dir, 2, 42)))
    with (out / "oof_predictions.csv").open() as f:
        oof = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in oof) == sorted(image_ids)
    assert all(int(r["fold"]) == folds[r["image_id"]] for r in oof)
    assert summary["pooled_oof"]["num_samples"] == len(image_ids) == 48
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["versions"]["horovod"] == "0.28.1" and len(manifest["data_manifest_sha256"]) == 64


def _kill_one_worker_when(condition, timeout=240):
    """SIGKILL one live Horovod worker process once `condition()` holds; return its pid."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            live = list_actors(filters=[("class_name", "=", "BaseHorovodWorker"), ("state", "=", "ALIVE")])
            if live:
                pid = live[-1].pid
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.2)
    raise AssertionError("the condition to kill a worker never held")


def test_killed_worker_is_retried_and_resumes(cluster, data, tmp_path):
    c, _ = cluster
    out = tmp_path / "run"
    cfg = cv_config(data, out, epochs=8, early_stopping_patience=8)
    state = out / "fold-0" / "resume" / "state.json"
    killer = threading.Thread(target=_kill_one_worker_when, args=(state.exists,), daemon=True)
    killer.start()
    run_cv(cfg, folds=[0], address=c.address)
    killer.join(timeout=5)
    m = _fold_metrics(out, 0)
    assert m["attempts"] == 2  # the first group died, the second finished
    assert m["resumed_from_epoch"] >= 1  # ...from the checkpoint, not from scratch
    assert m["num_samples"] == int((load_folds(data.dataset_dir, 2, 42) == 0).sum())


def test_rerun_skips_finished_folds(cluster, data, tmp_path):
    c, _ = cluster
    out = tmp_path / "run"
    cfg = cv_config(data, out, epochs=1)
    run_cv(cfg, folds=[0], address=c.address)  # an interrupted run: fold 1 never ran
    first = (out / "fold-0" / "metrics.json").stat().st_mtime_ns
    summary = run_cv(cfg, address=c.address)
    assert (out / "fold-0" / "metrics.json").stat().st_mtime_ns == first  # not retrained
    assert summary["folds_finished"] == [0, 1] and summary["folds_missing"] == []
