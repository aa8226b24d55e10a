"""The lesion classifier: a plain Keras 3 CNN built from `ModelConfig`.

Conv blocks (Conv-BatchNorm-ReLU, repeated, then max-pooling), global average
pooling, dropout and a dense head. One sigmoid unit for binary label schemes,
a softmax over the classes otherwise. The model takes float images in [0, 1]
(the pipeline normalises), so the same preprocessing serves training and
inference.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
from keras import layers

from melanoma_dist.config import ModelConfig


def build_model(cfg: ModelConfig, image_size: int, num_classes: int, seed: int = 0) -> keras.Model:
    """Build (not compile) the CNN.

    Args:
        cfg: Architecture settings.
        image_size: Side of the square input images.
        num_classes: 2 gives a single sigmoid output; more gives a softmax.
        seed: Seed of the weight initialisers and dropout.

    Raises:
        ValueError: fewer than 2 classes, or an input too small for the pooling stages.

    Example:

    ```python
    model = build_model(ModelConfig(filters=(8, 16)), image_size=32, num_classes=2)
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
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if cfg.dense_units:
        x = layers.Dropout(cfg.dropout, seed=seed, name="head_dropout0")(x)
        x = layers.Dense(cfg.dense_units, activation="relu", kernel_initializer=init(), name="head_dense")(x)
    x = layers.Dropout(cfg.dropout, seed=seed + 1, name="head_dropout1")(x)
    binary = num_classes == 2
    # float32 output keeps the loss numerically stable under a mixed_float16 policy.
    outputs = layers.Dense(1 if binary else num_classes, activation="sigmoid" if binary else "softmax",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)), dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="lesion_cnn")


def probabilities(outputs: np.ndarray, num_classes: int) -> np.ndarray:
    """Turn model outputs into per-class probabilities of shape [N, num_classes]."""
    p = np.asarray(outputs, dtype=np.float64)
    if num_classes == 2:
        p = p.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return p.reshape(-1, num_classes)
