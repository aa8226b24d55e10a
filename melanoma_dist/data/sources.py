"""Read one configured image collection (a `SourceConfig`) into labelled image records.

Three layouts are understood:

- `folder`: `root/<class>/<image file>`. The class folder name is the raw label; the
  image id and group are the file stem (prefixed with the class folder when stems
  collide). Every non-hidden file is a candidate: files that are not images are
  reported as skipped when decoded.
- `ham10000`: `root/HAM10000_metadata.csv` (columns `lesion_id,image_id,dx`) and the
  images in `root/images/`, `root/`, or `root/HAM10000_images_part_{1,2}/`. The group
  is the lesion id, so that images of one lesion never straddle folds.
- `csv`: a table with an id (or path) column and a label column, optional group and
  split columns. Images are found through `image_dir` (may contain `{split}`) or in
  `<csv dir>/<split>/`, `<csv dir>/images/`, `<csv dir>/`.

Rows whose image file is missing, and CSV rows with an empty split cell when `splits`
filters on it, are not an error: they are returned as skipped items with the reason, so
that ingest reports them in the manifest. Broken symbolic links are kept as records: decoding
them fails with the reason ("dangling symbolic link", "symbolic link loop"), also counted.
Image files that no label names (images directly in a folder source's root, images beside
a CSV's images that no row mentions) are listed as unlabelled, for the manifest and the log.

A source's path may be an object-store URI (`s3://bucket/ham10000`): the same layouts are
read through `melanoma_dist.storage`, one listing request per folder.

Example:

```python
records, skipped = read_source(SourceConfig(kind="ham10000", path="../shared/data/ham10000"))
records[0].image_id, records[0].raw_label, records[0].group  # ('ISIC_0024306', 'nv', 'HAM_0000550')
scan_source(SourceConfig(kind="csv", path="labels.csv")).unlabelled  # ['images/not_in_csv.jpg']
```
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from melanoma_dist.config import SourceConfig
from melanoma_dist.data.images import is_file_or_broken_link
from melanoma_dist.data.name_index import Mentions, NameIndex
from melanoma_dist.data.records import RecordBuilder, Records, decoded, encode, first_repeat, in_chunks
from melanoma_dist.storage import ObjectPath, as_path, join, listdir, open_text

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""Extensions tried when looking an image up by id (CSV and HAM10000 layouts)."""

HAM_METADATA = "HAM10000_metadata.csv"
HAM_IMAGE_DIRS: tuple[str, ...] = ("images", ".", "HAM10000_images_part_1", "HAM10000_images_part_2")
HAM_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")

MISSING_IMAGE = "image file not found"
EMPTY_SPLIT = "empty {column!r} cell"
"""Skip reason of a CSV row without a split when `splits` filters on it (formatted with the column)."""

UNLABELLED_SAMPLE = 5
"""Unlabelled image files named in the log and the manifest."""


@dataclass(frozen=True)
class SkippedItem:
    """An image left out of the dataset, with the reason."""

    source: str
    path: str
    image_id: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SourceScan:
    """What reading one source found."""

    records: Records
    """Labelled images, sorted by image id (Arrow columns: see `data.records`)."""
    skipped: list[SkippedItem]
    """Labelled rows left out before decoding (image file not found, empty split cell), sorted by path."""
    unlabelled: list[str]
    """Image files the source holds but no label names, sorted: they are not ingested."""
    label_file: str = ""
    """The CSV the labels come from; empty for a folder source."""


def read_source(src: SourceConfig) -> tuple[Records, list[SkippedItem]]:
    """Read the records of one source, sorted by image id (`scan_source` without the unlabelled files).

    Returns:
        The records whose image file exists, and the rows skipped because it does not.

    Raises:
        See `scan_source`.
    """
    scan = scan_source(src)
    return scan.records, scan.skipped


