"""The evidence and inference commands of `melanoma-dist`: report, audit, export, evaluate, predict.

    melanoma-dist report   runs/quick-cpu                       # report.html/.json + model_card.md
    melanoma-dist audit    --config configs/quick-cpu.yaml --external runs/isic2017-test-64
    melanoma-dist export   runs/quick-cpu --target-sensitivity 0.9 --tta   # -> runs/quick-cpu/export
    melanoma-dist evaluate runs/quick-cpu/export runs/isic2017-test-64
    melanoma-dist predict  runs/quick-cpu/export lesion.jpg photos/ --csv out.csv --json out.json
    melanoma-dist report   s3://derm/runs/quick-cpu             # a result in an object store: read and written there

RESULT_DIR, MODEL, DATASET_DIR and --out of report, export and evaluate may be object-store
URIs (`s3://`, `gs://`; see `storage.mirrored`); predict reads its MODEL from one too, but
its images and its --csv/--json files are local.

`cli.py` registers these commands (`EVIDENCE_COMMANDS`) and their arguments
(`add_evidence_arguments`). Heavy imports (TensorFlow, matplotlib) happen inside the
commands, so `melanoma-dist --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

from melanoma_dist.config import Config
from melanoma_dist.inference.tta import TTA_MODES
from melanoma_dist.paths import check_uri, ensure_writable_dir, ensure_writable_file, is_uri

logger = logging.getLogger(__name__)

_DEFAULT_TARGET = 0.90
_DEFAULT_BITS = 4
_DEFAULT_CORR = 0.97
_DEFAULT_N_BOOT = 2000


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _bits(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 64:
        raise argparse.ArgumentTypeError(f"must be in [0, 64] (bits of the 64-bit dHash), got {text}")
    return v


def _correlation(text: str) -> float | str | None:
    if text.lower() in ("none", "off"):
        return None
    if text == "model":  # evaluate's default: the setting stored with the model
        return text
    v = float(text)
    if not -1 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [-1, 1], or none to skip the confirmation, got {text}")
    return v


def _path_or_uri(text: str) -> Path | str:
    """A local path as a Path; an object-store URI kept as text (a Path would fold `s3://b` into `s3:/b`)."""
    if not is_uri(text):
        return Path(text)
    try:
        check_uri(text, "the path")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _out_key(args: argparse.Namespace) -> str:
    # Errors name the option, also when its default was used.
    return "--out" if args.out else "default --out"


def cmd_report(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist import storage
    from melanoma_dist.report.build import DEFAULT_REPORT_DIR, headline, write_report

    # Without --out the report goes to RESULT_DIR/report and the model card to RESULT_DIR.
    ensure_writable_dir(args.out or storage.join(args.result_dir, DEFAULT_REPORT_DIR), _out_key(args))
    if args.out is None and storage.is_dir(args.result_dir):
        ensure_writable_dir(args.result_dir, "RESULT_DIR")
    paths = write_report(args.result_dir, args.out, args.target_sensitivity, args.near_dup_bits, args.n_boot,
                         near_dup_corr=args.near_dup_corr)
    ev = json.loads(storage.read_bytes(paths["json"]))
    print(headline(ev))
    print(f"report: {paths['html']}\nsummary: {paths['json']}\nmodel card: {paths['model_card']}")
    return 0


def cmd_audit(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist.data.folds import folds_path
    from melanoma_dist.report.audit import ImageSet, audit_set, audit_train_test

    if args.json:
        ensure_writable_file(args.json, "--json")
    dataset = Path(args.dataset or cfg.data.dataset_dir)
    has_folds = folds_path(dataset, cfg.folds.k, cfg.folds.seed).is_file()
    train = ImageSet.from_dataset(dataset, folds=(cfg.folds.k, cfg.folds.seed) if has_folds else None)
    result = {"dataset": audit_set(train, args.near_dup_bits, args.near_dup_corr), "external": []}
    ex, near = result["dataset"]["exact"], result["dataset"]["near"]
    print(f"{dataset} ({len(train)} images{f', folds k={cfg.folds.k} seed={cfg.folds.seed}' if has_folds else ''}):"
          f"\n  exact duplicates: {ex['sets']} sets, {ex['images']} images"
          + (f", {ex['sets_across_folds']} sets across folds" if has_folds else "")
          + f"\n  near-duplicate candidates (dHash <= {args.near_dup_bits} bits): {near['candidate_pairs']} pairs"
            f"\n  near duplicates ({near['method']}): {near['pairs']} pairs, "
            f"{near['pairs_different_groups']} between different lesion ids"
          + (f", {near['pairs_across_folds']} across folds" if has_folds else ""))
    if has_folds:
        print("  folds: " + ("clean" if result["dataset"]["clean"] else "POSSIBLE LEAKAGE across folds"))
    for ext in args.external or []:
        test = ImageSet.from_dataset(ext)
        a = audit_train_test(train, test, args.near_dup_bits, args.near_dup_corr)
        result["external"].append(a)
        print(f"{ext} ({a['num_test']} images) vs training: {a['exact_duplicates']} identical, "
              f"{a['near_duplicates']} near-identical ({a['method']}): {a['flagged']} test images "
              f"to remove for a duplicate-free evaluation")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"audit written to {args.json}")
    return 0


def cmd_export(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist import storage
    from melanoma_dist.inference.export import DEFAULT_EXPORT_DIR, export_model

    # The model is built beside its target and renamed into place.
    ensure_writable_dir(args.out or storage.join(args.result_dir, DEFAULT_EXPORT_DIR), _out_key(args), replaced=True)
    out = export_model(args.result_dir, args.out, args.target_sensitivity, args.tta, args.near_dup_bits,
                       args.n_boot, near_dup_corr=args.near_dup_corr)
    spec = json.loads(storage.read_bytes(storage.join(out, "model.json")))
    print(f"exported {len(spec['members'])} fold models to {out}: T={spec['calibration']['temperature']:.3f}, "
          f"{spec['decision_class']} threshold {spec['operating_point']['threshold']:.4f} "
          f"(out-of-fold sensitivity {spec['operating_point']['oof_sensitivity']:.3f}, specificity "
          f"{_fmt(spec['operating_point']['oof_specificity'])}), TTA {spec['ensemble']['tta']}")
    return 0


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist import storage
    from melanoma_dist.inference.ensemble import read_model_json
    from melanoma_dist.inference.evaluate import EVALUATIONS_DIR, evaluate, summary_lines

    if not is_uri(args.model):  # a broken model fails before the dataset is read (one in a store: when loaded)
        read_model_json(args.model)
    # The evaluation goes to --out (default MODEL/evaluations/<dataset>); the model card in MODEL is updated.
    data_name = storage.as_path(str(args.data)).name
    ensure_writable_dir(args.out or storage.join(args.model, EVALUATIONS_DIR, data_name), _out_key(args))
    ensure_writable_dir(args.model, "MODEL")
    ev = evaluate(args.model, args.data, args.out, args.tta, args.near_dup_bits, args.n_boot,
                  near_dup_corr=args.near_dup_corr)
    print(summary_lines(ev))
    out = args.out or storage.join(args.model, EVALUATIONS_DIR, ev["dataset_name"])
    print(f"evaluation written to {storage.join(out, 'evaluation.json')}; model card updated in {args.model}")
    return 0


def cmd_predict(cfg: Config, args: argparse.Namespace) -> int:
    from melanoma_dist import storage
    from melanoma_dist.inference.ensemble import Ensemble
    from melanoma_dist.inference.predict import DISCLAIMER, format_table, predict_files, write_csv, write_json

    # Checked before the model loads and the images are scored, not after the table is printed.
    for path, key in ((args.csv, "--csv"), (args.json, "--json")):
        if path:
            ensure_writable_file(path, key)
    with storage.mirrored(args.model) as copy:  # a model in an object store is loaded from a local copy
        model = Ensemble.load(copy.local)
    model.model_dir = args.model  # named as given, not as the copy (the members are in memory)
    results = predict_files(model, args.inputs, tta=args.tta)
    print(f"*** {DISCLAIMER} ***\n")
    print(format_table(results, model))
    errors = sum(not r.ok for r in results)
    print(f"\n{len(results) - errors} file(s) scored, {errors} error(s).")
    if args.csv:
        print(f"CSV: {write_csv(results, model, args.csv)}")
    if args.json:
        print(f"JSON: {write_json(results, model, args.json, args.tta)}")
    return 1 if errors else 0


EVIDENCE_COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], int], str]] = {
    "report": (cmd_report, "HTML/JSON report and model card of a cross-validation result directory"),
    "audit": (cmd_audit, "exact and near-duplicate images within the dataset, across folds, and vs external sets"),
    "export": (cmd_export, "package the fold models of a finished run as one calibrated ensemble (model dir)"),
    "evaluate": (cmd_evaluate, "evaluate an exported model on an external ingested dataset"),
    "predict": (cmd_predict, "score image files or folders with an exported model (not a medical device)"),
}


def add_evidence_arguments(name: str, p: argparse.ArgumentParser) -> None:
    """Add the arguments of evidence command `name` to its sub-parser (no-op for other commands)."""
    def common(report_like: bool) -> None:
        p.add_argument("--near-dup-bits", type=_bits, default=None if not report_like else _DEFAULT_BITS,
                       help="near-duplicate threshold: dHash Hamming distance <= this many of 64 bits "
                            f"(default {_DEFAULT_BITS}{'' if report_like else ', or the one stored with the model'})")
        p.add_argument("--near-dup-corr", type=_correlation, default=_DEFAULT_CORR if report_like else "model",
                       help="confirm a near-duplicate candidate when the correlation of the two 16x16 thumbnails "
                            f"is >= this; 'none' keeps every dHash candidate (default {_DEFAULT_CORR}"
                            f"{'' if report_like else ', or the one stored with the model'})")
        p.add_argument("--n-boot", type=int, default=_DEFAULT_N_BOOT,
                       help=f"bootstrap replicates for confidence intervals (default {_DEFAULT_N_BOOT})")

    if name in ("report", "export"):
        p.add_argument("result_dir", type=_path_or_uri, help="output_dir of a `melanoma-dist cv` run (a folder or "
                       "an s3:// or gs:// URI)")
        p.add_argument("--out", type=_path_or_uri,
                       help="where to write (default: RESULT_DIR/report or RESULT_DIR/export)")
        p.add_argument("--target-sensitivity", type=_fraction, default=_DEFAULT_TARGET,
                       help="melanoma sensitivity the decision threshold is chosen for on the out-of-fold "
                            f"predictions (default {_DEFAULT_TARGET})")
        common(True)
        if name == "export":
            p.add_argument("--tta", nargs="?", const="flip", default="none", choices=TTA_MODES,
                           help="test-time augmentation stored as the model's default: none, flip (the mirror; "
                                "also `--tta` alone) or dihedral (8 flips and rotations)")
    elif name == "audit":
        p.add_argument("--dataset", type=Path, help="dataset dir to audit (default: data.dataset_dir of the config)")
        p.add_argument("--external", type=Path, action="append", metavar="DATASET_DIR",
                       help="an ingested external test set to compare with the dataset (repeatable)")
        p.add_argument("--near-dup-bits", type=_bits, default=_DEFAULT_BITS,
                       help=f"near-duplicate candidates: dHash distance in bits of 64 (default {_DEFAULT_BITS})")
        p.add_argument("--near-dup-corr", type=_correlation, default=_DEFAULT_CORR,
                       help="confirm a candidate when its 16x16 thumbnail correlation is >= this; 'none' keeps "
                            f"every candidate (default {_DEFAULT_CORR})")
        p.add_argument("--json", type=Path, help="also write the full audit to this JSON file")
    elif name == "evaluate":
        p.add_argument("model", type=_path_or_uri, help="an exported model directory (with model.json)")
        p.add_argument("data", type=_path_or_uri, help="an ingested dataset directory (e.g. the ISIC 2017 test split)")
        p.add_argument("--out", type=_path_or_uri, help="where to write (default: MODEL/evaluations/<dataset name>)")
        _tta_option(p)
        common(False)
    elif name == "predict":
        p.add_argument("model", type=_path_or_uri, help="an exported model directory (with model.json)")
        p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
        p.add_argument("--csv", type=Path, metavar="FILE", help="also write the predictions as CSV")
        p.add_argument("--json", type=Path, metavar="FILE", help="also write the predictions as JSON")
        _tta_option(p)


def _tta_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", nargs="?", const="flip", default=None, choices=TTA_MODES,
                   help="test-time augmentation: none, flip (also `--tta` alone) or dihedral (8 flips and "
                        "rotations); default: the model's setting")
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none", help="same as --tta none")
