"""Augmentation layers: active in training only, seeded, within their ranges."""

import numpy as np
import pytest

from melanoma_dist.config import AugmentConfig, ConfigError
from melanoma_dist.data.augment import RandomChannelGain, build_augmenter

COLOUR = AugmentConfig(rotation=0.0, zoom=0.0, horizontal_flip=False, aspect=0.2, brightness=0.1,
                       saturation=0.3, hue=0.05, channel_gain=0.1)


def _images(n=4, size=16):
    return np.random.default_rng(0).random((n, size, size, 3)).astype(np.float32)


def test_colour_and_aspect_options_build_their_layers():
    names = [type(layer).__name__ for layer in build_augmenter(COLOUR, seed=0).layers]
    assert names == ["RandomZoom", "RandomBrightness", "RandomSaturation", "RandomHue", "RandomChannelGain"]
    assert build_augmenter(AugmentConfig(rotation=0, zoom=0, horizontal_flip=False), seed=0) is None


def test_augmenter_changes_training_images_only():
    aug = build_augmenter(COLOUR, seed=0)
    x = _images()
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    y = np.asarray(aug(x, training=True))
    assert y.shape == x.shape and not np.allclose(y, x)
    assert 0.0 <= y.min() and y.max() <= 1.0 + 1e-6


def test_channel_gain():
    layer = RandomChannelGain(0.2, seed=3)
    x = np.full((64, 4, 4, 3), 0.5, np.float32)
    y = np.asarray(layer(x, training=True))
    gains = y[:, 0, 0, :] / 0.5
    assert gains.min() >= 0.8 - 1e-6 and gains.max() <= 1.2 + 1e-6
    assert np.ptp(gains[:, 0]) > 0.1 and not np.allclose(gains[:, 0], gains[:, 1])  # per image and channel
    np.testing.assert_allclose(y, np.broadcast_to(y[:, :1, :1, :], y.shape))  # one gain over the image
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    again = RandomChannelGain.from_config(layer.get_config())
    assert again.factor == 0.2 and again.seed == 3
    with pytest.raises(ValueError, match="factor must be in"):
        RandomChannelGain(1.5)


@pytest.mark.parametrize("field", ["aspect", "brightness", "saturation", "hue", "channel_gain"])
def test_ranges_are_checked(field):
    with pytest.raises(ConfigError, match=f"pipeline.augment.{field} must be in"):
        AugmentConfig(**{field: 1.0})
