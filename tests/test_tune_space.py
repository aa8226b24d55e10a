"""The `tune` config section and its search space (no Ray), and the outer split of an honest search."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from melanoma_dist.config import ConfigError, load_config
from melanoma_dist.data.folds import load_folds, make_folds
from melanoma_dist.data import shards
from melanoma_dist.tune.outer import held_out_ids, outer_training_dataset
from melanoma_dist.tune.space import Dimension, parse_space, trial_dict
from tests.synthetic import make_dataset

VALID_CASES = [
    ({"train.learning_rate": "loguniform(1e-4, 3e-3)"}, Dimension("train.learning_rate", "loguniform", (1e-4, 3e-3))),
    ({"pipeline.batch_size": "choice([32, 64])"}, Dimension("pipeline.batch_size", "choice", (32, 64))),
    ({"train.epochs": "grid([2, 4])"}, Dimension("train.epochs", "grid", (2, 4))),
    ({"train.epochs": "uniform(2, 6)"}, Dimension("train.epochs", "uniform", (2, 6), integer=True)),
    ({"model.dropout": "uniform(0, 0.5)"}, Dimension("model.dropout", "uniform", (0.0, 0.5))),
    ({"model.filters": "choice([[8, 16], [16, 32]])"}, Dimension("model.filters", "choice", ((8, 16), (16, 32)))),
    ({"model.backbone": "choice([simple_cnn, efficientnet_lite0])"},
     Dimension("model.backbone", "choice", ("simple_cnn", "efficientnet_lite0"))),
    ({"pipeline.augment.rotation": "uniform(0.0, 0.2)"}, Dimension("pipeline.augment.rotation", "uniform", (0.0, 0.2))),
]


@pytest.mark.parametrize("space,expected", VALID_CASES)
def test_parse_space(space, expected):
    assert parse_space(space) == [expected]


INVALID_CASES = [  # (overrides, message the error must contain)
    (["tune.space.train.lr=uniform(1, 2)"], "unknown config key 'train.lr'; valid keys: ["),
    (["tune.space.data.image_size=choice([64, 128])"], "the data section cannot be searched"),
    (["tune.space.train.learning_rate=normal(0, 1)"], "write one of ['loguniform(...)'"),
    (["tune.space.train.learning_rate=loguniform(0, 1e-3)"], "needs low > 0"),
    (["tune.space.train.learning_rate=uniform(1e-3, 1e-4)"], "needs low < high"),
    (["tune.space.train.learning_rate=uniform(-1, 1)"], "the value -1.0 gives an invalid config: train.learning_rate "
                                                        "must be > 0"),
    (["tune.space.model.dropout=choice([0.2, 1.5])"], "the value 1.5 gives an invalid config: model.dropout"),
    (["tune.space.model.backbone=uniform(0, 1)"], "needs a numeric key"),
    (["tune.space.train.epochs=uniform(1.5, 4)"], "give integer bounds"),
    (["tune.space.train.optimizer=choice([adam, sgd])"], "train.optimizer must be one of ['adam', 'adamw']"),
    (["tune.space.train.epochs=uniform(2, 6)", "tune.search_algorithm=grid", "tune.num_samples=1"],
     "cannot be enumerated by search_algorithm=grid"),
    (["tune.search_algorithm=grid"], "set tune.num_samples=1"),
    (["tune.space.train.epochs=grid([2, 4])", "tune.search_algorithm=tpe"], "grid() is not supported"),
    (["tune.metric=roc_auc", "data.label_scheme=ham7", "tune.space.train.epochs=grid([2])"],
     "tune.metric=roc_auc needs a two-class label scheme"),
    (["tune.space.train.epochs=grid([2, 8])", "tune.max_epochs=4"], "tune.max_epochs=4 is below the 8 epochs"),
    (["tune.metric=auc"], "tune.metric must be one of"),
    (["tune.outer_k=1"], "tune.outer_k must be >= 2"),
    (["tune.grace_period=0"], "tune.grace_period must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", INVALID_CASES)
def test_tune_section_rejects(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_tune_section_from_yaml_and_trial_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 3}\ntune:\n  space:\n    train.learning_rate: loguniform(1e-4, 3e-3)\n"
                    "    pipeline.batch_size: choice([32, 64])\n  num_samples: 4\n")
    cfg = load_config(path)
    assert list(cfg.tune.space) == ["train.learning_rate", "pipeline.batch_size"] and cfg.tune.num_samples == 4
    raw = trial_dict(cfg, {"train.learning_rate": 5e-4, "pipeline.batch_size": 32})
    assert "tune" not in raw and raw["train"]["learning_rate"] == 5e-4 and raw["pipeline"]["batch_size"] == 32
    assert raw["train"]["epochs"] == 3


def test_outer_training_part_never_holds_an_outer_validation_image(tmp_path):
    data = make_dataset(tmp_path, n_per_class={"other": 30, "melanoma": 18}, k=2)
    make_folds(data.dataset_dir, 3, seed=42)
    outer = load_folds(data.dataset_dir, 3, 42)
    all_ids = set(shards.read_columns(data.dataset_dir, ["image_id"])["image_id"].to_pylist())
    for o in range(3):
        inner_dir = outer_training_dataset(data.dataset_dir, outer, o, tmp_path / f"outer-{o}")
        held = held_out_ids(data.dataset_dir, outer, o)
        inner_ids = shards.read_columns(inner_dir, ["image_id"])["image_id"].to_pylist()
        assert held and not held & set(inner_ids)  # the search cannot read an outer-validation image
        assert held | set(inner_ids) == all_ids and len(inner_ids) == len(set(inner_ids))
        # Written a parent shard at a time: the same files as the kept rows written in one go.
        kept = shards.read_columns(data.dataset_dir, shards.COLUMNS).filter(pa.array(np.asarray(outer) != o))
        manifest = shards.load_manifest(inner_dir)
        names = shards.write_shards(kept.to_pylist(), tmp_path / f"rows-{o}", manifest["rows_per_shard"],
                                    manifest["shard_bytes"])
        assert names == manifest["shards"] and len(names) > 1
        assert all((inner_dir / n).read_bytes() == (tmp_path / f"rows-{o}" / n).read_bytes() for n in names)
        make_folds(inner_dir, 2, seed=42)  # the inner folds: only outer-training images, every one once
        assert len(load_folds(inner_dir, 2, 42)) == len(inner_ids)
        # Cut again from the same split: reused, not rewritten.
        before = (inner_dir / shards.MANIFEST).stat().st_mtime_ns
        outer_training_dataset(data.dataset_dir, outer, o, inner_dir)
        assert (inner_dir / shards.MANIFEST).stat().st_mtime_ns == before
