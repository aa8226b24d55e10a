"""Compact sets of file names for reading label files of a million rows.

A CSV or HAM10000 source finds each row's image by name in a folder listing (case-
insensitively), and lists the image files no row mentions. As Python dicts and sets, the
listing and the mentioned names cost about 300 bytes per image while a source is read; here
they are a 64-bit hash per name in numpy (plus the names as Arrow bytes), about 40 bytes.

A hash says "maybe"; a name is then compared in full, so a lookup is exact. Only `Mentions`
trusts hashes alone: two different names with the same 64-bit hash (never seen in practice)
would hide one unlabelled file from the report of unlabelled files, nothing more.

Example:

```python
index = NameIndex(["ISIC_0000001.JPG", "notes.txt"])
index.get("isic_0000001.jpg")  # 'ISIC_0000001.JPG'
```
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from melanoma_dist.data.records import decode, decoded, encode, in_chunks


def _hashes(names: Iterable[str]) -> np.ndarray:
    """The hash of each name, lower-cased (Python's `hash`: stable within one process, as these indexes are)."""
    return np.fromiter((hash(n.lower()) for n in names), np.int64)


class NameIndex:
    """The file names of one folder, looked up case-insensitively.

    Args:
        names: the names, in any order. Of names equal but for case, the last one is found
            (as a dict keyed by the lower-cased name would).
    """

    def __init__(self, names: Iterable[str]) -> None:
        arrays, hashes = [], []
        for chunk in in_chunks(names):
            arrays.append(pa.array([encode(n) for n in chunk], pa.binary()))
            hashes.append(_hashes(chunk))
        self._names = pa.chunked_array(arrays, pa.binary()).combine_chunks()
        keys = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return decoded(self._names)

    def get(self, lower: str) -> str | None:
        """The name whose lower-cased form is `lower`, or None."""
        key = hash(lower)
        end = int(np.searchsorted(self._keys, key, side="right"))
        i = end - 1
        while i >= 0 and self._keys[i] == key:  # from the last: the one a dict would have kept
            name = decode(self._names[int(self._order[i])].as_py())
            if name.lower() == lower:
                return name
            i -= 1
        return None


class Mentions:
    """Names (ids or file names) a label file mentions, lower-cased, as 64-bit hashes."""

    def __init__(self) -> None:
        self._hashes = array.array("q")
        self._known: np.ndarray | None = None  # the distinct hashes, once asked

    def add(self, name: str) -> None:
        self._hashes.append(hash(name.lower()))
        self._known = None

    def contains_any(self, *columns: Sequence[str]) -> np.ndarray:
        """For each position, whether a name at that position in any of the parallel `columns` is mentioned."""
        if self._known is None:
            self._known = np.unique(np.frombuffer(self._hashes, np.int64))
        hits = [np.isin(_hashes(column), self._known) for column in columns]
        return np.logical_or.reduce(hits)
