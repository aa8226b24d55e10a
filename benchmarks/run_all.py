"""Run every benchmark, then write the Markdown table `results/latest.md`.

    python benchmarks/run_all.py                 # full run (about 60 min on 2 idle cores)
    python benchmarks/run_all.py --smoke         # tiny sizes, overlapped: checks that everything runs (CI)
    python benchmarks/run_all.py --only bench_pipeline,bench_memory --out-dir /tmp/results

Each benchmark runs as its own process (`benchmarks/<name>.py [--smoke] --out-dir ... --work-dir ...`),
one at a time, and writes `<out-dir>/<name>.json`. With --smoke they overlap, each in its own
work dir (smoke numbers mean nothing; it roughly halves the time). `scaling_model.py` runs
last: it reads `bench_horovod.json` (and `bench_pipeline.json`, `bench_feeding.json`). `<out-dir>/latest.md` gets every
summary table: those of this run, and (full runs with --only) the others' from their JSON already in `<out-dir>`,
each marked with the date and commit it was measured at, so a partial rerun never drops results. Exit status 1 means
some benchmark failed to run; missed targets never change it (they are marked in the table).
Run it on an otherwise idle machine: the scripts print the load average they start with.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, base_parser, environment, fmt, format_table, print_environment

BENCHMARKS = ("bench_pipeline", "bench_feeding", "bench_horovod", "bench_ray", "bench_memory", "bench_scale", "scaling_model")
TITLES = {
    "bench_pipeline": "1. Input pipeline: Parquet + tf.data vs image_dataset_from_directory",
    "bench_horovod": "2. Horovod overhead and scaling",
    "bench_ray": "3. Ray fold scheduling",
    "bench_memory": "4. Peak memory of a training worker",
    "bench_feeding": "1b. Feeding a GPU: input side per core, augmentation in tf.data vs in the model, JPEG vs raw "
                     "shards; XLA step",
    "scaling_model": "5. Scaling on paper (model, not measurement)",
    "bench_scale": "6. Datasets at scale: ingest and one worker's input side at 10k to 1M images, local disk vs S3",
}


def parse_args(argv: list[str] | None = None) -> Any:
    p = base_parser(__doc__)
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    return p.parse_args(argv)


def command(name: str, args: Any, work_dir: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--out-dir", str(args.out_dir),
           "--work-dir", str(work_dir)]
    if name == "scaling_model":
        return cmd + ["--results-dir", str(args.out_dir)]
    return cmd + ["--smoke"] * args.smoke + (["--repeats", str(args.repeats)] if args.repeats else [])


def run_one(name: str, args: Any) -> dict[str, Any]:
    """Run one benchmark with its output streamed to the console."""
    cmd = command(name, args, args.work_dir)
    print(f"\n######## {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO)
    seconds = time.perf_counter() - start
    print(f"######## {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f}s", flush=True)
    return {"name": name, "exit_code": code, "seconds": seconds}


def run_overlapped(names: list[str], args: Any) -> list[dict[str, Any]]:
    """Smoke runs only: start the benchmarks at once (each in its own work dir), print their logs in order.

    Smoke numbers mean nothing, and most of a smoke run is process start-up and waiting
    (TensorFlow imports, Ray and Horovod start-up), so overlapping them roughly halves the time.
    """
    procs = {}
    for name in names:
        work = args.work_dir / name
        work.mkdir(parents=True, exist_ok=True)
        log = (work / "console.log").open("w")
        procs[name] = (subprocess.Popen(command(name, args, work), cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                       log, time.perf_counter())
    runs = []
    for name, (proc, log, start) in procs.items():
        code = proc.wait()
        seconds = time.perf_counter() - start
        log.close()
        print(f"\n######## {name} (overlapped smoke run)\n{Path(log.name).read_text()}")
        print(f"######## {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f}s", flush=True)
        runs.append({"name": name, "exit_code": code, "seconds": seconds})
    return runs


def write_markdown(out_dir: Path, runs: list[dict[str, Any]], env: dict[str, Any], smoke: bool,
                   argv: list[str]) -> Path:
    v = env["versions"]
    lines = [f"# Benchmark results{' (SMOKE run: tiny sizes, numbers meaningless)' if smoke else ''}", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; git {env['git'].get('commit', '?')[:12]}"
             f"{' (melanoma_dist modified)' if env['git'].get('dirty') else ''}",
             f"- Machine: {env['cpu_model']}, {env['cpus_usable']} CPUs, {env['mem_total_gib']} GiB; "
             f"load average at start {env['load_avg_1_5_15']}",
             "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- Command: `python {' '.join(['benchmarks/run_all.py', *argv])}`", ""]
    ran = {run["name"]: run for run in runs}
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        run = ran.get(name)
        if run is None and (smoke or not path.is_file()):
            continue
        lines += [f"## {TITLES[name]}", ""]
        if run is not None and (run["exit_code"] != 0 or not path.is_file()):
            lines += [f"**Failed to run** (exit {run['exit_code']}); see the console output.", ""]
            continue
        doc = json.loads(path.read_text())
        if run is None:
            lines += [f"_Not rerun: measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(doc['started_unix']))}"
                      f" at git {doc['env']['git'].get('commit', '?')[:12]} (`{path.name}`)._", ""]
        lines += [format_table(doc["summary"], with_name=False), ""]
        lines += [f"_{note}_" for note in doc.get("notes", [])]
        if name == "scaling_model":
            lines += [""] + [md + "\n" for md in doc["results"]["markdown"].values()]
        seconds = fmt(run["seconds"]) if run is not None else fmt(doc["elapsed_s"])
        lines += [f"`{path.name}`: {seconds} s, load average at end {doc['env'].get('load_avg_1_5_15_at_end')}", ""]
    out = out_dir / "latest.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"run_all.py: unknown benchmark {unknown[0]!r}; valid: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    env = environment()
    print_environment(env)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    measured = [n for n in names if n != "scaling_model"]
    if args.smoke and len(measured) > 1:
        runs = run_overlapped(measured, args)
    else:  # one at a time: benchmarks must not compete for the cores
        runs = [run_one(name, args) for name in measured]
    if "scaling_model" in names:  # reads bench_horovod.json: after the measurements
        runs.append(run_one("scaling_model", args))
    md = write_markdown(args.out_dir, runs, env, args.smoke, sys.argv[1:] if argv is None else argv)
    print(f"\n{md.read_text()}")
    failed = [r["name"] for r in runs if r["exit_code"] != 0]
    print(f"run_all: {len(runs) - len(failed)}/{len(runs)} benchmarks ran in {time.perf_counter() - start:.0f}s; "
          f"results in {args.out_dir}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
