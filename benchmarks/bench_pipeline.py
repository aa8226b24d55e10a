"""Input pipeline: our Parquet + tf.data pipeline versus `keras.utils.image_dataset_from_directory`.

Question: how many images per second does one worker's training input pipeline deliver
(decode, augment, batch), at 64, 128 and 224 px with 1 and 2 parallel calls, next to the
plain Keras loader reading the same HAM10000 images as JPEG files with the same
augmentation layers and output size? What does ingest cost, how big are the shards,
and is the pipeline ever the bottleneck of training?

    python benchmarks/bench_pipeline.py                 # full: all 10,015 HAM10000 images
    python benchmarks/bench_pipeline.py --sizes 128 --parallel 2 --repeats 5
    python benchmarks/bench_pipeline.py --smoke         # seconds; checks that it runs

How (all in one process, same images, same run):

- The images: a `<class>/<id>.jpg` tree of symlinks to the shared HAM10000 JPEGs (the
  baseline's input), ingested by `melanoma_dist.data.ingest.ingest` into Parquet at each
  size (timed: ingest images/s; shard bytes vs JPEG bytes). Ingest runs before TensorFlow
  is imported (its process pool forks).
- Ours: `pipeline.make_dataset(training=True)` over all rows as one worker (rank 0 of 1),
  plus rank 0 of 2 at the highest parallelism (a worker's share: it reads every shard).
- Baseline: `image_dataset_from_directory(crop_to_aspect_ratio=True)` (centre crop +
  bilinear resize, as ingest does), then one map: `/255` and the same
  `pipeline.build_augmenter` layers, `num_parallel_calls=p`. Keras hard-codes AUTOTUNE in
  its loader, so both datasets get `tf.data.Options().autotune.cpu_budget = p`.
- Both use the config's batch size and augmentation: quick-cpu.yaml at 64 px,
  full.yaml above. Each measurement: warm-up batches, then the same number of images,
  timed; ours and baseline alternate (ABBA) over `--repeats`; medians are reported. Besides
  images/s, the process CPU time per image (all threads) is recorded: it is what a worker
  pays for its input and it moves much less than wall time when the machine is shared.
- The loaders alone (no augmentation layers) at the highest parallelism: what the Parquet
  format saves, with the (identical) augmentation cost taken out; and each augmentation
  layer alone on in-memory batches (CPU ms per image), to show where the time goes.
- Training: the config's real CNN (plain Adam; the same compute as our 1-rank path) fed
  (a) one constant in-memory batch (compute only), (b) our pipeline, (c) the baseline.
  pipeline img/s ÷ compute img/s >= 1 means the pipeline keeps up in isolation;
  fed-by-ours ÷ compute close to 1 means it keeps up while sharing the CPUs with training.
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

from benchmarks._common import (int_list, Report, base_parser, bench_config, count_images, dataset_dir, ingest_tree,
                                jpeg_tree, main_guard, median, print_environment, ratio, setup_logging,
                                tree_bytes)

TARGET_SPEEDUP = 3.0


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--sizes", type=int_list, help="image sizes in px, comma-separated (default 64,128,224; smoke 32)")
    p.add_argument("--parallel", type=int_list, help="parallel calls to compare (default 1,2)")
    p.add_argument("--images", type=int, help="HAM10000 images to use (default all 10,015; smoke 48)")
    p.add_argument("--measure-images", type=int, help="images timed per measurement (default 2048; smoke 24)")
    p.add_argument("--train-images", type=int, help="images timed per training measurement (default 128; smoke 8)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- datasets

NO_AUGMENT = dict(rotation=0.0, zoom=0.0, horizontal_flip=False, vertical_flip=False, contrast=0.0)


def ours_dataset(index: Any, rows: Any, cfg: Any, size: int, parallel: int, seed: int, augment: bool = True) -> Any:
    import tensorflow as tf

    from melanoma_dist.data.pipeline import make_dataset

    # The tf.data side with the augmentation in it, as the baseline has it (bench_feeding.py: in the model).
    pcfg = dataclasses.replace(cfg.pipeline, parallel_calls=parallel, augment_on="pipeline")
    if not augment:
        pcfg = dataclasses.replace(pcfg, augment=dataclasses.replace(pcfg.augment, **NO_AUGMENT))
    return _budget(make_dataset(index, rows, pcfg, size, training=True, seed=seed), parallel, tf)


def baseline_dataset(tree: Path, cfg: Any, size: int, parallel: int, seed: int,
                     cpu_budget: int | None = -1, augment: bool = True) -> Any:
    """The plain Keras way: JPEG folder loader, then the same augmentation layers; endless.

    `parallel` -1 is AUTOTUNE; `cpu_budget` -1 means `parallel` (None: tf.data's default).
    """
    import keras
    import tensorflow as tf

    from melanoma_dist.data.augment import build_augmenter

    ds = keras.utils.image_dataset_from_directory(
        str(tree), labels="inferred", label_mode="int", image_size=(size, size),
        batch_size=cfg.pipeline.batch_size, shuffle=True, seed=seed, interpolation="bilinear",
        crop_to_aspect_ratio=True, verbose=False)
    augmenter = build_augmenter(cfg.pipeline.augment, seed) if augment else None
    calls = tf.data.AUTOTUNE if parallel == -1 else parallel
    if augmenter is None:
        ds = ds.map(lambda x, y: (x / 255.0, y), num_parallel_calls=calls)
    else:
        ds = ds.map(lambda x, y: (augmenter(x / 255.0, training=True), y), num_parallel_calls=calls,
                    deterministic=False)
    ds = ds.repeat().prefetch(tf.data.AUTOTUNE)
    return _budget(ds, parallel if cpu_budget == -1 else cpu_budget, tf)


def baseline_eval_dataset(tree: Path, cfg: Any, size: int) -> Any:
    """The plain Keras validation stream: one ordered pass, no augmentation."""
    import keras

    ds = keras.utils.image_dataset_from_directory(
        str(tree), labels="inferred", label_mode="int", image_size=(size, size),
        batch_size=cfg.pipeline.batch_size, shuffle=False, interpolation="bilinear",
        crop_to_aspect_ratio=True, verbose=False)
    return ds.map(lambda x, y: (x / 255.0, y))


def _budget(ds: Any, parallel: int | None, tf: Any) -> Any:
    if parallel is None or parallel < 1:
        return ds
    options = tf.data.Options()
    options.autotune.cpu_budget = parallel
    return ds.with_options(options)


def measure(ds: Any, warmup_batches: int, images: int) -> dict[str, float]:
    """Images/s of iterating `ds`, after `warmup_batches` untimed batches."""
    it = iter(ds)
    start = time.perf_counter()
    for _ in range(warmup_batches):
        next(it)
    warm = time.perf_counter() - start
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while n < images:
        x, _ = next(it)
        n += int(x.shape[0])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    del it
    gc.collect()
    # CPU time of the whole process (every thread) per image: less sensitive than img/s to other load.
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_ms_per_image": 1000 * cpu / n,
            "warmup_s": warm}


def augment_costs(cfg: Any, size: int, batches: int) -> dict[str, float]:
    """CPU ms per image of each `build_augmenter` layer alone, on batches of random images in memory."""
    import numpy as np
    import tensorflow as tf

    from melanoma_dist.data.augment import build_augmenter

    augmenter = build_augmenter(cfg.pipeline.augment, seed=0)
    if augmenter is None:
        return {}
    batch = cfg.pipeline.batch_size
    x = tf.constant(np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32))
    out = {}
    for layer in augmenter.layers:
        fn = tf.function(lambda t, layer=layer: layer(t, training=True))
        for _ in range(2):
            fn(x).numpy()
        cpu = time.process_time()
        for _ in range(batches):
            fn(x).numpy()
        out[f"{type(layer).__name__}({_layer_args(layer)})"] = 1000 * (time.process_time() - cpu) / (batches * batch)
    return out


def _layer_args(layer: Any) -> str:
    c = layer.get_config()
    return ", ".join(f"{k}={c[k]}" for k in ("mode", "factor", "height_factor", "fill_mode") if k in c)


# ---------------------------------------------------------------- training

def train_rate(model: Any, ds: Any, batch: int, images: int) -> dict[str, float]:
    """Training images/s of `model.fit` on `ds`: one untimed warm-up epoch, then timed epochs.

    Epochs are 2 steps long so that the timed part starts after tracing and pipeline start-up
    without a per-batch callback (which would turn off Keras' asynchronous dispatch).
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

            self.cpu: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.times.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)

    steps = 2
    epochs = 1 + max(1, math.ceil(images / (steps * batch)))
    timer = EpochTimer()
    model.fit(ds, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False)
    seconds = sum(timer.times[1:])
    n = (epochs - 1) * steps * batch
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds,
            "cpu_ms_per_image": 1000 * sum(timer.cpu[1:]) / n, "warmup_s": timer.times[0]}


