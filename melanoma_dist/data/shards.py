"""The on-disk dataset format: Parquet shards plus `manifest.json`, the single source of column names.

A dataset directory holds `shard-00000-of-000NN.parquet` files and `manifest.json`
(written by ingest; it lists the shards in row order). Every shard has the columns of
`SCHEMA`; rows are stored in row groups of at most `ROW_GROUP_ROWS` rows so that
readers can fetch a few images without reading the whole shard. A shard holds at most
`rows_per_shard` rows and, unless one image alone is larger, `shard_bytes` bytes of
images, so shards of large images hold fewer rows: global row `i` of the dataset is found
from the shards' row counts (`row_offsets`, `locate`), never as `i // rows_per_shard`.

Writing is deterministic: the same rows give byte-identical files (fixed compression,
no timestamps). The readers take a dataset in an object store (`s3://bucket/dataset`) too,
fetching only the footers and row groups they need.

Example:

```python
meta = read_columns("runs/dataset", [IMAGE_ID, LABEL, GROUP])  # pyarrow.Table, all shards
images = read_images(shard_paths("runs/dataset")[0], [0, 5])   # stored bytes of 2 rows (manifest["encoding"])
```
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from melanoma_dist import storage
from melanoma_dist.data.images import raw_length_error, raw_size
from melanoma_dist.paths import is_uri

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROW_GROUP_ROWS = 256

IMAGE_ID = "image_id"
SOURCE = "source"
IMAGE = "image"
LABEL = "label"
LABEL_NAME = "label_name"
GROUP = "group"
PIXEL_SHA256 = "pixel_sha256"
PHASH = "phash"
PATH = "path"

SCHEMA = pa.schema([
    pa.field(IMAGE_ID, pa.string(), nullable=False),
    pa.field(SOURCE, pa.string(), nullable=False),
    pa.field(IMAGE, pa.binary(), nullable=False),  # image_size^2 RGB: JPEG, PNG or raw (manifest `encoding`)
    pa.field(LABEL, pa.int32(), nullable=False),  # class index in the manifest's class_names
    pa.field(LABEL_NAME, pa.string(), nullable=False),
    pa.field(GROUP, pa.string(), nullable=False),  # lesion: rows of one group stay in one fold
    pa.field(PIXEL_SHA256, pa.string(), nullable=False),
    pa.field(PHASH, pa.string(), nullable=False),
    pa.field(PATH, pa.string(), nullable=False),  # the source image file, for reports
])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
LIGHT_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c != IMAGE)
"""Every column but the image bytes: cheap to read for folds and reports."""

_REINGEST = "re-run `melanoma-dist ingest --config <your config>`"
_PARTIAL_SUFFIX = ".partial"
OWN_FILES: tuple[str, ...] = (MANIFEST, "shard-*.parquet", f"shard-*{_PARTIAL_SUFFIX}", "folds/k*-seed*")
"""Glob patterns of the files melanoma-dist writes in a dataset folder (folds as `data.folds.folds_path` names them)."""
# zstd at a fixed level: deterministic output; JPEG and PNG bytes are already compressed,
# so a higher level would cost time for nothing. No statistics on the image column:
# min/max of image bytes are useless and would bloat the footer.
_WRITE_OPTIONS: dict[str, Any] = dict(
    compression="zstd", compression_level=3, row_group_size=ROW_GROUP_ROWS,
    use_dictionary=[SOURCE, LABEL_NAME], write_statistics=list(LIGHT_COLUMNS))
# Raw pixels (`encoding: raw`) are stored uncompressed: zstd saves ~25 % of their bytes but
# un-zstd-ing them cost a reader more CPU than all the rest of its work (bench_feeding.py), and
# raw shards exist to spare the reader's CPU.
_UNCOMPRESSED_IMAGES: dict[str, Any] = dict(
    _WRITE_OPTIONS, compression={c: "none" if c == IMAGE else "zstd" for c in COLUMNS},
    compression_level={c: 3 for c in LIGHT_COLUMNS})
# Shards are built and written in the system allocator's memory, not in Arrow's default pool
# (mimalloc), which keeps the pages of freed shards for reuse: the writer's RSS grew with the
# image size (ingest's driver at 512 px: 465 MiB, against 209 at 128 px; 387 MiB with
# ARROW_DEFAULT_MEMORY_POOL=system), while malloc gives large freed blocks back to the OS. Only
# the calls that take a `memory_pool` get it (pa.array, combine_chunks, compute functions, and
# pq.write_table, which hands it to its ParquetWriter); Table.from_pylist and Table.cast take none.
_POOL = pa.system_memory_pool()


def shard_name(index: int, num_shards: int) -> str:
    """File name of shard `index` of `num_shards`: `shard-00003-of-00012.parquet`."""
    return f"shard-{index:05d}-of-{num_shards:05d}.parquet"


def write_shards(rows: Iterable[Mapping[str, Any]] | Iterable[pa.Table | pa.RecordBatch] | pa.Table,
                 out_dir: str | Path, rows_per_shard: int, shard_bytes: int | None = None,
                 compress_images: bool = True) -> list[str]:
    """Write rows into Parquet shards of at most `rows_per_shard` rows and `shard_bytes` image bytes, streaming.

    A shard ends before the row that would take it past either limit (a single larger image
    gets a shard of its own), so the same rows always give the same shards, whichever form
    they come in.

    Args:
        rows: a `pyarrow.Table` with the `SCHEMA` columns; an iterable of such tables (or
            record batches), one after another; or an iterable of dicts keyed by column name.
            Iterables are consumed lazily: at most one shard (plus the table being cut) is
            held in memory.
        out_dir: directory to write to (created if needed; must hold no shards yet).
        rows_per_shard: rows per shard at most; the last shard may be smaller.
        shard_bytes: encoded image bytes per shard at most (the files come out a little
            larger: the other columns, the footer). Defaults to `None` (rows only).
        compress_images: zstd on the image column; False for raw pixels (read faster, stored
            larger). Defaults to `True`.

    Returns:
        The shard file names, in row order (empty when there are no rows).

    Raises:
        FileExistsError: `out_dir` already holds shards.
        ValueError: `rows_per_shard` or `shard_bytes` < 1, or a row does not fit `SCHEMA`.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1 (or None: no byte limit), got {shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("shard-*.parquet"))
    if existing:
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ...); write to an empty directory")
    # The final names contain the shard count, unknown until the rows run out: write
    # numbered partial files, then rename them.
    partial = []
    for i, table in enumerate(_batches(rows, rows_per_shard, shard_bytes)):
        path = out / f"shard-{i:05d}{_PARTIAL_SUFFIX}"
        pq.write_table(table, path, memory_pool=_POOL, **(_WRITE_OPTIONS if compress_images else _UNCOMPRESSED_IMAGES))
        partial.append(path)
    names = [shard_name(i, len(partial)) for i in range(len(partial))]
    for path, name in zip(partial, names):
        path.rename(out / name)
    logger.debug("wrote %d shards to %s", len(names), out)
    return names


