"""The lesion classifier: a plain Keras 3 CNN built from `ModelConfig`.

Conv blocks (Conv-BatchNorm-ReLU, repeated, then max-pooling), then the
classifier head of `model/head.py`. The model takes float images in [0, 1]
(the pipeline normalises), so the same preprocessing serves training and
inference.
"""

from __future__ import annotations

import itertools

import keras
from keras import layers

from melanoma_dist.config import ModelConfig
from melanoma_dist.model.head import classifier_head


def build_simple_cnn(cfg: ModelConfig, image_size: int, num_classes: int, seed: int = 0,
                     dropout_seed: int | None = None) -> keras.Model:
    """Build (not compile) the from-scratch CNN (`model.backbone: simple_cnn`).

    Args:
        cfg: Architecture settings.
        image_size: Side of the square input images.
        num_classes: 2 gives a single sigmoid output; more gives a softmax.
        seed: Seed of the weight initialisers. Defaults to `0`.
        dropout_seed: Seed of the dropout masks (one per Horovod rank). Defaults to `None` (`seed`).

    Raises:
        ValueError: fewer than 2 classes, or an input too small for the pooling stages.

    Example:

    ```python
    model = build_simple_cnn(ModelConfig(filters=(8, 16)), image_size=32, num_classes=2)
    model.output_shape  # (None, 1)
    ```
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < 2 ** len(cfg.filters):
        raise ValueError(f"image_size {image_size} is too small for {len(cfg.filters)} pooling stages: "
                         f"use image_size >= {2 ** len(cfg.filters)} or fewer model.filters")
    seeds = itertools.count(seed * 1000)  # a distinct seed per layer: same seed, same weights

    def init() -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=next(seeds))

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    for b, filters in enumerate(cfg.filters):
        for c in range(cfg.convs_per_block):
            # No bias: BatchNorm's beta plays that role.
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init(),
                              name=f"block{b}_conv{c}")(x)
            x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
            x = layers.Activation("relu", name=f"block{b}_relu{c}")(x)
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    outputs = classifier_head(x, cfg, num_classes, seed if dropout_seed is None else dropout_seed, seeds)
    return keras.Model(inputs, outputs, name="lesion_cnn")
