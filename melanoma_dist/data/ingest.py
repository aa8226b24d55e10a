"""Ingest: turn the configured image sources into one dataset of Parquet shards.

Steps: read every source's labelled records (checking first that its labels can give
the label scheme), map the labels to class indices (so that a bad label fails before
any image is decoded), decode/hash/resize the images in a process pool (or, on a Ray
cluster, in Ray Data tasks across the nodes: `data.ingest_ray`; the dataset is the same
byte for byte), stream them into shards in a temporary directory, write `manifest.json`
(with the counts, every skipped image and why, the unlabelled images, and the
fingerprint of the inputs, see `data.fingerprint`), and finally move the new files into
`data.dataset_dir`.

An interrupted ingest leaves the previous dataset untouched; a killed one leaves its
temporary directory (`.<dataset>.ingest-XXXXXXXX` beside the dataset), which the next
ingest removes. Ingest writes only into a new or empty folder or over one of its own
datasets, and there it replaces only its own files (manifest, shards, folds): a user's
notes beside them stay.

A `dataset_dir` in an object store (`s3://...`) is built in a local temporary folder by
the same code, then uploaded: the old manifest is deleted first and the new one uploaded
last, so that readers never find a manifest beside shards it does not list.

Example:

```python
ham = SourceConfig(kind="ham10000", path="../shared/data/ham10000")
manifest = ingest(DataConfig(sources=(ham,), dataset_dir="runs/ham64", image_size=64))
manifest["num_images"], manifest["counts"]  # 10015 {'other': 8902, 'melanoma': 1113}
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from melanoma_dist import storage
from melanoma_dist.config import DataConfig, SourceConfig
from melanoma_dist.data.fingerprint import fingerprint
from melanoma_dist.data.images import BadImageError, PreparedImage, prepare_image
from melanoma_dist.data.ingest_ray import ray_image_map, use_ray
from melanoma_dist.data.shards import COLUMNS, MANIFEST, SCHEMA_VERSION, own_files, write_manifest, write_shards
from melanoma_dist.data.records import Records, shared_ids
from melanoma_dist.data.sources import UNLABELLED_SAMPLE, SkippedItem, SourceScan, scan_source
from melanoma_dist.labels import check_provides, class_names, to_class_index
from melanoma_dist.paths import ensure_replaceable, is_uri

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 500
"""Images between two progress log lines."""

_OWNER = "ingest.owner"
"""In a temporary directory: the host and pid of the ingest writing it, so that others leave it alone."""


class NotADatasetError(FileExistsError, ValueError):
    """`data.dataset_dir` holds something else than a dataset, so ingest will not write there.

    A ValueError too, so that the command line reports it in one line.
    """


def ingest(cfg: DataConfig, progress: bool = True, address: str = "") -> dict[str, Any]:
    """Build the dataset described by `cfg` in `cfg.dataset_dir`, replacing any previous one.

    Args:
        cfg: the `data` section of the config.
        progress: log a progress line every 500 images. Defaults to `True`.
        address: the Ray cluster address of the command (`--address`, `distributed.address`):
            with `data.ingest_engine: auto`, an address (or RAY_ADDRESS) makes the images be
            prepared on that cluster with Ray Data (see `data.ingest_ray.use_ray`). Defaults to `""`.

    Returns:
        The manifest (also written to `<dataset_dir>/manifest.json`).

    Raises:
        ValueError: no sources; a source cannot provide the label scheme; a label is
            unknown; an image id is in two sources; or no image could be decoded.
        FileNotFoundError: a source's folder or CSV is missing.
        NotADatasetError: `dataset_dir` is not empty and not a dataset (it is left alone).
    """
    if not cfg.sources:
        raise ValueError("data.sources is empty: list at least one source to ingest (see configs/)")
    if is_uri(cfg.dataset_dir):
        return _ingest_to_store(cfg, progress, address)
    dataset_dir = Path(cfg.dataset_dir)
    ensure_replaceable(dataset_dir, MANIFEST, "data.dataset_dir", "a melanoma-dist dataset", NotADatasetError)
    _remove_stale_temps(dataset_dir)
    scans = _read_sources(cfg.sources, cfg.label_scheme)
    total = sum(len(scan.records) for scan in scans)
    skipped = [s for scan in scans for s in scan.skipped]
    if not total:
        raise ValueError(_nothing_ingested(cfg, skipped))
    labels = [_class_indices(cfg.label_scheme, scan.records) for scan in scans]
    on_ray = use_ray(cfg.ingest_engine, address)
    workers = min(cfg.ingest_workers or _available_cpus(), max(1, total))
    logger.info("ingest: %d images from %d sources, label scheme %s, %dx%d %s, %s",
                total, len(cfg.sources), cfg.label_scheme, cfg.image_size, cfg.image_size,
                cfg.encoding, "on the Ray cluster" if on_ray else f"{workers} workers")

    tmp = _make_temp(dataset_dir)
    try:
        prepare = functools.partial(_prepare, size=cfg.image_size, resize=cfg.resize,
                                    encoding=cfg.encoding, jpeg_quality=cfg.jpeg_quality,
                                    color_constancy=cfg.color_constancy)
        paths = itertools.chain.from_iterable(scan.records.paths() for scan in scans)
        start = time.perf_counter()
        kept: Counter[tuple[str, int]] = Counter()  # (source, class index) of the images that decoded
        mapping = (ray_image_map(prepare, paths, total, address) if on_ray
                   else _image_map(prepare, paths, total, workers))
        with mapping as results:
            rows = _rows(scans, labels, total, cfg.label_scheme, results, kept, skipped, progress, start)
            shards = write_shards(rows, tmp, cfg.rows_per_shard, cfg.shard_bytes,
                                  compress_images=cfg.encoding != "raw")
        elapsed = time.perf_counter() - start
        if not shards:
            raise ValueError(_nothing_ingested(cfg, skipped))
        manifest = _manifest(cfg, scans, kept, skipped, shards)
        write_manifest(tmp, manifest)
        _swap_into(tmp, dataset_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("ingest: wrote %d images (%d skipped) in %d shards to %s in %.1f s (%.0f images/s)",
                manifest["num_images"], manifest["num_skipped"], len(shards), dataset_dir, elapsed,
                total / max(elapsed, 1e-9))
    if skipped:
        logger.warning("ingest: skipped %d images: %s (each with its reason in %s)", len(skipped),
                       _reason_counts(skipped), dataset_dir / MANIFEST)
    return manifest


def _reason_counts(skipped: Sequence[SkippedItem]) -> str:
    """`reason: count` of the most common skip reasons (the text before a colon: details vary per file)."""
    counts = Counter(s.reason.split(":")[0] for s in skipped)
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common(5))


def _nothing_ingested(cfg: DataConfig, skipped: Sequence[SkippedItem]) -> str:
    if not skipped:
        sources = ", ".join(f"{s.display_name!r} ({s.kind} {s.path})" for s in cfg.sources)
        return f"no image could be ingested: the sources list no images: {sources}; check data.sources"
    reasons = dict(Counter(s.reason for s in skipped))
    return f"no image could be ingested; skipped: {reasons} (first: {skipped[0].path})"


# ---------------------------------------------------------------- reading sources

def _read_sources(sources: Sequence[SourceConfig], scheme: str) -> list[SourceScan]:
    """Every source's scan, in config order; image ids and source names must be unique."""
    names = [s.display_name for s in sources]
    repeated = [n for n, c in Counter(names).items() if c > 1]
    if repeated:
        raise ValueError(f"two data.sources are named {repeated[0]!r}; give them distinct `name`s "
                         f"(the name is stored in the source column)")
    scans: list[SourceScan] = []
    for src in sources:
        check_provides(scheme, src.label_type, src.display_name)
        scan = scan_source(src)
        shared = shared_ids(scan.records, [s.records for s in scans])
        if shared:
            image_id, other, count = shared
            raise ValueError(
                f"image id {image_id!r} is in both source {scans[other].records.source!r} and source "
                f"{src.display_name!r} ({count} ids shared); image ids must be unique in a dataset: "
                f"remove the overlap from one source (e.g. with splits) or ingest them into separate datasets")
        scans.append(scan)
    return scans