def scan_source(src: SourceConfig) -> SourceScan:
    """Read one source: its labelled images, the rows it skips and the image files no label names.

    Args:
        src: the source's configuration.

    Raises:
        FileNotFoundError: the folder or CSV does not exist (the message shows the expected layout).
        ValueError: the CSV is empty, has no rows or is not UTF-8; a required column is missing,
            a label cell is empty, or an image id repeats.
    """
    name = src.display_name
    readers = {"folder": _read_folder, "ham10000": _read_ham10000, "csv": _read_csv_source}
    if src.kind not in readers:  # pragma: no cover - config validation rejects other kinds
        raise ValueError(f"unknown source kind {src.kind!r}; valid kinds: {list(readers)}")
    scan = readers[src.kind](src, name)
    _check_unique_ids(scan.records, name)
    if scan.skipped:
        reasons = Counter(s.reason for s in scan.skipped)
        logger.warning("source %r: %d labelled images skipped (%s; first: %s)", name, len(scan.skipped),
                       ", ".join(f"{r}: {n}" for r, n in reasons.items()), scan.skipped[0].path)
    if scan.unlabelled:
        why = f"no row of {scan.label_file} names them" if scan.label_file else "they are not in a class folder"
        logger.warning("source %r: %d image file(s) not ingested because %s: %s%s", name, len(scan.unlabelled),
                       why, ", ".join(sorted(scan.unlabelled)[:UNLABELLED_SAMPLE]),
                       ", ..." if len(scan.unlabelled) > UNLABELLED_SAMPLE else "")
    logger.info("source %r: %d images", name, len(scan.records))
    return SourceScan(records=scan.records, skipped=sorted(scan.skipped, key=lambda s: (s.path, s.image_id)),
                      unlabelled=sorted(scan.unlabelled), label_file=scan.label_file)


# ---------------------------------------------------------------- layouts

