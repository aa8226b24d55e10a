"""Datasets at research scale: ingest and the input side at 10k, 100k and 1M images, local disk vs S3.

Question (issue 14): does ingest keep its speed per core and its memory as a collection grows
from 10k to 100k images; does one training worker's input side stay within its memory bound
at 1M rows; what does reading the shards from an object store cost against local disk; and
what does the row index take at 1M rows; and does ingest at 512 px stay within its bound?

    python benchmarks/bench_scale.py                 # 100k synthetic images at 128 px (~15 min on 2 cores)
    python benchmarks/bench_scale.py --smoke         # seconds; checks that it runs

How (one run, same machine):

- Synthetic source: re-encoded variants of the HAM10000 images (each image centre-cropped to
  144 px once, then 90-degree turns, flips, 128 px crop offsets and JPEG qualities 80-95 make up
  to 12 distinct variants), written as a `<class>/<id>.jpg` tree to the work dir, cached.
- Object store: a moto S3 server (its own process, 127.0.0.1), found by the code under test
  through the standard AWS variables, as in tests/test_storage.py. Its network is loopback and
  its storage memory, so the S3 rows show the object-store code path's own cost, not a cloud's.
- Ingest (each in a fresh process, 2 pool workers): the first 10k and all 100k images from
  local disk to a local dataset, and 10k from the bucket to a dataset in the bucket. Per core
  = images/s over the wall time / pool workers. Peak RSS sampled every 100 ms: the driver, the
  largest pool worker, and their sum.
- Input side (each in a fresh process): one worker's `make_dataset(training=True)` over all
  rows of the dataset (augmentation in the model, so tf.data reads, decodes and batches), the
  config's parallelism and shuffle buffer (`full.yaml`), `--measure-images` images timed after
  warm-up; datasets of 10k and 100k images, the 100k one read from the bucket, and 1M rows (the
  100k dataset's rows written 10 times under new ids: real images, 5 GB).
- Row index at 1M rows: the bytes of `RowIndex`'s Arrow/NumPy arrays, against the RSS that the
  same ids and groups take as one Python `str` per row (measured in the same process).
- Large images: the 10,015 HAM10000 originals (600x450) ingested at 128 and at 512 px: peak
  RSS of the driver and of the largest pool worker, and the shard count (shards are cut at
  `data.shard_bytes`, 64 MiB, so memory should grow by at most a few shards' bytes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (HAM_DIR, Report, base_parser, ham_subset, jpeg_tree, main_guard, run_child,
                                setup_logging)
from melanoma_dist.paths import is_uri

BUCKET = "bench"
VARIANTS = 12
"""4 turns x 3 crop offsets (x flip and quality): the distinct variants one HAM10000 image gives."""
WORKERS = 2


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--images", type=int, help="synthetic images (default 100,000; smoke 240)")
    p.add_argument("--small", type=int, help="the smaller ingest and input-side set (default 10,000; smoke 60)")
    p.add_argument("--replicas", type=int, help="copies of the large dataset's rows for the largest one "
                                                "(default 10: 1M rows; smoke 3)")
    p.add_argument("--measure-images", type=int, help="images timed per input-side run (default 8,192; smoke 64)")
    p.add_argument("--size", type=int, default=128, help="image size in px (default 128)")
    p.add_argument("--large-size", type=int, help="the large-image ingest's size in px, against --size "
                                                  "(default 512; smoke 96)")
    p.add_argument("--no-s3", action="store_true", help="skip the moto S3 rows")
    p.add_argument("--ingest-only", type=int, metavar="N",
                   help="only ingest N images (hard-linked copies of the synthetic set beyond --images) and write "
                        "bench_scale_ingest.json: the 1M-image ingest, ~15 min on 2 cores")
    return p.parse_args(argv)


# ---------------------------------------------------------------- synthetic source

def _variant_names(image_id: str, variants: range) -> list[str]:
    return [f"{image_id}_v{v:02d}.jpg" for v in variants]


def _write_variants(task: tuple[str, str, str, int, int]) -> int:
    """Write variants [first, last) of one HAM10000 image into `<out>/<cls>/`."""
    from PIL import Image, ImageOps

    image_id, cls, out, first, last = task
    with Image.open(HAM_DIR / "images" / f"{image_id}.jpg") as im:
        im.draft("RGB", (300, 300))  # decode at reduced scale: the source is 600x450, the variants 128 px
        base = ImageOps.fit(im.convert("RGB"), (144, 144))
    for v, name in zip(range(first, last), _variant_names(image_id, range(first, last))):
        turned = base.rotate(90 * (v % 4))
        off = 8 * (v // 4 % 3)
        img = turned.crop((off, off, off + 128, off + 128))
        if v // 2 % 2:
            img = ImageOps.mirror(img)
        img.save(Path(out) / cls / name, quality=80 + (5 * v) % 16)
    return last - first


def synthetic_tree(work_dir: Path, n: int) -> Path:
    """A `<class>/<id>.jpg` tree of `n` re-encoded variants of the HAM10000 images (cached)."""
    records = ham_subset(None)
    if n > len(records) * VARIANTS:
        raise ValueError(f"--images {n}: at most {len(records) * VARIANTS} distinct variants ({VARIANTS} per image)")
    root = work_dir / "scale" / f"synthetic-{n}"
    marker = root / ".complete"
    if marker.is_file():
        return root
    per_image = math.ceil(n / len(records))
    tasks = []
    for i, (image_id, cls) in enumerate(records):  # when n is not a multiple, the first images give one more
        count = per_image if i < n - (per_image - 1) * len(records) else per_image - 1
        if count:
            tasks.append((image_id, cls, str(root), 0, count))
    for cls in {c for _, c in records}:
        (root / cls).mkdir(parents=True, exist_ok=True)
    start, done = time.perf_counter(), 0
    with ProcessPoolExecutor(WORKERS, mp_context=get_context("spawn")) as pool:
        for k in pool.map(_write_variants, tasks, chunksize=16):
            done += k
            if done % 20_000 < k:
                print(f"   synthetic images: {done:,}/{n:,} ({done / (time.perf_counter() - start):.0f}/s)", flush=True)
    marker.write_text(f"{done}\n")
    return root


def _link_tree(root: Path, pairs: Iterable[tuple[Path, Path]], hard: bool = False) -> Path:
    """`root` filled once with links (target, link) from `pairs`: symlinks, or hard links when `hard`.

    A `.complete` marker says the tree is whole: a later call returns it without consuming
    `pairs` (pass a generator, so that the source is not even listed); links left by an
    interrupted call are kept.
    """
    marker = root / ".complete"
    if marker.is_file():
        return root
    count = 0
    for target, link in pairs:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(link):
            if hard:
                os.link(target, link)
            else:
                link.symlink_to(target)
        count += 1
    marker.write_text(f"{count}\n")
    return root


def subset_tree(tree: Path, n: int) -> Path:
    """A tree of symlinks to the first `n` images of `tree` (sorted by class, then name)."""
    root = tree.parent / f"{tree.name}-first{n}"

    def pairs() -> Iterator[tuple[Path, Path]]:
        for f in sorted(tree.rglob("*.jpg"))[:n]:
            yield f, root / f.parent.name / f.name

    return _link_tree(root, pairs())


def copies_tree(tree: Path, n: int) -> Path:
    """A tree of `n` files: hard links to the images of `tree` under new names (`<id>_c<k>.jpg`), k = 0, 1, ..."""
    root = tree.parent / f"{tree.name}-copies{n}"

    def pairs() -> Iterator[tuple[Path, Path]]:
        files = sorted(tree.rglob("*.jpg"))
        for i in range(n):
            f = files[i % len(files)]
            yield f, root / f.parent.name / f"{f.stem}_c{i // len(files)}.jpg"

    return _link_tree(root, pairs(), hard=True)


def ingest_only(args: Any, n: int) -> None:
    """Ingest `args.ingest_only` images into a throw-away dataset; report its speed and peak RSS."""
    work = args.work_dir
    count = args.ingest_only
    tree = copies_tree(synthetic_tree(work, n), count) if count > n else subset_tree(synthetic_tree(work, n), count)
    report = Report("bench_scale_ingest", args.smoke, {"images": count, "size": args.size, "ingest_workers": WORKERS})
    out = work / "scale" / f"dataset-ingest-{count}"
    r = run_ingest(f"{count:,} local", tree, out, args.size, work)
    shutil.rmtree(out, ignore_errors=True)
    report.results = {"ingest": r}
    report.row(f"ingest of {count:,} images: img/s per core", r["per_core_images_per_s"], unit="img/s/core")
    report.row(f"ingest of {count:,} images: peak RSS of the driver", mib(r["driver_peak_rss"]), unit="MiB")
    report.row(f"ingest of {count:,} images: peak RSS of the largest pool worker", mib(r["worker_peak_rss"]),
               unit="MiB")
    report.notes.append("beyond the synthetic set the files are hard links under new names: the same bytes, "
                        "decoded again")
    report.write(args.out_dir)


def replicate(dataset: Path, out: Path, copies: int) -> Path:
    """A dataset with the rows of `dataset` `copies` times over, under new ids (`<id>~<copy>`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from melanoma_dist.config import DataConfig
    from melanoma_dist.data import shards

    manifest = shards.load_manifest(dataset)
    if (out / shards.MANIFEST).is_file() and shards.load_manifest(out)["num_images"] == copies * manifest["num_images"]:
        return out
    shutil.rmtree(out, ignore_errors=True)

    def tables() -> Iterator[Any]:
        for c in range(copies):
            for path in shards.shard_paths(dataset):
                table = pq.read_table(path)
                ids = pc.binary_join_element_wise(table[shards.IMAGE_ID], f"~{c}", "")
                yield table.set_column(table.schema.get_field_index(shards.IMAGE_ID), shards.IMAGE_ID, ids)

    names = shards.write_shards(tables(), out, int(manifest["rows_per_shard"]), DataConfig.shard_bytes)
    shards.write_manifest(out, {**manifest, "shards": names, "num_shards": len(names),
                                "num_images": copies * manifest["num_images"]})
    return out


# ---------------------------------------------------------------- S3 (moto)

@contextlib.contextmanager
def moto_s3(work_dir: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server in its own process; yields the AWS variables that point the code at it."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.is_file():
        raise FileNotFoundError(f"{exe} not found: install the test dependencies (moto[server], "
                                f"launch/requirements.txt) or pass --no-s3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work_dir / "moto.log").open("w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start; see {work_dir / 'moto.log'}")
                time.sleep(0.5)
        env = {"AWS_ACCESS_KEY_ID": "AKIABENCHMARKKEY0000", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        moto_filesystem(env, allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def moto_filesystem(env: dict[str, str], **options: Any) -> Any:
    """The moto server's S3 as a pyarrow filesystem, from the AWS variables that `moto_s3` yields."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override=env["AWS_ENDPOINT_URL"].removeprefix("http://"), scheme="http",
                             region=env["AWS_DEFAULT_REGION"], **options)


def upload_dir(local: Path, uri: str, env: dict[str, str]) -> float:
    """Copy a folder into the bucket (threads); return the seconds it took."""
    import pyarrow.fs as pafs

    start = time.perf_counter()
    pafs.copy_files(str(local), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=moto_filesystem(env), use_threads=True)
    return time.perf_counter() - start


# ---------------------------------------------------------------- measurements

def mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def run_ingest(label: str, tree: Path | str, out: Path | str, size: int, work_dir: Path,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    if not is_uri(out):
        shutil.rmtree(out, ignore_errors=True)
    print(f"   ingest {label}: running; its progress lines are in {work_dir / 'logs'}/scale_ingest-*.log", flush=True)
    child = run_child("scale_ingest", {"tree": str(tree), "out": str(out), "size": size, "workers": WORKERS},
                      work_dir, env)
    r = {**child.result, "per_core_images_per_s": child.result["images_per_s"] / WORKERS}
    print(f"   ingest {label}: {r['num_images']:,} images in {r['seconds']:.1f}s, {r['images_per_s']:.0f} img/s "
          f"({r['per_core_images_per_s']:.0f} per core); peak RSS driver {mib(r['driver_peak_rss']):.0f} MiB, "
          f"largest worker {mib(r['worker_peak_rss']):.0f} MiB, sum {mib(r['tree_peak_rss']):.0f} MiB", flush=True)
    return r


def run_pipeline(label: str, dataset: Path | str, args: Any, work_dir: Path, env: dict[str, str] | None = None,
                 python_objects: bool = False) -> dict[str, Any]:
    spec = {"dataset": str(dataset), "size": args.size, "out": str(work_dir / "scale" / "out"),
            "images": args.measure_images, "warmup_batches": 2 if args.smoke else 8, "python_objects": python_objects}
    child = run_child("scale_pipeline", spec, work_dir, env)
    r = {**child.result, "max_rss": child.max_rss_bytes}
    print(f"   input side {label}: {r['rows']:,} rows in {r['shards']} shards; {r['images_per_s']:.0f} img/s, "
          f"{r['cpu_ms_per_image']:.2f} CPU ms/img; peak RSS {mib(r['max_rss']):.0f} MiB; "
          f"row index {r['index_bytes'] / 2**20:.1f} MiB", flush=True)
    return r


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    smoke = args.smoke
    n = args.images or (240 if smoke else 100_000)
    small = args.small or (60 if smoke else 10_000)
    copies = args.replicas or (3 if smoke else 10)
    args.measure_images = args.measure_images or (64 if smoke else 8192)
    if args.ingest_only:
        return ingest_only(args, n)
    work = args.work_dir
    report = Report("bench_scale", smoke, {"images": n, "small": small, "replicas": copies, "size": args.size,
                                           "measure_images": args.measure_images, "ingest_workers": WORKERS})
    start = time.perf_counter()
    tree = synthetic_tree(work, n)
    trees = {small: subset_tree(tree, small), n: tree}
    print(f"   synthetic source ready: {n:,} images ({time.perf_counter() - start:.0f}s)", flush=True)

    datasets = {k: work / "scale" / f"dataset-{k}" for k in (small, n)}
    ingests = {k: run_ingest(f"{k:,} local", trees[k], datasets[k], args.size, work) for k in (small, n)}
    big = replicate(datasets[n], work / "scale" / f"dataset-{n * copies}", copies)
    inputs = {k: run_pipeline(f"{k:,} rows", datasets[k], args, work) for k in (small, n)}
    inputs[n * copies] = run_pipeline(f"{n * copies:,} rows", big, args, work, python_objects=True)
    # Large images: the HAM10000 originals (600x450) at --size and at --large-size.
    large = args.large_size or (96 if smoke else 512)
    ham = jpeg_tree(work, small if smoke else None)
    sizes = {px: run_ingest(f"HAM10000 at {px} px", ham, work / "scale" / f"ham-{px}px", px, work)
             for px in (args.size, large)}
    for px, r in sizes.items():
        r["shards"] = len(list((work / "scale" / f"ham-{px}px").glob("shard-*.parquet")))
    s3: dict[str, Any] = {}
    if not args.no_s3:
        with moto_s3(work) as env:
            s3["upload_source_s"] = upload_dir(trees[small], f"s3://{BUCKET}/source-{small}", env)
            s3["ingest"] = run_ingest(f"{small:,} bucket -> bucket", f"s3://{BUCKET}/source-{small}",
                                      f"s3://{BUCKET}/dataset-{small}", args.size, work, env)
            s3["upload_dataset_s"] = upload_dir(datasets[n], f"s3://{BUCKET}/dataset-{n}", env)
            s3["input"] = run_pipeline(f"{n:,} rows from the bucket", f"s3://{BUCKET}/dataset-{n}", args, work, env)
    report.results = {"ingest": ingests, "input": inputs, "s3": s3, "image_sizes": sizes,
                      "dataset_bytes": {k: sum(p.stat().st_size for p in d.glob("shard-*.parquet"))
                                        for k, d in datasets.items()}}

    def k(x: int) -> str:
        return f"{x // 1_000_000}M" if x >= 1_000_000 else f"{x // 1000}k" if x >= 1000 else str(x)

    a, b, c = small, n, n * copies
    report.row(f"ingest img/s per core, {k(b)} vs {k(a)} images", ingests[b]["per_core_images_per_s"],
               ingests[a]["per_core_images_per_s"], "img/s/core", ratio_label=f"{k(b)}/{k(a)}",
               target="speed kept (>= 0.8x)", met=ingests[b]["per_core_images_per_s"]
               >= 0.8 * ingests[a]["per_core_images_per_s"])
    for key, what in (("driver_peak_rss", "driver"), ("worker_peak_rss", "largest pool worker")):
        report.row(f"ingest peak RSS of the {what}, {k(b)} vs {k(a)} images", mib(ingests[b][key]),
                   mib(ingests[a][key]), "MiB", ratio_label=f"{k(b)}/{k(a)}", target="bounded (<= 1.5x for 10x)",
                   met=ingests[b][key] <= 1.5 * ingests[a][key])
    for rows in (b, c):
        report.row(f"input side peak RSS of one worker, {k(rows)} vs {k(a)} rows", mib(inputs[rows]["max_rss"]),
                   mib(inputs[a]["max_rss"]), "MiB", ratio_label=f"{k(rows)}/{k(a)}",
                   target="bounded (<= 1.5x)", met=inputs[rows]["max_rss"] <= 1.5 * inputs[a]["max_rss"])
    report.row(f"input side img/s of one worker, {k(c)} vs {k(a)} rows", inputs[c]["images_per_s"],
               inputs[a]["images_per_s"], "img/s", ratio_label=f"{k(c)}/{k(a)}")
    report.row(f"row index at {k(c)} rows: Arrow arrays vs one Python str per id and group",
               mib(inputs[c]["index_bytes"]), mib(inputs[c]["python_object_index_bytes"]), "MiB")
    from melanoma_dist.config import DataConfig

    budget = 3 * DataConfig.shard_bytes  # a shard's rows, its Arrow table and the file being written
    grew = sizes[large]["driver_peak_rss"] - sizes[args.size]["driver_peak_rss"]
    report.row(f"ingest peak RSS of the driver, HAM10000 at {large} vs {args.size} px "
               f"({sizes[large]['shards']} vs {sizes[args.size]['shards']} shards)",
               mib(sizes[large]["driver_peak_rss"]), mib(sizes[args.size]["driver_peak_rss"]), "MiB",
               ratio_label=f"{large}/{args.size} px", target=f"grows <= 3 shards' bytes ({mib(budget):.0f} MiB)",
               met=grew <= budget)
    report.row(f"ingest peak RSS of the largest pool worker, HAM10000 at {large} vs {args.size} px",
               mib(sizes[large]["worker_peak_rss"]), mib(sizes[args.size]["worker_peak_rss"]), "MiB",
               ratio_label=f"{large}/{args.size} px")
    if s3:
        report.row(f"input side img/s of one worker, {k(b)} rows, S3 (moto) vs local disk",
                   s3["input"]["images_per_s"], inputs[b]["images_per_s"], "img/s", ratio_label="S3/local")
        report.row(f"ingest img/s per core, {k(a)} images, S3 -> S3 (moto) vs local -> local",
                   s3["ingest"]["per_core_images_per_s"], ingests[a]["per_core_images_per_s"], "img/s/core",
                   ratio_label="S3/local")
    report.notes.append(f"{WORKERS} ingest pool workers on {os.cpu_count()} cores; {args.size} px JPEG q95 shards; "
                        f"input side: augmentation in the model, full.yaml's batch and shuffle buffer, "
                        f"{args.measure_images} images timed per run")
    report.notes.append("RSS sums count shared pages in each process; the moto server runs in its own process "
                        "(not counted) and serves from memory over loopback")
    report.write(args.out_dir)
    print(json.dumps({"seconds": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    sys.exit(main_guard(main))