def _class_indices(scheme: str, records: Records) -> np.ndarray:
    """The class index of each record; a bad label fails here, before any image is decoded, naming its row.

    Each distinct raw label is mapped once (a source has a handful), then spread over the rows.
    """
    raw = records.table.column("raw_label")  # indices in records.labels
    index = []
    for i, label in enumerate(records.labels):
        try:
            index.append(to_class_index(scheme, records.label_type, label, ""))
        except ValueError:  # say it again with the row of its first use, for the message
            to_class_index(scheme, records.label_type, label, records[pc.index(raw, i).as_py()].where)
            raise
    return np.asarray(index, np.int32)[raw.to_numpy()]


# ---------------------------------------------------------------- decoding

def _available_cpus() -> int:
    """CPUs this process may use (the affinity mask, which containers and schedulers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _prepare(path: str, size: int, resize: str, encoding: str, jpeg_quality: int,
             color_constancy: str) -> PreparedImage | str:
    """Worker: the prepared image, or the reason it is skipped (exceptions do not cross the pool)."""
    try:
        return prepare_image(path, size, resize=resize, encoding=encoding, jpeg_quality=jpeg_quality,
                             color_constancy=color_constancy)
    except BadImageError as e:
        return e.reason


@contextlib.contextmanager
def _image_map(prepare: Callable[[str], PreparedImage | str], paths: Iterable[str], count: int,
               workers: int) -> Iterator[Iterator[PreparedImage | str]]:
    """`prepare(path)` for each of the `count` paths, in input order, from a process pool.

    One worker runs in-process (no pool start-up, easier debugging). `imap` keeps the
    input order, so the dataset is the same whatever the number of workers; it takes the
    paths lazily, so that they need not all exist as strings at once.
    """
    if workers <= 1:
        yield map(prepare, paths)
        return
    # Chunks big enough to amortise inter-process traffic, small enough to balance load.
    chunksize = max(1, min(32, count // (workers * 8)))
    # "spawn", not fork: the caller may already run threads (TensorFlow, Ray, Horovod), and a
    # forked child inherits their locks in whatever state they were, which can hang it.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # leaving the block ends the workers
        yield pool.imap(prepare, paths, chunksize=chunksize)


def _rows(scans: Sequence[SourceScan], labels: Sequence[np.ndarray], total: int, scheme: str,
          results: Iterable[PreparedImage | str], kept: Counter[tuple[str, int]], skipped: list[SkippedItem],
          progress: bool, start: float) -> Iterator[dict[str, Any]]:
    """Shard rows of the decoded images; counts them in `kept` and appends to `skipped` as it goes."""
    names = class_names(scheme)
    records = itertools.chain.from_iterable(scan.records for scan in scans)
    classes = itertools.chain.from_iterable(map(int, a) for a in labels)
    for i, (record, label, result) in enumerate(zip(records, classes, results), start=1):
        if isinstance(result, str):
            skipped.append(SkippedItem(record.source, record.path, record.image_id, result))
        else:
            kept[record.source, label] += 1
            yield {"image_id": record.image_id, "source": record.source, "image": result.data,
                   "label": label, "label_name": names[label], "group": record.group,
                   "pixel_sha256": result.pixel_sha256, "phash": result.phash, "path": record.path}
        if progress and (i % PROGRESS_EVERY == 0 or i == total):
            elapsed = time.perf_counter() - start
            logger.info("ingest: %d/%d images (%.0f images/s, %d skipped)",
                        i, total, i / max(elapsed, 1e-9), len(skipped))


# ---------------------------------------------------------------- manifest and swap

def _manifest(cfg: DataConfig, scans: Sequence[SourceScan], kept: Counter[tuple[str, int]],
              skipped: Sequence[SkippedItem], shards: Sequence[str]) -> dict[str, Any]:
    names = class_names(cfg.label_scheme)
    order = {s.display_name: i for i, s in enumerate(cfg.sources)}
    skipped = sorted(skipped, key=lambda s: (order[s.source], s.path, s.image_id))
    per_class: Counter[str] = Counter()
    images_per_source: Counter[str] = Counter()
    for (source, label), n in kept.items():
        per_class[names[label]] += n
        images_per_source[source] += n
    skipped_per_source = Counter(s.source for s in skipped)
    for name in names:
        if per_class[name] == 0:
            logger.warning("ingest: class %r has no images", name)
    return {
        "schema_version": SCHEMA_VERSION,
        "label_scheme": cfg.label_scheme,
        "class_names": list(names),
        "counts": {name: per_class[name] for name in names},
        "num_images": sum(kept.values()),
        "image_size": cfg.image_size,
        "resize": cfg.resize,
        "encoding": cfg.encoding,
        "jpeg_quality": cfg.jpeg_quality,
        "color_constancy": cfg.color_constancy,
        "rows_per_shard": cfg.rows_per_shard,
        "shard_bytes": cfg.shard_bytes,
        "num_shards": len(shards),
        "shards": list(shards),
        "columns": list(COLUMNS),
        "sources": [{"name": s.display_name, "kind": s.kind, "path": s.path, "label_type": s.label_type,
                     "num_images": images_per_source[s.display_name],
                     "num_skipped": skipped_per_source[s.display_name],
                     "num_unlabelled": len(scan.unlabelled),
                     "unlabelled_sample": scan.unlabelled[:UNLABELLED_SAMPLE]}
                    for s, scan in zip(cfg.sources, scans)],
        "num_skipped": len(skipped),
        "skipped": [s.to_dict() for s in skipped],
        "num_unlabelled": sum(len(scan.unlabelled) for scan in scans),
        "fingerprint": fingerprint(cfg, scans),
    }


def _swap_into(tmp: Path, dataset_dir: Path) -> None:
    """Move the finished dataset in `tmp` to `dataset_dir`, replacing only our own files there.

    The new manifest goes in last, in one rename: until then the folder keeps a manifest
    (the old one), so that an ingest killed here is still recognised as ours next time.
    """
    (tmp / _OWNER).unlink()
    if not dataset_dir.exists():
        tmp.rename(dataset_dir)
        return
    replaced = tmp / "replaced"
    for old in own_files(dataset_dir):
        if old.name != MANIFEST:
            dest = replaced / old.relative_to(dataset_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            old.rename(dest)
    for new in sorted(tmp.glob("shard-*.parquet")):
        new.rename(dataset_dir / new.name)
    os.replace(tmp / MANIFEST, dataset_dir / MANIFEST)
    with contextlib.suppress(OSError):  # the old folds are gone; keep the folder if the user put files there
        (dataset_dir / "folds").rmdir()
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- object stores

def _ingest_to_store(cfg: DataConfig, progress: bool, address: str) -> dict[str, Any]:
    """Ingest into a local staging folder, then publish it to the object-store URI `cfg.dataset_dir`.

    The same code as a local ingest writes the files, so that both give the same bytes.
    """
    _check_store_replaceable(cfg.dataset_dir)  # before the long work
    with tempfile.TemporaryDirectory(prefix="melanoma-dist-ingest-") as staging:
        local = Path(staging) / "dataset"
        manifest = ingest(dataclasses.replace(cfg, dataset_dir=str(local)), progress, address)
        _publish(local, cfg.dataset_dir)
    logger.info("ingest: uploaded the dataset to %s", cfg.dataset_dir)
    return manifest


def _store_entries(uri: str) -> list[str]:
    """Names of the files and folders directly under `uri`."""
    return [name for name, _ in storage.listdir(uri)]


def _check_store_replaceable(uri: str) -> None:
    """An object-store dataset_dir must be empty or hold a dataset (its manifest), as a local one."""
    entries = _store_entries(uri)
    if entries and MANIFEST not in entries:
        listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise NotADatasetError(f"data.dataset_dir {uri} exists and is not a melanoma-dist dataset (no {MANIFEST}; "
                               f"it holds {listed}); it would be replaced, so set data.dataset_dir to a new prefix")


def _publish(local: Path, uri: str) -> None:
    """Replace the dataset at `uri` by the one in `local`: manifest off first, new manifest on last.

    Readers look for the manifest first, so that between the two they find no dataset, never
    a manifest beside shards it does not list. Old shards and folds (made for the old rows)
    are deleted; other objects under the prefix stay.
    """
    fs, inner = storage.filesystem(uri)
    entries = _store_entries(uri)
    if MANIFEST in entries:
        fs.delete_file(f"{inner}/{MANIFEST}")
    shards = sorted(local.glob("shard-*.parquet"))
    storage.upload(shards, uri)
    new = {p.name for p in shards}
    for name in entries:
        if name.startswith("shard-") and name not in new:
            fs.delete_file(f"{inner}/{name}")
    if "folds" in entries:
        fs.delete_dir(f"{inner}/folds")
    storage.upload([local / MANIFEST], uri)


# ---------------------------------------------------------------- temporary directories

def _make_temp(dataset_dir: Path) -> Path:
    """A new temporary directory beside `dataset_dir`, marked with this process as its owner."""
    tmp = dataset_dir.parent / f".{dataset_dir.name}.ingest-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / _OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    return tmp


def _remove_stale_temps(dataset_dir: Path) -> None:
    """Remove what killed ingests left beside `dataset_dir`: temporary directories of no running ingest."""
    prefix = glob.escape(f".{dataset_dir.name}")
    # `.old-` folders: datasets replaced by earlier versions of ingest, which swapped whole folders.
    for stale in sorted(p for pattern in (".ingest-*", ".old-*") for p in dataset_dir.parent.glob(prefix + pattern)):
        owner = _running_owner(stale)
        if owner:
            logger.warning("ingest: leaving %s alone: it belongs to the ingest running as %s", stale, owner)
            continue
        logger.warning("ingest: removing %s, left by an interrupted ingest", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _running_owner(tmp: Path) -> str | None:
    """`pid N on HOST` when the ingest that made `tmp` may still run (another host's cannot be checked)."""
    try:
        owner = json.loads((tmp / _OWNER).read_text())
        host, pid = str(owner["host"]), int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no readable owner: from before owners were written, or killed while writing it
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)  # signal 0 only checks that the process exists
        except ProcessLookupError:
            return None
        except PermissionError:  # it exists, as another user's process
            pass
    return f"pid {pid} on {host}"
