"""Bodies of the benchmark child processes, Horovod ranks and Ray workers.

They live in an importable module because `horovod.run` and Ray pickle functions by
reference. A child process runs one of them as

    python -m benchmarks._workers <task> '<json spec>'

and writes its JSON result to `spec["result_path"]` (see `_common.run_child`).
Thread-pool sizes come from the environment the parent sets (`_common.thread_env`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- training throughput


def _config(spec: dict[str, Any]) -> Any:
    from benchmarks._common import bench_config

    cfg, _ = bench_config(spec["size"], spec.get("dataset", "unused"), spec["output_dir"], spec.get("overrides", []))
    return cfg


def _random_batches(batch: int, size: int, seed: int) -> tuple[Any, Any]:
    """A constant training batch and a constant validation batch (in memory: compute only)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def one() -> Any:
        x = rng.random((batch, size, size, 3), dtype=np.float32)
        y = (rng.random(batch) < 0.3).astype(np.int32)
        return tf.data.Dataset.from_tensors((x, y)).repeat()

    return one(), one()


def _phase_timer() -> Any:
    """A callback splitting each epoch into training steps, validation and epoch-end work."""
    import keras

    class PhaseTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.train_s: list[float] = []
            self.val_s: list[float] = []
            self.epoch_end_s: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t0 = self._t1 = self._t2 = time.perf_counter()

        def on_test_begin(self, logs: Any = None) -> None:
            self._t1 = time.perf_counter()

        def on_test_end(self, logs: Any = None) -> None:
            self._t2 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            t3 = time.perf_counter()
            self.train_s.append(self._t1 - self._t0)
            self.val_s.append(self._t2 - self._t1)
            self.epoch_end_s.append(t3 - self._t2)  # callbacks listed before this one

    return PhaseTimer()


def build_for_mode(mode: str, cfg: Any, steps: int, out_dir: Path) -> tuple[Any, list[Any]]:
    """The model and callbacks of `mode`: `plain` (Keras + Adam) or `ours` (as train/fold.py does it)."""
    import keras

    from melanoma_dist.model.build import build_model

    if mode == "plain":
        model = build_model(cfg.model, cfg.data.image_size, 2, seed=cfg.train.seed)
        model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss="binary_crossentropy",
                      metrics=["accuracy", keras.metrics.AUC(name="auc")], jit_compile=False)
        return model, []
    from melanoma_dist import distributed as hk
    from melanoma_dist.train import checkpoint as ckpt
    from melanoma_dist.train.fold import compile_model

    model = compile_model(cfg, build_model(cfg.model, cfg.data.image_size, 2, seed=cfg.train.seed), 2,
                          cfg.train.learning_rate)
    hk.broadcast_model(model, root_rank=0)
    early = ckpt.ResumableEarlyStopping(state=None, best_weights=None, monitor="val_loss",
                                        patience=cfg.train.early_stopping_patience, restore_best_weights=True)
    plateau = ckpt.ResumableReduceLROnPlateau(state=None, monitor="val_loss", factor=cfg.train.reduce_lr_factor,
                                              patience=cfg.train.reduce_lr_patience)
    import horovod.tensorflow as hvd

    # fit(validation_data=...) validates per rank: sync BatchNorm statistics first (fold.py's FoldValidation does).
    callbacks = [hk.MetricAverageCallback(), hk.SyncBatchNormStatistics(),
                 hk.WarmupScaledLR(cfg.train.learning_rate, warmup_epochs=cfg.train.warmup_epochs, size=hvd.size(),
                                   steps_per_epoch=steps),
                 plateau, early]
    if hvd.rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        callbacks += [keras.callbacks.CSVLogger(str(out_dir / "history.csv")),
                      ckpt.FoldCheckpoint(out_dir / "resume", early, plateau, ckpt.resume_key(cfg),
                                          data_fingerprint={"data": "random batches"}, workers=hvd.size())]
    return model, callbacks