def training_rates(cfg: Any, size: int, ours_ds: Any, base_ds: Any, images: int) -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    from melanoma_dist.model.build import build_model

    batch = cfg.pipeline.batch_size
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = (rng.random(batch) < 0.3).astype(np.int32)
    sources = {"compute_only": tf.data.Dataset.from_tensors((x, y)).repeat(), "fed_by_ours": ours_ds,
               "fed_by_baseline": base_ds}
    for name, ds in sources.items():
        keras.utils.set_random_seed(0)
        model = build_model(cfg.model, size, 2, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss="binary_crossentropy",
                      metrics=["accuracy", keras.metrics.AUC(name="auc")], jit_compile=False)
        out[name] = train_rate(model, ds, batch, images)
        print(f"   train {size}px {name:16s} {out[name]['images_per_s']:8.1f} img/s "
              f"{out[name]['cpu_ms_per_image']:7.1f} CPU ms/img", flush=True)
        del model
        gc.collect()
    out["params"] = int(build_model(cfg.model, size, 2).count_params())
    return out


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    smoke = args.smoke
    sizes = args.sizes or ([32] if smoke else [64, 128, 224])
    parallel = args.parallel or [1, 2]
    repeats = args.repeats or (1 if smoke else 3)
    measure_images = args.measure_images or (24 if smoke else 2048)
    train_images = args.train_images or (8 if smoke else 128)
    n_wanted = args.images or (48 if smoke else None)
    work = args.work_dir

    tree = jpeg_tree(work, n_wanted)
    n = count_images(tree)
    params = {"sizes": sizes, "parallel_calls": parallel, "repeats": repeats, "images_in_dataset": n,
              "measure_images": measure_images, "train_images": train_images, "jpeg_tree": str(tree)}
    report = Report("bench_pipeline", smoke, params)
    print_environment(report.env)
    jpeg_bytes = tree_bytes(tree)

    # 1. Ingest at every size (timed), before TensorFlow exists in this process.
    ingests = {}
    for size in sizes:
        print(f"== ingest {n} images at {size}px ...", flush=True)
        ingests[size] = ingest_tree(tree, dataset_dir(work, n, size), size)
        ingests[size]["jpeg_bytes"] = jpeg_bytes
        print(f"   {ingests[size]['images_per_s']:.0f} img/s, shards {ingests[size]['shard_bytes'] / 2**20:.1f} MiB "
              f"vs JPEG folder {jpeg_bytes / 2**20:.1f} MiB", flush=True)

    import numpy as np

    from melanoma_dist.data.pipeline import RowIndex, worker_rows

    results: dict[str, Any] = {"ingest": ingests, "sizes": {}}
    for size in sizes:
        cfg, cfg_name = bench_config(size, dataset_dir(work, n, size), work / "unused",
                                     ["pipeline.batch_size=8"] if smoke else [])
        batch = cfg.pipeline.batch_size
        warmup = 1 if smoke else max(3, math.ceil(256 / batch))
        index = RowIndex.load(cfg.data.dataset_dir)
        all_rows = np.arange(len(index), dtype=np.int64)
        print(f"== {size}px ({cfg_name}: batch {batch}, augment {dataclasses.asdict(cfg.pipeline.augment)})", flush=True)
        per_size: dict[str, Any] = {"config": cfg_name, "batch_size": batch, "pipeline": {}}
        for p in parallel:
            runs: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
            if p == max(parallel):  # a worker's share; and the loaders alone (no augmentation)
                runs.update(ours_rank0_of_2=[], ours_no_augment=[], baseline_no_augment=[])
            for r in range(repeats):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))  # ABBA: drift cancels
                for mode in order:
                    seed = 1234 + r
                    if mode == "ours":
                        ds = ours_dataset(index, all_rows, cfg, size, p, seed)
                    elif mode == "ours_rank0_of_2":
                        ds = ours_dataset(index, worker_rows(all_rows, 0, 2), cfg, size, p, seed)
                    elif mode == "ours_no_augment":
                        ds = ours_dataset(index, all_rows, cfg, size, p, seed, augment=False)
                    elif mode == "baseline_no_augment":
                        ds = baseline_dataset(tree, cfg, size, p, seed, augment=False)
                    else:
                        ds = baseline_dataset(tree, cfg, size, p, seed)
                    m = measure(ds, warmup, measure_images)
                    runs[mode].append(m)
                    print(f"   {size}px p={p} {mode:20s} {m['images_per_s']:8.1f} img/s "
                          f"{m['cpu_ms_per_image']:6.2f} CPU ms/img", flush=True)
                    del ds
            per_size["pipeline"][f"p{p}"] = {
                mode: {"runs": ms, "images_per_s": median([m["images_per_s"] for m in ms]),
                       "cpu_ms_per_image": median([m["cpu_ms_per_image"] for m in ms])} for mode, ms in runs.items()}
        p_max = max(parallel)
        per_size["augment_cpu_ms_per_image"] = augment_costs(cfg, size, 2 if smoke else 20)
        for layer, ms in per_size["augment_cpu_ms_per_image"].items():
            print(f"   {size}px augmentation layer {layer}: {ms:.2f} CPU ms/img", flush=True)
        per_size["training"] = training_rates(
            cfg, size, ours_dataset(index, all_rows, cfg, size, p_max, 99),
            baseline_dataset(tree, cfg, size, p_max, 99), train_images)
        results["sizes"][str(size)] = per_size

        # Summary rows of this size.
        for p in parallel:
            pr = per_size["pipeline"][f"p{p}"]
            ours, base = pr["ours"]["images_per_s"], pr["baseline"]["images_per_s"]
            report.row(f"{size}px pipeline, {p} parallel call(s)", ours, base, "img/s",
                       target=f">= {TARGET_SPEEDUP:g}x", met=bool(ratio(ours, base) and ours / base >= TARGET_SPEEDUP))
        pr = per_size["pipeline"][f"p{p_max}"]
        report.row(f"{size}px pipeline CPU time per image (p={p_max})", pr["ours"]["cpu_ms_per_image"],
                   pr["baseline"]["cpu_ms_per_image"], "CPU ms/img", ratio_value=ratio(
                       pr["baseline"]["cpu_ms_per_image"], pr["ours"]["cpu_ms_per_image"]),
                   ratio_label="baseline/ours")
        aug = per_size["augment_cpu_ms_per_image"]
        if aug:
            report.row(f"{size}px augmentation layers alone vs whole pipeline (CPU time per image)", sum(aug.values()),
                       pr["ours"]["cpu_ms_per_image"], "CPU ms/img", ratio_label="augmentation share")
        report.row(f"{size}px loader alone, no augmentation (p={p_max})", pr["ours_no_augment"]["images_per_s"],
                   pr["baseline_no_augment"]["images_per_s"], "img/s")
        report.row(f"{size}px loader alone, CPU time per image (p={p_max})", pr["ours_no_augment"]["cpu_ms_per_image"],
                   pr["baseline_no_augment"]["cpu_ms_per_image"], "CPU ms/img", ratio_value=ratio(
                       pr["baseline_no_augment"]["cpu_ms_per_image"], pr["ours_no_augment"]["cpu_ms_per_image"]),
                   ratio_label="baseline/ours")
        report.row(f"{size}px pipeline, rank 0 of 2 vs 1 of 1 (p={p_max})", pr["ours_rank0_of_2"]["images_per_s"],
                   pr["ours"]["images_per_s"], "img/s", ratio_label="share/whole")
        tr = per_size["training"]
        compute = tr["compute_only"]["images_per_s"]
        report.row(f"{size}px ours pipeline (p={p_max}) vs training compute", pr["ours"]["images_per_s"], compute,
                   "img/s", ratio_label="pipeline/training", target=">= 1 (not the bottleneck)",
                   met=pr["ours"]["images_per_s"] >= compute)
        report.row(f"{size}px training fed by ours vs by baseline", tr["fed_by_ours"]["images_per_s"],
                   tr["fed_by_baseline"]["images_per_s"], "img/s")
        report.row(f"{size}px training fed by ours vs compute only", tr["fed_by_ours"]["images_per_s"], compute,
                   "img/s", ratio_label="fed/compute (1: pipeline costs training nothing)")
        report.row(f"{size}px training CPU time per image: fed by ours vs compute only",
                   tr["fed_by_ours"]["cpu_ms_per_image"], tr["compute_only"]["cpu_ms_per_image"], "CPU ms/img",
                   ratio_label="fed/compute")
        ing = ingests[size]
        report.row(f"{size}px ingest (one-off, {ing['workers']} processes)", ing["images_per_s"], None, "img/s")
        report.row(f"{size}px dataset on disk: shards vs JPEG folder", ing["shard_bytes"] / 2**20,
                   ing["jpeg_bytes"] / 2**20, "MiB", ratio_label="shards/JPEG")
        # Ingest pays for itself after this many epochs (per-image time saved by our pipeline).
        saved = 1 / pr["baseline"]["images_per_s"] - 1 / pr["ours"]["images_per_s"]
        ing["break_even_epochs"] = (ing["seconds"] / (saved * n)) if saved > 0 else None
        if ing["break_even_epochs"] is not None:
            report.row(f"{size}px ingest cost in epochs of pipeline time saved", ing["break_even_epochs"], None,
                       "epochs")
        else:
            report.notes.append(f"{size}px: our pipeline saved no time per image here, so ingest never pays back "
                                "in pipeline time")
    report.results = results
    report.notes.append("pipeline rates are one worker's pipeline alone on the machine; 'fed' training shares "
                        "the CPUs between the pipeline and the model, as a worker does.")
    report.write(args.out_dir)


if __name__ == "__main__":
    sys.exit(main_guard(main))
