"""Feeding a GPU: the input side per CPU core with augmentation in tf.data vs in the model, JPEG vs raw shards.

Question (issue 13): one H200 trains EfficientNet-Lite0 at 128 px at about 6,100 images/s.
How many CPU cores does one rank's input side need to keep up, with the augmentation in
tf.data (`pipeline.augment_on: pipeline`) and with it moved into the model (`model`: tf.data
only reads, decodes and batches), from JPEG shards and from raw ones (`data.encoding: raw`:
no decode, only a copy)? What does the augmentation cost per image when it runs in the model
on this CPU, and does the XLA-compiled forward/backward pass (`train.jit_compile`) change the
training step here?

    python benchmarks/bench_feeding.py                   # 128 and 224 px, 4,096 HAM10000 images
    python benchmarks/bench_feeding.py --sizes 128 --repeats 5
    python benchmarks/bench_feeding.py --smoke           # seconds; checks that it runs

How (one process, same images, same run):

- Data: HAM10000 JPEGs ingested into Parquet at each size twice, as JPEG q95 and as raw
  pixels (cached in the work dir), the config's batch size and augmentation (`full.yaml`, as
  bench_pipeline.py above 64 px). Shard bytes per image of both are recorded.
- (a) input side from JPEG shards with augmentation in tf.data, (b) from JPEG shards with
  augmentation in the model, (c) from raw shards with augmentation in the model: the real
  `pipeline.make_dataset(training=True)` with 1 parallel call and a tf.data CPU budget of 1,
  the three interleaved (ABC CBA ...). Per core = 1000 / (process CPU ms per image, all
  threads): CPU time is what a core pays, and it moves much less than wall time on a shared
  machine. Wall img/s is recorded too.
- (c) training step: `TrainingModel` around the config's CNN, fed one constant in-memory
  batch, Keras' step vs the XLA forward/backward (`jit_gradients=True`), plain Adam (the
  Horovod allreduce, outside XLA either way, is bench_horovod.py's subject).
- (d) the model-side augmentation alone: `build_augmenter` layers on in-memory batches, CPU ms
  per image (on a GPU this moves to the accelerator).
- Derived: cores one rank needs at 6,100 img/s (128 px) for each case, and the img/s the input
  side of a 2-, 16- and 96-core node sustains (per-core rate x cores: decode scales with cores,
  as tf.data's parallel map does; memory bandwidth and Parquet reads are assumed not to bind).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `melanoma_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (Report, base_parser, bench_config, count_images, ensure_dataset, int_list, jpeg_tree,
                                main_guard, median, print_environment, setup_logging)

GPU_IMAGES_PER_S = 6100.0
"""One H200, EfficientNet-Lite0 at 128 px, bf16, augmentation on the GPU (issue 13's reference figure)."""
NODE_CORES = (2, 16, 96)
TARGETS = {128: 3000.0, 224: 1200.0}
"""Input side with augmentation in the model, img/s per core (issue 13)."""
CASES: dict[str, tuple[str, str]] = {"pipeline": ("jpeg", "pipeline"), "model": ("jpeg", "model"),
                                     "raw_model": ("raw", "model")}
"""Input-side cases: key in the result file -> (shard encoding, augmentation placement). The JPEG cases keep
the keys of earlier result files (`scaling_model.py` reads them)."""
ENCODINGS = ("jpeg", "raw")


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--sizes", type=int_list, help="image sizes in px, comma-separated (default 128,224; smoke 32)")
    p.add_argument("--images", type=int, help="HAM10000 images to use (default 4096; smoke 48)")
    p.add_argument("--measure-images", type=int, help="images timed per input measurement (default 2048; smoke 24)")
    p.add_argument("--train-images", type=int, help="images timed per training measurement (default 96; smoke 8)")
    p.add_argument("--train-sizes", type=int_list,
                   help="sizes of the XLA training-step comparison, comma-separated; empty skips it (default: --sizes)")
    return p.parse_args(argv)


def input_rate(index: Any, rows: Any, cfg: Any, size: int, placement: str, seed: int, warmup: int,
               images: int) -> dict[str, float]:
    """One rank's training input side on one core: `make_dataset` with 1 parallel call, CPU budget 1."""
    from benchmarks.bench_pipeline import _budget, measure
    import tensorflow as tf

    from melanoma_dist.data.pipeline import make_dataset

    pcfg = dataclasses.replace(cfg.pipeline, parallel_calls=1, augment_on=placement)
    ds = _budget(make_dataset(index, rows, pcfg, size, training=True, seed=seed), 1, tf)
    m = measure(ds, warmup, images)
    m["per_core_images_per_s"] = 1000.0 / m["cpu_ms_per_image"]
    return m


def augment_cost(cfg: Any, size: int, batches: int) -> float:
    """CPU ms per image of the whole `build_augmenter` block on in-memory batches (as in the model)."""
    import numpy as np
    import tensorflow as tf

    from melanoma_dist.data.augment import build_augmenter

    augmenter = build_augmenter(cfg.pipeline.augment, seed=0)
    batch = cfg.pipeline.batch_size
    x = tf.constant(np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32))
    fn = tf.function(lambda t: augmenter(t, training=True))
    for _ in range(2):
        fn(x).numpy()
    cpu = time.process_time()
    for _ in range(batches):
        fn(x).numpy()
    return 1000 * (time.process_time() - cpu) / (batches * batch)