def timed_fit(model: Any, callbacks: list[Any], batch: int, size: int, steps: int, epochs: int,
              warmup_steps: int, val_steps: int, seed: int = 0) -> dict[str, Any]:
    """Warm up (trace) with a short fit, then time `epochs` x `steps` training steps with validation."""
    train_ds, val_ds = _random_batches(batch, size, seed)
    kw = dict(validation_data=val_ds, validation_steps=val_steps, verbose=0, shuffle=False)
    model.fit(train_ds, steps_per_epoch=warmup_steps, epochs=1, callbacks=callbacks, **kw)
    timer = _phase_timer()
    start = time.perf_counter()
    model.fit(train_ds, steps_per_epoch=steps, epochs=epochs, callbacks=[*callbacks, timer], **kw)
    wall = time.perf_counter() - start
    images = steps * epochs * batch
    train_s = sum(timer.train_s)
    return {"images": images, "wall_s": wall, "train_s": train_s, "val_s": sum(timer.val_s),
            "epoch_end_s": sum(timer.epoch_end_s), "epochs": epochs, "steps": steps, "batch": batch,
            "images_per_s_wall": images / wall, "images_per_s_train": images / train_s,
            "step_ms": 1000 * train_s / (steps * epochs)}


def model_costs(cfg: Any) -> dict[str, Any]:
    """Parameters, gradient bytes and multiply-accumulates per image (forward) of the config's CNN."""
    import keras

    from melanoma_dist.model.build import build_model

    model = build_model(cfg.model, cfg.data.image_size, 2)
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            macs += h * w * kh * kw * layer.input.shape[-1] * c_out
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    trainable = sum(int(math.prod(v.shape)) for v in model.trainable_variables)
    return {"params": int(model.count_params()), "trainable_params": trainable, "gradient_bytes": 4 * trainable,
            "gradient_tensors": len(model.trainable_variables), "forward_macs_per_image": int(macs)}


def train_modes(spec: dict[str, Any]) -> dict[str, Any]:
    """Alternate `spec["modes"]` (plain, ours) `repeats` times in this process; per-run timings.

    `ours` initialises Horovod (a world of size 1) before and shuts it down after each run, so
    that `plain` runs without Horovod's background thread.
    """
    import gc

    import keras

    cfg = _config(spec)
    batch, size = cfg.pipeline.batch_size, cfg.data.image_size
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in spec["modes"]}
    for r in range(spec["repeats"]):
        modes = spec["modes"] if r % 2 == 0 else list(reversed(spec["modes"]))
        for mode in modes:
            keras.utils.set_random_seed(cfg.train.seed)
            if mode == "ours":
                from melanoma_dist import distributed as hk

                hk.init_worker(use_gpu=False)
            model, callbacks = build_for_mode(mode, cfg, spec["steps"], Path(spec["output_dir"]) / f"{mode}-{r}")
            res = timed_fit(model, callbacks, batch, size, spec["steps"], spec["epochs"], spec["warmup_steps"],
                            spec["val_steps"])
            if mode == "ours":
                hk.shutdown()
            runs[mode].append(res)
            print(f"{mode} run {r}: {res['images_per_s_wall']:.1f} img/s (wall), {res['images_per_s_train']:.1f} "
                  f"(steps only), epoch end {res['epoch_end_s']:.2f}s", flush=True)
            del model, callbacks
            gc.collect()
    return {"runs": runs, "costs": model_costs(cfg), "batch": batch, "size": size,
            "threads": os.environ.get("TF_NUM_INTRAOP_THREADS")}