def _read_folder(src: SourceConfig, name: str) -> SourceScan:
    root = as_path(src.path)
    layout = f"expected {root}/<class>/<image files>, e.g. {root}/mel/ISIC_0000001.jpg"
    if not root.is_dir():
        raise FileNotFoundError(f"folder source {name!r}: {root} is not a directory; {layout}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise FileNotFoundError(f"folder source {name!r}: {root} has no class folders; {layout}")
    loose = [str(f) for f in root.iterdir() if _is_candidate(f) and f.suffix.lower() in IMAGE_EXTENSIONS]
    # Names and stems as Arrow arrays, not a Path per file: at 1M files those cost ~0.5 GB.
    listed = [(d, *_names_and_stems(d)) for d in class_dirs]
    repeated = _repeated(pa.chunked_array([c for _, _, stems in listed for c in stems.chunks], pa.binary()))
    builder = RecordBuilder()
    for folder, names, stems in listed:
        label, base = folder.name, str(folder)
        in_folder = _repeated(stems) if repeated else set()
        for file, stem in zip(decoded(names), decoded(stems)):
            image_id = _folder_id(label, file, stem, repeated, in_folder)
            builder.add(image_id, f"{base}/{file}", label, image_id)
    return SourceScan(builder.build(name, src.label_type), [], loose)


def _is_candidate(f: Path | ObjectPath) -> bool:
    """A non-hidden file, or a broken symbolic link (kept so that its decoding failure is counted)."""
    if isinstance(f, ObjectPath):
        return not f.name.startswith(".") and f.is_file()
    return not f.name.startswith(".") and is_file_or_broken_link(f)


def _names_and_stems(folder: Path | ObjectPath) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The candidate files of one class folder: their names and stems (`encode`d), in listing order."""
    if isinstance(folder, ObjectPath):
        files: Iterator[str] = (f.name for f in folder.iterdir() if _is_candidate(f))
    else:
        files = _list_files(folder)
    names: list[pa.Array] = []
    stems: list[pa.Array] = []
    for chunk in in_chunks(files):
        names.append(pa.array([encode(f) for f in chunk], pa.binary()))
        stems.append(pa.array([encode(_stem(f)) for f in chunk], pa.binary()))
    return pa.chunked_array(names, pa.binary()), pa.chunked_array(stems, pa.binary())


def _list_files(folder: Path, hidden: bool = False) -> Iterator[str]:
    """Names of the files (or broken links) in a local folder, hidden ones only if `hidden`.

    `scandir` needs no stat per file. Broken links are listed: decoding them fails with the
    reason, which is counted.
    """
    with os.scandir(folder) as it:
        for e in it:
            if (hidden or not e.name.startswith(".")) and (_plain_file(e) or is_file_or_broken_link(e.path)):
                yield e.name


def _plain_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symbolic link loop: `is_file_or_broken_link` keeps it, to report it when decoded
        return False


def _stem(name: str) -> str:
    """`Path(name).stem` without making a Path (a leading dot or a trailing one is not a suffix)."""
    i = name.rfind(".")
    return name[:i] if 0 < i < len(name) - 1 else name


def _repeated(values: pa.ChunkedArray) -> set[bytes]:
    """The values that occur more than once (few: ids are meant to be unique)."""
    counts = pc.value_counts(values)
    return set(counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist())


def _folder_id(label: str, file: str, stem: str, repeated: set[bytes], in_folder: set[bytes]) -> str:
    """The file stem, made unique with the class folder (then the full file name) where stems collide."""
    if encode(stem) not in repeated:
        return stem
    if encode(stem) not in in_folder:
        return f"{label}/{stem}"
    return f"{label}/{file}"  # same stem, different extensions in one class folder


def _read_ham10000(src: SourceConfig, name: str) -> SourceScan:
    root = as_path(src.path)
    meta = root / HAM_METADATA
    if src.label_type != "dx":
        raise ValueError(f"ham10000 source {name!r}: its labels are dx diagnoses, got label_type "
                         f"{src.label_type!r}; remove label_type or set it to dx")
    if not meta.is_file():
        raise FileNotFoundError(
            f"ham10000 source {name!r}: {meta} not found; expected {root}/{HAM_METADATA} "
            f"(columns {', '.join(HAM_COLUMNS)}) and images in {root}/images/<image_id>.jpg")
    finder = _ImageFinder()
    dirs = [root / d for d in HAM_IMAGE_DIRS]
    builder = RecordBuilder()
    skipped: list[SkippedItem] = []
    for line, row in _read_table(meta, HAM_COLUMNS):
        where = f"{meta} line {line}"
        image_id = _required_cell(row, "image_id", where)
        finder.mention(image_id)
        label = _required_cell(row, "dx", where)
        found = finder.find(dirs, image_id, (".jpg",))
        if found is None:
            skipped.append(SkippedItem(name, str(dirs[0] / f"{image_id}.jpg"), image_id, MISSING_IMAGE))
            continue
        builder.add(image_id, str(found), label, row["lesion_id"].strip() or image_id, line)
    records = builder.build(name, "dx", str(meta))
    return SourceScan(records, skipped, finder.unmentioned(records), str(meta))


def _read_csv_source(src: SourceConfig, name: str) -> SourceScan:
    csv_path = as_path(src.path)
    key_column = src.path_column or src.id_column
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"csv source {name!r}: {csv_path} not found; expected a CSV file with columns "
            f"{key_column!r} and {src.label_column!r}, images in <csv dir>/<split>/, <csv dir>/images/ "
            f"or <csv dir>/ (or set image_dir)")
    needs_split = bool(src.splits) or "{split}" in src.image_dir
    required = [key_column, src.label_column]
    if src.group_column:
        required.append(src.group_column)
    if needs_split:
        required.append(src.split_column)
    base = csv_path.parent
    finder = _ImageFinder()
    builder = RecordBuilder()
    skipped: list[SkippedItem] = []
    other_splits = 0
    for line, row in _read_table(csv_path, required):
        where = f"{csv_path} line {line}"
        finder.mention(row.get(src.id_column, ""), Path(row.get(src.path_column, "")).name)
        split = row.get(src.split_column, "").strip()
        if src.splits and split not in src.splits:
            if split:
                other_splits += 1
            else:  # not a row of another split but a label nobody meant to leave out: count it
                skipped.append(SkippedItem(name, where, row.get(key_column, "").strip(),
                                           EMPTY_SPLIT.format(column=src.split_column)))
            continue
        if src.path_column:
            rel = _required_cell(row, src.path_column, where)
            image_id = row.get(src.id_column, "").strip() or Path(rel).stem
            expected = base / rel
            found = expected if expected.is_file() else None
        else:
            image_id = _required_cell(row, src.id_column, where)
            dirs = _csv_image_dirs(src, base, split, where)
            expected = dirs[0] / f"{image_id}.jpg"
            found = finder.find(dirs, image_id, (".jpg", ".jpeg", ".png"))
        label = _required_cell(row, src.label_column, where)
        if found is None:
            skipped.append(SkippedItem(name, str(expected), image_id, MISSING_IMAGE))
            continue
        group = (row.get(src.group_column, "").strip() if src.group_column else "") or image_id
        builder.add(image_id, str(found), label, group, line)
    records = builder.build(name, src.label_type, str(csv_path))
    if src.splits and not records and not skipped:
        logger.warning("csv source %r: no row of %s has %s in %s", name, csv_path, src.split_column,
                       list(src.splits))
    elif other_splits:
        logger.info("csv source %r: %d rows of %s have another %s than %s", name, other_splits, csv_path,
                    src.split_column, list(src.splits))
    return SourceScan(records, skipped, finder.unmentioned(records), str(csv_path))


def _csv_image_dirs(src: SourceConfig, base: Path | ObjectPath, split: str, where: str) -> list[Path | ObjectPath]:
    if src.image_dir:
        if "{split}" in src.image_dir and not split:
            raise ValueError(f"{where}: image_dir {src.image_dir!r} needs a split but the "
                             f"{src.split_column!r} cell is empty; fill it in or drop {{split}} from image_dir")
        return [base / src.image_dir.replace("{split}", split)]
    return ([base / split] if split else []) + [base / "images", base]


# ---------------------------------------------------------------- helpers

def _read_table(path: Path | ObjectPath, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) of a CSV after checking that the `required` columns exist.

    Raises:
        ValueError: the file is empty, not UTF-8 or not CSV; a required column is missing
            (naming it and the columns found); or there is no row after the header.
    """
    rows = 0
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would
        # otherwise become part of the first column name.
        with open_text(path, encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise ValueError(f"{path} is empty: expected a header line with the columns {list(required)}, "
                                 f"then one row per image")
            for column in required:
                if column not in header:
                    raise ValueError(f"{path}: missing column {column!r}; columns found: {header}. "
                                     f"Fix the CSV or set the source's column options (e.g. label_column)")
            for values in reader:
                if any(v.strip() for v in values):  # blank lines are not rows
                    rows += 1
                    yield reader.line_num, dict(zip(header, values))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} cannot be decoded): "
                         f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > utf8.csv`") from None
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV file: {e}") from None
    if not rows:
        raise ValueError(f"{path} has no rows, only a header: add one row per image, or remove the source "
                         f"from data.sources")


def _required_cell(row: dict[str, str], column: str, where: str) -> str:
    value = row.get(column, "").strip()
    if not value:
        raise ValueError(f"{where}: empty {column!r} cell; fill it in or remove the row")
    return value


def _check_unique_ids(records: Records, name: str) -> None:
    pair = first_repeat(records)
    if pair is not None:
        lines = records.table.column("line")
        in_file_order = sorted(pair, key=lambda i: (lines[i].as_py(), records[i].path))
        first, second = (records[i] for i in in_file_order)
        raise ValueError(f"source {name!r}: image id {first.image_id!r} appears twice ({first.where} "
                         f"and {second.where}); image ids must be unique")


class _ImageFinder:
    """Finds `<id><ext>` in a list of folders, listing each folder once; tells which images no row mentions.

    Listing once replaces one stat call per id, extension and folder (tens of thousands
    on a network file system) with one directory scan.
    """

    def __init__(self) -> None:
        # Compact (`data.name_index`): a CSV of 1M rows is matched against folders of 1M files.
        self._listings: dict[Path | ObjectPath, NameIndex] = {}
        self._mentioned = Mentions()

    def _names(self, folder: Path | ObjectPath) -> NameIndex:
        if folder not in self._listings:
            if isinstance(folder, ObjectPath):  # one listing request per prefix
                self._listings[folder] = NameIndex(name for name, is_folder in listdir(str(folder))
                                                   if not is_folder)
                return self._listings[folder]
            try:
                self._listings[folder] = NameIndex(_list_files(folder, hidden=True))
            except (FileNotFoundError, NotADirectoryError):
                self._listings[folder] = NameIndex([])
        return self._listings[folder]

    def mention(self, *names: str) -> None:
        """Note ids or file names that a row of the label file mentions (whether or not the row is kept)."""
        for name in names:
            if name.strip():
                self._mentioned.add(name.strip())

    def unmentioned(self, records: Records) -> list[str]:
        """Image files in the folders the records' images are in that no row mentions, by id or file name."""
        out = []
        for folder in sorted({os.path.dirname(f) for f in records.folders}):  # each ends with its "/"
            for chunk in in_chunks(self._names(as_path(folder))):
                images = [n for n in chunk if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                          and not n.startswith(".")]
                if images:
                    named = self._mentioned.contains_any([os.path.splitext(n)[0] for n in images], images)
                    out += [join(folder, n) for n, hit in zip(images, named) if not hit]
        return out

    def find(self, folders: Sequence[Path | ObjectPath], image_id: str,
             extensions: Sequence[str]) -> Path | ObjectPath | None:
        """The first `<folder>/<image_id><ext>` that exists (extension case-insensitive), or None."""
        candidates = [image_id] if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS else []
        candidates += [image_id + ext for ext in extensions]
        for folder in folders:
            names = self._names(folder)
            for candidate in candidates:
                real = names.get(candidate.lower())
                if real is not None:
                    return folder / real
        return None
