"""`melanoma-dist report`: turn a cross-validation result directory into evidence.

Writes `report.html` (self-contained: inline CSS, PNG figures next to it in
`figures/`), `report.json` (every number of the page, every fold) and `model_card.md`.
By default the report goes to `<result>/report/` and the model card to
`<result>/model_card.md`; with `out_dir` both go there. The result directory and `out_dir`
may be object-store URIs (`s3://...`): they are read and written through local copies
(`storage.mirrored`), without the checkpoints and models a report never reads.

Example:

```python
paths = write_report("runs/quick-cpu")
paths["html"]  # PosixPath('runs/quick-cpu/report/report.html')
```
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from melanoma_dist import storage
from melanoma_dist.report import plots
from melanoma_dist.report.audit import DEFAULT_MIN_CORRELATION, DEFAULT_NEAR_DUP_BITS, read_pixels_by_id
from melanoma_dist.report.bootstrap import DEFAULT_N_BOOT
from melanoma_dist.report.calibration import DEFAULT_TARGET_SENSITIVITY, apply_temperature
from melanoma_dist.report.evidence import summarize
from melanoma_dist.report.html import render_report
from melanoma_dist.report.model_card import render_model_card
from melanoma_dist.run_files import CHECKPOINT_DIR, SEARCH_DIR
from melanoma_dist.report.result import CVResult

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
DEFAULT_REPORT_DIR = "report"
"""Default report folder, inside the result directory."""
EVALUATION_FILE = "evaluation.json"
REPORT_PULL_SKIP = (CHECKPOINT_DIR, "*.keras", "shard-*.parquet", "trials", "experiment")
"""What a report never reads of a result in an object store: resume checkpoints, models (fold and exported),
and of a `tune` run's search its trials, Ray Tune's experiment and the outer training parts' shards (it
reads the search's summary and trials table only)."""