def hvd_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of a `horovod.run` job: our training path, then allreduce timings of the model's gradients."""
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf

    from melanoma_dist import distributed as hk

    ctx = hk.init_worker(use_gpu=False)
    cfg = _config(spec)
    batch, size = cfg.pipeline.batch_size, cfg.data.image_size
    keras.utils.set_random_seed(cfg.train.seed)
    model, callbacks = build_for_mode("ours", cfg, spec["steps"], Path(spec["output_dir"]) / f"hvd-rank{ctx.rank}")
    fit = timed_fit(model, callbacks, batch, size, spec["steps"], spec["epochs"], spec["warmup_steps"],
                    spec["val_steps"], seed=ctx.rank)

    grads = [tf.random.normal(v.shape, seed=i) for i, v in enumerate(model.trainable_variables)]
    nbytes = sum(int(g.shape.num_elements()) * 4 for g in grads)
    iters = spec["allreduce_iters"]

    def timed(call: Any) -> float:
        for _ in range(3):
            call()
        hk.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            call()
        return 1000 * (time.perf_counter() - start) / iters

    @tf.function
    def graph_allreduce(gs: list[Any]) -> list[Any]:
        return hvd.grouped_allreduce(gs, op=hvd.Average)

    tiny = [tf.zeros([1], tf.float32)]
    out = {
        "rank": ctx.rank, "size": ctx.size, "fit": fit, "gradient_bytes": nbytes, "gradient_tensors": len(grads),
        # As in training: one grouped allreduce of every gradient, inside a tf.function.
        "allreduce_ms_graph": timed(lambda: graph_allreduce(grads)[-1].numpy()),
        # The same from eager code.
        "allreduce_ms_eager": timed(lambda: hvd.grouped_allreduce(grads, op=hvd.Average)[-1].numpy()),
        # A 4-byte allreduce: Horovod's per-operation latency (negotiation, cycle time, Gloo round trip).
        "allreduce_ms_4_bytes": timed(lambda: graph_allreduce(tiny)[-1].numpy()),
    }
    hk.shutdown()
    return out


# ---------------------------------------------------------------- memory


