"""The fingerprint of a dataset: everything that shapes it, stored in its manifest.

Two datasets with equal fingerprints were made from the same files in the same way. The
fingerprint holds the settings (label scheme, image size, resize, encoding, JPEG quality,
colour constancy) and, per source, its options (kind, absolute path, name, label type, CSV
columns, splits, image folder) and a listing of its files: the label file and every image
file it names, each with its size and modification time (cheap: no image is read).

`differences` says, in words, what changed between a stored fingerprint and the config's.
A manifest from before the fingerprint existed gives a partial one (`stored`): its settings
and its sources' names, kinds, paths and label types, and no file listings.

Example:

```python
changes = differences(stored(load_manifest("runs/ham64")), current(cfg.data))
# ["source 'ham10000' path: '/data/ham' in the dataset, '/data/ham2' in the config"]
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from melanoma_dist import storage
from melanoma_dist.config import DataConfig, SourceConfig
from melanoma_dist.data.records import CHUNK_ROWS, decoded, encode, in_chunks, sort
from melanoma_dist.data.sources import SourceScan, scan_source
from melanoma_dist.paths import absolute, is_uri

logger = logging.getLogger(__name__)

IMAGE_SETTINGS: tuple[str, ...] = ("image_size", "resize", "encoding", "jpeg_quality", "color_constancy")
"""The `data` settings that shape each image: what a model's input must match."""

SETTINGS: tuple[str, ...] = ("label_scheme",) + IMAGE_SETTINGS
"""The `data` settings that shape a dataset (not where it is, nor how it is sharded)."""

_LEGACY_SOURCE_KEYS = ("name", "kind", "path", "label_type")
"""What manifests from before the fingerprint record of each source."""


def fingerprint(cfg: DataConfig, scans: Sequence[SourceScan | None]) -> dict[str, Any]:
    """The fingerprint of the dataset `cfg` describes, from its sources' scans (None: not listable)."""
    return {"settings": settings(vars(cfg)),
            "sources": [_source(src, scan) for src, scan in zip(cfg.sources, scans)]}


def current(cfg: DataConfig) -> dict[str, Any]:
    """The fingerprint of `cfg`'s sources as they are now on disk.

    A source whose folder or CSV is gone keeps its options but gets no file listing (logged):
    its files cannot be compared, and a dataset ingested from it may still be used.
    """
    scans: list[SourceScan | None] = []
    for src in cfg.sources:
        try:
            scans.append(scan_source(src))
        except FileNotFoundError as e:
            logger.warning("cannot list the files of source %r, so they are not compared with the dataset's: %s",
                           src.display_name, e)
            scans.append(None)
    return fingerprint(cfg, scans)


