"""The CNN builds from config, saves as .keras, and learns."""

import keras
import numpy as np
import pytest

from melanoma_dist.config import ModelConfig
from melanoma_dist.model.cnn import build_model, probabilities

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
