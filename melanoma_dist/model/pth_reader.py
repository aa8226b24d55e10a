"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without PyTorch.

The legacy format is a run of pickles followed by raw tensor storage:

1. a magic number, the protocol version and a dict of system info (three pickles);
2. the state dict itself, pickled with *persistent ids* for the storages:
   `("storage", <torch.XStorage class>, key, location, numel, view)`, and tensors
   rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`;
3. a pickled list of storage keys, in the order their bytes follow;
4. per key: the element count as a little-endian int64, then the raw elements.

Only the handful of globals a state dict needs are resolved (an OrderedDict, the
storage classes, the tensor rebuild function); anything else in the pickle is
refused, so reading an untrusted file cannot run code.

Example:

```python
tensors = read_legacy_state_dict("efficientnet-lite0-57934424.pth")
tensors["_conv_stem.weight"].shape  # (32, 3, 3, 3)
```
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class PthFormatError(ValueError):
    """The file is not a legacy PyTorch state dict this reader understands."""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    def __init__(self, dtype: Any, numel: int) -> None:
        self.dtype, self.numel = np.dtype(dtype), numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor waiting for its storage's bytes (they come after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        strides = [s * data.itemsize for s in self.stride]
        return np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size, strides=strides).copy()


def _rebuild_tensor_v2(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO, path: Path) -> None:
        super().__init__(f)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise PthFormatError(f"{self.path}: refusing to load {module}.{name} (a state dict holds only tensors)")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise PthFormatError(f"{self.path}: unsupported storage reference {pid!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, int(numel))
        return self.storages[key]


def read_legacy_state_dict(path: str | Path) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a legacy-format `.pth` state dict into numpy arrays, in file order.

    Args:
        path: The `.pth` file.

    Returns:
        Tensor name -> array (same shape and dtype as in PyTorch).

    Raises:
        PthFormatError: the file is in the zip format of PyTorch >= 1.6, is truncated,
            or holds something other than a state dict of tensors.
    """
    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise PthFormatError(f"{path} is a zip-format checkpoint (PyTorch >= 1.6); this reader "
                                 "handles the legacy format only")
        f.seek(0)
        try:
            magic = pickle.load(f)
            if magic != _MAGIC:
                raise PthFormatError(f"{path}: not a PyTorch legacy file (magic number {magic!r})")
            pickle.load(f)  # protocol version
            pickle.load(f)  # system info (endianness, type sizes)
            unpickler = _Unpickler(f, path)
            state = unpickler.load()
            keys = pickle.load(f)
            for key in keys:
                storage = unpickler.storages[key]
                (numel,) = struct.unpack("<q", f.read(8))
                raw = f.read(numel * storage.dtype.itemsize)
                if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
                    raise PthFormatError(f"{path}: storage {key} is truncated or inconsistent")
                storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
        except (pickle.UnpicklingError, EOFError, struct.error, KeyError, ValueError) as e:
            if isinstance(e, PthFormatError):
                raise
            raise PthFormatError(f"{path}: unreadable legacy PyTorch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise PthFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return collections.OrderedDict((k, v.array()) for k, v in state.items())