class RssSampler:
    """Samples this process's RSS every `interval` seconds; remembers the peak and named marks.

    With `children=True` it also keeps the peak RSS of the largest child process (an ingest
    pool worker) and of this process plus all its children (shared pages counted in each).
    """

    def __init__(self, interval: float = 0.02, children: bool = False) -> None:
        import psutil

        self._proc = psutil.Process()
        self._children = children
        self.peak = self.child_peak = self.tree_peak = 0
        self.marks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._interval = interval
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            if self._children:
                sizes = []
                for child in self._proc.children(recursive=True):
                    try:
                        sizes.append(child.memory_info().rss)
                    except psutil.Error:  # it ended between the listing and the read
                        pass
                self.child_peak = max([self.child_peak, *sizes])
                self.tree_peak = max(self.tree_peak, rss + sum(sizes))
            time.sleep(self._interval)

    def rss(self) -> int:
        """This process's RSS now."""
        return self._proc.memory_info().rss

    def mark(self, name: str) -> None:
        rss = self.rss()
        self.peak = max(self.peak, rss)
        self.marks[name] = rss
        self.marks[f"peak_until_{name}"] = self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def memory(spec: dict[str, Any]) -> dict[str, Any]:
    """One training worker, for its peak RSS: `ours` (train_fold), `baseline` (plain Keras) or `floor`."""
    import resource

    sampler = RssSampler()
    mode = spec["mode"]
    import keras  # noqa: F401  (TensorFlow start-up is part of every worker)

    from melanoma_dist import distributed as hk
    from melanoma_dist.train import fold as fold_mod

    sampler.mark("imports")
    cfg = _config(spec)
    steps, val_steps = spec["steps"], spec["val_steps"]
    if mode == "ours":
        # The real worker body, with fit() capped to `steps` training and `val_steps` validation
        # batches (memory reaches its plateau within a few steps); prediction covers the whole fold.
        original_fit = keras.Model.fit

        def capped_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["steps_per_epoch"] = min(kwargs.get("steps_per_epoch") or steps, steps)
            kwargs["validation_steps"] = min(kwargs.get("validation_steps") or val_steps, val_steps)
            sampler.mark("fit_start")
            history = original_fit(self, *args, **kwargs)
            sampler.mark("fit_end")  # then: prediction of the whole validation fold, gathering, saving
            return history

        keras.Model.fit = capped_fit
        fold_mod.train_fold(cfg, 0)
        sampler.mark("end")
    elif mode == "baseline":
        from benchmarks.bench_pipeline import baseline_dataset, baseline_eval_dataset
        from melanoma_dist.model.build import build_model

        hk.init_worker(use_gpu=False)  # same libraries loaded as ours
        tree = Path(spec["jpeg_tree"])
        train_ds = baseline_dataset(tree, cfg, cfg.data.image_size, parallel=-1, seed=cfg.train.seed, cpu_budget=None)
        val_ds = baseline_eval_dataset(tree, cfg, cfg.data.image_size)
        model = build_model(cfg.model, cfg.data.image_size, 2, seed=cfg.train.seed)
        model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss="binary_crossentropy",
                      metrics=["accuracy", keras.metrics.AUC(name="auc")], jit_compile=False)
        sampler.mark("fit_start")
        model.fit(train_ds, steps_per_epoch=steps, epochs=1, validation_data=val_ds.repeat(),
                  validation_steps=val_steps, verbose=0, shuffle=False)
        sampler.mark("fit_end")
        # Predict as many images as ours predicts: one fold of five.
        model.predict(val_ds, steps=math.ceil(spec["val_images"] / cfg.pipeline.batch_size), verbose=0)
        sampler.mark("end")
    elif mode == "floor":
        import numpy as np

        hk.init_worker(use_gpu=False)
        from melanoma_dist.model.build import build_model

        model = fold_mod.compile_model(cfg, build_model(cfg.model, cfg.data.image_size, 2, seed=cfg.train.seed), 2,
                                       cfg.train.learning_rate)
        sampler.mark("fit_start")
        b, s = cfg.pipeline.batch_size, cfg.data.image_size
        model.train_on_batch(np.zeros((b, s, s, 3), np.float32), np.zeros((b,), np.int32))
        sampler.mark("end")
    else:
        raise ValueError(f"memory mode must be ours, baseline or floor, got {mode!r}")
    sampler.stop()
    return {"mode": mode, "sampled_peak_rss": sampler.peak, "marks": sampler.marks,
            "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------- datasets at scale (bench_scale.py)


def scale_ingest(spec: dict[str, Any]) -> dict[str, Any]:
    """`ingest` of a source folder (or URI) into a dataset (or URI), with the peak RSS of the driver and its pool."""
    from benchmarks._common import ingest_tree, setup_logging

    setup_logging()  # ingest's progress lines in the child's log: a 1M-image ingest runs ~15 min
    sampler = RssSampler(interval=0.1, children=True)
    result = ingest_tree(spec["tree"], spec["out"], spec["size"], workers=spec["workers"], progress=True)
    sampler.stop()
    return {**result, "driver_peak_rss": sampler.peak, "worker_peak_rss": sampler.child_peak,
            "tree_peak_rss": sampler.tree_peak}


def scale_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """One worker's training input side over a whole dataset (local or URI): img/s, RSS, row index size.

    With `python_objects`, also the RSS that the row index's ids and groups take as one Python
    `str` per row (what an index of NumPy object arrays holds), for comparison.
    """
    import dataclasses

    import numpy as np

    from benchmarks._common import bench_config
    from benchmarks.bench_pipeline import measure
    from melanoma_dist.data.pipeline import RowIndex, make_dataset

    sampler = RssSampler()
    import tensorflow as tf  # noqa: F401  (its start-up is part of every worker)

    sampler.mark("imports")
    index = RowIndex.load(spec["dataset"])
    sampler.mark("index")
    fields = (index.shard_offsets, index.image_ids, index.labels, index.groups)
    cfg, _ = bench_config(spec["size"], spec["dataset"], spec["out"])
    pcfg = dataclasses.replace(cfg.pipeline, augment_on="model")  # tf.data reads, decodes and batches
    ds = make_dataset(index, np.arange(len(index), dtype=np.int64), pcfg, spec["size"], training=True, seed=0)
    m = measure(ds, spec["warmup_batches"], spec["images"])
    sampler.mark("end")
    out = {**m, "rows": len(index), "shards": len(index.shard_paths), "index_bytes": sum(f.nbytes for f in fields),
           "peak_rss": sampler.peak, "marks": sampler.marks}
    if spec.get("python_objects"):
        before = sampler.rss()
        objects = [np.asarray(index.image_ids.to_pylist(), dtype=object),
                   np.asarray(index.groups.to_pylist(), dtype=object)]
        out["python_object_index_bytes"] = sampler.rss() - before + index.labels.nbytes
        del objects
    sampler.stop()
    return out


# ---------------------------------------------------------------- Ray


def noop() -> dict[str, Any]:
    """A Horovod-group body that does nothing: measures start-up and tear-down."""
    return {"t_enter": time.time(), "pid": os.getpid(), "rank": os.environ.get("HOROVOD_RANK")}


def timed_fold_worker(cfg_dict: dict, fold: int, attempt: int) -> dict | None:
    """`melanoma_dist.schedule.cv._fold_worker` plus timestamps of its start, imports and first steps.

    Writes them to `<output_dir>/fold-<K>/bench_timing_rank<R>.json`. Only fit's
    `on_train_batch_begin` is hooked, which keeps Keras' asynchronous batch dispatch on.
    """
    t_enter = time.time()
    import keras

    from melanoma_dist.schedule import cv as folds_mod
    importlib.import_module("melanoma_dist.train.fold")  # TensorFlow, Horovod, the model code

    t_imported = time.time()
    marks: dict[str, float] = {}

    class FirstSteps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if "first_step_begin" not in marks:
                marks["first_step_begin"] = time.time()
            elif "second_step_begin" not in marks:
                marks["second_step_begin"] = time.time()

        def on_train_end(self, logs: Any = None) -> None:
            marks["fit_end"] = time.time()

    original_fit = keras.Model.fit

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.setdefault("fit_called", time.time())
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), FirstSteps()]
        return original_fit(self, *args, **kwargs)

    keras.Model.fit = fit
    try:
        result = folds_mod._fold_worker(cfg_dict, fold, attempt)
    finally:
        keras.Model.fit = original_fit
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    timing = {"fold": fold, "rank": rank, "pid": os.getpid(), "t_enter": t_enter, "t_imported": t_imported,
              **marks, "t_return": time.time()}
    out = Path(cfg_dict["output_dir"]) / f"fold-{fold}" / f"bench_timing_rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(timing) + "\n")
    return result


