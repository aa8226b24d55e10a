"""Render the cross-validation report as one self-contained HTML page.

The page has inline CSS, no scripts and no network references; figures are PNG files
referenced by relative paths (kept next to the page). Every value coming from files is
HTML-escaped.

Example:

```python
page = render_report(evidence, {"roc": "figures/roc.png"})
Path("report/report.html").write_text(page)
```
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

DISCLAIMER = ("Research software. Not a medical device: its output must not be used to diagnose, "
              "treat or triage patients.")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
     color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
tr.agg td{font-weight:600;background:#fafafa}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;margin:1em 0}
.bad{background:#f8d7da;border:1px solid #e39ca4;padding:.6em 1em;margin:1em 0}
.ok{background:#e5f4e8;border:1px solid #9fd2a9;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}
.figs{display:flex;flex-wrap:wrap;gap:1em}
"""


def esc(v: Any) -> str:
    """HTML-escaped text of a value."""
    return html.escape("" if v is None else str(v))


def num(v: Any, digits: int = 3) -> str:
    """A number with `digits` decimals (integers as they are), `-` for missing values."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return esc(v)
    if isinstance(v, int):
        return str(v)
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return esc(v)


def ci_text(ci: Mapping | None, digits: int = 3) -> str:
    """`0.871 (0.842-0.897)` from a ConfidenceInterval dict."""
    if not ci or ci.get("estimate") is None:
        return "n/a"
    if ci.get("low") is None:
        return num(ci["estimate"], digits)
    return f"{num(ci['estimate'], digits)} ({num(ci['low'], digits)}–{num(ci['high'], digits)})"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], agg_rows: int = 0, left_cols: int = 1) -> str:
    """An HTML table; the last `agg_rows` rows are emphasised; the first `left_cols` columns left-aligned."""
    def cells(row: Sequence[Any], tag: str) -> str:
        return "".join(f"<{tag}{' class=l' if i < left_cols else ''}>{c}</{tag}>" for i, c in enumerate(row))
    body = []
    for i, row in enumerate(rows):
        cls = " class=agg" if i >= len(rows) - agg_rows else ""
        body.append(f"<tr{cls}>{cells(row, 'td')}</tr>")
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(figures: Mapping[str, str], key: str, alt: str) -> str:
    """An <img> of a figure (relative path), or nothing when it was not drawn."""
    src = figures.get(key)
    return f'<img src="{esc(src)}" alt="{esc(alt)}">' if src else ""


# ---------------------------------------------------------------- sections

_FOLD_METRICS = ("accuracy", "balanced_accuracy", "decision_roc_auc", "roc_auc", "f1", "f1_macro")


def _fold_table(ev: Mapping) -> str:
    cols = [c for c in _FOLD_METRICS if c in ev["mean_std"]]
    if len(ev["class_names"]) == 2:
        cols = [c for c in cols if c != "roc_auc"]  # the same as decision_roc_auc
    header = ["fold", "images"] + [c.replace("decision_roc_auc", f"{ev['decision_class']} ROC-AUC") for c in cols] + [
        "epochs", "best epoch", "workers", "node", "host", "wall time (s)"]
    rows = [[f["fold"], f["num_samples"]] + [num(f.get(c)) for c in cols]
            + [num(f.get("epochs_run")), num(f.get("best_epoch")), num(f.get("workers")),
               esc(str(f.get("node_id") or "-")[:12]), esc(f.get("host") or "-"), num(f.get("wall_time_s"), 1)]
            for f in ev["folds"]]
    ms = ev["mean_std"]
    rows.append(["mean ± sd", ""] + [f"{num(ms[c]['mean'])} ± {num(ms[c]['std'])}" for c in cols] + [""] * 6)
    return table(header, rows, agg_rows=1)


def _pooled_table(ev: Mapping) -> str:
    p, ci = ev["pooled"], ev["pooled"]["ci"]
    d = p["decision"]
    rows = [[f"{esc(ev['decision_class'])} ROC-AUC (calibrated P)", ci_text(ci.get("decision_roc_auc"))],
            [f"{esc(ev['decision_class'])} average precision", num(d.get("average_precision"))],
            ["accuracy (argmax)", ci_text(ci.get("accuracy"))],
            ["balanced accuracy (argmax)", ci_text(ci.get("balanced_accuracy"))]]
    if "macro_roc_auc" in ci:
        rows.append(["macro one-vs-rest ROC-AUC", ci_text(ci["macro_roc_auc"])])
    rows += [[f"sensitivity at threshold {num(d['threshold'])}", ci_text(d.get("sensitivity"))],
             [f"specificity at threshold {num(d['threshold'])}", ci_text(d.get("specificity"))],
             ["images / lesion groups", f"{p['num_samples']} / {ci['accuracy']['n_units']}"]]
    note = ("<p class=note>Pooled metrics score all folds' predictions together, mixing K models whose "
            "probability scales can differ; a pooled ROC-AUC well below the fold mean shows such differences "
            "(one threshold then suits the folds unequally).</p>")
    return table(["pooled out-of-fold metric", "estimate (95% CI)"], rows) + note


def _per_class_table(ev: Mapping) -> str:
    pc = ev["pooled"]["per_class"]
    rows = [[esc(n), num(v["precision"]), num(v["recall"]), num(v["f1"]), v["support"], num(v["roc_auc"])]
            for n, v in pc.items()]
    return table(["class", "precision", "recall", "F1", "support", "ROC-AUC"], rows)


def _calibration_section(ev: Mapping, figures: Mapping[str, str]) -> str:
    cal = ev["calibration"]
    b, a = cal["before"], cal["after"]
    rows = [[name, num(b[key], 4), num(a[key], 4)] for name, key in (
        (f"ECE of P({ev['decision_class']}), {cal['n_bins']} bins", "ece"),
        ("top-label ECE", "ece_top_label"), (f"Brier score of P({ev['decision_class']})", "brier"),
        ("negative log-likelihood", "nll"))]
    return (f"<p>Temperature scaling fitted on the {cal['num_samples']} pooled out-of-fold predictions "
            f"(logits = log p): <b>T = {num(cal['temperature'])}</b> "
            f"({'softens over-confident' if cal['temperature'] > 1 else 'sharpens under-confident'} predictions). "
            f"Ranking, and so ROC-AUC, is unchanged for binary models.</p>"
            + table(["", "before", "after"], rows)
            + "<p class=note>One temperature corrects over- or under-confidence only. It cannot move the "
              "probabilities towards the true prevalence when training re-weighted the classes "
              "(train.class_weight: balanced): an ECE that stays high after scaling shows that shift.</p>"
            + figure(figures, "reliability", "reliability diagram"))


def _operating_point_section(ev: Mapping) -> str:
    op = ev["operating_point"]
    c = ev["pooled"]["decision"]["confusion_at_threshold"]
    dc = esc(ev["decision_class"])
    return (f"<p>Decision rule: <b>{dc} if calibrated P({dc}) ≥ {num(op['threshold'], 4)}</b>, the highest "
            f"threshold reaching the target sensitivity {num(op['target_sensitivity'], 2)} on the pooled "
            f"out-of-fold predictions ({op['num_positives']} {dc} / {op['num_negatives']} other images).</p>"
            + table(["", "estimate (95% CI)"], [["sensitivity", ci_text(op["sensitivity_ci"])],
                                               ["specificity", ci_text(op["specificity_ci"])]])
            + table(["", f"called {dc}", "called other"],
                    [[f"true {dc}", c["tp"], c["fn"]], ["true other", c["fp"], c["tn"]]])
            + "<p class=note>The threshold is chosen and scored on the same predictions: the sensitivity is "
              "met by construction and the specificity is optimistic. The exported ensemble averages the fold "
              "models, whose probabilities are less spread than a single model's; check the threshold on an "
              "external set (<code>melanoma-dist evaluate</code>).</p>")


def audit_html(audit: Mapping, figures: Mapping[str, str] | None = None) -> str:
    """The leakage audit of a cross-validation set."""
    if not audit.get("available"):
        return f"<div class=warn>Leakage audit not available: {esc(audit.get('error'))}</div>"
    ex, near = audit["exact"], audit["near"]
    status = ("<div class=ok>No exact duplicate and no near-duplicate pair of different lesions crosses folds.</div>"
              if audit.get("clean") else
              "<div class=bad>Possible leakage: duplicates cross folds (see below). The folds keep lesion ids and "
              "identical images together; near duplicates of different lesion ids are not merged.</div>")
    rows = [["exact duplicates (identical pixels): sets / images", f"{ex['sets']} / {ex['images']}"],
            ["exact-duplicate sets spanning several lesion ids", ex["sets_with_several_groups"]],
            ["exact-duplicate sets across folds", ex.get("sets_across_folds", "-")],
            [f"near-duplicate candidates (dHash distance ≤ {near['max_bits']} of 64 bits, pixels differ): pairs",
             near["candidate_pairs"]],
            ["… candidates of different lesion ids / across folds",
             f"{near['candidate_pairs_different_groups']} / {near.get('candidate_pairs_across_folds', '-')}"],
            [f"near duplicates ({esc(near['method'])}): pairs", near["pairs"]],
            ["… within one lesion (expected)", near["pairs_same_group"]],
            ["… of different lesion ids", near["pairs_different_groups"]],
            ["… across folds (pairs / images)",
             f"{near.get('pairs_across_folds', '-')} / {near.get('images_across_folds', '-')}"]]
    examples = ""
    if near["examples"]:
        examples = "<p>Most similar near-duplicate pairs of different lesions across folds:</p>" + table(
            ["image a", "lesion a", "fold a", "image b", "lesion b", "fold b", "dHash bits", "correlation"],
            [[esc(e["image_a"]), esc(e["group_a"]), e.get("fold_a", "-"), esc(e["image_b"]), esc(e["group_b"]),
              e.get("fold_b", "-"), e["distance_bits"], num(e.get("correlation"))] for e in near["examples"][:10]],
            left_cols=6)
    note = ("<p class=note>A 64-bit dHash cannot tell most dermoscopic images apart (a dark lesion centred on "
            "lighter skin gives the same gradients), so its candidates are confirmed on the stored images by "
            "the correlation of 16x16 RGB thumbnails; see <code>melanoma_dist/report/audit.py</code>.</p>")
    return (status + table(["", "count"], rows) + note + examples
            + figure(figures or {}, "duplicates", "near-duplicate pairs"))


def external_html(evaluations: Sequence[Mapping]) -> str:
    """External evaluations (from `melanoma-dist evaluate`), one table each."""
    parts = []
    for e in evaluations:
        dc = esc(e.get("decision_class", "melanoma"))
        rows = []
        for key, label in (("all", "all images"), ("deduplicated", "near-duplicates of training removed")):
            m = e.get("metrics", {}).get(key)
            if m:
                rows.append([label, m["num_samples"], m["num_positives"], ci_text(m.get("roc_auc")),
                             ci_text(m.get("sensitivity")), ci_text(m.get("specificity"))])
        parts.append(f"<h3>{esc(e.get('dataset_name'))}</h3><p>{esc(e.get('statement'))}</p>" + table(
            ["images", "n", f"{dc}", "ROC-AUC (95% CI)", "sensitivity", "specificity"], rows))
    return "".join(parts)


def _manifest_section(ev: Mapping) -> str:
    pv = ev["provenance"]
    data = ev["data"]
    rows = [["result directory", esc(pv["result_dir"])], ["command", esc(pv.get("command"))],
            ["Ray address", esc(pv.get("ray_address"))], ["dataset", esc(data["dataset_dir"])],
            ["data manifest SHA-256", f"<code>{esc(pv.get('data_manifest_sha256'))}</code>"],
            ["config SHA-256", f"<code>{esc(pv.get('config_sha256'))}</code>"],
            ["seeds", esc(json.dumps(pv.get("seeds")))], ["nodes", esc(", ".join(pv.get("nodes") or []) or "-")],
            ["hosts", esc(", ".join(pv.get("hosts") or []) or "-")],
            ["wall time per fold (s)", esc(", ".join(f"{k}: {v}" for k, v in pv["fold_wall_time_s"].items()))],
            ["cross-validation wall time (s)", num(pv.get("cv_wall_time_s"), 1)]]
    versions = table(["package", "version"], [[esc(k), esc(v)] for k, v in pv.get("versions", {}).items()],
                     left_cols=2)
    sources = table(["source", "kind", "images", "licence"],
                    [[esc(s.get("name")), esc(s.get("kind")), num(s.get("num_images")), esc(s.get("licence"))]
                     for s in data.get("sources", [])], left_cols=4)
    return (table(["", ""], rows, left_cols=2) + "<h3>Data sources</h3>" + sources + "<h3>Versions</h3>" + versions
            + "<h3>Configuration</h3><pre>" + esc(yaml.safe_dump(pv["config"], sort_keys=False)) + "</pre>")


def tune_html(tune: Mapping, figures: Mapping[str, str]) -> str:
    """The search of a `tune` run: how the estimate was made, every trial, the metric vs the parameters."""
    s, params = tune["summary"], tune["params"]
    rows = [[esc(r["outer_fold"]), esc(r["trial_id"]), esc(r["state"]), *[esc(r[p]) for p in params], num(r["oof"], 4),
             f"{num(r['fold_mean'], 4)} ± {num(r['fold_sd'], 4)}", esc(r["epochs"])] for r in tune["trials"]]
    estimate = (f" Estimate: <b>{num(s['estimate_mean'], 4)}</b>" + (f" ± {num(s['estimate_sd'], 4)}" if s.get("estimate_sd")
                                                                     else "") if s.get("estimate_mean") is not None else "")
    return (f"<p>{esc(s['num_trials'])} trials ({esc(s['search_algorithm'])} search, scheduler {esc(s['scheduler'])}), "
            f"metric {esc(s['metric'])}. How the reported estimate was made: <b>{esc(s['estimate'])}</b>: "
            f"{esc(s['estimate_description'])}.{estimate} Chosen: <code>{esc(s['chosen']['params'])}</code>.</p>"
            + table(["outer fold", "trial", "state", *[esc(p) for p in params], "pooled OOF", "mean ± sd over folds",
                     "epochs"], rows, left_cols=3)
            + figure(figures, "tune", "metric vs the searched parameters"))


def render_report(ev: Mapping, figures: Mapping[str, str], evaluations: Sequence[Mapping] = ()) -> str:
    """The whole report page.

    Args:
        ev: The evidence dict of `evidence.summarize`.
        figures: Figure key (`roc`, `pr`, `ovr_roc`, `confusion`, `reliability`, `learning`,
            `classes`, `duplicates`) to its path relative to the page.
        evaluations: External evaluation dicts to show. Defaults to `()`.
    """
    dc = esc(ev["decision_class"])
    warnings = []
    if ev["folds_missing"]:
        warnings.append(f"<div class=bad>Folds {ev['folds_missing']} have not finished: this report covers "
                        f"folds {ev['folds_finished']} only.</div>")
    if ev["audit"].get("available") and not ev["audit"].get("clean"):
        warnings.append("<div class=bad>The leakage audit found duplicates across folds (see Leakage audit).</div>")
    counts = {f"fold {f['fold']}": f["class_counts"] for f in ev["folds"]}
    dist_rows = [[esc(k)] + [v.get(n, 0) for n in ev["class_names"]] + [sum(v.values())] for k, v in counts.items()]
    head = ev["pooled"]["ci"].get("decision_roc_auc")
    sections = [
        f"<h1>Cross-validation report: {dc} detection ({esc(ev['label_scheme'])} scheme, {ev['k']} folds)</h1>",
        f"<div class=warn><b>{esc(DISCLAIMER)}</b></div>", *warnings,
        f"<p>Pooled out-of-fold {dc} ROC-AUC <b>{ci_text(head)}</b> (95% bootstrap CI, "
        f"{esc(ev['bootstrap']['n_boot'])} replicates resampling {esc(ev['bootstrap']['unit'])}s, stratified by "
        f"label). Generated {esc(ev['generated'])}.</p>",
        "<h2>Per-fold metrics</h2>", _fold_table(ev),
        "<h2>Pooled out-of-fold metrics</h2>", _pooled_table(ev), _per_class_table(ev),
        "<h2>ROC and precision-recall curves</h2><div class=figs>",
        figure(figures, "roc", "ROC curves"), figure(figures, "pr", "precision-recall curves"),
        figure(figures, "ovr_roc", "one-vs-rest ROC"), "</div>",
        "<h2>Confusion matrix (argmax, pooled)</h2>", figure(figures, "confusion", "confusion matrix"),
        "<h2>Calibration</h2>", _calibration_section(ev, figures),
        "<h2>Operating point</h2>", _operating_point_section(ev),
        "<h2>Learning curves</h2>", figure(figures, "learning", "learning curves"),
        "<h2>Class distribution per fold</h2>",
        table(["fold"] + [esc(n) for n in ev["class_names"]] + ["total"], dist_rows),
        figure(figures, "classes", "class distribution"),
        "<h2>Leakage audit</h2>", audit_html(ev["audit"], figures),
    ]
    if ev.get("tune"):
        sections += ["<h2>Hyperparameter search</h2>", tune_html(ev["tune"], figures)]
    if evaluations:
        sections += ["<h2>External evaluation</h2>", external_html(evaluations)]
    sections += ["<h2>Run manifest</h2>", _manifest_section(ev)]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>melanoma-dist report: {esc(ev['provenance']['result_dir'])}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(sections) + "</body></html>\n")
