"""Shared helpers of the benchmark scripts: flags, environment, data set-up, result files.

Every benchmark script:

1. parses the common flags (`--smoke`, `--out-dir`, `--work-dir`, `--repeats`);
2. prints and records the environment (CPUs, load average, library versions, thread settings);
3. measures our path and the plain baseline in the same run on the same data;
4. writes `<out-dir>/<name>.json`: its parameters, raw numbers, and a `summary` list of
   rows `{metric, ours, baseline, unit, ratio, target, met}` that `run_all.py` turns into
   the Markdown table.

Targets are reported, never asserted: a script exits non-zero only when it fails to run.
Images are read in place from `../shared/data/ham10000`; everything derived from them
(symlink trees, Parquet datasets, logs) goes to `--work-dir` (a temp dir by default).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HAM_DIR = SHARED_DATA / "ham10000"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "configs"
THREAD_VARS = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "CUDA_VISIBLE_DEVICES")
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "horovod", "ray", "numpy", "pyarrow", "pillow", "psutil")

logger = logging.getLogger("benchmarks")


def default_work_dir() -> Path:
    """Scratch space shared by the scripts of one run: `/tmp/melanoma-bench-<uid>`."""
    return Path(os.environ.get("MELANOMA_BENCH_WORK_DIR", f"/tmp/melanoma-bench-{os.getuid()}"))


def int_list(text: str) -> list[int]:
    """`"64,128"` -> `[64, 128]`, for comma-separated command-line options."""
    return [int(x) for x in text.split(",") if x.strip()]


def base_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: runs in seconds, checks that the benchmark works (numbers are meaningless)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS,
                        help=f"where <name>.json is written. Defaults to {DEFAULT_RESULTS.relative_to(REPO)}")
    parser.add_argument("--work-dir", type=Path, default=default_work_dir(),
                        help="scratch space (symlink trees, datasets, logs). Defaults to /tmp/melanoma-bench-<uid>")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measurements of each case; the median is reported (default: 3, smoke: 1)")
    return parser


def setup_logging() -> None:
    """Our progress lines at INFO; libraries (e.g. Horovod's rendezvous server) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("benchmarks", "melanoma_dist"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ---------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "melanoma_dist"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def versions() -> dict[str, str]:
    """Installed versions of the libraries that matter, read without importing them."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = os.cpu_count()
    return {
        "host": socket.gethostname(), "platform": platform.platform(), "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable, "mem_total_gib": _mem_total_gib(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(), "thread_env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        "git": _git(), "argv": sys.argv,
    }


def print_environment(env: dict[str, Any]) -> None:
    v = env["versions"]
    print(f"== environment: {env['cpu_model']}, {env['cpus_usable']}/{env['cpu_count']} CPUs usable, "
          f"{env['mem_total_gib']} GiB, load {env['load_avg_1_5_15']}")
    print("   " + ", ".join(f"{k} {val}" for k, val in v.items()))
    if env["thread_env"]:
        print("   threads: " + ", ".join(f"{k}={val}" for k, val in env["thread_env"].items()))
    busy = env["load_avg_1_5_15"][0]
    if busy > 0.5 * (env["cpus_usable"] or 1):
        print(f"   WARNING: 1-minute load average {busy} on {env['cpus_usable']} CPUs: the machine is busy, "
              "timings are noisy (ratios of interleaved runs suffer least)")
    sys.stdout.flush()


# ---------------------------------------------------------------- results

def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@dataclass
class Report:
    """The result file of one benchmark."""

    name: str
    smoke: bool
    params: dict[str, Any]
    env: dict[str, Any] = field(default_factory=environment)
    results: dict[str, Any] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def row(self, metric: str, ours: float | None, baseline: float | None = None, unit: str = "",
            ratio_value: float | None = None, ratio_label: str = "ours/baseline", target: str = "",
            met: bool | None = None) -> None:
        """Add one line of the summary table; the ratio defaults to ours / baseline."""
        r = ratio_value if ratio_value is not None else ratio(ours, baseline)
        self.summary.append({"metric": metric, "ours": _round(ours), "baseline": _round(baseline), "unit": unit,
                             "ratio": _round(r), "ratio_label": ratio_label, "target": target, "met": met})

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}.json"
        self.env["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
        doc = {"name": self.name, "smoke": self.smoke, "started_unix": round(self.started, 1),
               "elapsed_s": round(time.time() - self.started, 1), "env": self.env, "params": self.params,
               "summary": self.summary, "results": self.results, "notes": self.notes}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
        tmp.replace(path)
        print(f"\n== {self.name}: summary ({'SMOKE run: sizes too small to mean anything' if self.smoke else 'full run'})")
        print(format_table(self.summary, with_name=False))
        for note in self.notes:
            print(f"   note: {note}")
        print(f"wrote {path}")
        return path


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else None
    return x


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def format_table(rows: Sequence[dict[str, Any]], with_name: bool = True) -> str:
    """Markdown table of summary rows (each may carry a `benchmark` key)."""
    head = (["benchmark"] if with_name else []) + ["metric", "ours", "baseline / reference", "unit", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio_cell = "–" if r.get("ratio") is None else f"{fmt(r['ratio'])} ({r.get('ratio_label', '')})"
        met = r.get("met")
        cells = ([r.get("benchmark", "")] if with_name else []) + [
            r["metric"], fmt(r.get("ours")), fmt(r.get("baseline")), r.get("unit", ""), ratio_cell,
            r.get("target") or "", "–" if met is None else ("yes" if met else "**NO**")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- data

def ham_subset(n: int | None, seed: int = 0) -> list[tuple[str, str]]:
    """(image_id, class) of `n` HAM10000 images (all when None), class `melanoma` or `other`.

    The subset is deterministic and keeps the melanoma share (at least 2 of each class).

    Raises:
        FileNotFoundError: the shared data is missing.
    """
    meta = HAM_DIR / "HAM10000_metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: the benchmarks read the real HAM10000 images from "
                                f"{SHARED_DATA} (see its README.md)")
    with meta.open(newline="") as f:
        rows = sorted(((r["image_id"], "melanoma" if r["dx"] == "mel" else "other") for r in csv.DictReader(f)))
    if n is None or n >= len(rows):
        return rows
    import numpy as np

    rng = np.random.default_rng(seed)
    mel = [r for r in rows if r[1] == "melanoma"]
    other = [r for r in rows if r[1] == "other"]
    n_mel = max(2, round(n * len(mel) / len(rows)))
    pick = ([mel[i] for i in rng.choice(len(mel), n_mel, replace=False)]
            + [other[i] for i in rng.choice(len(other), max(2, n - n_mel), replace=False)])
    return sorted(pick)


def jpeg_tree(work_dir: Path, n: int | None) -> Path:
    """A `<class>/<image>.jpg` tree of symlinks to `n` HAM10000 JPEGs (the baseline's input)."""
    records = ham_subset(n)
    root = work_dir / "jpeg" / f"ham{len(records)}"
    marker = root / ".complete"
    if marker.is_file():
        return root
    for image_id, cls in records:
        (root / cls).mkdir(parents=True, exist_ok=True)
        link = root / cls / f"{image_id}.jpg"
        if not link.is_symlink():
            link.symlink_to(HAM_DIR / "images" / f"{image_id}.jpg")
    marker.write_text(f"{len(records)}\n")
    return root


def tree_bytes(root: Path, pattern: str = "*.jpg") -> int:
    """Total size of the files (symlink targets) matching `pattern` under `root`."""
    return sum(p.stat().st_size for p in root.rglob(pattern))


def count_images(root: Path) -> int:
    return sum(1 for _ in root.rglob("*.jpg"))


def dataset_dir(work_dir: Path, num_images: int, size: int, encoding: str = "jpeg") -> Path:
    """Where the dataset of `num_images` images at `size` px is cached (JPEG ones keep their old names)."""
    return work_dir / "datasets" / f"ham{num_images}-{size}px{'' if encoding == 'jpeg' else '-' + encoding}"


def ingest_tree(tree: Path | str, out: Path | str, size: int, workers: int = 0,
                encoding: str = "jpeg", progress: bool = False) -> dict[str, Any]:
    """Ingest the JPEG tree into Parquet shards at `size` px with our ingest; return timing and sizes.

    Either may be an object-store URI (then the shards' bytes are not counted). With `progress`,
    ingest logs a line every 500 images (seen when logging is at INFO: `setup_logging`)."""
    from melanoma_dist.config import DataConfig, SourceConfig
    from melanoma_dist.data.ingest import ingest
    from melanoma_dist.paths import is_uri

    cfg = DataConfig(sources=(SourceConfig(kind="folder", path=str(tree), name="ham10000", label_type="melanoma"),),
                     dataset_dir=str(out), label_scheme="melanoma", image_size=size, encoding=encoding,
                     ingest_workers=workers)
    start = time.perf_counter()
    manifest = ingest(cfg, progress=progress)
    seconds = time.perf_counter() - start
    shard_bytes = None if is_uri(out) else sum(p.stat().st_size for p in Path(out).glob("shard-*.parquet"))
    return {"image_size": size, "num_images": manifest["num_images"], "seconds": seconds,
            "images_per_s": manifest["num_images"] / seconds, "shard_bytes": shard_bytes,
            "workers": workers or len(os.sched_getaffinity(0))}


def ensure_dataset(work_dir: Path, tree: Path, size: int, encoding: str = "jpeg") -> Path:
    """The Parquet dataset of `tree` at `size` px, ingesting it if it is not cached in `work_dir` yet."""
    n = count_images(tree)
    out = dataset_dir(work_dir, n, size, encoding)
    manifest = out / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("num_images") == n):
        ingest_tree(tree, out, size, encoding=encoding)
    return out


def bench_config(size: int, dataset: Path | str, output_dir: Path | str, overrides: Sequence[str] = ()) -> tuple[Any, str]:
    """The real config for `size` px: quick-cpu.yaml up to 64 px, full.yaml above; pointed at `dataset`.

    Returns the Config and the name of the YAML it came from.
    """
    from melanoma_dist.config import load_config

    name = "quick-cpu.yaml" if size <= 64 else "full.yaml"
    cfg = load_config(CONFIGS / name, [f"data.image_size={size}", f"data.dataset_dir={dataset}", "data.sources=[]",
                                       f"output_dir={output_dir}", *overrides])
    return cfg, name


# ---------------------------------------------------------------- child processes

def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a benchmark child process: this repo importable, TF quiet, plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    env.update(extra or {})
    return env


def thread_env(threads: int) -> dict[str, str]:
    """Thread-pool sizes of one worker with `threads` CPUs (as GroupSpec.worker_env sets them)."""
    return {"OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1"}


@dataclass
class ChildResult:
    result: dict[str, Any]
    max_rss_bytes: int
    """ru_maxrss of the child itself, from wait4."""
    seconds: float


def run_child(task: str, spec: dict[str, Any], work_dir: Path, env: dict[str, str] | None = None,
              timeout: float = 3600) -> ChildResult:
    """Run `benchmarks._workers.<task>(spec)` in a fresh Python process; return its JSON result and peak RSS.

    Raises:
        RuntimeError: the child failed or timed out (the message holds the end of its log).
    """
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{task}-{os.getpid()}-{time.monotonic_ns()}"
    out_path, log_path = logs / f"{stem}.json", logs / f"{stem}.log"
    spec = {**spec, "result_path": str(out_path)}
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks._workers", task, json.dumps(spec)],
                                cwd=REPO, env=child_env(env), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise RuntimeError(f"child {task} timed out after {timeout:.0f}s; log: {log_path}\n{_tail(log_path)}")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"child {task} failed (exit {proc.returncode}); log: {log_path}\n{_tail(log_path)}")
    return ChildResult(json.loads(out_path.read_text()), usage.ru_maxrss * 1024, seconds)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main_guard(fn) -> int:
    """Run a benchmark's main(); a failure to run is exit 1 with the error, never a missed target."""
    try:
        fn()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"{Path(sys.argv[0]).name}: FAILED to run (see the traceback above)", file=sys.stderr)
        return 1
