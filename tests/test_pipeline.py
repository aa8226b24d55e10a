"""The tf.data pipeline: per-worker shards, augmentation in training only, every stored encoding."""

import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from melanoma_dist.config import AugmentConfig, PipelineConfig
from melanoma_dist.data import shards
from melanoma_dist.data.folds import load_folds
from melanoma_dist.data.images import decode_stored
from melanoma_dist.data.shards import SCHEMA, SCHEMA_VERSION, write_manifest, write_shards
from melanoma_dist.data.pipeline import (RowIndex, decode_image, make_dataset, split_rows, steps_per_epoch,
                                         worker_rows)
from melanoma_dist.inference.images import decode
from tests.synthetic import make_dataset as make_synthetic

NO_AUGMENT = AugmentConfig(rotation=0.0, zoom=0.0, horizontal_flip=False)
PLAIN = PipelineConfig(batch_size=4, augment=NO_AUGMENT)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cfg = make_synthetic(tmp_path_factory.mktemp("pipeline"))
    return cfg, RowIndex.load(cfg.dataset_dir)


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    """The images of `dataset` (same generator arguments), stored as raw pixels."""
    cfg = make_synthetic(tmp_path_factory.mktemp("pipeline-raw"), encoding="raw")
    return cfg, RowIndex.load(cfg.dataset_dir)


def test_row_index_holds_no_python_object_per_row(tmp_path):
    # A large index (issue 14: 1M rows) must be a few Arrow/NumPy buffers, not one str object per row.
    n = 200_000
    ids = pa.array([f"img{i:07d}" for i in range(n)])
    labels = np.arange(n) % 2
    table = pa.table({"image_id": ids, "source": ["s"] * n, "image": [b"x"] * n, "label": labels,
                      "label_name": np.array(["a", "b"])[labels], "group": [f"g{i // 2:07d}" for i in range(n)],
                      "pixel_sha256": ["0"] * n, "phash": ["0"] * n, "path": ["p"] * n}, schema=SCHEMA)
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "shards": write_shards(table, tmp_path, 60_000)})
    index = RowIndex.load(tmp_path)
    assert len(index) == n and index.shard_offsets.tolist() == [0, 60_000, 120_000, 180_000, n]
    fields = [index.shard_offsets, index.image_ids, index.labels, index.groups]
    assert not any(isinstance(f, np.ndarray) and f.dtype == object for f in fields)
    # 10-char ids and 8-char groups: 14 + 12 bytes of strings and offsets, 4 of label, per row.
    assert sum(f.nbytes for f in fields) <= 32 * n
    assert index.image_ids.take([0, n - 1]).to_pylist() == ["img0000000", f"img{n - 1:07d}"]
    assert index.groups[n - 1].as_py() == f"g{(n - 1) // 2:07d}"


def _images(ds) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in ds])


def _keys(images: np.ndarray) -> list[bytes]:
    """Pixel bytes of each image: float [0, 1] images, or the uint8 training batches of `augment_on: model`."""
    pixels = images if images.dtype == np.uint8 else (images * 255).round().astype(np.uint8)
    return sorted(im.tobytes() for im in pixels)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_worker_rows_disjoint_and_complete(world_size):
    rows = np.arange(3, 50)
    shares = [worker_rows(rows, r, world_size) for r in range(world_size)]
    assert sorted(np.concatenate(shares).tolist()) == rows.tolist()
    assert sum(len(s) for s in shares) == len(rows)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_workers_read_disjoint_complete_data(dataset, world_size):
    cfg, index = dataset
    rows = np.arange(len(index))
    everything = _keys(_images(make_dataset(index, rows, PLAIN, 16, training=False)))
    per_rank = [_keys(_images(make_dataset(index, worker_rows(rows, r, world_size), PLAIN, 16, training=False)))
                for r in range(world_size)]
    assert len(everything) == len(index) == 40
    assert sorted(k for keys in per_rank for k in keys) == everything  # complete, nothing twice
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(per_rank[a]) & set(per_rank[b])  # disjoint


def test_validation_is_plain_ordered_and_complete(dataset):
    cfg, index = dataset
    val = split_rows(load_folds(cfg.dataset_dir, 2, 42), 0, training=False)
    augmenting = PipelineConfig(batch_size=3, augment=AugmentConfig(rotation=0.3, zoom=0.3, contrast=0.3))
    ds = make_dataset(index, val, augmenting, 16, training=False)
    first, second = _images(ds), _images(ds)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert len(first) == len(val)  # batch 3 does not divide it evenly: nothing dropped
    np.testing.assert_array_equal(first, second)  # no augmentation, same order every pass
    np.testing.assert_array_equal(labels, index.labels[val])
    stored = _keys(_images(make_dataset(index, val, PLAIN, 16, training=False)))
    assert _keys(first) == stored


