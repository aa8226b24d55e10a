"""A source's labelled images as Arrow columns: the listing ingest holds for every image.

Ingest keeps the whole listing on its driver (labels are checked and ids compared across
sources before any image is decoded). As a list of Python objects it cost about 480 bytes per
image (1M images: 461 MiB); as Arrow columns it costs the bytes of its strings plus offsets
(about 70 bytes per image for typical file names). `Records` is a read-only sequence that makes
one `SourceRecord` per item on access, so callers iterate it as they would a list. A
path is stored as its folder (an index: a source has a few) and its file name; a group equal
to the image id is not stored.

Strings are stored as UTF-8 bytes with `surrogatepass`: a file name that is not valid UTF-8
(a str with lone surrogates) comes back unchanged, and sorting the bytes gives the order of
sorting the strings (`surrogateescape` would store such a byte as itself and sort it apart).

Example:

```python
builder = RecordBuilder()
builder.add("ISIC_0000002", "/data/mel/ISIC_0000002.jpg", "mel", "ISIC_0000002")
builder.add("ISIC_0000001", "/data/nv/ISIC_0000001.jpg", "nv", "ISIC_0000001")
records = builder.build(source="folder", label_type="dx")
[r.image_id for r in records]  # ['ISIC_0000001', 'ISIC_0000002']
```
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

T = TypeVar("T")

CHUNK_ROWS = 8192
"""Rows converted to and from Python objects at a time: what the driver holds as objects."""

MERGED_FOLDERS = 64
"""`Records.sorted_paths` merges at most this many folders' sorted names; more are sorted as whole paths."""

_SCHEMA = pa.schema([
    ("image_id", pa.binary()),
    ("folder", pa.int32()),  # index in `Records.folders`: a path is its folder (a few distinct ones) + its file name
    ("file", pa.binary()),
    ("raw_label", pa.int32()),  # index in `Records.labels` (a handful of distinct labels)
    ("group", pa.binary()),  # null: the group is the image id (every folder source, most CSVs)
    ("line", pa.int32()),  # line of the label file; 0 when the label comes from the path
])


@dataclass(frozen=True)
class SourceRecord:
    """One labelled image of a source, before decoding."""

    image_id: str
    path: str
    """Image file, built from the source's configured path."""
    raw_label: str
    """The label as written in the source (class folder name or CSV cell)."""
    label_type: str
    group: str
    """Images of one group (lesion) stay in one fold."""
    source: str
    where: str = ""
    """File and row the label came from, for error messages."""


def encode(text: str) -> bytes:
    """`text` as stored: UTF-8, lone surrogates (file-name bytes that are not UTF-8) kept in code-point order."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    """The string `encode` stored."""
    return data.decode("utf-8", "surrogatepass")


def sort(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Stored strings in sorted order (`encode`: the order of the strings)."""
    return values.take(pc.sort_indices(values))


def in_chunks(items: Iterable[T], size: int = CHUNK_ROWS) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def decoded(column: pa.ChunkedArray | pa.Array) -> Iterator[str]:
    """The strings of a stored column, converted `CHUNK_ROWS` at a time."""
    for start in range(0, len(column), CHUNK_ROWS):
        yield from (decode(v) for v in column.slice(start, CHUNK_ROWS).to_pylist())


