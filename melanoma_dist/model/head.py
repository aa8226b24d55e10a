"""The classifier head shared by every backbone: pooling, dropout, optional dense layer, output."""

from __future__ import annotations

from collections.abc import Iterator

import keras
from keras import layers

from melanoma_dist.config import ModelConfig


def classifier_head(features: keras.KerasTensor, cfg: ModelConfig, num_classes: int, seed: int,
                    seeds: Iterator[int]) -> keras.KerasTensor:
    """Pool a feature map and classify it.

    One sigmoid unit for two classes, a softmax otherwise; the output is float32
    so that the loss stays numerically stable under a mixed-precision policy.

    Args:
        features: The backbone's last feature map, [batch, h, w, channels].
        cfg: `pooling`, `dense_units` and `dropout` are read.
        num_classes: 2 gives a single sigmoid output; more gives a softmax.
        seed: Seed of the dropout layers.
        seeds: Source of distinct initializer seeds (same seeds, same weights).
    """
    pool = layers.GlobalMaxPooling2D if cfg.pooling == "max" else layers.GlobalAveragePooling2D
    x = pool(name="gap")(features)
    if cfg.dense_units:
        x = layers.Dropout(cfg.dropout, seed=seed, name="head_dropout0")(x)
        x = layers.Dense(cfg.dense_units, activation="relu", name="head_dense",
                         kernel_initializer=keras.initializers.HeNormal(seed=next(seeds)))(x)
    x = layers.Dropout(cfg.dropout, seed=seed + 1, name="head_dropout1")(x)
    binary = num_classes == 2
    return layers.Dense(1 if binary else num_classes, activation="sigmoid" if binary else "softmax",
                        kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
                        dtype="float32", name="probabilities")(x)
