"""`melanoma-dist predict`: score image files with an exported model.

Every file is prepared like a training image (`inference.images.load_file`). A file that
cannot be used (missing, empty, not an image, truncated, too small, a broken symbolic link)
gets an error entry with the reason and the other files are still scored. Folders are
searched recursively (hidden files and folders skipped), in sorted order.

Example:

```python
model = Ensemble.load("runs/quick-cpu/export")
results = predict_files(model, ["lesion1.jpg", "photos/"])
print(format_table(results, model))
```
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from melanoma_dist.data.images import BadImageError, is_file_or_broken_link
from melanoma_dist.inference.tta import tta_mode
from melanoma_dist.inference.ensemble import Ensemble
from melanoma_dist.inference.images import load_file

logger = logging.getLogger(__name__)

DISCLAIMER = ("NOT A MEDICAL DEVICE. Research software: these scores must not be used to diagnose, "
              "treat or triage anyone. See the model card for its evidence and limits.")


@dataclass
class Prediction:
    """The result for one input file."""

    file: str
    ok: bool
    error: str = ""
    """Why the file could not be scored (empty when `ok`)."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """Calibrated probability of each class."""
    decision_probability: float | None = None
    """Probability of the decision class (melanoma)."""
    decision: bool | None = None
    """True when `decision_probability` >= the model's threshold."""
    top_class: str = ""


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files to score: each file as given, each folder's non-hidden files (recursive, sorted).

    A path that does not exist is kept, so that it gets a per-file error; so are a folder's
    broken symbolic links (dangling, or loops), which are also named in a warning.
    """
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and is_file_or_broken_link(f))
            broken = [f for f in found if not f.is_file()]
            if broken:
                logger.warning("%s: %d broken symbolic links, reported as errors: %s", p, len(broken),
                               ", ".join(str(f.relative_to(p)) for f in broken))
            out += found
        else:
            out.append(p)
    return out


def predict_files(model: Ensemble, inputs: Sequence[str | Path], tta: str | bool | None = None,
                  batch_size: int = 32) -> list[Prediction]:
    """Score image files (and folders of them) with an exported model.

    Args:
        model: The loaded ensemble.
        inputs: Files and folders.
        tta: Test-time augmentation: `none`, `flip` or `dihedral`. Defaults to `None` (the model's setting).
        batch_size: Images per forward pass. Defaults to `32`.

    Returns:
        One `Prediction` per file, in input order; unreadable files have `ok=False` and an error.
    """
    files = collect_files(inputs)
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probs = model.predict(np.stack([x for _, x in pending]), tta=tta)
        called = model.decide(probs)
        for (i, _), p, c in zip(pending, probs, called):
            r = results[i]
            r.probabilities = {n: float(v) for n, v in zip(model.class_names, p)}
            r.decision_probability = float(p[model.decision_index])
            r.decision = bool(c)
            r.top_class = model.class_names[int(p.argmax())]
        pending.clear()

    for f in files:
        results.append(Prediction(str(f), ok=True))
        try:
            pending.append((len(results) - 1, load_file(f, model.spec["input"])))
        except BadImageError as e:
            results[-1].ok, results[-1].error = False, e.reason
            logger.debug("%s: %s", f, e.reason)
        except ValueError as e:  # decoded by Pillow but not by TensorFlow: still one file's problem
            results[-1].ok, results[-1].error = False, str(e)
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def format_table(results: Sequence[Prediction], model: Ensemble) -> str:
    """An aligned text table: file, top class, P(decision class), decision, or the error."""
    dc = model.decision_class
    header = ["file", "top class", f"P({dc})", f"{dc}? (P >= {model.threshold:.3f})"]
    rows = []
    for r in results:
        if r.ok:
            rows.append([r.file, f"{r.top_class} ({r.probabilities[r.top_class]:.3f})",
                         f"{r.decision_probability:.3f}", "YES" if r.decision else "no"])
        else:
            rows.append([r.file, "ERROR", "-", r.error])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def write_csv(results: Sequence[Prediction], model: Ensemble, path: str | Path) -> Path:
    """One row per file: file, ok, error, P(class) per class, P(decision class), decision."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    dc = model.decision_class
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "ok", "error"] + [f"prob_{c}" for c in model.class_names]
                   + [f"p_{dc}", f"{dc}_at_threshold", "threshold", "top_class"])
        for r in results:
            probs = [f"{r.probabilities[c]:.6f}" if r.ok else "" for c in model.class_names]
            w.writerow([r.file, int(r.ok), r.error] + probs
                       + [f"{r.decision_probability:.6f}" if r.ok else "",
                          "" if r.decision is None else int(r.decision),
                          f"{model.threshold:.6f}", r.top_class])
    return p


def to_json(results: Sequence[Prediction], model: Ensemble, tta: str | bool | None = None) -> dict:
    """The predictions with the model's threshold, classes and the disclaimer."""
    return {"disclaimer": DISCLAIMER, "model_dir": str(model.model_dir), "class_names": list(model.class_names),
            "decision_class": model.decision_class, "threshold": model.threshold,
            "temperature": model.temperature, "tta": model.tta if tta is None else tta_mode(tta),
            "num_files": len(results), "num_errors": sum(not r.ok for r in results),
            "predictions": [asdict(r) for r in results]}


def write_json(results: Sequence[Prediction], model: Ensemble, path: str | Path,
               tta: str | bool | None = None) -> Path:
    """Write `to_json` to a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_json(results, model, tta), indent=2) + "\n")
    return p