def train_step_rates(cfg: Any, size: int, images: int) -> dict[str, dict[str, float]]:
    """Training img/s of the config's CNN through `TrainingModel`, Keras' step vs the XLA gradient step."""
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.bench_pipeline import train_rate
    from melanoma_dist.model.build import build_model
    from melanoma_dist.model.training_model import TrainingModel

    batch = cfg.pipeline.batch_size
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensors((rng.random((batch, size, size, 3), dtype=np.float32),
                                       (rng.random(batch) < 0.3).astype(np.int32))).repeat()
    out = {}
    for name, jit in (("keras_step", False), ("xla_step", True)):
        keras.utils.set_random_seed(0)
        trainer = TrainingModel(build_model(cfg.model, size, 2, seed=0), jit_gradients=jit)
        trainer.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss="binary_crossentropy",
                        metrics=["accuracy"], jit_compile=False)
        out[name] = train_rate(trainer, ds, batch, images)
        print(f"   train {size}px {name:10s} {out[name]['images_per_s']:8.2f} img/s "
              f"{out[name]['cpu_ms_per_image']:7.1f} CPU ms/img", flush=True)
        del trainer
        gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    smoke = args.smoke
    sizes = args.sizes or ([32] if smoke else [128, 224])
    repeats = args.repeats or (1 if smoke else 3)
    measure_images = args.measure_images or (24 if smoke else 2048)
    train_images = args.train_images or (8 if smoke else 96)
    train_sizes = sizes if args.train_sizes is None else args.train_sizes
    work = args.work_dir

    tree = jpeg_tree(work, args.images or (48 if smoke else 4096))
    n = count_images(tree)
    report = Report("bench_feeding", smoke, {"sizes": sizes, "repeats": repeats, "images_in_dataset": n,
                                             "measure_images": measure_images, "train_images": train_images,
                                             "cases": CASES, "gpu_images_per_s": GPU_IMAGES_PER_S,
                                             "node_cores": NODE_CORES})
    print_environment(report.env)
    datasets = {(size, enc): ensure_dataset(work, tree, size, enc)  # ingest forks: before TensorFlow
                for size in sizes for enc in ENCODINGS}

    import numpy as np

    from melanoma_dist.data.pipeline import RowIndex

    results: dict[str, Any] = {}
    for size in sizes:
        cfg, cfg_name = bench_config(size, datasets[size, "jpeg"], work / "unused",
                                     ["pipeline.batch_size=8"] if smoke else [])
        indices = {enc: RowIndex.load(datasets[size, enc]) for enc in ENCODINGS}
        rows = np.arange(len(indices["jpeg"]), dtype=np.int64)
        warmup = 1 if smoke else max(3, math.ceil(256 / cfg.pipeline.batch_size))
        print(f"== {size}px ({cfg_name}: batch {cfg.pipeline.batch_size})", flush=True)
        runs: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
        for r in range(repeats):
            for case in CASES if r % 2 == 0 else reversed(CASES):  # ABC CBA: drift cancels
                enc, placement = CASES[case]
                m = input_rate(indices[enc], rows, cfg, size, placement, 1234 + r, warmup, measure_images)
                runs[case].append(m)
                print(f"   {size}px input, {enc:4s} shards, augmentation in the {placement:8s} "
                      f"{m['images_per_s']:8.1f} img/s wall {m['per_core_images_per_s']:8.1f} img/s per core "
                      f"({m['cpu_ms_per_image']:.3f} CPU ms/img)", flush=True)
        per_size: dict[str, Any] = {"config": cfg_name, "batch_size": cfg.pipeline.batch_size, "input": {
            case: {"encoding": CASES[case][0], "augment_on": CASES[case][1], "runs": ms,
                   "per_core_images_per_s": median([m["per_core_images_per_s"] for m in ms]),
                   "images_per_s": median([m["images_per_s"] for m in ms])} for case, ms in runs.items()}}
        per_size["shard_bytes_per_image"] = {
            enc: sum(p.stat().st_size for p in datasets[size, enc].glob("shard-*.parquet")) / len(rows)
            for enc in ENCODINGS}
        per_size["augment_in_model_cpu_ms_per_image"] = augment_cost(cfg, size, 2 if smoke else 20)
        per_size["training"] = train_step_rates(cfg, size, train_images) if size in train_sizes else None
        results[str(size)] = per_size

        inp, tr = per_size["input"], per_size["training"]
        a, b, c = (inp[case]["per_core_images_per_s"] for case in ("pipeline", "model", "raw_model"))
        target = f">= {TARGETS[size]:,.0f} (model)" if size in TARGETS else ""
        report.row(f"{size}px input side per core, JPEG shards: augmentation in the model vs in tf.data", b, a,
                   "img/s/core", ratio_label="model/pipeline", target=target,
                   met=b >= TARGETS[size] if size in TARGETS else None)
        report.row(f"{size}px input side per core, augmentation in the model: raw vs JPEG shards", c, b, "img/s/core",
                   ratio_label="raw/jpeg", target=target, met=c >= TARGETS[size] if size in TARGETS else None)
        report.row(f"{size}px input side, 1 parallel call, wall: in the model vs in tf.data (JPEG)",
                   inp["model"]["images_per_s"], inp["pipeline"]["images_per_s"], "img/s", ratio_label="model/pipeline")
        report.row(f"{size}px input side, 1 parallel call, wall, augmentation in the model: raw vs JPEG",
                   inp["raw_model"]["images_per_s"], inp["model"]["images_per_s"], "img/s", ratio_label="raw/jpeg")
        report.row(f"{size}px shard bytes per image: raw (uncompressed) vs JPEG q95 (zstd)",
                   per_size["shard_bytes_per_image"]["raw"], per_size["shard_bytes_per_image"]["jpeg"], "bytes",
                   ratio_label="raw/jpeg")
        report.row(f"{size}px augmentation in the model, on this CPU", per_size["augment_in_model_cpu_ms_per_image"],
                   None, "CPU ms/img")
        if tr is not None:
            report.row(f"{size}px training step: XLA forward/backward vs Keras' step (compute only)",
                       tr["xla_step"]["images_per_s"], tr["keras_step"]["images_per_s"], "img/s",
                       ratio_label="xla/keras")
        per_size["cores_per_gpu"] = {case: GPU_IMAGES_PER_S / inp[case]["per_core_images_per_s"] for case in CASES}
        report.row(f"{size}px cores one rank needs for {GPU_IMAGES_PER_S:,.0f} img/s, JPEG shards: augmentation in "
                   "the model vs tf.data", per_size["cores_per_gpu"]["model"], per_size["cores_per_gpu"]["pipeline"],
                   "cores", ratio_label="model/pipeline")
        report.row(f"{size}px cores one rank needs for {GPU_IMAGES_PER_S:,.0f} img/s, augmentation in the model: "
                   "raw vs JPEG shards", per_size["cores_per_gpu"]["raw_model"], per_size["cores_per_gpu"]["model"],
                   "cores", ratio_label="raw/jpeg")
        per_size["node_images_per_s"] = {case: {n: n * inp[case]["per_core_images_per_s"] for n in NODE_CORES}
                                         for case in CASES}
        for n in NODE_CORES:
            report.row(f"{size}px input side of a {n}-core node, augmentation in the model: raw vs JPEG shards",
                       per_size["node_images_per_s"]["raw_model"][n], per_size["node_images_per_s"]["model"][n],
                       "img/s", ratio_label="raw/jpeg")
    report.results = {"sizes": results}
    report.notes.append("per core = 1000 / process CPU ms per image with 1 parallel call; node = per core x cores "
                        "(decode scales with cores; memory bandwidth and Parquet reads assumed not to bind); "
                        f"{GPU_IMAGES_PER_S:,.0f} img/s = one H200 on EfficientNet-Lite0 at 128 px (issue 13); "
                        "raw = `data.encoding: raw` shards (uint8 pixels, no decode), JPEG = q95 4:4:4")
    report.write(args.out_dir)


if __name__ == "__main__":
    sys.exit(main_guard(main))
