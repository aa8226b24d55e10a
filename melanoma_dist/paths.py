"""Up-front checks of the folders and files a command will write.

A command calls these before its long work (ingest, training, bootstrap, prediction),
so that an output path that is a file, or lies on a read-only or forbidden folder, fails
at once in one line instead of after the work, with a traceback. Nothing is created:
the checks look at the nearest existing folder and probe it with an anonymous temporary
file. The errors are OSErrors whose `filename` is the offending path and whose
`strerror` names the setting (`output_dir`, `--json`), as `cli.main` prints them.
Object-store URIs (`s3://bucket/prefix`) are checked for their form here (`check_uri`) and
are not probed: `melanoma_dist.storage` reads and writes them.

Example:

```python
ensure_writable_dir(cfg.output_dir, "output_dir")   # before training starts
ensure_writable_file(args.json, "--json")           # before predicting
```
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


SCHEMES: tuple[str, ...] = ("s3", "gs")
"""Object stores a path may name; `gcs://` is read as `gs://`."""

ALIASES = {"gcs": "gs"}


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` is an object-store URI (`scheme://...`, or a `storage.ObjectPath`) rather than a local path.

    A `Path` never is: pathlib folds `s3://b` into `s3:/b`.
    """
    return not isinstance(path, Path) and "://" in str(path)


def check_uri(value: str, key: str) -> None:
    """Refuse a URI this module cannot serve, or one that carries a credential.

    Args:
        value: The configured path (`s3://bucket/prefix`); local paths pass unchecked.
        key: The setting that gave it, named in errors (`output_dir`, `data.dataset_dir`).

    Raises:
        ValueError: an unknown scheme, no bucket, or a user/password in the URI. The message
            never repeats the user or password.
    """
    if not is_uri(value):
        return
    scheme, sep, rest = value.partition("://")
    scheme = ALIASES.get(scheme.lower(), scheme.lower())
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        safe = f"{scheme}://{netloc.rsplit('@', 1)[1]}/{rest.split('/', 1)[1] if '/' in rest else ''}"
        raise ValueError(f"{key} {safe} (shown without it) has a user or password in the URI: credentials come "
                         f"only from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, "
                         f"the instance role; GCS application default credentials), never from a config")
    if scheme not in SCHEMES:
        raise ValueError(f"{key} {value}: unknown scheme {scheme!r}; give a local path or a URI of "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if not netloc:
        raise ValueError(f"{key} {value} names no bucket: give {scheme}://<bucket>/<prefix>")


def absolute(path: str) -> str:
    """A local path made absolute (every node of a cluster must read it alike); a URI unchanged."""
    return path if is_uri(path) or not path else os.path.abspath(path)


def _existing_folder(path: Path, key: str, target: Path) -> Path:
    """The nearest existing folder at or above `path`; a file on the way is an error."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"is a file, so {key} {target} cannot be created under it", str(p))
    return p


def _probe(folder: Path, key: str, target: Path) -> None:
    """Create and drop an anonymous file in `folder`: the only sure test (permissions, read-only mounts, ACLs)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: {key} {target} cannot be written there", str(folder)) from None


def ensure_writable_dir(path: str | Path, key: str, replaced: bool = False) -> Path:
    """Check that the folder `path` is, or can be created as, a writable folder.

    Args:
        path: The folder a command will write.
        key: The setting that gave it, named in errors (`output_dir`, `data.dataset_dir`, `--out`).
        replaced: The folder is built beside its target and renamed into place (ingest, export),
            so its parent must be writable as well. Defaults to `False`.

    Returns:
        `path` as a Path; an object-store URI unchanged and unchecked.

    Raises:
        NotADirectoryError: `path`, or a folder above it, is a file.
        OSError: the folder (or the nearest existing one above it) cannot be written, e.g.
            PermissionError, or errno 30 on a read-only file system.
    """
    if is_uri(path):  # an object store has no folders to probe; its errors come with the first write
        return path  # type: ignore[return-value]
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{key} is a file, not a folder", str(p))
    _probe(_existing_folder(p.parent if replaced else p, key, p), key, p)
    return p


def ensure_writable_file(path: str | Path, key: str) -> Path:
    """Check that the file `path` can be written (created, or overwritten) without creating it.

    Args:
        path: The file a command will write.
        key: The option that gave it, named in errors (`--json`, `--csv`).

    Returns:
        `path` as a Path.

    Raises:
        IsADirectoryError: `path` is a folder.
        NotADirectoryError: a folder above it is a file.
        OSError: it, or the folder it goes in, cannot be written.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{key} is a folder: give a file name", str(p))
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(errno.EACCES, f"{key} is a file that cannot be overwritten", str(p))
    _probe(_existing_folder(p.parent, key, p), key, p)
    return p


def ensure_replaceable(folder: Path, marker: str, key: str, kind: str,
                       error: type[Exception] = FileExistsError) -> None:
    """Refuse to replace a folder that is neither absent, empty, nor ours (it holds `marker`).

    Ingest and export build their output beside it and swap it in; this keeps them from
    swapping away a folder someone else owns.

    Args:
        folder: The folder to be replaced.
        marker: The file that marks the folder as ours (a manifest, `model.json`).
        key: The setting that gave it, named in errors (`data.dataset_dir`, `--out`).
        kind: What the folder should be, for the error (`a melanoma-dist dataset`).
        error: The exception class to raise. Defaults to `FileExistsError`.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise error(f"{key} {folder} is a file, not a folder: set {key} to a new folder")
    entries = sorted(p.name for p in folder.iterdir())
    if entries and not (folder / marker).is_file():
        listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise error(f"{key} {folder} exists and is not {kind} (no {marker}; it holds {listed}); it would be "
                    f"replaced, so set {key} to a new or empty folder")


def os_error_line(e: OSError) -> str:
    """One line for an OSError: its file(s) and its reason, without the `[Errno N]` prefix."""
    if not e.strerror:  # raised with a message only, e.g. FileNotFoundError("no dataset in ...")
        return str(e)
    files = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return ": ".join(files + [e.strerror])