def test_training_is_augmented_where_configured(dataset):
    cfg, index = dataset
    rows = np.arange(len(index))
    stored = set(_keys(_images(make_dataset(index, rows, PLAIN, 16, training=False))))
    plain = make_dataset(index, rows, PLAIN, 16, training=True, seed=1)
    plain_keys = _keys(_images(plain.take(10)))
    assert set(plain_keys) <= stored  # augmentation off: training sees stored images
    augmented = make_dataset(index, rows, PipelineConfig(batch_size=4, augment_on="pipeline"), 16, training=True,
                             seed=1)
    aug_keys = _keys(_images(augmented.take(10)))
    assert len(aug_keys) == 40
    assert sum(k in stored for k in aug_keys) < 20  # default augmentation changes most images
    # augment_on: model (the default): the model scales and augments; tf.data only reads, decodes and
    # batches, and hands over uint8 pixels.
    in_model = _images(make_dataset(index, rows, PipelineConfig(batch_size=4), 16, training=True, seed=1).take(10))
    assert in_model.dtype == np.uint8 and set(_keys(in_model)) <= stored
    assert _images(augmented.take(1)).dtype == np.float32


def test_training_stream_is_endless_and_reshuffled(dataset):
    cfg, index = dataset
    rows = np.arange(len(index))
    # Buffer of 1: the order is the per-pass shard and row permutation alone.
    cfg = PipelineConfig(batch_size=4, shuffle_buffer=1, augment=NO_AUGMENT)
    images = _images(make_dataset(index, rows, cfg, 16, training=True, seed=3).take(30))
    assert len(images) == 120  # 40 rows, three passes
    passes = [images[i * 40:(i + 1) * 40] for i in range(3)]
    stored = _keys(_images(make_dataset(index, rows, PLAIN, 16, training=False)))
    assert all(_keys(p) == stored for p in passes)  # each pass is every row once
    assert not np.array_equal(passes[0], passes[1])  # in a new order


def test_steps_per_epoch_equal_on_all_ranks():
    assert steps_per_epoch(101, 2, 10) == 5  # the smallest share, 50 rows, makes 5 batches
    assert steps_per_epoch(101, 2, 16) == 4
    assert steps_per_epoch(5, 3, 64) == 1


def test_empty_rows(dataset):
    _, index = dataset
    with pytest.raises(ValueError, match="no rows"):
        make_dataset(index, np.array([], dtype=np.int64), PLAIN, 16, training=False)
    with pytest.raises(ValueError, match="rank must be in"):
        worker_rows(np.arange(4), 2, 2)


def test_raw_and_png_shards_give_identical_batches(dataset, raw_dataset):
    (_, png), (_, raw) = dataset, raw_dataset
    assert (png.encoding, raw.encoding) == ("png", "raw")
    assert list(raw.image_ids) == list(png.image_ids)
    rows = np.arange(len(png))
    for training, cfg in ((False, PLAIN), (True, PipelineConfig(batch_size=4))):  # eval; uint8 training stream
        a = make_dataset(png, rows, cfg, 16, training=training, seed=5)
        b = make_dataset(raw, rows, cfg, 16, training=training, seed=5)
        for (xa, ya), (xb, yb) in zip(a.take(12), b.take(12), strict=True):
            assert xa.dtype == xb.dtype
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_raw_image_of_wrong_length_fails_naming_the_dataset(raw_dataset, tmp_path):
    """Every reader of stored raw bytes: the tf.data pipeline, inference's decode, the reports' decode."""
    cfg, _ = raw_dataset
    bad = tmp_path / "bad-raw"
    shutil.copytree(cfg.dataset_dir, bad)
    path = shards.shard_paths(bad)[0]
    table = pq.read_table(path)
    images = table.column(shards.IMAGE).to_pylist()
    short = images[1] = images[1][:-5]  # e.g. a shard written at another size
    i = table.schema.get_field_index(shards.IMAGE)
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(images, pa.binary())), path)

    index = RowIndex.load(bad)
    wrong = "763 bytes, not 768 bytes.*ingest the dataset again"
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"in {re.escape(str(path))} is {wrong}"):
        list(make_dataset(index, np.arange(len(index)), PLAIN, 16, training=False))
    for read in (lambda: decode(short, 16, "raw", str(bad)), lambda: decode_stored(short, "raw", 16, str(bad))):
        with pytest.raises(ValueError, match=f"in {re.escape(str(bad))} is {wrong}"):
            read()
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"in {re.escape(str(bad))} is not 768 bytes"):
        decode_image(tf.constant(short), 16, "raw", str(bad))  # the graph-side check of single images
