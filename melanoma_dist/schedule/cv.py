"""Cross-validation as a Ray job: every fold is one Horovod group placed by Ray.

The driver (this module) prepares the dataset and folds once, connects to Ray
(an existing cluster, or an embedded local one), and launches one Horovod group
per unfinished fold. Groups run concurrently as far as the cluster's resources
allow and queue otherwise. A fold whose worker or node dies, or that makes no
progress for `distributed.progress_timeout_s`, is started again, up to
`distributed.max_retries` times, and resumes from its last saved epoch; a fold
that fails with an error another attempt cannot fix (see `is_healable`) fails at
once. Ctrl-C tears every running group down.
Finished folds (those with `fold-K/metrics.json`) of the same data are not
re-run, so running `cv` again with the same output directory finishes an
interrupted run; a finished fold of other data (dataset re-ingested, folds
re-made) is run again (see `split_finished`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from melanoma_dist import labels as label_schemes
from melanoma_dist import storage
from melanoma_dist.config import Config, config_from_dict
from melanoma_dist.data import folds as fold_io
from melanoma_dist.data import shards
from melanoma_dist.data.prepare import prepare
from melanoma_dist.log import setup_logging
from melanoma_dist.metrics import format_metric
from melanoma_dist.paths import absolute, is_uri
from melanoma_dist.report.aggregate import aggregate_cv, load_fold_metrics
from melanoma_dist.run_files import (CHECKPOINT_DIR, METRICS_FILE, SEARCH_DIR, discard_fold_result, fold_dir,
                                     fold_name)
from melanoma_dist.schedule.horovod_group import (GroupCancelled, GroupHung, GroupSpec, PlacementTimeout,
                                                   run_horovod_group)

logger = logging.getLogger(__name__)


def _fold_worker(cfg_dict: dict, fold: int, attempt: int) -> dict | None:
    """Body of every Horovod rank of one fold (runs inside a Ray actor)."""
    import ray

    from melanoma_dist.train.fold import train_fold

    setup_logging()
    return train_fold(config_from_dict(cfg_dict), fold,
                      extra={"node_id": ray.get_runtime_context().get_node_id(), "attempts": attempt})


def absolute_paths(cfg: Config) -> Config:
    """The config with data and output paths made absolute, as every node must read them alike."""
    sources = tuple(dataclasses.replace(s, path=absolute(s.path)) for s in cfg.data.sources)
    data = dataclasses.replace(cfg.data, sources=sources, dataset_dir=absolute(cfg.data.dataset_dir))
    return dataclasses.replace(cfg, data=data, output_dir=absolute(cfg.output_dir))


def _versions() -> dict[str, str]:
    """Installed versions of the stack, read from package metadata (importing TensorFlow here
    would cost the driver seconds and hundreds of MB for nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "horovod", "ray", "numpy", "pyarrow", "scikit-learn"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def write_run_manifest(cfg: Config, ray_address: str, out: Path | None = None) -> Path:
    """Record what produced this run: config, versions, data manifest hash, seeds, cluster.

    The file goes in `out`, which defaults to `output_dir` (the driver's local mirror of an object-store one).
    """
    run = {"config": cfg.to_dict(), "versions": _versions(),
           "data_manifest_sha256": fold_io.dataset_sha256(cfg.data.dataset_dir),
           "seeds": {"folds": cfg.folds.seed, "train": cfg.train.seed},
           "ray_address": ray_address, "command": " ".join(sys.argv)}
    path = (out or Path(cfg.output_dir)) / "run_manifest.json"
    path.write_text(json.dumps(run, indent=2) + "\n")
    return path


def _connect(address: str) -> tuple[str, bool]:
    """Connect to `address`, else RAY_ADDRESS, else start a local Ray.

    Returns:
        What was connected to, and whether this call started Ray (and so should stop it).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS", "")
    # Each fold logs its own progress lines; Ray's de-duplication would fold them together.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        return "the Ray this process already joined", False
    if address:  # a submitted job's runtime_env (working dir, env vars) stays as the job set it
        ray.init(address=address, log_to_driver=True)
        logger.info("connected to the Ray cluster at %s", address)
    else:
        # Horovod 0.28's Ray workers call an API that Ray 2.58 deprecates: one warning per worker, no news.
        # address="local": always a new Ray of our own, never a cluster someone else left running here.
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
        logger.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    return address or "local", True


def fold_fingerprints(cfg: Config, manifest: dict, fold_of_row: Sequence[int],
                      folds: Sequence[int]) -> dict[int, dict[str, str]]:
    """Check that each fold can be scored, and return the data fingerprint of each.

    Raises:
        ValueError: a fold lacks a class (folds made before `make_folds` refused that).
    """
    index = shards.read_columns(cfg.data.dataset_dir, ["image_id", "label"])
    fold_io.check_fold_classes(index["label"].to_numpy(), fold_of_row, manifest["class_names"], folds)
    ids = index["image_id"].to_pylist()
    return {f: fold_io.data_fingerprint(cfg.data.dataset_dir, fold_of_row, f, ids) for f in folds}


def split_finished(output_dir: str | Path, folds: Sequence[int],
                   fingerprints: dict[int, dict[str, str]]) -> tuple[list[int], dict[int, str]]:
    """Which finished folds to keep, and which to run again because they are of other data.

    A finished fold is kept when its metrics record the data fingerprint it would
    have now, and run again (with the reason) when they record another one. One
    that records none, finished by a melanoma-dist that did not record it, is kept
    with a warning: its data cannot be checked, and re-running it could cost hours;
    delete its `metrics.json` to run it again. Unfinished folds are in neither.

    Args:
        output_dir: The run's output directory.
        folds: The folds wanted.
        fingerprints: The current data fingerprint of each wanted fold (`fold_fingerprints`).

    Returns:
        (finished folds to keep, {finished fold to run again: why}).
    """
    keep, rerun = [], {}
    for f in folds:
        m = load_fold_metrics(output_dir, f)
        if m is None:
            continue
        why = fold_io.fingerprint_change(m.get("data_fingerprint"), fingerprints[f])
        if why is None or why == fold_io.NO_FINGERPRINT:
            keep.append(f)
            if why:
                logger.warning("fold %d finished in %s, but %s: keeping it; delete %s to run it again", f,
                               output_dir, why, fold_dir(output_dir, f) / METRICS_FILE)
        else:
            rerun[f] = why
    return keep, rerun


class FoldFailed(RuntimeError):
    """A fold failed on every allowed attempt, or with an error that another attempt cannot fix."""


_HEALABLE_MESSAGE = re.compile(
    r"horovod has been shut down|horovodinternalerror|gloo|connection (reset|refused|closed)|"
    r"broken pipe|peer .*(closed|disconnected)", re.IGNORECASE)
"""What a rank raises when a peer died or Horovod's stall check shut the group down."""


def is_healable(error: BaseException) -> bool:
    """Whether another attempt of the fold can succeed after `error`.

    True for a dead worker process or node, a group that could not be placed in
    time or hung, and the Horovod/Gloo errors the surviving ranks raise then;
    False for everything else (a bad config, missing data, a shape mismatch, a
    ValueError of the training code), which would fail the same way again.

    Example:
        >>> is_healable(ValueError("bad image size"))
        False
    """
    import ray.exceptions as rex

    if isinstance(error, (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                          rex.LocalRayletDiedError, rex.ActorUnschedulableError, PlacementTimeout, GroupHung)):
        return True
    cause = error.cause if isinstance(error, rex.RayTaskError) else error
    if isinstance(cause, GroupCancelled):
        return False
    if type(cause).__name__ == "HorovodInternalError":
        return True
    return bool(_HEALABLE_MESSAGE.search(f"{type(cause).__name__}: {cause}"))


def _first_line(error: BaseException) -> str:
    """`Type: message` of the error a rank raised (not Ray's wrapper and remote traceback)."""
    import ray.exceptions as rex

    cause = error.cause if isinstance(error, rex.RayTaskError) and error.cause is not None else error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def last_write(path: str | Path) -> float:
    """Newest modification time of `path` and the files below it (0 when there are none); a URI's objects too."""
    if is_uri(path):
        return storage.last_write(path)
    newest = 0.0
    for root, _dirs, files in os.walk(path):
        for name in [".", *files]:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:  # replaced while we looked
                pass
    return newest


STORE_PROGRESS_S = 30.0
"""Seconds between two listings of a fold's folder in an object store (each is a request, and billed)."""


def _at_most_every(seconds: float, fn: Callable[[], float]) -> Callable[[], float]:
    """`fn`, called at most once every `seconds`; in between, its last value."""
    last = {"at": -math.inf, "value": 0.0}

    def call() -> float:
        if time.monotonic() - last["at"] >= seconds:
            last.update(at=time.monotonic(), value=fn())
        return last["value"]
    return call


def fold_spec(cfg: Config, fold: int, attempt: int) -> GroupSpec:
    """The Horovod group of one attempt of one fold."""
    d = cfg.distributed
    return GroupSpec(d.workers_per_fold, d.cpus_per_worker, d.gpus_per_worker,
                     progress_timeout_s=d.progress_timeout_s, stall_shutdown_s=d.stall_shutdown_s,
                     name=f"melanoma-dist-fold-{fold}-attempt-{attempt}")


def run_fold_with_retries(cfg: Config, fold: int, worker: Callable[[dict, int, int], Any] | None = None,
                          stop: threading.Event | None = None, within: Any = None) -> Any:
    """Train one fold as a Horovod group, starting again (and resuming) when a worker or node died.

    A fold makes progress when it writes to its directory (every epoch: the
    resume checkpoint and the history); one that writes nothing for
    `distributed.progress_timeout_s` is torn down and retried.

    Args:
        cfg: The job's config.
        fold: The fold.
        worker: The body of every rank, called as `worker(cfg_dict, fold, attempt)`.
            Defaults to `None`: this module's `_fold_worker` (`train_fold`), looked up at call
            time so that a benchmark can wrap it.
        stop: When set, the running attempt is torn down and the fold fails. Defaults to `None`.
        within: A placement group of the caller's to start the ranks in (see `run_horovod_group`).
            Defaults to `None`.

    Returns:
        What rank 0 returned.

    Raises:
        FoldFailed: the fold failed with an error that cannot heal (at once, with that error's
            message), or failed on every allowed attempt.
    """
    worker = worker or _fold_worker
    attempts = cfg.distributed.max_retries + 1
    out = storage.join(cfg.output_dir, fold_name(fold))  # a path or a URI: what `last_write` watches
    progress = _at_most_every(STORE_PROGRESS_S, lambda: last_write(out)) if is_uri(out) else lambda: last_write(out)
    for attempt in range(1, attempts + 1):
        spec = fold_spec(cfg, fold, attempt)
        logger.info("fold %d: requesting %d worker(s) from Ray (attempt %d of %d); it starts when they are placed",
                    fold, spec.num_workers, attempt, attempts)
        try:
            results = run_horovod_group(worker, [cfg.to_dict(), fold, attempt], spec,
                                        progress=progress, stop=stop, within=within)
            return results[0]  # rank 0 holds the metrics
        except Exception as e:
            if not is_healable(e):
                logger.error("fold %d: attempt %d failed: %s", fold, attempt, e)  # with the remote traceback
                raise FoldFailed(f"fold {fold} failed (attempt {attempt}; not retried, another attempt would "
                                 f"fail the same way): {_first_line(e)}") from e
            logger.warning("fold %d: attempt %d failed: %s", fold, attempt, _first_line(e))
            if attempt == attempts:
                raise FoldFailed(f"fold {fold} failed {attempts} time(s) (distributed.max_retries="
                                 f"{cfg.distributed.max_retries}); last error: {_first_line(e)}") from e
    raise AssertionError("unreachable")


def run_cv(cfg: Config, folds: Sequence[int] | None = None, address: str = "") -> dict:
    """Run (or finish) a cross-validation on Ray; aggregate and return the summary.

    Args:
        cfg: The job's config.
        folds: Folds to run. Defaults to `None` (all folds).
        address: Ray cluster address. Defaults to `""` (RAY_ADDRESS, else a local Ray).

    Raises:
        FoldFailed: some fold failed on every attempt (the others are still aggregated).
    """
    start = time.time()
    cfg = absolute_paths(cfg)
    # The driver is the only writer of the dataset and the folds (ingested on the cluster when there is one).
    manifest, fold_of_row = prepare(cfg, address)
    wanted = list(range(cfg.folds.k)) if folds is None else sorted(set(folds))
    fingerprints = fold_fingerprints(cfg, manifest, fold_of_row, wanted)
    # The driver works in a local mirror of an object-store output_dir, pushed on the way out (also after an
    # error: its files so far are kept, as on a disk); each fold pushes its own folder. Not pulled: checkpoints,
    # and the searches of a `tune` run (whose outer folds are run here), which the driver never reads.
    with storage.mirrored(cfg.output_dir, pull_skip=(CHECKPOINT_DIR, SEARCH_DIR)) as mirror:
        failures = _run_folds(cfg, mirror, wanted, fingerprints, address)
        summary = aggregate_cv(mirror.local, cfg.folds.k,
                               label_schemes.reported_melanoma_index(cfg.data.label_scheme))
        summary["wall_time_s"] = round(time.time() - start, 1)
        (mirror.local / "cv_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failures:
        raise FoldFailed(f"{len(failures)} fold(s) failed: {failures}; finished folds are kept in {cfg.output_dir}; "
                         f"run `melanoma-dist cv` again with the same output_dir to retry only those")
    return summary


def _run_folds(cfg: Config, mirror: storage.FolderMirror, wanted: list[int],
               fingerprints: dict[int, dict[str, str]], address: str) -> dict[int, str]:
    """Run the unfinished folds of `wanted` on Ray, the driver's files in `mirror.local`; return {failed fold: why}."""
    import ray

    out = mirror.local
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())

    done, stale = split_finished(out, wanted, fingerprints)
    pending = [f for f in wanted if f not in done]
    if done:
        logger.info("folds %s already finished in %s on the same data: not re-running them", done, out)
    used, started_ray = _connect(address or cfg.distributed.address)
    for f, why in stale.items():
        logger.warning("fold %d finished in %s, but %s: running it again", f, out, why)
        discard_fold_result(out, f)  # should the re-run fail, the fold is missing rather than stale
    write_run_manifest(cfg, used, out)
    failures: dict[int, str] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def one(fold: int) -> None:
        try:
            m = run_fold_with_retries(cfg, fold, stop=stop)
            mirror.pull(fold_name(fold), skip=(CHECKPOINT_DIR,))  # its results, for the count and aggregation
            logger.info("fold %d finished on node %s: balanced accuracy %s, ROC-AUC %s (%d of %d folds done)",
                        fold, str(m.get("node_id", "?"))[:8], format_metric(m["balanced_accuracy"]),
                        format_metric(m["roc_auc"]),
                        sum(load_fold_metrics(out, f) is not None for f in wanted), len(wanted))
        except FoldFailed as e:
            with lock:
                failures[fold] = str(e)
            logger.error("%s", e)

    try:
        # One thread per fold only waits on Ray; Ray decides where and when each group runs.
        with ThreadPoolExecutor(max_workers=max(1, len(pending)), thread_name_prefix="fold") as pool:
            try:
                list(pool.map(one, pending))
            except BaseException:  # Ctrl-C: tear the running groups down before waiting for their threads
                stop.set()
                raise
    finally:
        if started_ray:
            ray.shutdown()
    return failures