def driver_versions(spec: dict[str, Any]) -> dict[str, Any]:
    """What the `cv` driver pays to record library versions: `ours` (schedule.cv._versions, which
    imports TensorFlow, Keras, Horovod, Ray, scikit-learn) or `metadata` (importlib.metadata)."""
    import psutil

    from melanoma_dist.schedule import cv as folds_mod

    proc = psutil.Process()
    rss0, start = proc.memory_info().rss, time.perf_counter()
    if spec["mode"] == "ours":
        found = folds_mod._versions()
    else:
        from importlib import metadata

        names = {"tensorflow": "tensorflow-cpu", "keras": "keras", "horovod": "horovod", "ray": "ray",
                 "numpy": "numpy", "pyarrow": "pyarrow", "scikit-learn": "scikit-learn"}
        found = {k: metadata.version(v) for k, v in names.items()}
    return {"mode": spec["mode"], "seconds": time.perf_counter() - start,
            "rss_added_bytes": proc.memory_info().rss - rss0, "versions": found}


# ---------------------------------------------------------------- entry point

TASKS = {"train_modes": train_modes, "memory": memory, "driver_versions": driver_versions,
         "scale_ingest": scale_ingest, "scale_pipeline": scale_pipeline}


def main(argv: list[str]) -> int:
    task, spec = argv[0], json.loads(argv[1])
    if task not in TASKS:
        print(f"unknown task {task!r}; valid tasks: {sorted(TASKS)}", file=sys.stderr)
        return 2
    result = TASKS[task](spec)
    Path(spec["result_path"]).write_text(json.dumps(result, default=_json_default) + "\n")
    return 0


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
