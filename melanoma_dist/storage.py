"""Local paths and object-store URIs (`s3://bucket/key`, `gs://bucket/key`) behind one filesystem layer.

`data.sources[*].path`, `data.dataset_dir` and `output_dir` may be URIs. The modules that
read or write them ask this one for a `pyarrow.fs.FileSystem` and the path inside it;
local paths go to the local filesystem unchanged, so that everything local behaves as before.

Credentials come only from the standard chains, never from a config, a URI or a manifest:
for S3 the `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` variables,
`~/.aws/credentials` and the instance metadata service; for GCS the application default
credentials. A URI with a user or password in it (`s3://KEY:SECRET@bucket/...`) is refused,
and no error message repeats it. The endpoint of an S3-compatible server (MinIO, a local
`moto`) comes from the standard `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` variable, the
region from `AWS_REGION`/`AWS_DEFAULT_REGION` or the SDK's own chain.

Example:

```python
fs, path = filesystem("s3://derm/ham10000/HAM10000_metadata.csv")  # S3FileSystem, "derm/ham10000/..."
join("s3://derm/runs", "dataset", "manifest.json")                 # 's3://derm/runs/dataset/manifest.json'
read_bytes("runs/dataset/manifest.json")                           # a local path works alike
```
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from melanoma_dist.paths import ALIASES, check_uri, is_uri

logger = logging.getLogger(__name__)


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `path`, and the path inside it.

    Args:
        path: A local path or an `s3://` / `gs://` URI.

    Returns:
        `(LocalFileSystem, absolute path)` for a local path; `(S3FileSystem or GcsFileSystem,
        "bucket/key")` for a URI.

    Raises:
        ValueError: see `check_uri`.
    """
    if not is_uri(path):
        return _local(), os.path.abspath(path)
    check_uri(str(path), "path")
    parts = urlsplit(str(path))
    scheme = ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    return _object_store(scheme), (parts.netloc + parts.path).rstrip("/")


@functools.lru_cache(maxsize=None)
def _local() -> pafs.FileSystem:
    return pafs.LocalFileSystem()


def _object_store(scheme: str) -> pafs.FileSystem:
    if scheme == "gs":
        return _client("gs", None, None)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return _client("s3", endpoint, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None)


# One client per process and setting: building an S3 client resolves credentials and the
# region, which costs a request to the instance metadata service on a cloud node. The key
# holds the endpoint and region, so that a changed environment gets a new client.
@functools.lru_cache(maxsize=8)
def _client(scheme: str, endpoint: str | None, region: str | None) -> pafs.FileSystem:
    if scheme == "gs":
        return pafs.GcsFileSystem()
    options: dict = {"region": region}
    if endpoint:
        parts = urlsplit(endpoint)
        options |= {"endpoint_override": parts.netloc or parts.path, "scheme": parts.scheme or "https"}
        endpoint = f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"  # logged without any user part
    logger.debug("S3 client: endpoint %s, region %s", endpoint or "AWS", region or "from the SDK chain")
    return pafs.S3FileSystem(**options)


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...`: posix joining for URIs (`os.path.join` would use `\\` on Windows), os.path for local paths."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder holding `path` (`s3://b/a` for `s3://b/a/x.jpg`)."""
    if not is_uri(path):
        return os.path.dirname(path)
    scheme, rest = str(path).rstrip("/").split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest) or rest}"  # a bucket is its own parent, as `/` is


def info(path: str | Path) -> pafs.FileInfo:
    """Type, size and modification time of `path` (type NotFound when absent)."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def is_file(path: str | Path) -> bool:
    """Whether `path` is a file (a link to one, locally) or an object."""
    return os.path.isfile(path) if not is_uri(path) else info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    """Whether `path` is a folder; in an object store, a prefix that some object's key starts with."""
    return os.path.isdir(path) if not is_uri(path) else info(path).type == pafs.FileType.Directory


