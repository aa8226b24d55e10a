"""Leakage audit: exact and near-duplicate images within a set, across folds, and train vs test.

Two images are

- **exact duplicates** when their decoded pixels are identical (same `pixel_sha256`,
  computed by ingest at the original resolution);
- **near duplicates** when their pixels differ but (1) their 64-bit difference hashes
  (`phash`, ingest's dHash of the original image) differ in at most `max_bits` bits and
  (2) the check is confirmed on the stored images: the Pearson correlation of their
  16x16 RGB thumbnails is at least `min_correlation`.

Why two stages. `DEFAULT_NEAR_DUP_BITS = 4` (of 64) is the usual dHash cut-off for "the
same picture" after resizing, recompression or small colour changes, and it keeps
98-100 % of such copies of HAM10000 images (JPEG quality 50, 80 % resize, +10 %
brightness or contrast; crops and rotations of a few degrees mostly escape it). But a
9x8 gradient hash cannot tell dermoscopic images apart: a dark lesion centred on lighter
skin gives the same few gradients. On HAM10000 (10,015 images) it yields 18,659 pairs
of images of *different* lesions (75 at distance 0), nearly all visibly different
lesions. The thumbnail correlation separates them: the copies above correlate at
>= 0.976, while the dHash pairs of different lesions have a median of 0.72 and only 2
reach 0.97 (both look like the same lesion); 84 of the 99 dHash pairs within one lesion
do. `DEFAULT_MIN_CORRELATION = 0.97`; pass `min_correlation=None` for the dHash stage
alone. Both counts are reported.

Within a cross-validation set, pairs in one lesion group are expected (several images of
one lesion) and never cross folds; pairs of *different* groups in *different* folds are
leakage candidates: the folds keep lesion ids and exact duplicates together, but nothing
else. Between a training set and an external test set, every test image with an exact or
(confirmed) near duplicate in the training set is flagged, so that test metrics can be
reported with those images removed.

Example:

```python
train = ImageSet.from_dataset("runs/ham10000-64", folds=(5, 42))
report = audit_set(train, max_bits=4)
report["clean"], report["near"]["pairs_across_folds"], report["near"]["candidate_pairs"]
```
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_dist.data import shards
from melanoma_dist.data.fingerprint import with_defaults
from melanoma_dist.data.folds import load_folds
from melanoma_dist.data.images import decode_stored

logger = logging.getLogger(__name__)

DEFAULT_NEAR_DUP_BITS = 4
"""Near-duplicate candidates: dHash Hamming distance <= this many of 64 bits."""
DEFAULT_MIN_CORRELATION = 0.97
"""Near-duplicate confirmation: thumbnail correlation >= this (None: no confirmation)."""
THUMB_SIZE = 16
"""Side of the RGB thumbnails compared in the confirmation stage."""
MAX_EXAMPLES = 20
"""Example pairs kept in an audit (counts cover all pairs)."""
_ROW_CHUNK = 512

_COLUMNS = [shards.IMAGE_ID, shards.LABEL_NAME, shards.GROUP, shards.PIXEL_SHA256, shards.PHASH, shards.PATH]


def phash_ints(hex_hashes: Sequence[str]) -> np.ndarray:
    """16-hex-digit dHashes as uint64.

    Raises:
        ValueError: a hash is not 16 hex digits.
    """
    try:
        return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)
    except (ValueError, OverflowError):
        bad = next(h for h in hex_hashes if not _is_hash(h))
        raise ValueError(f"phash {bad!r} is not a 64-bit hex hash; re-ingest the dataset") from None


def _is_hash(h: str) -> bool:
    try:
        return 0 <= int(h, 16) < 2 ** 64
    except (TypeError, ValueError):
        return False


def _check_params(max_bits: int, min_correlation: float | None) -> None:
    if not 0 <= max_bits <= 64:
        raise ValueError(f"max_bits (near-duplicate threshold) must be in [0, 64], got {max_bits}")
    if min_correlation is not None and not -1 <= min_correlation <= 1:
        raise ValueError(f"min_correlation must be in [-1, 1] or None (no confirmation), got {min_correlation}")


def thumbnail_features(images: Sequence[bytes], encoding: str, image_size: int, dataset: str = "") -> np.ndarray:
    """Zero-mean, unit-norm 16x16 RGB thumbnails of stored images: their dot product is the correlation.

    Args:
        images: Image bytes from the shards of one dataset.
        encoding: That dataset's `encoding` (its manifest's).
        image_size: That dataset's `image_size`.
        dataset: Named in errors. Defaults to `""`.
    """
    out = np.zeros((len(images), THUMB_SIZE * THUMB_SIZE * 3), dtype=np.float32)
    for k, data in enumerate(images):
        rgb = Image.fromarray(decode_stored(data, encoding, image_size, dataset))
        thumb = rgb.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
        f = np.asarray(thumb, dtype=np.float32).ravel()
        f -= f.mean()
        out[k] = f / max(float(np.linalg.norm(f)), 1e-6)
    return out


@dataclass(frozen=True)
class ImageSet:
    """The hash columns of an ingested dataset (one entry per image, in shard order)."""

    name: str
    image_ids: np.ndarray
    groups: np.ndarray
    label_names: np.ndarray
    pixel_sha256: np.ndarray
    phash: np.ndarray
    """uint64 dHashes."""
    paths: np.ndarray
    folds: np.ndarray | None = None
    """Fold of each image, when loaded with `folds`."""
    dataset_dir: str | None = None
    """Where the stored images are read for the confirmation stage (None: not available)."""
    features: np.ndarray | None = None
    """Precomputed thumbnail features (see `thumbnail_features`); else read from `dataset_dir`."""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def can_confirm(self) -> bool:
        return self.features is not None or self.dataset_dir is not None

    def thumbnails(self, rows: np.ndarray) -> np.ndarray:
        """Thumbnail features of some rows (read from the shards once, then cached)."""
        if self.features is not None:
            return self.features[rows]
        if self.dataset_dir is None:
            raise ValueError(f"image set {self.name!r} has no dataset_dir or features to confirm near duplicates")
        missing = sorted({int(r) for r in rows} - set(self._cache))
        if missing:
            stored = with_defaults(shards.load_manifest(self.dataset_dir), ("encoding", "image_size"))
            paths = shards.shard_paths(self.dataset_dir)
            offsets = shards.row_offsets(paths)
            for shard, local in shards.locate(offsets, missing):
                data = shards.read_images(paths[shard], local.tolist())
                self._cache.update(zip((local + offsets[shard]).tolist(),
                                       thumbnail_features(data, stored["encoding"], int(stored["image_size"]),
                                                          self.dataset_dir)))
        return np.stack([self._cache[int(r)] for r in rows]) if len(rows) else np.zeros((0, 3 * THUMB_SIZE ** 2))

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, folds: tuple[int, int] | None = None,
                     name: str = "") -> "ImageSet":
        """Read an ingested dataset's hashes (images are read later, only for near-duplicate candidates).

        Args:
            dataset_dir: The dataset directory (with manifest.json).
            folds: (k, seed) of the fold assignment to attach. Defaults to `None`.
            name: Label of the set in reports. Defaults to `""` (the directory name).

        Raises:
            FileNotFoundError: no dataset, or no such folds.
        """
        t = shards.read_columns(dataset_dir, _COLUMNS)
        col = {c: np.asarray(t[c].to_pylist(), dtype=object) for c in _COLUMNS}
        fold_of_row = load_folds(dataset_dir, *folds) if folds else None
        return cls(name or Path(dataset_dir).name, col[shards.IMAGE_ID], col[shards.GROUP],
                   col[shards.LABEL_NAME], col[shards.PIXEL_SHA256], phash_ints(col[shards.PHASH]),
                   col[shards.PATH], fold_of_row, str(dataset_dir))


def hamming_pairs(a: np.ndarray, b: np.ndarray | None = None,
                  max_bits: int = DEFAULT_NEAR_DUP_BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i, j) whose 64-bit hashes differ in at most `max_bits` bits.

    Args:
        a: uint64 hashes.
        b: uint64 hashes to compare `a` with. Defaults to `None`: pairs within `a`, i < j.
        max_bits: Largest Hamming distance kept. Defaults to `4`.

    Returns:
        Arrays i (into a), j (into b, or a) and the distances.
    """
    _check_params(max_bits, None)
    a = np.asarray(a, dtype=np.uint64)
    other = a if b is None else np.asarray(b, dtype=np.uint64)
    out_i, out_j, out_d = [], [], []
    for start in range(0, len(a), _ROW_CHUNK):
        block = a[start:start + _ROW_CHUNK]
        dist = np.bitwise_count(block[:, None] ^ other[None, :])
        hit = dist <= max_bits
        if b is None:  # keep j > i only
            hit &= np.arange(len(other))[None, :] > (start + np.arange(len(block)))[:, None]
        i, j = np.nonzero(hit)
        out_i.append(i + start)
        out_j.append(j)
        out_d.append(dist[i, j])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.int64))


