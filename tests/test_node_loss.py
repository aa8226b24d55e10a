"""A node lost mid-fold: the fold is placed again on the surviving node and resumes.

A simulated cluster of two 1-CPU nodes runs a 2-fold cross-validation of one
worker per fold, so each fold has a node. Once fold 0 has checkpointed an epoch,
its node is removed (its raylet and workers die, as when a machine goes away).
Fold 0 must then wait for the surviving node, resume there from its checkpoint,
and the aggregate must hold both folds with every image exactly once.
"""

import csv
import json
import threading
import time

import pytest

from melanoma_dist.config import config_from_dict
from melanoma_dist.data.folds import load_folds
from melanoma_dist.data.pipeline import RowIndex
from melanoma_dist.schedule.cv import run_cv
from tests.synthetic import make_dataset

ray = pytest.importorskip("ray")
from tests.clusters import simulated_cluster  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster():
    with simulated_cluster(cpus_per_node=1) as c:
        yield c


def _remove_node_of_fold_0(c, nodes, state_file, removed, timeout=300):
    """Remove the node that runs fold 0's first attempt once it has checkpointed an epoch."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state_file.exists() and ray.is_initialized():
            pgs = [pg for pg in ray.util.placement_group_table().values()
                   if pg["name"] == "melanoma-dist-fold-0-attempt-1" and pg["state"] == "CREATED"]
            if pgs:
                node_id = pgs[0]["bundles_to_node_id"][0]
                node = next(n for n in nodes if n.node_id == node_id)
                c.remove_node(node)
                removed.append(node_id)
                return
        time.sleep(0.1)


def test_lost_node_fold_resumes_on_the_survivor(cluster, tmp_path):
    c, nodes = cluster
    data = make_dataset(tmp_path, n_per_class={"other": 24, "melanoma": 16}, image_size=16, k=2)
    out = tmp_path / "run"
    cfg = config_from_dict({
        "data": {"dataset_dir": data.dataset_dir, "image_size": 16, "label_scheme": "melanoma"},
        "folds": {"k": 2, "seed": 42},
        "pipeline": {"batch_size": 4, "shuffle_buffer": 32},
        "model": {"backbone": "simple_cnn", "filters": [4, 8], "convs_per_block": 1, "dense_units": 8,
                  "dropout": 0.0},
        "train": {"epochs": 12, "learning_rate": 0.01, "warmup_epochs": 1, "early_stopping_patience": 12,
                  "verbose": 0},
        "distributed": {"workers_per_fold": 1, "cpus_per_worker": 1, "max_retries": 2},
        "output_dir": str(out),
    })
    removed: list[str] = []
    killer = threading.Thread(target=_remove_node_of_fold_0,
                              args=(c, nodes, out / "fold-0" / "resume" / "state.json", removed), daemon=True)
    killer.start()
    summary = run_cv(cfg, address=c.address)
    killer.join(timeout=5)

    assert len(removed) == 1, "fold 0's node was never removed"
    survivor = next(n.node_id for n in nodes if n.node_id != removed[0])
    m = json.loads((out / "fold-0" / "metrics.json").read_text())
    assert m["attempts"] == 2 and m["node_id"] == survivor  # placed again, on the node that is left
    assert m["resumed_from_epoch"] >= 1  # ...from its checkpoint, not from scratch
    assert summary["folds_finished"] == [0, 1] and summary["folds_missing"] == []

    image_ids = RowIndex.load(data.dataset_dir).image_ids.to_pylist()
    folds = dict(zip(image_ids, load_folds(data.dataset_dir, 2, 42)))
    with (out / "oof_predictions.csv").open() as f:
        oof = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in oof) == sorted(image_ids)  # every image exactly once
    assert all(int(r["fold"]) == folds[r["image_id"]] for r in oof)
