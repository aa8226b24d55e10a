"""`melanoma-dist`: the command line.

    melanoma-dist ingest --config configs/quick-cpu.yaml           # images -> Parquet shards + folds
    melanoma-dist ingest --config ... --address HEAD_IP:6379      # the same, images prepared across a Ray cluster
    melanoma-dist folds  --config configs/quick-cpu.yaml --set folds.k=10
    melanoma-dist train  --config configs/quick-cpu.yaml --fold 0  # one fold (ingests first if needed)
    melanoma-dist cv     --config configs/quick-cpu.yaml           # all folds, Horovod groups placed by Ray
    melanoma-dist cv     --config ... --address HEAD_IP:6379      # from a node of an existing cluster (or RAY_ADDRESS)
    melanoma-dist tune   --config configs/tune-cpu.yaml [--nested] # Ray Tune search, every trial a CV
    horovodrun -np 2 --gloo melanoma-dist train --config ... --fold 0   # the same fold on 2 workers

Every command takes `--config FILE` and any number of `--set section.key=value`
overrides; `melanoma-dist config --config FILE` prints the resolved config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

# TensorFlow's C++ start-up chatter hides our progress lines; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from melanoma_dist.config import Config, load_config  # noqa: E402
from melanoma_dist.cli_evidence import EVIDENCE_COMMANDS, add_evidence_arguments  # noqa: E402
from melanoma_dist.submit import add_launch_arguments, cmd_launch  # noqa: E402
from melanoma_dist.log import setup_logging  # noqa: E402
from melanoma_dist.paths import ensure_writable_dir, is_uri, os_error_line  # noqa: E402


def cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def _check_dataset_dir(cfg: Config, makes_folds: bool) -> None:
    """Fail now, not after a long ingest, when the dataset or its folds would be written where they cannot be.

    A prepared dataset may be read-only; it must be writable only for what is still to be made.
    """
    from melanoma_dist.data import shards
    from melanoma_dist.data.folds import folds_path

    dataset = cfg.data.dataset_dir
    if is_uri(dataset):  # an object store is not probed: its errors come with the first write
        return
    if not (Path(dataset) / shards.MANIFEST).is_file():  # to be ingested: built beside it, then renamed into place
        ensure_writable_dir(dataset, "data.dataset_dir", replaced=True)
    folds = folds_path(dataset, cfg.folds.k, cfg.folds.seed)
    if makes_folds or not folds.is_file():
        ensure_writable_dir(folds.parent, "data.dataset_dir")


def cmd_ingest(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist.data.folds import make_folds
    from melanoma_dist.data.ingest import ingest

    ensure_writable_dir(cfg.data.dataset_dir, "data.dataset_dir", replaced=True)
    manifest = ingest(cfg.data, address=args.address or cfg.distributed.address)
    print(f"ingested {manifest['num_images']} images into {manifest['num_shards']} shard(s) in "
          f"{cfg.data.dataset_dir}; skipped {manifest['num_skipped']} (reasons in manifest.json)")
    summary = make_folds(cfg.data.dataset_dir, cfg.folds.k, cfg.folds.seed)
    _print_folds(summary)
    return 0


def _print_folds(summary: dict) -> None:
    for f in summary["folds"]:
        counts = ", ".join(f"{k} {v}" for k, v in f["counts"].items())
        print(f"fold {f['fold']}: {f['num_images']} images, {f['num_groups']} lesions ({counts})")
    leak = summary["leakage"]
    print("leakage check: " + ("clean (no lesion or identical image in two folds)" if leak["clean"] else
                               f"LEAK: {json.dumps(leak)}"))


def cmd_folds(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist.data.folds import make_folds
    from melanoma_dist.data.prepare import ensure_dataset

    _check_dataset_dir(cfg, makes_folds=True)
    ensure_dataset(cfg)
    _print_folds(make_folds(cfg.data.dataset_dir, cfg.folds.k, cfg.folds.seed))
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist.data.prepare import prepare
    from melanoma_dist.train.fold import train_fold

    # Under horovodrun (which sets HOROVOD_RANK) every rank runs this command: the
    # dataset and folds must already exist, since only one process may write them.
    ensure_writable_dir(cfg.output_dir, "output_dir")
    if "HOROVOD_RANK" not in os.environ:
        _check_dataset_dir(cfg, makes_folds=False)
        prepare(cfg)
    metrics = train_fold(cfg, args.fold)
    if metrics is not None:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_cv(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist.report.aggregate import format_table
    from melanoma_dist.schedule.cv import FoldFailed, run_cv

    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    ensure_writable_dir(cfg.output_dir, "output_dir")
    _check_dataset_dir(cfg, makes_folds=False)
    try:
        summary = run_cv(cfg, folds=folds, address=args.address or "")
    except FoldFailed as e:
        print(f"melanoma-dist cv: {e}", file=sys.stderr)
        return 1
    out = cfg.output_dir if is_uri(cfg.output_dir) else Path(cfg.output_dir).resolve()
    print(format_table(out, summary))
    print(f"cross-validation finished in {summary['wall_time_s']:.0f}s; results in {out} "
          f"(cv_folds.csv, cv_summary.json, oof_predictions.csv, run_manifest.json)")
    return 0


def cmd_tune(cfg: Config, args: argparse.Namespace) -> int:
    import dataclasses

    from melanoma_dist.tune.experiment import format_summary, run_tune

    if args.nested:
        cfg = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, estimate="nested"))
    if not cfg.tune.space:
        raise ValueError("tune.space is empty: give the keys to search, e.g. "
                         "--set 'tune.space.train.learning_rate=loguniform(1e-4, 3e-3)' (see configs/tune-cpu.yaml)")
    ensure_writable_dir(cfg.output_dir, "output_dir")
    _check_dataset_dir(cfg, makes_folds=True)
    try:
        summary = run_tune(cfg, address=args.address or "", resume=args.resume)
    except RuntimeError as e:  # no trial finished
        print(f"melanoma-dist tune: {e}", file=sys.stderr)
        return 1
    print(format_summary(cfg, summary))
    return 0


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], int], str]] = {
    "config": (cmd_config, "print the resolved configuration"),
    "ingest": (cmd_ingest, "read image collections into Parquet shards, then make the folds"),
    "folds": (cmd_folds, "(re)make the cross-validation folds and check them for leakage"),
    "train": (cmd_train, "train and score one fold (ingests and makes folds first if needed)"),
    "cv": (cmd_cv, "cross-validate: every fold a Horovod group, scheduled on a Ray cluster"),
    "tune": (cmd_tune, "search hyperparameters with Ray Tune: every trial a cross-validation, an honest estimate"),
    "launch": (lambda cfg, args: cmd_launch(cfg, args, {"cv": cmd_cv, "tune": cmd_tune}),
               "run `cv` (or `tune`) here (local), on a Ray cluster (ray: Jobs API) or on Kubernetes (k8s: KubeRay)"),
}


COMMANDS.update(EVIDENCE_COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melanoma-dist", description="Distributed training and cross-validation of a melanoma CNN "
                                     "(Ray schedules folds, Horovod trains each, tf.data over Parquet).",
                                     epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", type=Path, help="YAML config (see configs/); defaults built in")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
        p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
        if name == "train":
            p.add_argument("--fold", type=int, required=True, help="fold to validate on (trains on the others)")
        if name == "ingest":
            p.add_argument("--address", help="Ray cluster address: prepare the images there with Ray Data "
                           "(default: RAY_ADDRESS, else on this machine; see data.ingest_engine)")
        if name == "cv":
            p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
            p.add_argument("--folds", help="comma-separated folds to run (default: all)")
        if name == "tune":
            p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
            p.add_argument("--nested", action="store_true", help="nested CV: a search in every outer fold "
                           "(same as --set tune.estimate=nested)")
            p.add_argument("--resume", action="store_true", help="restore the searches of output_dir and fail if "
                           "there is none (without it, existing searches are restored anyway)")
        if name == "launch":
            add_launch_arguments(p)
        add_evidence_arguments(name, p)  # report, audit, export, evaluate, predict
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        return COMMANDS[args.command][0](cfg, args)
    except ValueError as e:  # ConfigError and the other input errors of the commands
        print(f"melanoma-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is missing, a file, read-only or forbidden
        print(f"melanoma-dist {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
