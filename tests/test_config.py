"""Config loading, overrides and validation."""

import pytest

from melanoma_dist.config import Config, ConfigError, config_from_dict, load_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quick-cpu.yaml", "full.yaml", "pretrained-cpu.yaml", "pretrained-gpu.yaml",
                                  "ham7-cpu.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.sources and cfg.data.sources[0].kind == "ham10000"
    # YAML round trip gives the same config.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.epochs=3", "data.label_scheme=ham7", "model.filters=[8, 16]",
                             "pipeline.augment.horizontal_flip=false", "train.learning_rate=1e-2"])
    assert cfg.train.epochs == 3 and cfg.data.label_scheme == "ham7"
    assert cfg.model.filters == (8, 16) and cfg.pipeline.augment.horizontal_flip is False
    assert cfg.train.learning_rate == pytest.approx(0.01)
    assert Config().train.epochs == 30


def test_override_list_item(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - {kind: ham10000, path: /a}\n")
    cfg = load_config(path, ["data.sources.0.path=/b", "data.sources.0.name=ham"])
    assert cfg.data.sources[0].path == "/b" and cfg.data.sources[0].display_name == "ham"


INVALID_CASES = [
    (["train.epochz=3"], "unknown config key train.epochz; valid keys of train"),
    (["nope.x=1"], "unknown config key nope"),
    (["data.label_scheme=cats"], "data.label_scheme must be one of ['ham7', 'melanoma', 'malignant'], got 'cats'"),
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["train.epochs=three"], "train.epochs must be an integer, got 'three'"),
    (["model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
    (["train.mixed_precision=maybe"], "train.mixed_precision must be one of ['none', 'bf16', 'fp16'"),
    (["data.sources=[{kind: zip, path: x}]"], "data.sources[0].kind must be one of"),
    (["data.sources=[{kind: csv}]"], "missing 1 required positional argument: 'path'"),
    (["data.sources=[{kind: folder, path: x, splits: [train]}]"], "splits is only for kind 'csv'"),
    (["train.epochs"], "must look like section.key=value"),
    (["data.sources.3.path=x"], "index '3' out of range"),
    (["train.learning_rate=.inf"], "train.learning_rate must be a finite number"),
    (["train.learning_rate=.nan"], "train.learning_rate must be a finite number"),
    (["model.backbone=resnet50"], "model.backbone must be one of ['simple_cnn', 'efficientnet_lite0'"),
    (["model.fine_tune_blocks=-2"], "model.fine_tune_blocks must be >= -1"),
    (["train.monitor=val_auc"], "train.monitor must be one of ['auto', 'val_loss', 'val_roc_auc'"),
    (["train.lr_schedule=step"], "train.lr_schedule must be one of ['plateau', 'cosine']"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio must be in [0, 1]"),
    (["data.color_constancy=retinex"], "data.color_constancy must be one of ['none', 'shades_of_gray']"),
    (["data.ingest_engine=spark"], "data.ingest_engine must be one of ['auto', 'local', 'ray']"),
    (["data.shard_bytes=0"], "data.shard_bytes must be >= 1, got 0"),
]


@pytest.mark.parametrize("overrides,message", INVALID_CASES)
def test_invalid(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