def _batches(rows: Iterable[Mapping[str, Any]] | Iterable[pa.Table | pa.RecordBatch] | pa.Table, max_rows: int,
             max_bytes: int | None) -> Iterator[pa.Table]:
    """The shards' tables: cut where `_shard_lengths` says, from tables or from streamed rows alike."""
    items = iter([rows] if isinstance(rows, pa.Table) else rows)
    first = next(items, None)
    if first is None:
        return
    items = itertools.chain([first], items)
    if isinstance(first, (pa.Table, pa.RecordBatch)):
        yield from _cut_tables(items, max_rows, max_bytes)
    else:
        yield from _cut_rows(items, max_rows, max_bytes)


def _cut_tables(tables: Iterable[pa.Table | pa.RecordBatch], max_rows: int,
                max_bytes: int | None) -> Iterator[pa.Table]:
    """Shards cut from tables streamed one after another (a shard may span several, or part of one)."""
    pending: list[pa.Table] = []  # the rows seen but not yet in a shard

    def sizes() -> Iterator[int]:
        for table in tables:
            if isinstance(table, pa.RecordBatch):
                table = pa.Table.from_batches([table])
            table = table.select(list(COLUMNS)).cast(SCHEMA)
            pending.append(table)
            yield from pc.binary_length(table[IMAGE], memory_pool=_POOL).to_numpy().tolist()

    for length in _shard_lengths(sizes(), max_rows, max_bytes):
        rows = pa.concat_tables(pending)  # no copy: the chunks are kept
        # One chunk per column, as a single table or rows give: the Parquet writer cuts pages at
        # chunk boundaries too, so the same rows in other chunks would not give the same bytes.
        yield rows.slice(0, length).combine_chunks(memory_pool=_POOL)
        pending[:] = [rows.slice(length)]


def _cut_rows(rows: Iterable[Mapping[str, Any]], max_rows: int, max_bytes: int | None) -> Iterator[pa.Table]:
    """Shards cut from streamed row dicts."""
    buf: list[Mapping[str, Any]] = []

    def sizes() -> Iterator[int]:
        for row in rows:
            buf.append(row)
            yield len(row.get(IMAGE) or b"")

    # A length comes out once the row after the shard was seen (and buffered), or at the end.
    for length in _shard_lengths(sizes(), max_rows, max_bytes):
        table = _to_table(buf[:length])
        del buf[:length]  # before the table is written: one copy of the shard's images in memory, not two
        yield table