def listdir(path: str | Path) -> list[tuple[str, bool]]:
    """`(name, is_folder)` of the entries of folder `path`, sorted by name; empty when it is missing."""
    fs, inner = filesystem(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except NotADirectoryError:
        return []
    return sorted((posixpath.basename(i.path), i.type == pafs.FileType.Directory) for i in found)


def stat_many(paths: Sequence[str]) -> list[tuple[int, int] | None]:
    """Size and modification time (ns) of each file or object, None for one that cannot be read.

    Local files are statted one by one; object URIs through `stat_objects` (one listing per folder).
    """
    in_store = stat_objects([p for p in paths if is_uri(p)])
    return [in_store[p] if is_uri(p) else _stat_local(p) for p in paths]


def _stat_local(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def stat_objects(paths: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    """Size and modification time (ns) of each object URI, None for a missing one.

    One listing per folder (the store pages 1,000 keys a request) rather than one request per
    object: a source of 100k images is statted in ~100 requests, not 100k.
    """
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(parent(path), []).append(path)
    out: dict[str, tuple[int, int] | None] = {}
    for folder, wanted in by_folder.items():
        fs, inner = filesystem(folder)
        try:
            found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        except NotADirectoryError:
            found = []
        listed = {posixpath.basename(i.path): i for i in found if i.type == pafs.FileType.File}
        for path in wanted:
            i = listed.get(posixpath.basename(path))
            out[path] = None if i is None else (i.size, i.mtime_ns or 0)
    return out


def open_input(path: str | Path) -> pa.NativeFile:
    """A binary, seekable file object reading `path` (pyarrow's NativeFile; Parquet and PIL read it).

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    fs, inner = filesystem(path)
    return fs.open_input_file(inner)


def read_bytes(path: str | Path) -> bytes:
    """The whole content of the file or object `path`."""
    if not is_uri(path):
        return Path(path).read_bytes()
    with open_input(path) as f:
        return f.read()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path`; on an object store the object appears whole, when the write completes."""
    if not is_uri(path):
        Path(path).write_bytes(data)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def last_write(path: str) -> float:
    """Newest modification time (seconds) of the objects below the URI `path`; 0 when there are none."""
    fs, inner = filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return max((f.mtime.timestamp() for f in found if f.mtime is not None), default=0.0)


def upload(local_files: list[Path], dest: str) -> None:
    """Copy `local_files` into the folder `dest`, one after another in the given order.

    The caller puts the file that readers look for first (a manifest) last, so that they
    never find it beside a half-copied set.
    """
    fs, inner = filesystem(dest)
    for f in local_files:
        pafs.copy_files(str(f), posixpath.join(inner, f.name), source_filesystem=_local(),
                        destination_filesystem=fs)


def open_text(path: str | Path, encoding: str = "utf-8") -> TextIO:
    """`path` opened for reading text with universal newlines off (as the csv module wants).

    An object is fetched whole: label files are small, and decoding errors then surface
    while reading, as they do for a local file.
    """
    if not is_uri(path):
        return open(path, newline="", encoding=encoding)
    return io.TextIOWrapper(io.BytesIO(read_bytes(str(path))), encoding=encoding, newline="")


def as_path(path: str) -> Path | ObjectPath:
    """A `Path` for a local path, an `ObjectPath` for a URI: the few pathlib calls that scanning a source makes."""
    return ObjectPath(path) if is_uri(path) else Path(path)


class ObjectPath:
    """The part of pathlib's interface that `data.sources` uses, for an object-store URI.

    Folders are key prefixes. `iterdir` lists a prefix in one request and remembers which
    entries are folders, so that asking each entry costs nothing more.

    Example:

    ```python
    root = ObjectPath("s3://derm/ham")
    [p.name for p in root.iterdir() if p.is_dir()]  # ['images']
    (root / "HAM10000_metadata.csv").is_file()      # True
    ```
    """

    def __init__(self, uri: str, is_folder: bool | None = None) -> None:
        self._uri = uri.rstrip("/")
        self._is_folder = is_folder

    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"ObjectPath({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other._uri == self._uri

    def __lt__(self, other: ObjectPath) -> bool:
        return self._uri < other._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    def __truediv__(self, part: str) -> ObjectPath:
        return ObjectPath(posixpath.normpath(join(self._uri, part)).replace(":/", "://", 1))

    @property
    def name(self) -> str:
        return posixpath.basename(self._uri)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(parent(self._uri))

    def is_dir(self) -> bool:
        return self._is_folder if self._is_folder is not None else is_dir(self._uri)

    def is_file(self) -> bool:
        return not self._is_folder if self._is_folder is not None else is_file(self._uri)

    def iterdir(self) -> Iterator[ObjectPath]:
        for name, folder in listdir(self._uri):
            yield ObjectPath(join(self._uri, name), folder)


class FolderMirror:
    """A local working folder kept in step with a folder of an object store (`output_dir` there).

    Training writes with local file semantics (Keras checkpoints, CSV appends, atomic renames),
    which an object store does not offer; it writes to `local`, and `push` uploads what changed.
    For a local `uri` (`local` is then that folder itself), `pull` and `push` do nothing, so that
    callers of `mirrored` treat both alike.

    Example:

    ```python
    mirror = FolderMirror("s3://derm/runs/cv1/fold-0", Path(tempfile.mkdtemp()))
    mirror.pull()                          # the last uploaded checkpoint, to resume from
    ...                                    # train, writing mirror.local
    mirror.push(last=("metrics.json",))    # after each epoch, and at the end
    ```
    """

    def __init__(self, uri: str, local: Path) -> None:
        self.uri, self.local = uri, local
        self._sent: dict[str, tuple[int, int]] = {}  # local (size, mtime) of each file as last uploaded
        self._pulled: dict[str, tuple[int, int]] = {}  # the object's (size, mtime) when last downloaded

    @property
    def remote(self) -> bool:
        """Whether `uri` is in an object store (else `local` is the folder itself)."""
        return is_uri(self.uri)

    def name_of(self, path: Path) -> Path | str:
        """`path`, a file or folder below `local`, as named in the mirrored folder (a URI, or itself)."""
        if not self.remote:
            return path
        rel = Path(path).relative_to(self.local).as_posix()
        return join(self.uri, rel) if rel != "." else self.uri

    def pull(self, under: str = "", skip: tuple[str, ...] = ()) -> None:
        """Copy the object-store folder into `local` (nothing when it does not exist yet, or is local).

        An object already downloaded, and unchanged since (same size and modification time),
        is not downloaded again: a `tune` trial pulls its folder every 30 s while folds train.

        Args:
            under: Copy only this subfolder (`fold-0`). Defaults to `""` (all).
            skip: Names or glob patterns of subfolders and files that are not copied (`resume`:
                checkpoints the driver never reads; `*.keras`: models a report never reads).
                Defaults to `()`.
        """
        if not self.remote:
            return
        fs, inner = filesystem(self.uri)
        base = posixpath.join(inner, under) if under else inner
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return
        pulled = []
        for found in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = posixpath.relpath(found.path, inner)
            if found.type != pafs.FileType.File or _skipped(rel, skip):
                continue
            remote = (found.size, found.mtime_ns or 0)
            if self._pulled.get(rel) == remote and (self.local / rel).is_file():
                continue
            (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(found.path, str(self.local / rel), source_filesystem=fs, destination_filesystem=_local())
            self._pulled[rel] = remote
            pulled.append(rel)
        state = self._state()
        self._sent.update((rel, state[rel]) for rel in pulled)  # what came down need not go up again

    def push(self, last: tuple[str, ...] = ()) -> None:
        """Upload the files of `local` that are new or changed since the last push or pull; delete those removed.

        Files that `pull` skipped are neither uploaded nor deleted: they stay in the object store as they were.
        Nothing happens for a local folder.

        Args:
            last: File names uploaded after all others (a file that marks the folder as complete).
                Defaults to `()`.
        """
        if not self.remote:
            return
        state = self._state()
        changed = sorted((rel for rel, st in state.items() if self._sent.get(rel) != st),
                         key=lambda rel: (posixpath.basename(rel) in last, rel))
        fs, inner = filesystem(self.uri)
        for rel in [rel for rel in self._sent if rel not in state]:  # removed here (a discarded result)
            fs.delete_file(posixpath.join(inner, rel))
            del self._sent[rel]
        for rel in changed:
            pafs.copy_files(str(self.local / rel), posixpath.join(inner, rel), source_filesystem=_local(),
                            destination_filesystem=fs)
            self._sent[rel] = state[rel]

    def _state(self) -> dict[str, tuple[int, int]]:
        """Size and modification time of every finished file below `local` (not `*.tmp` ones being written)."""
        out = {}
        for root, _dirs, files in os.walk(self.local):
            for name in files:
                if not name.endswith(".tmp"):
                    st = os.stat(os.path.join(root, name))
                    out[os.path.relpath(os.path.join(root, name), self.local).replace(os.sep, "/")] = (
                        st.st_size, st.st_mtime_ns)
        return out


def _skipped(rel: str, skip: tuple[str, ...]) -> bool:
    """Whether a folder or the file of the relative path `rel` matches a pattern of `skip`."""
    return any(fnmatch.fnmatchcase(part, pattern) for part in rel.split("/") for pattern in skip)


@contextlib.contextmanager
def mirrored(folder: str | Path, pull_skip: tuple[str, ...] = (), pull: bool = True,
             push_last: tuple[str, ...] = ()) -> Iterator[FolderMirror]:
    """A local folder to read and write `folder` through: the folder itself, or a mirror of an object-store one.

    For a URI, a temporary folder named like `folder` (so that `.name` is the same) is filled
    from the object store, and what was written in it is pushed back on the way out, also when
    the body raised (the results written before a failure are kept, as they would be on a local
    disk); the temporary folder is then removed. A failing push after a failure is logged, and
    the body's error is the one raised.

    Args:
        folder: A local folder or an `s3://` / `gs://` URI.
        pull_skip: Names or glob patterns of subfolders and files not to download (see
            `FolderMirror.pull`). Defaults to `()`.
        pull: Download the folder on entry. Defaults to `True` (`False`: the caller pulls, e.g.
            only on Horovod rank 0).
        push_last: File names uploaded after all others (see `FolderMirror.push`). Defaults to `()`.

    Yields:
        A `FolderMirror`; write in its `local` folder.

    Example:

    ```python
    with mirrored("s3://derm/runs/cv1", pull_skip=("resume",)) as run:
        (run.local / "report").mkdir(exist_ok=True)   # written to s3://derm/runs/cv1/report/ on exit
    ```
    """
    if not is_uri(folder):
        yield FolderMirror(str(folder), Path(folder))
        return
    root = Path(tempfile.mkdtemp(prefix="melanoma-dist-"))
    mirror = FolderMirror(str(folder).rstrip("/"), root / posixpath.basename(str(folder).rstrip("/")))
    try:
        mirror.local.mkdir()
        if pull:
            mirror.pull(skip=pull_skip)
        try:
            yield mirror
        except BaseException:
            try:
                mirror.push(last=push_last)
            except Exception as e:  # the body's error is the one to see; this one is logged
                logger.error("could not upload %s to %s after the error below: %s", mirror.local, mirror.uri, e)
            raise
        mirror.push(last=push_last)
    finally:
        shutil.rmtree(root, ignore_errors=True)
