"""Label schemes: which classes a dataset has and how raw source labels map to them.

A source's `label_type` says what its raw labels are:

- `dx`: HAM10000 diagnosis codes (`akiec bcc bkl df mel nv vasc`) or aliases such as
  `melanoma`, `nevus`, `seborrheic_keratosis`. A diagnosis provides every scheme.
- `melanoma`: a binary melanoma label (0/1, true/false, `other`/`melanoma`). It
  provides only the `melanoma` scheme.
- `malignant`: a binary malignancy label (0/1, true/false, `benign`/`malignant`). It
  provides only the `malignant` scheme.

Example:

```python
to_class_index("melanoma", "dx", "Melanoma", where="meta.csv line 2")  # 1
to_class_index("ham7", "dx", "nevus", where="meta.csv line 3")        # 5 (nv)
```
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

HAM7_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
"""The 7 HAM10000 diagnosis codes, in class-index order (alphabetical)."""

MALIGNANT_DX: frozenset[str] = frozenset({"mel", "bcc", "akiec"})
"""Diagnoses counted as malignant by the `malignant` scheme."""

SCHEMES: dict[str, tuple[str, ...]] = {
    "ham7": HAM7_CLASSES,
    "melanoma": ("other", "melanoma"),
    "malignant": ("benign", "malignant"),
}
"""Class names of each label scheme; for binary schemes index 1 is the positive class."""

LABEL_TYPES: tuple[str, ...] = ("dx", "melanoma", "malignant")

# Lower-case, underscore-separated spellings seen in ISIC/HAM exports.
DX_ALIASES: dict[str, str] = {
    "melanoma": "mel",
    "nevus": "nv",
    "naevus": "nv",
    "melanocytic_nevus": "nv",
    "seborrheic_keratosis": "bkl",
    "benign_keratosis": "bkl",
    "basal_cell_carcinoma": "bcc",
    "actinic_keratosis": "akiec",
    "dermatofibroma": "df",
    "vascular": "vasc",
}

_TRUE = frozenset({"1", "true"})
_FALSE = frozenset({"0", "false"})


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; valid schemes: {list(SCHEMES)}")


def _check_label_type(label_type: str) -> None:
    if label_type not in LABEL_TYPES:
        raise ValueError(f"unknown label_type {label_type!r}; valid label types: {list(LABEL_TYPES)}")


def class_names(scheme: str) -> tuple[str, ...]:
    """Class names of `scheme`, in class-index order.

    Raises:
        ValueError: `scheme` is not one of `ham7`, `melanoma`, `malignant`.
    """
    _check_scheme(scheme)
    return SCHEMES[scheme]


def is_binary(scheme: str) -> bool:
    """True for the two-class schemes (`melanoma`, `malignant`)."""
    return len(class_names(scheme)) == 2


def positive_class(scheme: str) -> str | None:
    """The positive class (index 1) of a binary scheme; None for the multi-class `ham7`."""
    names = class_names(scheme)
    return names[1] if len(names) == 2 else None


def melanoma_index(scheme: str) -> int | None:
    """Index of the melanoma class: `mel` in `ham7`, `melanoma` in `melanoma`; None for `malignant`.

    Used to report melanoma-vs-rest metrics from a `ham7` model.
    """
    names = class_names(scheme)
    for name in ("mel", "melanoma"):
        if name in names:
            return names.index(name)
    return None


def reported_melanoma_index(scheme: str) -> int | None:
    """The class whose one-vs-rest ROC-AUC the metrics add: melanoma in a multi-class scheme.

    None for binary schemes, whose ROC-AUC is already that of class 1.
    """
    return melanoma_index(scheme) if len(class_names(scheme)) > 2 else None


def provided_schemes(label_type: str) -> tuple[str, ...]:
    """The schemes a source whose labels are of `label_type` can provide."""
    _check_label_type(label_type)
    return tuple(SCHEMES) if label_type == "dx" else (label_type,)


def check_provides(scheme: str, label_type: str, source_name: str) -> None:
    """Check that a source with `label_type` labels can be mapped to `scheme`.

    Raises:
        ValueError: it cannot, e.g. melanoma 0/1 labels cannot give 7 diagnoses.
    """
    _check_provides(scheme, label_type, f"source {source_name!r}")


def _check_provides(scheme: str, label_type: str, subject: str) -> None:
    _check_scheme(scheme)
    provided = provided_schemes(label_type)
    if scheme not in provided:
        raise ValueError(
            f"{subject} has {label_type} 0/1 labels and cannot provide label scheme {scheme!r}; "
            f"use label_scheme: {provided[0]}")


def normalize_dx(raw_value: Any, where: str) -> str:
    """Map a diagnosis (code or alias, any case, spaces or hyphens) to one of the 7 codes.

    Raises:
        ValueError: the diagnosis is unknown; the message names `where` and the valid values.
    """
    text = str(raw_value).strip().lower().replace("-", "_").replace(" ", "_")
    dx = DX_ALIASES.get(text, text)
    if dx not in HAM7_CLASSES:
        raise ValueError(
            f"{where}: unknown diagnosis {raw_value!r}; valid values: {list(HAM7_CLASSES)} "
            f"or aliases {sorted(DX_ALIASES)}")
    return dx


def _binary_value(label_type: str, raw_value: Any, where: str) -> int:
    """0 or 1 from a binary label: 0/1, 0.0/1.0, true/false or the scheme's class names."""
    names = SCHEMES[label_type]
    if isinstance(raw_value, bool):
        return int(raw_value)
    text = str(raw_value).strip().lower()
    if text in names:
        return names.index(text)
    if text.endswith(".0"):  # 1.0 from a float column written by pandas
        text = text[:-2]
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise ValueError(
        f"{where}: unknown {label_type} label {raw_value!r}; valid values: 0, 1, true, false, "
        f"{names[0]}, {names[1]}")


def to_class_index(scheme: str, label_type: str, raw_value: Any, where: str) -> int:
    """Class index of a raw source label under `scheme`.

    Args:
        scheme: the dataset's label scheme (`ham7`, `melanoma`, `malignant`).
        label_type: what the raw label is (`dx`, `melanoma`, `malignant`).
        raw_value: the label as read from the source (string, int or bool).
        where: the file and row of the label, for error messages.

    Raises:
        ValueError: the label is unknown (naming `where` and the valid values), or
            `label_type` cannot provide `scheme`.
    """
    _check_provides(scheme, label_type, where)
    if label_type != "dx":
        return _binary_value(label_type, raw_value, where)
    dx = normalize_dx(raw_value, where)
    if scheme == "ham7":
        return HAM7_CLASSES.index(dx)
    if scheme == "melanoma":
        return int(dx == "mel")
    return int(dx in MALIGNANT_DX)
