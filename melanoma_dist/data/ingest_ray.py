"""Ingest on a Ray cluster: the images are prepared by Ray Data tasks across the nodes.

`data.ingest` maps one function, `prepare(path) -> PreparedImage | skip reason`, over the
source images in input order, and writes what comes back into shards on the driver.
Here that map runs as a Ray Data dataset: the paths go in blocks of at most
`MAX_BLOCK_IMAGES` images, `map_batches` prepares each block on whichever node has a free
CPU (reading, decoding, hashing, resizing, encoding), and the driver iterates the results
with the block order preserved. Everything else (sources, labels, shards, manifest) is the
single-machine code, fed the same results in the same order: the dataset is byte-identical.

Memory stays bounded: Ray Data streams, so the driver holds a few finished blocks at a
time, not the dataset. The paths are put in their blocks (Arrow bytes) before the dataset
starts, about 100 bytes per image, as the source listing already holds them (`data.records`).

Example:

```python
with ray_image_map(prepare, paths, len(paths), address="HEAD_IP:6379") as results:
    for path, result in zip(paths, results):  # PreparedImage, or the reason it was skipped
        ...
```
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from melanoma_dist.data.images import PreparedImage
from melanoma_dist.data.records import in_chunks

if TYPE_CHECKING:  # imported where used: a local ingest never loads Ray
    import ray.data

logger = logging.getLogger(__name__)

MAX_BLOCK_IMAGES = 256
"""Images per Ray Data block (one task) at most: at 512 px, a block of results is ~10-40 MB."""

BLOCKS_PER_CPU = 4
"""Blocks per cluster CPU at least (small datasets): enough tasks to balance the nodes."""

_RESULT_SCHEMA = pa.schema([
    ("index", pa.int64()),  # the record's position: checked on the driver, so that order cannot go wrong silently
    ("data", pa.binary()),  # the prepared image's fields; null when skipped
    ("pixel_sha256", pa.string()),
    ("phash", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("reason", pa.binary()),  # why the image is skipped (UTF-8, surrogateescape); null when prepared
    ("node", pa.string()),  # the Ray node that prepared it (logged, not stored)
])


def use_ray(engine: str, address: str = "") -> bool:
    """Whether ingest prepares the images with Ray Data (`engine: ray`) or a local process pool (`local`).

    Args:
        engine: `data.ingest_engine`. `auto` means Ray Data when there is a cluster to run
            on: an address (`address`, else RAY_ADDRESS), or a Ray of several nodes that this
            process already joined; otherwise the local pool (also the default on the embedded
            single-machine Ray of `cv`, which is started after ingest).
        address: the Ray cluster address given to the command (`--address`,
            `distributed.address`). Defaults to `""`.
    """
    if engine != "auto":
        return engine == "ray"
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    if "ray" not in sys.modules:  # never imported: this process has not joined any Ray
        return False
    import ray

    return ray.is_initialized() and sum(n["Alive"] for n in ray.nodes()) > 1


@contextlib.contextmanager
def ray_image_map(prepare: Callable[[str], PreparedImage | str], paths: Iterable[str], count: int,
                  address: str = "") -> Iterator[Iterator[PreparedImage | str]]:
    """`prepare(path)` for each path, in input order, run by Ray Data tasks on the cluster.

    Joins the Ray cluster at `address` (else RAY_ADDRESS, else a new local Ray) unless this
    process already joined one, and leaves it again at the end if it joined it here. When
    the results run out, logs how many images each node prepared.

    Args:
        prepare: a picklable function of a path (e.g. a `functools.partial` of a module-level
            function): the prepared image, or the reason it is skipped (it must not raise for a
            bad image: an exception fails the whole ingest).
        paths: the image files, in row order.
        count: how many `paths` there are.
        address: the Ray cluster address. Defaults to `""` (RAY_ADDRESS, else a local Ray).

    Yields:
        An iterator of the results, in the order of `paths`.

    Raises:
        RuntimeError: results came back out of order or are missing (a Ray Data bug; raised
            before the manifest is written, so ingest leaves the previous dataset in place).
    """
    import ray

    with _joined(address):
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        per_block = max(1, min(MAX_BLOCK_IMAGES, math.ceil(count / (cpus * BLOCKS_PER_CPU))))
        logger.info("ingest: preparing %d images with Ray Data on %d CPUs (%d nodes), %d images per task",
                    count, cpus, sum(n["Alive"] for n in ray.nodes()), per_block)
        per_node: Counter[str] = Counter()
        yield _results(_dataset(prepare, paths, per_block), per_node)
        # Here when the caller's block ended without an error, having taken the results it needed (the
        # iterator itself may never be resumed after its last result): all of them, unless Ray Data lost some.
        if sum(per_node.values()) != count:
            raise RuntimeError(f"Ray Data returned {sum(per_node.values())} of {count} images; "
                               f"run ingest with --set data.ingest_engine=local")
        logger.info("ingest: images prepared per node: %s",
                    ", ".join(f"node {node[:8]}: {n}" for node, n in sorted(per_node.items())))


@contextlib.contextmanager
def _joined(address: str) -> Iterator[None]:
    """This process in a Ray cluster: the one it is in, else `address`, RAY_ADDRESS or a new local Ray."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        logger.info("ingest: connected to the Ray cluster at %s", address)
    else:  # `ingest_engine: ray` without a cluster: a Ray of our own, never one someone else left running
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def _dataset(prepare: Callable[[str], PreparedImage | str], paths: Iterable[str],
             per_block: int) -> "ray.data.Dataset":
    """The Ray Data dataset of the results, one block per `per_block` paths, its blocks kept in order."""
    import ray.data

    ctx = ray.data.DataContext.get_current().copy()
    # Blocks come out in input order (else in completion order); the dataset keeps this
    # context, so the process-wide one stays untouched.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # ingest logs its own progress lines
    # Paths as bytes: a file name that is not valid UTF-8 (a str with surrogates) must reach the task unchanged.
    blocks = [pa.table({"index": pa.array(range(start, start + len(chunk)), pa.int64()),
                        "path": pa.array([os.fsencode(p) for p in chunk], pa.binary())})
              for start, chunk in zip(itertools.count(0, per_block), in_chunks(paths, per_block))]
    with ray.data.DataContext.current(ctx):
        ds = ray.data.from_arrow(blocks)
        # batch_size=None: one task per block, so a block's images are prepared together.
        return ds.map_batches(_prepare_block, batch_size=None, batch_format="pyarrow",
                              fn_kwargs={"prepare": prepare}, num_cpus=1)


