"""The training model (issue 13): augmentation as its first block, XLA forward/backward with Horovod outside.

The 2-rank XLA equivalence runs in the shared Horovod job of test_horovod_keras.py
(`hvd_workers.run_all`); here a world of size 1, and whole folds trained with either
augmentation placement, whose saved models must carry no augmentation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

from melanoma_dist import distributed as hk
from melanoma_dist.config import AugmentConfig, Config, ConfigError, ModelConfig, load_config
from melanoma_dist.data.augment import build_augmenter
from melanoma_dist.model.build import backbone_of, build_model
from melanoma_dist.model.training_model import TrainingModel, training_model
from tests import hvd_workers
from tests.test_horovod_keras import _flat, assert_same_training

AUGMENT = AugmentConfig(rotation=0.2, zoom=0.2, horizontal_flip=True, vertical_flip=True, contrast=0.2)
TINY = ModelConfig(filters=(4,), convs_per_block=1, dense_units=0, dropout=0.0)


@pytest.fixture(scope="module")
def world() -> hk.WorkerContext:
    return hk.init_worker(use_gpu=False)


def _images(n: int = 8, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).random((n, size, size, 3)).astype("float32")


def _random_layers(model: keras.Model) -> list[str]:
    """Names of augmentation layers anywhere in `model` (nested models included)."""
    out = []
    for layer in model.layers:
        if type(layer).__name__.startswith("Random"):
            out.append(layer.name)
        if isinstance(layer, keras.Model):
            out += _random_layers(layer)
    return out


def test_augmentation_runs_in_training_only_and_shares_the_weights() -> None:
    model = build_model(TINY, 16, 2, seed=0)
    trainer = TrainingModel(model, build_augmenter(AUGMENT, seed=5))
    x = _images()
    inference = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(np.asarray(trainer(x, training=False)), inference)
    np.testing.assert_allclose(trainer.predict(x, verbose=0), inference, atol=1e-6)
    # In training the batch is augmented first: the model sees other images (BatchNorm in training mode
    # alike on both sides, so only the augmentation can make the difference).
    assert not np.allclose(np.asarray(trainer(x, training=True)), np.asarray(model(x, training=True)), atol=1e-4)
    # uint8 training batches (tf.data with augment_on: model) are scaled to [0, 1] first.
    pixels = np.round(x * 255).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(trainer(pixels, training=False)),
                               np.asarray(model(pixels.astype("float32") / 255, training=False)), atol=1e-6)
    # The weights are the classifier's, in its order: best weights and checkpoints move across.
    assert [w.path for w in trainer.weights] == [w.path for w in model.weights]
    assert not _random_layers(model) and len(_random_layers(trainer)) == 4


def test_training_model_follows_the_config() -> None:
    model = build_model(TINY, 16, 2)
    cfg = Config()
    pipeline_side = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, augment_on="pipeline"))
    assert training_model(model, pipeline_side, seed=0) is model  # nothing differs from inference
    trainer = training_model(model, cfg, seed=0)  # the default: augmentation in the model
    assert isinstance(trainer, TrainingModel) and trainer.augmenter is not None and not trainer.jit_gradients
    xla = dataclasses.replace(pipeline_side, train=dataclasses.replace(cfg.train, jit_compile=True))
    trainer = training_model(model, xla, seed=0)
    assert trainer.augmenter is None and trainer.jit_gradients
    with pytest.raises(ValueError, match="compile with jit_compile=False"):
        trainer.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=True)


def test_backbone_is_found_through_the_training_model() -> None:
    model = build_model(ModelConfig(backbone="efficientnet_lite0", pretrained=False), 32, 2)
    trainer = TrainingModel(model, build_augmenter(AUGMENT, seed=0))
    assert backbone_of(trainer) is backbone_of(model) is not None


CONFIG_CASES = [  # (override, attribute path, expected)
    ("train.mixed_precision=true", ("train", "mixed_precision"), "fp16"),  # the bool of older configs
    ("train.mixed_precision=false", ("train", "mixed_precision"), "none"),
    ("train.mixed_precision=bf16", ("train", "mixed_precision"), "bf16"),
    ("pipeline.augment_on=pipeline", ("pipeline", "augment_on"), "pipeline"),
    ("train.jit_compile=true", ("train", "jit_compile"), True),
]
INVALID_CONFIG_CASES = [  # (override, message)
    ("pipeline.augment_on=gpu", "pipeline.augment_on must be one of \\['model', 'pipeline'\\], got 'gpu'"),
    ("train.mixed_precision=fp32", "train.mixed_precision must be one of"),
    ("train.mixed_precision=1", "train.mixed_precision must be one of"),  # 1 == True, but not a boolean
    ("train.jit_compile=1", "train.jit_compile must be true or false"),
]


@pytest.mark.parametrize("override,path,expected", CONFIG_CASES)
def test_config_keys(override: str, path: tuple[str, str], expected: object) -> None:
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, path[0]), path[1]) == expected
    assert load_config(None).pipeline.augment_on == "model" and load_config(None).train.jit_compile is False


@pytest.mark.parametrize("override,message", INVALID_CONFIG_CASES)
def test_config_keys_invalid(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_shipped_gpu_configs_feed_a_gpu() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in [*sorted((root / "configs").glob("*-gpu.yaml")), root / "k8s/overlays/gpu/config.yaml"]:
        cfg = load_config(path)
        assert (cfg.train.mixed_precision, cfg.train.jit_compile, cfg.pipeline.augment_on,
                cfg.distributed.gpus_per_worker) == ("bf16", True, "model", 1), path
    assert load_config(root / "configs/quick-cpu.yaml").train.jit_compile is False


# ---------------------------------------------------------------- the XLA step, one rank

def test_xla_step_equals_plain_step_on_one_rank(world: hk.WorkerContext) -> None:
    run = hvd_workers.xla_equivalence(0, 1)
    assert_same_training(run["xla"], run["plain"])


def test_xla_step_with_loss_scaling_and_augmentation(world: hk.WorkerContext) -> None:
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x, y = hvd_workers.data()
        weights = {}
        for jit in (False, True):
            model = hvd_workers.tiny_cnn()
            trainer = TrainingModel(model, jit_gradients=jit)
            scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=2.0**8)
            trainer.compile(optimizer=hk.distributed_optimizer(scaled), loss="mse", jit_compile=False)
            trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
            assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0**8  # no step skipped
            weights[jit] = _flat(model.get_weights())
            bad = x[:8].copy()
            bad[0, 0, 0, 0] = np.nan
            trainer.train_on_batch(bad, y[:8])  # non-finite gradients: skipped, scale halved
            np.testing.assert_array_equal(_flat(model.get_weights()), weights[jit])
            assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0**7
        np.testing.assert_allclose(weights[True], weights[False], rtol=0, atol=2e-3)  # float16 compute
    finally:
        keras.config.set_dtype_policy("float32")
    # Augmentation stays outside the XLA cluster (its transforms have no XLA kernels) and still trains.
    model = build_model(TINY, 16, 2, seed=0)
    trainer = TrainingModel(model, build_augmenter(AUGMENT, seed=1), jit_gradients=True)
    trainer.compile(optimizer=hk.distributed_optimizer(keras.optimizers.Adam(0.01)), loss="binary_crossentropy",
                    metrics=["accuracy"], jit_compile=False)
    before = _flat(model.get_weights())
    history = trainer.fit(_images(16), np.arange(16) % 2, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and np.abs(_flat(model.get_weights()) - before).max() > 1e-4


# ---------------------------------------------------------------- whole folds, either placement

@pytest.fixture(scope="module")
def fold_models(world: hk.WorkerContext, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fold 0 of generated images trained with augmentation in tf.data, and in the model with XLA."""
    from melanoma_dist.config import config_from_dict
    from melanoma_dist.train.fold import train_fold
    from tests.synthetic import make_dataset

    tmp = tmp_path_factory.mktemp("placements")
    data = make_dataset(tmp)
    out = {}
    for placement, jit in (("pipeline", False), ("model", True)):
        cfg = config_from_dict({
            "data": {"dataset_dir": data.dataset_dir, "image_size": 16, "encoding": "png"},
            "folds": {"k": 2, "seed": 42},
            "pipeline": {"batch_size": 8, "shuffle_buffer": 64, "augment_on": placement,
                         "augment": dataclasses.asdict(AUGMENT)},
            "model": {"filters": [4, 8], "convs_per_block": 1, "dense_units": 8, "dropout": 0.0},
            "train": {"epochs": 1, "learning_rate": 0.01, "warmup_epochs": 0, "jit_compile": jit},
            "output_dir": str(tmp / placement)})
        assert train_fold(cfg, 0)["epochs_run"] == 1
        out[placement] = tmp / placement / "fold-0"
    return out


