"""Training-time augmentation: Keras preprocessing layers built from `AugmentConfig`.

Geometry (flips, rotation, zoom, aspect-ratio jitter) and colour (contrast,
brightness, saturation, hue, per-channel gain). Colour and aspect jitter make the
model robust to what changes between clinics: cameras' colour response and
lighting, and copies of images squashed to a square (ISIC 2017's are 4:3
resized to 1:1). Every layer takes a seed and is the identity outside training.
"""

from __future__ import annotations

import keras
from keras import layers

from melanoma_dist.config import AugmentConfig


class RandomChannelGain(keras.layers.Layer):
    """Multiply each colour channel by its own random gain in [1 - factor, 1 + factor], clipped to [0, 1].

    Imitates cameras whose colour response differs (a white balance error per image).

    Args:
        factor: Largest relative change of a channel. Defaults to `0.1`.
        seed: Seed of the gains. Defaults to `None`.

    Example:

    ```python
    layer = RandomChannelGain(0.1, seed=0)
    layer(images, training=True)   # images float32 [N, S, S, 3] in [0, 1]
    ```
    """

    def __init__(self, factor: float = 0.1, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor must be in [0, 1), got {factor}")
        self.factor, self.seed = float(factor), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool = True):
        if not training or self.factor == 0.0:
            return images
        shape = keras.ops.shape(images)
        gain = keras.random.uniform((shape[0], 1, 1, shape[-1]), 1.0 - self.factor, 1.0 + self.factor,
                                    seed=self.seed_generator, dtype=images.dtype)
        return keras.ops.clip(images * gain, 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


def build_augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential | None:
    """Keras preprocessing layers for training-time augmentation of [0, 1] images, or None when all are off."""
    out: list[keras.layers.Layer] = []
    if cfg.horizontal_flip or cfg.vertical_flip:
        mode = "horizontal_and_vertical" if cfg.horizontal_flip and cfg.vertical_flip else (
            "horizontal" if cfg.horizontal_flip else "vertical")
        out.append(layers.RandomFlip(mode, seed=seed))
    if cfg.rotation > 0:
        out.append(layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom > 0:
        out.append(layers.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed + 2))
    if cfg.aspect > 0:  # zoom the height alone: the aspect ratio changes by up to +-aspect
        out.append(layers.RandomZoom(height_factor=cfg.aspect, width_factor=0.0, fill_mode="reflect",
                                     seed=seed + 4))
    if cfg.contrast > 0:
        out.append(layers.RandomContrast(cfg.contrast, seed=seed + 3))
    if cfg.brightness > 0:
        out.append(layers.RandomBrightness(cfg.brightness, value_range=(0.0, 1.0), seed=seed + 5))
    if cfg.saturation > 0:  # 0.5 is the identity of RandomSaturation
        out.append(layers.RandomSaturation((0.5 - cfg.saturation / 2, 0.5 + cfg.saturation / 2),
                                           value_range=(0.0, 1.0), seed=seed + 6))
    if cfg.hue > 0:
        out.append(layers.RandomHue(cfg.hue, value_range=(0.0, 1.0), seed=seed + 7))
    if cfg.channel_gain > 0:
        out.append(RandomChannelGain(cfg.channel_gain, seed=seed + 8))
    return keras.Sequential(out, name="augment") if out else None
