"""The exported model: K fold models plus `model.json`, used as one calibrated classifier.

Format (a directory, written by `melanoma-dist export`):

    model.json            class names, input size and preprocessing, temperature, threshold,
                          decision (melanoma) class index, ensemble settings, provenance
    folds/fold-K.keras    the K cross-validation models, unchanged (each loads on its own with
                          `keras.models.load_model(p, compile=False)`)
    model_card.md         what the model is, its evidence and its limits
    evidence.json         the cross-validation numbers behind the card (report.json)
    run_manifest.json, config.yaml   copies from the training run

The fold models are kept as separate files rather than merged into one Keras graph so
that each stays inspectable and loadable without custom layers; `Ensemble` does the rest
in NumPy: each member's probabilities are temperature-scaled (softmax(log p / T)) and the
scaled probabilities are averaged over members (and over the test-time views of
`inference.tta`: the mirror, or the 8 flips and rotations). The decision class is called when its averaged
probability is >= the stored threshold.

Example:

```python
model = Ensemble.load("runs/quick-cpu/export")
probs = model.predict(images)            # images: float32 [N, S, S, 3] in [0, 1]
called = model.decide(probs)             # bool [N]
```
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_dist.inference.tta import TTA_MODES, tta_mode, views
from melanoma_dist.report.calibration import apply_temperature

logger = logging.getLogger(__name__)

MODEL_JSON = "model.json"
FORMAT = "melanoma-dist-ensemble"
FORMAT_VERSION = 1
NORMALISATION = "RGB uint8 / 255 -> float32 in [0, 1], NHWC"
REQUIRED_KEYS = ("format", "format_version", "members", "label_scheme", "class_names", "decision_index",
                 "input", "calibration", "operating_point", "ensemble", "provenance")


class ModelDirError(ValueError):
    """A model directory is missing, incomplete, or of another format."""


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    """Read and check a model directory's `model.json`.

    Raises:
        ModelDirError: no such directory, no model.json, not a JSON object, another format or
            version, missing keys or member files, or a value of the wrong type or range.
    """
    d = Path(model_dir)
    path = d / MODEL_JSON
    if not d.is_dir():
        raise ModelDirError(f"model directory {d} does not exist: export one with "
                            f"`melanoma-dist export RESULT_DIR --out {d}`")
    if not path.is_file():
        raise ModelDirError(f"{d} has no {MODEL_JSON}: it is not an exported model; export one with "
                            f"`melanoma-dist export RESULT_DIR --out DIR` (a cv result directory is not a model)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON ({e}): export the model again") from None
    if not isinstance(spec, dict):
        raise ModelDirError(f"{path} must hold a JSON object, got a {type(spec).__name__}: export the model again")
    if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path} has format {spec.get('format')!r} version {spec.get('format_version')!r}; "
                            f"this melanoma-dist reads {FORMAT!r} version {FORMAT_VERSION}: export it again")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise ModelDirError(f"{path} lacks {missing}: export the model again")
    _check_values(spec, path)
    absent = [m for m in spec["members"] if not (d / m).is_file()]
    if absent:
        raise ModelDirError(f"{d} lacks the member model(s) {absent} listed in {MODEL_JSON}: export it again")
    return spec


def _value(spec: dict[str, Any], path: Path, key: str, ok: Callable[[Any], bool], what: str) -> Any:
    """`spec[a][b]` for key `a.b` (or `spec[a]`), checked by `ok`; a ModelDirError naming the file and key if not."""
    node: Any = spec
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not ok(node):
        raise ModelDirError(f"{path}: {key} must be {what}, got {node!r}: export the model again")
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v: Any, min_len: int) -> bool:
    return isinstance(v, list) and len(v) >= min_len and all(isinstance(x, str) for x in v)


def _check_values(spec: dict[str, Any], path: Path) -> None:
    """The values inference relies on have the right type and range (a hand-edited file fails here, not mid-run)."""
    _value(spec, path, "members", lambda v: _is_str_list(v, 1), "a non-empty list of file names")
    names = _value(spec, path, "class_names", lambda v: _is_str_list(v, 2), "a list of at least 2 class names")
    _value(spec, path, "decision_index", lambda v: isinstance(v, int) and not isinstance(v, bool)
           and 0 <= v < len(names), f"an index of class_names (0 to {len(names) - 1})")
    _value(spec, path, "input.image_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
           "a positive integer")
    _value(spec, path, "calibration.temperature", lambda v: _is_number(v) and v > 0, "a finite number > 0")
    _value(spec, path, "operating_point.threshold", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    _value(spec, path, "ensemble.tta", lambda v: v in TTA_MODES or isinstance(v, bool), f"one of {list(TTA_MODES)}")


def _load_member(path: Path) -> Any:
    """Load one fold model; a damaged file is named as such (Keras calls a broken zip "File not found")."""
    import keras

    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ModelDirError(f"member model {path} is corrupt: not a readable .keras (zip) file ({e}); "
                            f"export the model again") from None
    if damaged is not None:
        raise ModelDirError(f"member model {path} is corrupt: its entry {damaged} fails its checksum; "
                            f"export the model again")
    try:
        return keras.models.load_model(path, compile=False)
    except (KeyError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:  # a sound zip, wrong content
        raise ModelDirError(f"member model {path} is unreadable ({type(e).__name__}: {e}); "
                            f"export the model again") from None


class Ensemble:
    """K fold models averaged into one calibrated classifier (see the module docstring).

    Args:
        spec: The parsed `model.json`.
        members: The loaded fold models, in `spec["members"]` order.
        model_dir: Where they were loaded from. Defaults to `None`.
    """

    def __init__(self, spec: dict[str, Any], members: Sequence[Any], model_dir: Path | str | None = None) -> None:
        if len(members) != len(spec["members"]) or not members:
            raise ModelDirError(f"the ensemble lists {len(spec['members'])} members but {len(members)} were given")
        self.spec = spec
        self.members = list(members)
        self.model_dir = model_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> "Ensemble":
        """Load an exported model directory.

        Raises:
            ModelDirError: see `read_model_json`, a member file is corrupt, or a member's input
                or output shape does not match model.json.
        """
        d = Path(model_dir)
        spec = read_model_json(d)
        members = [_load_member(d / m) for m in spec["members"]]
        ens = cls(spec, members, d)
        for m, model in zip(spec["members"], members):
            ens.check_member(model, m)
        return ens

    def check_member(self, model: Any, name: str) -> None:
        """Check a member's input shape and number of outputs against the spec.

        Raises:
            ModelDirError: they do not match.
        """
        s = self.image_size
        units = 1 if len(self.class_names) == 2 else len(self.class_names)
        if tuple(model.input_shape[1:]) != (s, s, 3) or model.output_shape[-1] != units:
            raise ModelDirError(f"member {name} takes {model.input_shape} and gives {model.output_shape}, but "
                                f"{MODEL_JSON} says [{s}, {s}, 3] images and {units} output unit(s)")

    # ------------------------------------------------------------ properties
    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.spec["class_names"])

    @property
    def decision_index(self) -> int:
        return int(self.spec["decision_index"])

    @property
    def decision_class(self) -> str:
        return self.class_names[self.decision_index]

    @property
    def threshold(self) -> float:
        return float(self.spec["operating_point"]["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.spec["calibration"]["temperature"])

    @property
    def image_size(self) -> int:
        return int(self.spec["input"]["image_size"])

    @property
    def tta(self) -> str:
        """The stored test-time augmentation: `none`, `flip` or `dihedral` (see `inference.tta`)."""
        return tta_mode(self.spec["ensemble"]["tta"])

    # ------------------------------------------------------------ inference
    def _member_probs(self, model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
        from melanoma_dist.model.build import probabilities

        # Eager calls: no tf.function to retrace for every batch shape and member.
        out = [np.asarray(model(x[i:i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
        return probabilities(np.concatenate(out), len(self.class_names))

    def predict(self, images: np.ndarray, tta: str | bool | None = None, batch_size: int = 64) -> np.ndarray:
        """Calibrated class probabilities, averaged over members (and test-time views).

        Args:
            images: float32 [N, S, S, 3] in [0, 1] (see `inference.images`).
            tta: `none`, `flip` (with the mirrored image) or `dihedral` (the 8 symmetries of
                the square). Defaults to `None` (model.json's setting).
            batch_size: Images per forward pass. Defaults to `64`.

        Returns:
            [N, num_classes] probabilities.

        Raises:
            ValueError: the images are not [N, S, S, 3].
        """
        x = np.asarray(images, dtype=np.float32)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise ValueError(f"images must have shape [N, {s}, {s}, 3], got {list(x.shape)}")
        if len(x) == 0:
            return np.zeros((0, len(self.class_names)))
        shown = views(x, self.tta if tta is None else tta_mode(tta))
        total = np.zeros((len(x), len(self.class_names)))
        for model in self.members:
            for v in shown:
                total += apply_temperature(self._member_probs(model, v, batch_size), self.temperature)
        return total / (len(self.members) * len(shown))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """True where the decision class's probability is >= the stored threshold."""
        return np.asarray(probs)[:, self.decision_index] >= self.threshold