class Records(Sequence[SourceRecord]):
    """The labelled images of one source, sorted by image id, as Arrow columns.

    Args:
        table: the columns of `_SCHEMA` (strings `encode`d).
        folders: the folders the images are in, each ending with its separator.
        labels: the distinct raw labels.
        source: the source's name, the same for every record.
        label_type: what the raw labels are (`dx`, `melanoma`), the same for every record.
        label_file: the CSV the line numbers refer to; empty for a folder source.
    """

    def __init__(self, table: pa.Table, folders: Sequence[str], labels: Sequence[str], source: str,
                 label_type: str, label_file: str = "") -> None:
        self.table = table
        self.folders = list(folders)
        self.labels = list(labels)
        self.source = source
        self.label_type = label_type
        self.label_file = label_file

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> SourceRecord:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self._record(self.table.slice(index % len(self), 1).to_pylist()[0])

    def __iter__(self) -> Iterator[SourceRecord]:
        for batch in self.table.to_batches(max_chunksize=CHUNK_ROWS):
            yield from (self._record(row) for row in batch.to_pylist())

    def paths(self) -> Iterator[str]:
        """The image files, in record order."""
        for batch in self.table.select(["folder", "file"]).to_batches(max_chunksize=CHUNK_ROWS):
            folders, files = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            yield from (self.folders[f] + decode(name) for f, name in zip(folders, files))

    def sorted_paths(self, folder_name: Callable[[str], str] = str) -> Iterator[str]:
        """The paths in sorted order (repeats kept), each folder renamed by `folder_name` first.

        With a few folders, each folder's names are sorted in Arrow and the folders merged, so
        that no full path is held but a chunk per folder. With many (small) folders the merge
        would hold them all: the full paths are then built and sorted in Arrow instead.
        """
        if len(self.folders) > MERGED_FOLDERS:
            prefixes = pa.array([encode(folder_name(f)) for f in self.folders], pa.binary())
            paths = pc.binary_join_element_wise(pc.take(prefixes, self.table.column("folder")),
                                                self.table.column("file"), b"")
            return decoded(sort(paths))
        order = pc.sort_indices(self.table, sort_keys=[("folder", "ascending"), ("file", "ascending")])
        folders = pc.take(self.table.column("folder"), order).to_numpy()
        files = pc.take(self.table.column("file"), order)
        starts = np.flatnonzero(np.diff(folders, prepend=-1))
        ends = np.append(starts[1:], len(folders))
        return heapq.merge(*(_prefixed(folder_name(self.folders[folders[a]]), files.slice(a, b - a))
                             for a, b in zip(starts, ends)))

    def _record(self, row: dict) -> SourceRecord:
        path = self.folders[row["folder"]] + decode(row["file"])
        image_id = decode(row["image_id"])
        return SourceRecord(image_id=image_id, path=path, raw_label=self.labels[row["raw_label"]],
                            label_type=self.label_type, source=self.source,
                            group=image_id if row["group"] is None else decode(row["group"]),
                            where=f"{self.label_file} line {row['line']}" if row["line"] else path)


def _prefixed(prefix: str, names: pa.ChunkedArray) -> Iterator[str]:
    return (prefix + name for name in decoded(names))


class RecordBuilder:
    """Collects records one at a time into Arrow batches of `CHUNK_ROWS` rows."""

    def __init__(self) -> None:
        self._rows: list[tuple[bytes, int, bytes, int, bytes | None, int]] = []
        self._batches: list[pa.RecordBatch] = []
        self._folders: dict[str, int] = {}
        self._labels: dict[str, int] = {}

    def add(self, image_id: str, path: str, raw_label: str, group: str, line: int = 0) -> None:
        cut = path.rfind("/") + 1  # "/" in local paths and URIs alike; 0 for a bare file name
        folder = self._folders.setdefault(path[:cut], len(self._folders))
        label = self._labels.setdefault(raw_label, len(self._labels))
        self._rows.append((encode(image_id), folder, encode(path[cut:]), label,
                           None if group == image_id else encode(group), line))
        if len(self._rows) >= CHUNK_ROWS:
            self._flush()

    def build(self, source: str, label_type: str, label_file: str = "") -> Records:
        """The records added so far, sorted by image id (stable: repeated ids stay in the order added)."""
        self._flush()
        table = pa.Table.from_batches(self._batches, schema=_SCHEMA)
        self._batches = []
        table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending")]))
        return Records(table, list(self._folders), list(self._labels), source, label_type, label_file)

    def _flush(self) -> None:
        if self._rows:
            columns = list(zip(*self._rows))
            self._batches.append(pa.RecordBatch.from_arrays(
                [pa.array(c, field.type) for c, field in zip(columns, _SCHEMA)], schema=_SCHEMA))
            self._rows = []


def first_repeat(records: Records) -> tuple[int, int] | None:
    """Positions of two records with the same image id (adjacent, since sorted by id), or None."""
    ids = records.table.column("image_id")
    if len(ids) < 2:
        return None
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    hits = np.flatnonzero(same.to_numpy(zero_copy_only=False))
    return (int(hits[0]), int(hits[0]) + 1) if len(hits) else None


def shared_ids(records: Records, others: Sequence[Records]) -> tuple[str, int, int] | None:
    """The first image id of `records` that `others` hold too: (id, index of the first of `others` holding
    it, how many ids of `records` the others hold), or None."""
    if not others:
        return None
    ids = records.table.column("image_id")
    known = pa.chunked_array([c for other in others for c in other.table.column("image_id").chunks], pa.binary())
    shared = pc.is_in(ids, value_set=known.combine_chunks())
    count = pc.sum(shared).as_py() or 0
    if not count:
        return None
    first = ids[int(np.flatnonzero(shared.to_numpy(zero_copy_only=False))[0])]
    owner = next(i for i, other in enumerate(others)
                 if pc.any(pc.equal(other.table.column("image_id"), first)).as_py())
    return decode(first.as_py()), owner, count