def stored(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's fingerprint; a partial one (no file listings) for manifests written before it existed."""
    if "fingerprint" in manifest:
        return dict(manifest["fingerprint"])
    sources = [{k: absolute(v) if k == "path" else v for k, v in s.items() if k in _LEGACY_SOURCE_KEYS}
               for s in manifest.get("sources", [])]
    return {"settings": settings(manifest), "sources": sources}


def with_defaults(values: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """`keys` of `values` (a `data` config, a manifest, a model's input spec), absent ones at their default.

    Files written before a setting existed were made with its default.
    """
    return {k: values.get(k, DataConfig.__dataclass_fields__[k].default) for k in keys}


def settings(values: Mapping[str, Any], keys: Iterable[str] = SETTINGS) -> dict[str, Any]:
    """The shaping settings in `values` (a `data` config or a manifest); absent ones were their default."""
    out = with_defaults(values, keys)
    if out.get("encoding", "jpeg") != "jpeg" and "jpeg_quality" in out:
        out["jpeg_quality"] = None  # PNG and raw ignore it: changing it must not trigger a new ingest
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs from the `old` (dataset) fingerprint to the `new` (config) one, one phrase each.

    Only what both hold is compared, so that a partial fingerprint compares what it can.
    """
    out = [_differ(k, v, new["settings"][k]) for k, v in old.get("settings", {}).items()
           if k in new.get("settings", {}) and v != new["settings"][k]]
    if "sources" not in old or "sources" not in new:
        return out
    old_sources, new_sources = old["sources"], new["sources"]
    if len(old_sources) != len(new_sources):
        names = [[s.get("name") for s in ss] for ss in (old_sources, new_sources)]
        return out + [_differ("sources", *names)]
    for a, b in zip(old_sources, new_sources):
        label = f"source {b['name']!r}"
        out += [_differ(f"{label} {k}", v, b[k]) for k, v in a.items() if k != "files" and k in b and v != b[k]]
        if "files" in a and "files" in b and a["files"] != b["files"]:
            out.append(_files_changed(label, a["files"], b["files"]))
    return out


# ---------------------------------------------------------------- parts

def _source(src: SourceConfig, scan: SourceScan | None) -> dict[str, Any]:
    options = dataclasses.asdict(src)
    options.update(name=src.display_name, path=absolute(src.path), splits=list(src.splits))
    if scan is not None:
        others = sorted({absolute(p) for p in [s.path for s in scan.skipped] + [scan.label_file] if p})
        options["files"] = _listing(heapq.merge(scan.records.sorted_paths(_absolute_folder), others))
    return options


def file_listing(paths: Iterable[str]) -> dict[str, Any]:
    """Count, total size and a SHA-256 over (absolute path, size, modification time) of files.

    A file that cannot be read counts as absent, so that its appearing changes the listing.
    """
    return _listing(decoded(_sorted_unique(paths)))


def _listing(paths: Iterator[str]) -> dict[str, Any]:
    """`file_listing` of sorted absolute paths (repeats skipped), statted a chunk at a time.

    At 1M files the listing then costs tens of MiB, not a Python string per file.
    """
    first = next(paths, None)
    paths = itertools.chain([first] if first is not None else [], paths)
    # Object-store paths go in one call, in which `stat_many` lists each folder once.
    per_call = sys.maxsize if first is not None and is_uri(first) else CHUNK_ROWS
    digest, count, total, last = hashlib.sha256(), 0, 0, None
    for chunk in in_chunks(paths, per_call):
        chunk = [p for p, before in zip(chunk, [last] + chunk) if p != before]
        last = chunk[-1] if chunk else last
        for path, found in zip(chunk, storage.stat_many(chunk)):
            line = f"{path}\t-" if found is None else f"{path}\t{found[0]}\t{found[1]}"
            # The lines joined by newlines, hashed as they come.
            digest.update((f"\n{line}" if count else line).encode("utf-8", "surrogateescape"))
            count += 1
            total += found[0] if found is not None else 0
    return {"count": count, "bytes": total, "sha256": digest.hexdigest()}


def _absolute_folder(folder: str) -> str:
    """`absolute` of a folder ending with its separator (or empty: the working directory), keeping the separator."""
    return absolute(folder + "_")[:-1]  # a file name in it made absolute, less the name


def _sorted_unique(paths: Iterable[str]) -> pa.Array:
    """The distinct absolute paths, sorted (`data.records.encode`d: byte order is the strings' order)."""
    chunks = [pa.array([encode(absolute(p)) for p in chunk], pa.binary()) for chunk in in_chunks(paths)]
    return sort(pc.unique(pa.chunked_array(chunks, pa.binary())))


def _differ(what: str, old: Any, new: Any) -> str:
    return f"{what}: {old!r} in the dataset, {new!r} in the config"


def _files_changed(label: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    size = "{count} files of {bytes} bytes".format
    if (old["count"], old["bytes"]) == (new["count"], new["bytes"]):
        return f"{label} files: {size(**old)} as when ingested, but renamed or modified since"
    return f"{label} files: {size(**old)} when ingested, {size(**new)} now"
