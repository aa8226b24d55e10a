"""Test-time augmentation: the views of an image whose predictions are averaged.

`flip` averages the image and its horizontal mirror; `dihedral` averages all 8
symmetries of the square (4 rotations, each with and without a mirror).
Dermoscopic images have no canonical orientation, so every view is as valid as
the original; averaging them removes the model's orientation noise.

Example:

```python
views(images, "dihedral")   # 8 arrays [N, S, S, 3]
```
"""

from __future__ import annotations

import numpy as np

TTA_MODES = ("none", "flip", "dihedral")


def tta_mode(value: str | bool | None) -> str:
    """Normalise a TTA setting: a mode name, or a bool of models exported before modes existed.

    Raises:
        ValueError: an unknown mode.
    """
    if isinstance(value, bool) or value is None:
        return "flip" if value else "none"
    if value not in TTA_MODES:
        raise ValueError(f"test-time augmentation must be one of {list(TTA_MODES)}, got {value!r}")
    return value


def view_names(mode: str) -> list[str]:
    """Human-readable names of the views of `mode`, in `views` order."""
    mode = tta_mode(mode)
    if mode == "none":
        return ["identity"]
    if mode == "flip":
        return ["identity", "horizontal flip"]
    return [f"rot{90 * k}{'+flip' if f else ''}" for k in range(4) for f in (False, True)]


def views(images: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views of a batch [N, S, S, C] (contiguous copies), identity first."""
    mode = tta_mode(mode)
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, np.ascontiguousarray(images[:, :, ::-1, :])]
    out = []
    for k in range(4):
        rotated = np.rot90(images, k, axes=(1, 2))
        out += [np.ascontiguousarray(rotated), np.ascontiguousarray(rotated[:, :, ::-1, :])]
    return out