def _correlations(a: ImageSet, i: np.ndarray, b: ImageSet, j: np.ndarray) -> np.ndarray | None:
    """Thumbnail correlation of each pair, or None when either set cannot be read."""
    if not (a.can_confirm and b.can_confirm):
        return None
    if len(i) == 0:
        return np.zeros(0)
    ua, ia = np.unique(i, return_inverse=True)
    ub, ib = np.unique(j, return_inverse=True)
    fa, fb = a.thumbnails(ua), b.thumbnails(ub)
    return np.einsum("ij,ij->i", fa[ia], fb[ib]).astype(np.float64)


def _near_pairs(a: ImageSet, b: ImageSet | None, max_bits: int, min_correlation: float | None) -> dict:
    """dHash candidates (pixels differ) and those confirmed by correlation."""
    other = a if b is None else b
    i, j, d = hamming_pairs(a.phash, None if b is None else b.phash, max_bits)
    differ = a.pixel_sha256[i] != other.pixel_sha256[j]
    i, j, d = i[differ], j[differ], d[differ]
    corr = _correlations(a, i, other, j) if min_correlation is not None else None
    if min_correlation is not None and corr is None:
        logger.warning("near duplicates not confirmed: the stored images of %r or %r cannot be read", a.name,
                       other.name)
    keep = np.ones(len(i), bool) if corr is None else corr >= min_correlation
    method = (f"dHash <= {max_bits} bits and 16x16 thumbnail correlation >= {min_correlation}" if corr is not None
              else f"dHash <= {max_bits} bits only (no confirmation)")
    return {"i": i[keep], "j": j[keep], "d": d[keep], "corr": None if corr is None else corr[keep],
            "candidates": (i, j, d), "method": method, "confirmed": corr is not None}


