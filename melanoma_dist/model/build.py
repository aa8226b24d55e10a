"""Build the lesion classifier named by `model.backbone`: the from-scratch CNN or EfficientNet-Lite.

Every model takes float images in [0, 1] and carries its own input
normalisation, so training, export and predict feed it the same way. A
pretrained backbone starts from ImageNet weights (`model/pretrained.py`) and its
BatchNorm layers stay frozen (`model.freeze_batchnorm`): not trainable, so Keras
runs them in inference mode with their ImageNet statistics, which small
per-worker batches could not re-estimate well, and which stay identical on
every Horovod rank. (Calling the backbone with `training=False` would not do:
Keras 3 functional models pass the outer call's `training` to every layer.)

Freeze-then-unfreeze: `set_backbone_trainable(model, blocks)` trains the head
only (`blocks=0`), the top `blocks` units of the backbone, or all of it (`-1`);
`train/fold.py` calls it between its head-only and fine-tuning phases.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np

from melanoma_dist.config import ModelConfig
from melanoma_dist.model import efficientnet_lite as lite
from melanoma_dist.model.cnn import build_simple_cnn
from melanoma_dist.model.head import classifier_head
from melanoma_dist.model.pretrained import pretrained_weights

BACKBONE_LAYER = "backbone"


def build_model(cfg: ModelConfig, image_size: int, num_classes: int, seed: int = 0,
                dropout_seed: int | None = None) -> keras.Model:
    """Build (not compile) the classifier for `cfg.backbone`.

    Args:
        cfg: Architecture settings.
        image_size: Side of the square input images.
        num_classes: 2 gives a single sigmoid output; more gives a softmax.
        seed: Seed of the initialisers (the same on every rank). Defaults to `0`.
        dropout_seed: Seed of the dropout masks; give each Horovod rank its own
            (`WorkerContext.rank_seed`). Defaults to `None` (`seed`).

    Raises:
        ValueError: fewer than 2 classes, or an input too small for the architecture.
        WeightsError: `pretrained` is set but the weights package is missing.

    Example:

    ```python
    model = build_model(ModelConfig(backbone="efficientnet_lite0"), image_size=96, num_classes=2)
    model.output_shape  # (None, 1)
    ```
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if cfg.backbone == "simple_cnn":
        return build_simple_cnn(cfg, image_size, num_classes, seed=seed, dropout_seed=dropout_seed)
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is too small for {cfg.backbone} (5 stride-2 stages): use >= 32")
    backbone = lite.efficientnet_lite(cfg.backbone, image_size, name=BACKBONE_LAYER)
    if cfg.pretrained:
        backbone.load_weights(pretrained_weights(cfg.backbone))
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    outputs = classifier_head(backbone(inputs), cfg, num_classes, seed if dropout_seed is None else dropout_seed,
                              itertools.count(seed * 1000))
    model = keras.Model(inputs, outputs, name=f"lesion_{cfg.backbone}")
    set_backbone_trainable(model, cfg, cfg.fine_tune_blocks)
    return model


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The nested backbone of a model from `build_model` (or of a model wrapping one, such as a
    `TrainingModel`), or None for the simple CNN."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        pass
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model):
            found = backbone_of(layer)
            if found is not None:
                return found
    return None


def set_backbone_trainable(model: keras.Model, cfg: ModelConfig, blocks: int) -> None:
    """Train the head plus the top `blocks` units of the backbone (-1: all, 0: head only).

    BatchNorm stays frozen in a pretrained backbone with `cfg.freeze_batchnorm`.
    Recompile the model afterwards: Keras fixes the trainable variables at compile time.
    No-op for the simple CNN, which is trained whole.
    """
    backbone = backbone_of(model)
    if backbone is not None:
        lite.set_trainable_top(backbone, blocks, freeze_batchnorm=cfg.pretrained and cfg.freeze_batchnorm)


def probabilities(outputs: np.ndarray, num_classes: int) -> np.ndarray:
    """Turn model outputs into per-class probabilities of shape [N, num_classes]."""
    p = np.asarray(outputs, dtype=np.float64)
    if num_classes == 2:
        p = p.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return p.reshape(-1, num_classes)