def _shard_lengths(sizes: Iterable[int], max_rows: int, max_bytes: int | None) -> Iterator[int]:
    """Rows of each shard, given each row's image bytes: a shard ends before the row that would overflow it."""
    rows = nbytes = 0
    for size in sizes:
        if rows and (rows >= max_rows or (max_bytes is not None and nbytes + size > max_bytes)):
            yield rows
            rows = nbytes = 0
        rows += 1
        nbytes += size
    if rows:
        yield rows


def _to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`pa.Table.from_pylist(rows, schema=SCHEMA)`, built in `_POOL` (from_pylist takes no memory pool)."""
    try:
        return pa.Table.from_arrays([pa.array([row.get(f.name) for row in rows], f.type, memory_pool=_POOL)
                                     for f in SCHEMA], schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"rows do not fit the shard schema {list(COLUMNS)}: {e}") from None


def write_manifest(dataset_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write `manifest.json` with sorted keys (the same manifest gives the same bytes)."""
    path = Path(dataset_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read a dataset's `manifest.json`.

    Raises:
        FileNotFoundError: there is no manifest (the dataset was not ingested).
        ValueError: the manifest is damaged (not JSON, no list of shards) or was written
            by an incompatible format version.
    """
    path = manifest_path(dataset_dir)
    if not storage.is_file(path):
        raise FileNotFoundError(f"no {MANIFEST} in {dataset_dir}: run `melanoma-dist ingest --config ...` first")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: cut short or overwritten
        raise ValueError(_damaged(path, f"not valid JSON: {e}")) from None
    if not isinstance(manifest, dict):
        raise ValueError(_damaged(path, f"a JSON {type(manifest).__name__}, not an object"))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r} but this melanoma-dist reads version "
                         f"{SCHEMA_VERSION}: {_REINGEST}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        raise ValueError(_damaged(path, f"'shards' is {shards!r}, not a list of file names"))
    return manifest


def manifest_path(dataset_dir: str | Path) -> Path | str:
    """The dataset's `manifest.json`: a Path, or a URI when the dataset is in an object store."""
    return storage.join(dataset_dir, MANIFEST) if is_uri(dataset_dir) else Path(dataset_dir) / MANIFEST


def parquet_file(path: str | Path) -> pq.ParquetFile:
    """A Parquet file (shard, folds), local or in an object store; only the parts read are fetched."""
    if not is_uri(path):
        return pq.ParquetFile(path)
    fs, inner = storage.filesystem(path)
    return pq.ParquetFile(inner, filesystem=fs)


def own_files(dataset_dir: str | Path) -> list[Path]:
    """The files melanoma-dist wrote in a dataset folder (manifest, shards, folds), not the user's."""
    root = Path(dataset_dir)
    return sorted({p for pattern in OWN_FILES for p in root.glob(pattern) if p.is_file()})


def _damaged(path: Path | str, detail: str) -> str:
    return f"{path} is damaged or truncated ({detail}): {_REINGEST}"


@contextlib.contextmanager
def _shard_errors(path: str | Path) -> Iterator[None]:
    """Turn Arrow's errors on a damaged shard (which do not name the file) into a ValueError that does."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise ValueError(_damaged(path, str(e).splitlines()[0] if str(e) else type(e).__name__)) from None


def num_rows(path: str | Path) -> int:
    """Rows of one shard, from its footer.

    Raises:
        ValueError: the shard is damaged or truncated.
    """
    with _shard_errors(path):
        return parquet_file(path).metadata.num_rows


def row_offsets(paths: Sequence[str | Path]) -> np.ndarray:
    """The first global row of each shard, plus the total row count at the end (from the footers).

    Shards need not have equal row counts (see `write_shards`): map rows with `locate`.

    Raises:
        ValueError: a shard is damaged or truncated.
    """
    return np.concatenate([[0], np.cumsum([num_rows(p) for p in paths], dtype=np.int64)]).astype(np.int64)


def locate(offsets: np.ndarray, rows: Sequence[int] | np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split global row ids into (shard number, local row ids), by shard, in row order within a shard.

    Args:
        offsets: the dataset's `row_offsets`.
        rows: global row ids.

    Raises:
        IndexError: a row is outside the dataset.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= offsets[-1]):
        bad = rows[(rows < 0) | (rows >= offsets[-1])][0]
        raise IndexError(f"row {bad} is outside the dataset ({offsets[-1]} rows)")
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    return [(int(s), rows[shard_of == s] - offsets[s]) for s in np.unique(shard_of)]


def shard_paths(dataset_dir: str | Path) -> list[Path] | list[str]:
    """The dataset's shard files, in row order, as listed by its manifest: Paths, or URIs in an object store.

    Raises:
        FileNotFoundError: the manifest or a shard it lists is missing.
    """
    names = load_manifest(dataset_dir)["shards"]
    if is_uri(dataset_dir):  # one listing request instead of one per shard
        listed = {name for name, _ in storage.listdir(dataset_dir)}
        paths: list = [storage.join(dataset_dir, name) for name in names]
        found = [name in listed for name in names]
    else:
        paths = [Path(dataset_dir) / name for name in names]
        found = [p.is_file() for p in paths]
    for p, ok in zip(paths, found):
        if not ok:
            raise FileNotFoundError(f"shard {p} listed in {manifest_path(dataset_dir)} is missing: {_REINGEST}")
    return paths


def read_columns(dataset_dir: str | Path, columns: Sequence[str]) -> pa.Table:
    """Read some columns of every shard, concatenated in row order.

    Args:
        dataset_dir: the dataset directory.
        columns: column names, e.g. `[IMAGE_ID, LABEL, GROUP, PIXEL_SHA256]`.

    Raises:
        ValueError: a name is not a shard column, or a shard lacks one (it is stale).
        FileNotFoundError: see `shard_paths`.
    """
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown shard column {unknown[0]!r}; valid columns: {list(COLUMNS)}")
    tables = []
    for p in shard_paths(dataset_dir):
        with _shard_errors(p):
            pf = parquet_file(p)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"shard {p} has no column {missing[0]!r} (columns: {pf.schema_arrow.names}): "
                                 f"it was written by an older ingest; {_REINGEST}")
            tables.append(pf.read(columns=list(columns)))
    return pa.concat_tables(tables)


def read_images(path: str | Path, row_indices: Sequence[int] | None = None) -> list[bytes]:
    """The stored image bytes of some rows of one shard (all rows when `row_indices` is None).

    Only the row groups holding the requested rows are read.

    Raises:
        IndexError: a row index is outside the shard.
        ValueError: the shard is damaged or truncated.
    """
    with _shard_errors(path):
        return _image_column(parquet_file(path), path, row_indices).to_pylist()


def read_raw_images(path: str | Path, row_indices: Sequence[int] | None, image_size: int) -> np.ndarray:
    """The pixels of some rows of one shard of a `raw` dataset: uint8 [n, image_size, image_size, 3].

    Straight from Arrow's buffers, without a Python object per image: reading raw shards is
    meant to cost no more than copying their bytes.

    Raises:
        IndexError: a row index is outside the shard.
        ValueError: the shard is damaged or truncated, or an image is not image_size^2 x 3 bytes
            (the message names the shard and says to ingest again).
    """
    with _shard_errors(path):
        column = _image_column(parquet_file(path), path, row_indices)
    nbytes = raw_size(image_size)
    parts = []
    for chunk in column.chunks:  # binary arrays: buffers are (validity, int32 offsets, data)
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int32, count=len(chunk) + 1, offset=4 * chunk.offset)
        lengths = np.diff(offsets)
        if (lengths != nbytes).any():
            raise ValueError(raw_length_error(image_size, str(path), int(lengths[lengths != nbytes][0])))
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
        parts.append(data.reshape(len(chunk), image_size, image_size, 3))
    if not parts:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _image_column(pf: pq.ParquetFile, path: str | Path, row_indices: Sequence[int] | None) -> pa.ChunkedArray:
    """The image column of the rows asked, in that order, reading only the row groups that hold them."""
    if row_indices is None:
        return pf.read(columns=[IMAGE]).column(IMAGE)
    meta = pf.metadata
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    for i in row_indices:
        if not 0 <= i < meta.num_rows:
            raise IndexError(f"row {i} is outside shard {path} ({meta.num_rows} rows)")
    groups = sorted({bisect.bisect_right(starts, i) - 1 for i in row_indices})
    column = pf.read_row_groups(groups, columns=[IMAGE]).column(IMAGE)
    # Position of each selected group's first row inside `column`.
    offset, base = 0, {}
    for g in groups:
        base[g] = offset
        offset += starts[g + 1] - starts[g]
    positions = []
    for i in row_indices:
        g = bisect.bisect_right(starts, i) - 1
        positions.append(base[g] + i - starts[g])
    return column.take(pa.array(positions, pa.int64()))
