"""The tf.data input pipeline over Parquet shards, sharded per worker.

Each worker (Horovod rank) reads only its own rows: the rows of a split are put
in a fixed order and rank `r` of `W` takes every W-th row starting at `r`, so
workers see disjoint sets that together are the whole split. Image bytes are
read shard by shard with pyarrow (memory stays bounded by one shard), then
shuffled, decoded, batched, normalised to [0, 1] and prefetched by tf.data. How
images are decoded is the dataset's `encoding` (its manifest, in `RowIndex`):
JPEG or PNG through `tf.io.decode_image` per image; `raw` shards are not decoded at
all: their pixels go from Arrow's buffers into uint8 tensors a shard at a time.
Training-time augmentation (Keras preprocessing layers) runs here only with
`pipeline.augment_on: pipeline`. By default (`model`) the training model takes
over everything after batching (`model/training_model.py`): training batches
stay uint8 (a quarter of the bytes to copy to the accelerator), and the model
scales them to [0, 1] and augments them, so this side only reads, decodes and
batches, light enough to feed a GPU from a core or two.

Training streams are endless (reshuffled every pass) and consumed for
`steps_per_epoch` batches, the same number on every rank, because unequal step
counts would deadlock Horovod's allreduce. Evaluation streams are one ordered
pass with no augmentation, no dropped and no repeated rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import tensorflow as tf

from melanoma_dist.config import PipelineConfig
from melanoma_dist.data import shards
from melanoma_dist.data.augment import build_augmenter
from melanoma_dist.data.fingerprint import with_defaults
from melanoma_dist.data.images import raw_length_error, raw_size

logger = logging.getLogger(__name__)

_RAW_ROWS_PER_YIELD = 64
"""Raw images handed to tf.data at a time: TensorFlow makes a tensor of a whole 300 MB shard (224 px) about
3x slower per byte than of a few MB (measured on 2,048-row shards)."""


@dataclass(frozen=True)
class RowIndex:
    """The light columns of a dataset, one entry per row in shard order.

    The ids and groups stay Arrow arrays (a few buffers), not one Python string per row:
    every training worker loads the index, and at a million rows the strings alone would
    take ~150 MB per worker. Take the rows you need: `index.image_ids.take(rows).to_pylist()`.
    """

    shard_paths: tuple[Path, ...]
    shard_offsets: np.ndarray  # first global row of each shard, plus the total at the end
    image_ids: pa.Array  # string
    labels: np.ndarray  # int32
    groups: pa.Array  # string
    encoding: str
    """How the shards store the images: the manifest's `encoding` (`jpeg`, `png` or `raw`)."""
    dataset: str
    """The dataset directory, named in errors."""

    @classmethod
    def load(cls, dataset_dir: str | Path) -> "RowIndex":
        paths = tuple(shards.shard_paths(dataset_dir))
        table = shards.read_columns(dataset_dir, [shards.IMAGE_ID, shards.LABEL, shards.GROUP])
        encoding = with_defaults(shards.load_manifest(dataset_dir), ("encoding",))["encoding"]
        return cls(paths, shards.row_offsets(paths), table[shards.IMAGE_ID].combine_chunks(),
                   table[shards.LABEL].to_numpy().astype(np.int32), table[shards.GROUP].combine_chunks(),
                   encoding, str(dataset_dir))

    def __len__(self) -> int:
        return int(self.shard_offsets[-1])

    def by_shard(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Split global row ids into (shard number, local row ids), preserving order within a shard."""
        return shards.locate(self.shard_offsets, rows)


def split_rows(fold_of_row: np.ndarray, fold: int, training: bool) -> np.ndarray:
    """Global row ids of the training part (every other fold) or validation part (this fold)."""
    mask = fold_of_row != fold if training else fold_of_row == fold
    return np.flatnonzero(mask).astype(np.int64)


def worker_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This worker's share of `rows`: disjoint across ranks, complete together.

    Raises:
        ValueError: rank outside [0, world_size).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rows[rank::world_size]


def steps_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Training batches per epoch, identical on every rank (based on the smallest rank share)."""
    return max(1, math.ceil((num_rows // world_size) / batch_size))


def _decode_uint8(data: tf.Tensor, image_size: int, encoding: str, dataset: str = "") -> tf.Tensor:
    """Decode one stored image to uint8 [image_size, image_size, 3] (the shards hold it at that size).

    Raises:
        ValueError: an unknown encoding.
        tf.errors.InvalidArgumentError: (when run) a raw image of the wrong length; bytes that do not decode.
    """
    if encoding == "raw":
        # No codec: the bytes are the pixels. Their length is checked first, so that shards written at
        # another size fail with what to do rather than with a reshape error.
        pixels = tf.io.decode_raw(data, tf.uint8)
        check = tf.debugging.assert_equal(tf.size(pixels), raw_size(image_size),
                                          message=raw_length_error(image_size, dataset))
        with tf.control_dependencies([check] if check is not None else []):  # None when eager (checked already)
            image = tf.reshape(pixels, [image_size, image_size, 3])
    elif encoding in ("jpeg", "png"):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    else:
        raise ValueError(f"dataset {dataset or '(unnamed)'} has encoding {encoding!r}; this melanoma-dist reads "
                         f"'jpeg', 'png' and 'raw': ingest it again (`melanoma-dist ingest --config ...`)")
    return tf.ensure_shape(image, [image_size, image_size, 3])


def to_unit_range(images: tf.Tensor) -> tf.Tensor:
    """uint8 pixels to float32 in [0, 1]."""
    return tf.cast(images, tf.float32) / 255.0


def decode_image(data: tf.Tensor, image_size: int, encoding: str, dataset: str = "") -> tf.Tensor:
    """Decode one stored image to float32 [image_size, image_size, 3] in [0, 1].

    Args:
        data: The image's bytes from the shards.
        image_size: The dataset's image size.
        encoding: The dataset's `encoding` (its manifest's, `RowIndex.encoding`).
        dataset: The dataset, named in errors. Defaults to `""`.
    """
    return to_unit_range(_decode_uint8(data, image_size, encoding, dataset))


def _shard_chunks(index: RowIndex, rows: np.ndarray, image_size: int, shuffle: bool, seed: int,
                  repeat: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (images, labels) one shard at a time; reshuffled on every pass when asked.

    Images are stored bytes (one object per image) or, for raw shards, uint8 [n, S, S, 3] pixels,
    read a shard at a time and yielded `_RAW_ROWS_PER_YIELD` rows at a time.
    """
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        parts = index.by_shard(rows)
        if shuffle:
            parts = [parts[i] for i in rng.permutation(len(parts))]
        for shard, local in parts:
            if shuffle:
                local = rng.permutation(local)
            labels = index.labels[local + index.shard_offsets[shard]]
            if index.encoding == "raw":  # a copy, not a decode per image: what raw shards are for
                pixels = shards.read_raw_images(index.shard_paths[shard], local, image_size)
                for start in range(0, len(local), _RAW_ROWS_PER_YIELD):
                    yield pixels[start:start + _RAW_ROWS_PER_YIELD], labels[start:start + _RAW_ROWS_PER_YIELD]
            else:
                yield np.asarray(shards.read_images(index.shard_paths[shard], local), dtype=object), labels
        if not repeat:
            return
        epoch += 1


def make_dataset(index: RowIndex, rows: np.ndarray, cfg: PipelineConfig, image_size: int,
                 training: bool, seed: int = 0) -> tf.data.Dataset:
    """A batched dataset of (image, label) over `rows` (already this worker's share).

    Args:
        index: Row index of the dataset.
        rows: Global row ids to read, in order.
        cfg: Pipeline settings (batch size, shuffle buffer, parallelism, augmentation and where it runs:
            augmented here only with `augment_on: pipeline`).
        image_size: Side of the stored square images (decoded as `index.encoding` says).
        training: Endless, shuffled stream when True: uint8 images in [0, 255] with `augment_on: model`
            (the training model scales and augments them), float32 [0, 1] augmented ones with `pipeline`;
            one ordered, plain float32 pass when False.
        seed: Seed of shuffling and augmentation (give each rank its own).

    Raises:
        ValueError: `rows` is empty, or the dataset's encoding is unknown. (A raw image of the wrong
            length fails when its shard is read, naming the shard and the fix.)
    """
    if len(rows) == 0:
        raise ValueError("this worker has no rows to read: fewer images than workers, or an empty fold")
    parallel = tf.data.AUTOTUNE if cfg.parallel_calls == -1 else cfg.parallel_calls
    raw = index.encoding == "raw"
    images = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8) if raw else tf.TensorSpec([None], tf.string)
    ds = tf.data.Dataset.from_generator(
        lambda: _shard_chunks(index, rows, image_size, shuffle=training, seed=seed, repeat=training),
        output_signature=(images, tf.TensorSpec([None], tf.int32)))
    ds = ds.unbatch()
    if training:
        ds = ds.shuffle(min(cfg.shuffle_buffer, len(rows)), seed=seed)
    if not raw:  # raw shards arrive as pixels
        ds = ds.map(lambda data, label: (_decode_uint8(data, image_size, index.encoding, index.dataset), label),
                    num_parallel_calls=parallel, deterministic=not training)
    ds = ds.batch(cfg.batch_size, drop_remainder=False)
    if training and cfg.augment_on == "model":
        # The training model scales and augments on the accelerator; the float conversion alone would cost
        # this side about a fifth of its CPU time per image.
        return ds.prefetch(tf.data.AUTOTUNE)
    # Scale whole batches: one op per batch instead of two per image (same values as decode_image).
    ds = ds.map(lambda x, y: (to_unit_range(x), y), num_parallel_calls=parallel, deterministic=not training)
    augmenter = build_augmenter(cfg.augment, seed) if training else None
    if augmenter is not None:
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=parallel,
                    deterministic=False)
    return ds.prefetch(tf.data.AUTOTUNE)