def _prepare_block(block: pa.Table, prepare: Callable[[str], PreparedImage | str]) -> pa.Table:
    """Ray Data task: prepare the images of one block of paths; results as a table of `_RESULT_SCHEMA`."""
    import ray

    results = [prepare(os.fsdecode(p)) for p in block.column("path").to_pylist()]
    ok = [r if isinstance(r, PreparedImage) else None for r in results]
    node = ray.get_runtime_context().get_node_id()

    def field(name: str) -> list:
        return [getattr(r, name) if r is not None else None for r in ok]

    return pa.table({"index": block.column("index"), "data": field("data"),
                     "pixel_sha256": field("pixel_sha256"), "phash": field("phash"),
                     "width": field("width"), "height": field("height"),
                     "reason": [r.encode("utf-8", "surrogateescape") if isinstance(r, str) else None for r in results],
                     "node": [node] * len(results)}, schema=_RESULT_SCHEMA)


def _results(ds: "ray.data.Dataset", per_node: Counter[str]) -> Iterator[PreparedImage | str]:
    """The dataset's results as `PreparedImage`s or skip reasons, checked to be in input order; counted per node."""
    expected = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = batch.to_pydict()
        for i, data, sha, phash, width, height, reason, node in zip(
                rows["index"], rows["data"], rows["pixel_sha256"], rows["phash"], rows["width"], rows["height"],
                rows["reason"], rows["node"]):
            if i != expected:
                raise RuntimeError(f"Ray Data returned image {i} where image {expected} was expected: the "
                                   f"results are out of order; run ingest with --set data.ingest_engine=local")
            expected += 1
            per_node[node] += 1
            if reason is not None:
                yield reason.decode("utf-8", "surrogateescape")
            else:
                yield PreparedImage(data=data, pixel_sha256=sha, phash=phash, width=width, height=height)