def _pair_example(a: ImageSet, i: int, b: ImageSet, j: int, dist: int, corr: float | None) -> dict:
    ex = {"image_a": a.image_ids[i], "group_a": a.groups[i], "label_a": a.label_names[i], "path_a": a.paths[i],
          "image_b": b.image_ids[j], "group_b": b.groups[j], "label_b": b.label_names[j], "path_b": b.paths[j],
          "distance_bits": int(dist), "correlation": None if corr is None else round(float(corr), 4),
          "exact": bool(a.pixel_sha256[i] == b.pixel_sha256[j])}
    if a.folds is not None and b.folds is not None:
        ex.update(fold_a=int(a.folds[i]), fold_b=int(b.folds[j]))
    return ex


def _examples(a: ImageSet, b: ImageSet, near: dict, mask: np.ndarray) -> list[dict]:
    i, j, d, corr = near["i"][mask], near["j"][mask], near["d"][mask], near["corr"]
    c = corr[mask] if corr is not None else None
    order = np.argsort(-c if c is not None else d, kind="stable")[:MAX_EXAMPLES]
    return [_pair_example(a, int(i[k]), b, int(j[k]), int(d[k]), None if c is None else c[k]) for k in order]


def _exact_sets(s: ImageSet) -> list[np.ndarray]:
    """Index sets of images sharing a pixel hash (sets of 2 or more)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(s.pixel_sha256):
        by_hash[h].append(i)
    return [np.asarray(v) for v in by_hash.values() if len(v) > 1]


def audit_set(s: ImageSet, max_bits: int = DEFAULT_NEAR_DUP_BITS,
              min_correlation: float | None = DEFAULT_MIN_CORRELATION) -> dict:
    """Exact and near duplicates within one set; across folds when the set has folds.

    Args:
        s: The images' hashes (with `folds` for a cross-validation audit).
        max_bits: dHash threshold of near-duplicate candidates, in bits. Defaults to `4`.
        min_correlation: Thumbnail correlation confirming a candidate; None keeps every
            candidate. Defaults to `0.97`.

    Returns:
        A JSON-ready dict: `exact` and `near` counts (`near.candidate_*` before
        confirmation), example pairs, and `clean` (no exact duplicate and no confirmed
        near-duplicate pair of different lesions across folds; None when the set has no folds).

    Raises:
        ValueError: `max_bits` outside [0, 64] or `min_correlation` outside [-1, 1].
    """
    _check_params(max_bits, min_correlation)
    has_folds = s.folds is not None
    exact_sets = _exact_sets(s)
    exact = {"sets": len(exact_sets), "images": int(sum(len(v) for v in exact_sets)),
             "sets_with_several_groups": sum(len(set(s.groups[v])) > 1 for v in exact_sets)}
    if has_folds:
        exact["sets_across_folds"] = sum(len(set(s.folds[v])) > 1 for v in exact_sets)

    near = _near_pairs(s, None, max_bits, min_correlation)
    ci, cj, cd = near["candidates"]
    i, j = near["i"], near["j"]
    same_group = s.groups[i] == s.groups[j]
    out: dict = {"max_bits": max_bits, "min_correlation": min_correlation if near["confirmed"] else None,
                 "method": near["method"], "candidate_pairs": int(len(ci)),
                 "candidate_pairs_different_groups": int((s.groups[ci] != s.groups[cj]).sum()),
                 "candidate_distance_histogram": {str(k): v for k, v in sorted(Counter(cd.tolist()).items())},
                 "pairs": int(len(i)), "pairs_same_group": int(same_group.sum()),
                 "pairs_different_groups": int((~same_group).sum())}
    suspect = ~same_group
    if has_folds:
        across = s.folds[i] != s.folds[j]
        suspect = ~same_group & across
        out.update(candidate_pairs_across_folds=int((s.folds[ci] != s.folds[cj]).sum()),
                   pairs_across_folds=int(across.sum()),
                   images_across_folds=int(len(set(i[across]) | set(j[across]))))
    out["examples"] = _examples(s, s, near, suspect)
    clean = (exact["sets_across_folds"] == 0 and out["pairs_across_folds"] == 0) if has_folds else None
    return {"set": s.name, "num_images": len(s), "exact": exact, "near": out, "clean": clean}


def audit_train_test(train: ImageSet, test: ImageSet, max_bits: int = DEFAULT_NEAR_DUP_BITS,
                     min_correlation: float | None = DEFAULT_MIN_CORRELATION) -> dict:
    """Test images with an exact or near duplicate in the training set.

    Args:
        train: The training (cross-validation) set.
        test: The external test set.
        max_bits: dHash threshold of near-duplicate candidates, in bits. Defaults to `4`.
        min_correlation: Thumbnail correlation confirming a candidate; None keeps every
            candidate. Defaults to `0.97`.

    Returns:
        A JSON-ready dict with counts, `flagged_image_ids` (test images to remove for a
        duplicate-free evaluation: exact or near duplicates of a training image) and examples.
    """
    _check_params(max_bits, min_correlation)
    train_hashes = set(train.pixel_sha256)
    exact_ids = {tid for tid, h in zip(test.image_ids, test.pixel_sha256) if h in train_hashes}
    near = _near_pairs(test, train, max_bits, min_correlation)
    ci = near["candidates"][0]
    near_ids = sorted(set(test.image_ids[near["i"]]) - exact_ids)
    flagged = sorted(exact_ids | set(near_ids))
    return {"train": train.name, "test": test.name, "num_train": len(train), "num_test": len(test),
            "max_bits": max_bits, "min_correlation": min_correlation if near["confirmed"] else None,
            "method": near["method"], "exact_duplicates": len(exact_ids), "near_duplicates": len(near_ids),
            "candidate_test_images": int(len(set(test.image_ids[ci]) - exact_ids)),
            "flagged": len(flagged), "flagged_image_ids": flagged, "pairs": int(len(near["i"])),
            "examples": _examples(test, train, near, np.ones(len(near["i"]), bool))}


def read_images_by_id(dataset_dir: str | Path, image_ids: Sequence[str]) -> dict[str, bytes]:
    """The stored (resized; encoded as the manifest's `encoding` says) images of some ids, read from the shards.

    Raises:
        KeyError: an id is not in the dataset.
    """
    ids = shards.read_columns(dataset_dir, [shards.IMAGE_ID])[shards.IMAGE_ID].to_pylist()
    row_of = {v: r for r, v in enumerate(ids)}
    paths = shards.shard_paths(dataset_dir)
    offsets = shards.row_offsets(paths)
    wanted = list(dict.fromkeys(image_ids))
    for image_id in wanted:
        if image_id not in row_of:
            raise KeyError(f"image {image_id!r} is not in the dataset {dataset_dir}")
    out = {}
    for shard, local in shards.locate(offsets, sorted(row_of[i] for i in wanted)):
        data = shards.read_images(paths[shard], local.tolist())
        out.update(zip((ids[r] for r in local + offsets[shard]), data))
    return out


def read_pixels_by_id(dataset_dir: str | Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The stored images of some ids as uint8 [S, S, 3] RGB, decoded as the dataset's manifest says.

    Raises:
        KeyError: an id is not in the dataset.
        ValueError: a stored image does not decode (the message names the dataset and the fix).
    """
    stored = with_defaults(shards.load_manifest(dataset_dir), ("encoding", "image_size"))
    return {image_id: decode_stored(data, stored["encoding"], int(stored["image_size"]), str(dataset_dir))
            for image_id, data in read_images_by_id(dataset_dir, image_ids).items()}
