"""The CNN builds from config, saves as .keras, and learns."""

import keras
import numpy as np
import pytest

from melanoma_dist.config import ModelConfig
from melanoma_dist.model.build import build_model, probabilities

TINY = ModelConfig(filters=(8, 16), convs_per_block=1, dense_units=16, dropout=0.0)


@pytest.mark.parametrize("num_classes,out_shape", [(2, (None, 1)), (7, (None, 7))])
def test_heads(num_classes, out_shape):
    model = build_model(TINY, 32, num_classes)
    assert model.output_shape == out_shape
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_save_load_roundtrip(tmp_path):
    model = build_model(TINY, 32, 7, seed=3)
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def test_same_seed_same_weights():
    a, b = build_model(TINY, 32, 2, seed=5), build_model(TINY, 32, 2, seed=5)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_loss_decreases_on_tiny_images():
    # Bright vs dark images: a learnable signal; 30 steps must lower the loss clearly.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    x = (rng.random((64, 16, 16, 3)) * 0.5 + 0.5 * y[:, None, None, None]).astype("float32")
    keras.utils.set_random_seed(0)
    model = build_model(TINY, 16, 2)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    loss = model.fit(x, y, batch_size=16, epochs=8, verbose=0).history["loss"]
    assert loss[-1] < 0.7 * loss[0]


def test_invalid():
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model(TINY, 32, 1)
    with pytest.raises(ValueError, match="too small for 2 pooling stages"):
        build_model(TINY, 3, 2)


def test_probabilities():
    np.testing.assert_allclose(probabilities(np.array([[0.2], [0.9]]), 2), [[0.8, 0.2], [0.1, 0.9]])
    assert probabilities(np.eye(3), 3).shape == (3, 3)


# ---------------------------------------------------------------- EfficientNet-Lite backbones

LITE = ModelConfig(backbone="efficientnet_lite0", pretrained=False, dense_units=0, dropout=0.0)


def _trainable_prefixes(model):
    from melanoma_dist.model.build import backbone_of

    return {v.path.split("/")[0].split("_")[0] for v in backbone_of(model).trainable_variables}


def test_freeze_and_unfreeze_top_blocks():
    from melanoma_dist.model.build import set_backbone_trainable

    model = build_model(LITE, 32, 2)
    assert _trainable_prefixes(model) == {"stem", "head"} | {f"block{i}" for i in range(16)}  # -1: all
    set_backbone_trainable(model, LITE, 0)
    assert [w.path for w in model.trainable_weights] == ["probabilities/kernel", "probabilities/bias"]
    set_backbone_trainable(model, LITE, 3)
    assert _trainable_prefixes(model) == {"head", "block15", "block14"}
    # The variable order of get_weights() does not depend on what is trainable (best weights survive a phase change).
    paths = [w.path for w in model.weights]
    set_backbone_trainable(model, LITE, -1)
    assert [w.path for w in model.weights] == paths


def test_pretrained_backbone_keeps_its_batchnorm_statistics():
    cfg = ModelConfig(backbone="efficientnet_lite0", pretrained=True, fine_tune_blocks=-1, dense_units=0)
    model = build_model(cfg, 32, 2)
    backbone = model.get_layer("backbone")
    before = {v.path: v.numpy().copy() for v in backbone.weights}
    model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy")
    x = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    model.fit(x, np.arange(8) % 2, epochs=1, verbose=0)
    changed = {v.path for v in backbone.weights if not np.array_equal(v.numpy(), before[v.path])}
    assert "head_conv/kernel" in changed and "stem_conv/kernel" in changed  # the convolutions train ...
    assert not [p for p in changed if "_bn/" in p]  # ... every BatchNorm variable is kept
    # From scratch (or freeze_batchnorm=false), BatchNorm statistics do update.
    scratch = build_model(LITE, 32, 2)
    variance = scratch.get_layer("backbone").get_layer("stem_bn").moving_variance.numpy().copy()
    scratch.compile(keras.optimizers.SGD(0.1), "binary_crossentropy")
    scratch.fit(x, np.arange(8) % 2, epochs=1, verbose=0)
    assert np.abs(variance - scratch.get_layer("backbone").get_layer("stem_bn").moving_variance.numpy()).max() > 1e-3


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_backbone_model_saves_and_loads_in_a_fresh_process(backbone, tmp_path):
    import subprocess
    import sys

    model = build_model(ModelConfig(backbone=backbone, pretrained=True, dense_units=16), 32, 7, seed=1)
    x = np.random.default_rng(1).random((3, 32, 32, 3), dtype=np.float32)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", model.predict(x, verbose=0))
    code = ("import keras, numpy as np, sys; d = sys.argv[1]; "
            "m = keras.models.load_model(d + '/m.keras', compile=False); "
            "np.testing.assert_allclose(m.predict(np.load(d + '/x.npy'), verbose=0), np.load(d + '/want.npy'), atol=1e-5)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_backbone_input_too_small():
    with pytest.raises(ValueError, match="too small for efficientnet_lite0"):
        build_model(LITE, 16, 2)
