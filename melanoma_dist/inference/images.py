"""Turn image files (or stored dataset images) into model input exactly as training saw them.

Training images went through ingest (`data.images.prepare_image`: decode, RGB, centre
crop or pad to a square, bilinear resize, colour constancy if set, JPEG, PNG or raw re-encode) and then the
pipeline's `decode_image` (decode, / 255). Files given to `predict` take the same two steps with the
settings stored in `model.json["input"]`, so a file scored by `predict` gets the same
pixels it would have had in the training set.

Example:

```python
x = load_file("lesion.jpg", spec["input"])    # float32 [S, S, 3] in [0, 1]
```
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_dist.data.images import check_raw_length, prepare_image


def decode(data: bytes, image_size: int, encoding: str, dataset: str = "") -> np.ndarray:
    """Decode stored (ingested) image bytes with the training pipeline's `decode_image`.

    Args:
        data: One image's bytes, as ingest stored them.
        image_size: The side of the stored square.
        encoding: How they were stored: the dataset manifest's (or `model.json["input"]`'s) `encoding`.
        dataset: The dataset, named in errors. Defaults to `""`.

    Raises:
        ValueError: the bytes do not decode to an `image_size` square RGB image (a raw image of the
            wrong length: the message names the dataset and says to ingest it again).
    """
    import tensorflow as tf

    from melanoma_dist.data.pipeline import decode_image

    if encoding == "raw":  # checked here too (decode_image checks it as well), to name the length
        check_raw_length(data, image_size, dataset)
    try:
        return decode_image(tf.constant(data), image_size, encoding, dataset).numpy()
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        raise ValueError(f"stored image does not decode to {image_size}x{image_size} RGB: "
                         f"{str(e).splitlines()[0]}") from None


def load_file(path: str | Path, input_spec: Mapping[str, Any]) -> np.ndarray:
    """Read an image file as model input: ingest's `prepare_image`, then the pipeline's decode.

    Args:
        path: An image file (any format Pillow reads).
        input_spec: `model.json["input"]`: image_size, resize, encoding, jpeg_quality, color_constancy.

    Raises:
        BadImageError: the file is empty, not an image, truncated, too small, ... (`reason` says which).
    """
    size, encoding = int(input_spec["image_size"]), input_spec.get("encoding", "jpeg")
    prepared = prepare_image(path, size, resize=input_spec.get("resize", "crop"), encoding=encoding,
                             jpeg_quality=int(input_spec.get("jpeg_quality", 95)),
                             color_constancy=input_spec.get("color_constancy", "none"))
    return decode(prepared.data, size, encoding, str(path))