def test_saved_fold_models_hold_no_augmentation_with_either_placement(fold_models: dict[str, Path]) -> None:
    import csv

    from melanoma_dist.data.pipeline import decode_image
    from melanoma_dist.data.shards import read_columns

    models = {p: keras.models.load_model(d / "model.keras", compile=False) for p, d in fold_models.items()}
    for placement, model in models.items():
        assert not _random_layers(model), placement
        # The saved model reproduces the fold's stored probabilities: nothing random at inference.
        dataset = fold_models[placement].parents[1] / "dataset"  # tmp/<placement>/fold-0
        table = read_columns(dataset, ["image_id", "image"])
        by_id = dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))
        with (fold_models[placement] / "predictions.csv").open() as f:
            preds = list(csv.DictReader(f))
        x = np.stack([decode_image(by_id[r["image_id"]], 16, "png").numpy() for r in preds])
        np.testing.assert_allclose(model.predict(x, verbose=0)[:, 0], [float(r["prob_melanoma"]) for r in preds],
                                   atol=1e-5)
    # One inference graph whatever the placement: the same layers, and the same outputs from the same weights.
    pipeline_model, model_model = models["pipeline"], models["model"]
    assert ([type(layer).__name__ for layer in pipeline_model.layers]
            == [type(layer).__name__ for layer in model_model.layers])
    pipeline_model.set_weights(model_model.get_weights())
    x = _images(6)
    np.testing.assert_array_equal(pipeline_model.predict(x, verbose=0), model_model.predict(x, verbose=0))