def find_evaluations(result_dir: Path) -> list[dict]:
    """External evaluations of models exported inside the result directory (`*/evaluations/*/evaluation.json`)."""
    out = []
    for p in sorted(Path(result_dir).glob(f"*/evaluations/*/{EVALUATION_FILE}")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("ignoring unreadable evaluation %s: %s", p, e)
    return out


def tune_evidence(result_dir: Path) -> dict | None:
    """The search of a `melanoma-dist tune` run in `<result_dir>/tune/` (summary, trials), or None."""
    from melanoma_dist.tune.results import SUMMARY_JSON, read_trials

    tune_dir = Path(result_dir) / SEARCH_DIR
    if not (tune_dir / SUMMARY_JSON).is_file():
        return None
    summary = json.loads((tune_dir / SUMMARY_JSON).read_text())
    trials = read_trials(tune_dir)
    return {"summary": summary, "trials": trials, "params": list(summary["chosen"]["params"])}


def draw_figures(result: CVResult, ev: dict, fig_dir: Path) -> dict[str, Path]:
    """Draw every figure of the report into `fig_dir`; return {key: path} of those drawn."""
    k = ev["decision_index"]
    dc = ev["decision_class"]
    scaled = apply_temperature(result.oof_probs, ev["calibration"]["temperature"])
    y_dec = (result.oof_labels == k).astype(int)
    per_fold = [(f"fold {fr.fold}", y_dec[result.oof_fold == fr.fold], scaled[result.oof_fold == fr.fold, k])
                for fr in result.folds]
    pooled = ("pooled", y_dec, scaled[:, k])
    op = ev["operating_point"]
    figs: dict[str, Path | None] = {
        "roc": plots.roc_curves(fig_dir / "roc.png", per_fold, pooled,
                                (1 - (op["specificity"] or 0), op["sensitivity"]),
                                title=f"ROC of P({dc}), out-of-fold"),
        "pr": plots.pr_curves(fig_dir / "pr.png", per_fold, pooled, title=f"Precision-recall of P({dc}), out-of-fold"),
        "confusion": plots.confusion_matrices(fig_dir / "confusion.png", ev["pooled"]["confusion_matrix"],
                                              result.class_names),
        "reliability": plots.reliability_diagram(fig_dir / "reliability.png", ev["calibration"]["before"],
                                                 ev["calibration"]["after"], dc, ev["calibration"]["temperature"]),
        "learning": plots.learning_curves(fig_dir / "learning_curves.png",
                                          {fr.fold: fr.history for fr in result.folds}),
        "classes": plots.class_distribution(fig_dir / "class_distribution.png",
                                            {f"fold {f['fold']}": f["class_counts"] for f in ev["folds"]},
                                            result.class_names),
    }
    if len(result.class_names) > 2:
        figs["ovr_roc"] = plots.one_vs_rest_roc(fig_dir / "ovr_roc.png", result.oof_labels, result.oof_probs,
                                                result.class_names)
    if ev.get("tune"):
        figs["tune"] = plots.tune_trials(fig_dir / "tune.png", ev["tune"]["trials"], ev["tune"]["params"],
                                         ev["tune"]["summary"]["metric"])
    examples = ev["audit"].get("near", {}).get("examples", []) if ev["audit"].get("available") else []
    if examples:
        try:
            images = read_pixels_by_id(result.dataset_dir, [e[x] for e in examples[:8] for x in ("image_a", "image_b")])
            figs["duplicates"] = plots.image_pairs(fig_dir / "duplicates.png", [
                (images[e["image_a"]], images[e["image_b"]],
                 f"{e['image_a']} (fold {e.get('fold_a', '-')}) | {e['image_b']} (fold {e.get('fold_b', '-')}): "
                 f"{e['distance_bits']} bits") for e in examples[:8]])
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            logger.warning("could not draw the near-duplicate pairs: %s", e)
    return {key: p for key, p in figs.items() if p is not None}


def write_report(result_dir: str | Path, out_dir: str | Path | None = None,
                 target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                 near_dup_bits: int = DEFAULT_NEAR_DUP_BITS, n_boot: int = DEFAULT_N_BOOT,
                 seed: int = 0, near_dup_corr: float | None = DEFAULT_MIN_CORRELATION) -> dict[str, Path | str]:
    """Write the report, its JSON summary and the model card of a cross-validation run.

    Args:
        result_dir: The `output_dir` of a `melanoma-dist cv` run: a folder or an object-store URI.
        out_dir: Where to write: a folder or a URI. Defaults to `None` (`<result_dir>/report/`,
            and the model card to `<result_dir>/model_card.md`).
        target_sensitivity: Decision-class sensitivity of the threshold. Defaults to `0.90`.
        near_dup_bits: Near-duplicate candidates of the audit: dHash distance in bits. Defaults to `4`.
        n_boot: Bootstrap replicates. Defaults to `2000`.
        seed: Bootstrap seed. Defaults to `0`.
        near_dup_corr: Thumbnail correlation confirming a near duplicate (None: dHash only).
            Defaults to `0.97`.

    Returns:
        Paths (URIs for an object store) of `html`, `json` and `model_card`.

    Raises:
        ResultError: the result directory is missing or has no finished fold.
    """
    with contextlib.ExitStack() as stack:  # what was written is uploaded on the way out, also after an error
        run = stack.enter_context(storage.mirrored(result_dir, pull_skip=REPORT_PULL_SKIP))
        dest = stack.enter_context(storage.mirrored(out_dir)) if out_dir is not None else run
        result = CVResult.load(run.local, origin=run.uri if run.remote else "")
        out = dest.local if out_dir is not None else run.local / DEFAULT_REPORT_DIR
        card_path = (out if out_dir is not None else run.local) / "model_card.md"
        paths = _write_report(result, out, card_path, target_sensitivity, near_dup_bits, n_boot, seed, near_dup_corr)
        named = {key: dest.name_of(p) for key, p in paths.items()}
    logger.info("report written to %s; model card %s", named["html"], named["model_card"])
    return named


def _write_report(result: CVResult, out: Path, card_path: Path, target_sensitivity: float, near_dup_bits: int,
                  n_boot: int, seed: int, near_dup_corr: float | None) -> dict[str, Path]:
    """`write_report` of a loaded result, into the local folder `out` and the file `card_path`."""
    out.mkdir(parents=True, exist_ok=True)
    ev = summarize(result, target_sensitivity, near_dup_bits, n_boot, seed, near_dup_corr=near_dup_corr)
    ev["tune"] = tune_evidence(result.result_dir)
    figs = draw_figures(result, ev, out / FIGURES_DIR)
    rel = {k: p.relative_to(out).as_posix() for k, p in figs.items()}
    evaluations = find_evaluations(result.result_dir)
    ev["figures"] = rel
    ev["external_evaluations"] = evaluations
    (out / "report.json").write_text(json.dumps(ev, indent=2) + "\n")
    (out / "report.html").write_text(render_report(ev, rel, evaluations))
    card_path.write_text(render_model_card(ev, evaluations=evaluations))
    logger.debug("%d figures drawn in %s", len(rel), out / FIGURES_DIR)
    return {"html": out / "report.html", "json": out / "report.json", "model_card": card_path}


def headline(ev: dict) -> str:
    """Two lines for the terminal: AUC with CI and the operating point."""
    from melanoma_dist.report.html import ci_text

    op = ev["operating_point"]
    dc = ev["decision_class"]
    n = sum(f["num_samples"] for f in ev["folds"])
    return (f"pooled out-of-fold {dc} ROC-AUC {ci_text(ev['pooled']['ci'].get('decision_roc_auc'))} "
            f"over {n} images ({len(ev['folds'])} of {ev['k']} folds)\n"
            f"T={ev['calibration']['temperature']:.3f} (ECE {ev['calibration']['before']['ece']:.3f} -> "
            f"{ev['calibration']['after']['ece']:.3f}); threshold {op['threshold']:.4f} for sensitivity "
            f">= {op['target_sensitivity']:.2f}: sensitivity {op['sensitivity']:.3f}, specificity "
            f"{op['specificity'] if op['specificity'] is None else round(op['specificity'], 3)}")
