"""The `ray` target: submit `melanoma-dist cv` (or `tune`) to an existing Ray cluster through the Ray Jobs API.

    melanoma-dist launch ray --address http://127.0.0.1:8265 --config my-config.yaml [--folds 0,1]
    melanoma-dist launch ray --address http://127.0.0.1:8265 --config configs/tune-cpu.yaml --tune

What is sent: a snapshot of the working directory (default: this repository, without
.venv, runs, .git and caches) with the resolved config written into it as
`melanoma-dist-job.yaml`, and the entrypoint `python -m melanoma_dist cv --config
melanoma-dist-job.yaml` (`tune` with `--tune`). The cluster must already have the pinned stack (our image,
or launch/setup.sh on every node): Horovod is compiled against TensorFlow, so it
cannot come from a runtime-env pip install. The job's data and output paths must be
absolute paths on storage every node shares; that is where the results are.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from melanoma_dist.config import Config
from melanoma_dist.paths import is_uri

logger = logging.getLogger(__name__)

JOB_CONFIG = "melanoma-dist-job.yaml"
"""Name of the resolved config inside the shipped working directory."""
DEFAULT_EXCLUDES = (".venv", "venv", "runs", ".git", ".pytest_cache", "__pycache__", "*.pyc", "*.egg-info")
"""Never shipped with a job: environments, results, history, caches."""
DEFAULT_ENV = {"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
"""Environment of the job's driver and workers (unbuffered, so logs stream as they come)."""
RESULT_FILES = "cv_folds.csv, cv_summary.json, oof_predictions.csv, run_manifest.json, fold-K/"


def repo_root() -> Path:
    """The checkout this package runs from (holding pyproject.toml)."""
    return Path(__file__).resolve().parents[2]


def check_cluster_paths(cfg: Config) -> None:
    """Reject relative data and output paths: on a cluster they would resolve inside each node's temporary job dir.

    Object-store URIs (`s3://...`) are shared by every node and pass.

    Raises:
        ValueError: naming the key, its value and the fix.
    """
    paths = {"output_dir": cfg.output_dir, "data.dataset_dir": cfg.data.dataset_dir}
    paths |= {f"data.sources.{i}.path": s.path for i, s in enumerate(cfg.data.sources)}
    for key, value in paths.items():
        if not (is_uri(value) or os.path.isabs(value)):  # an object store is shared storage
            raise ValueError(f"{key}={value!r} is relative: on a Ray cluster it would resolve inside the job's "
                             f"temporary working directory of each node. Give an absolute path on storage that "
                             f"every node mounts, e.g. --set {key}=/mnt/shared/{value.lstrip('./')}")


def cli_argv(entrypoint: str) -> list[str]:
    """The `melanoma-dist` arguments of an entrypoint (`melanoma-dist ...` or `<python> -m melanoma_dist ...`)."""
    tokens = shlex.split(entrypoint)
    if tokens and Path(tokens[0]).name == "melanoma-dist":
        return tokens[1:]
    if len(tokens) >= 3 and tokens[1:3] == ["-m", "melanoma_dist"]:
        return tokens[3:]
    raise ValueError(f"entrypoint {entrypoint!r} is not a melanoma-dist command")


def build_entrypoint(python: str, command: Sequence[str]) -> str:
    """The job's command line: `command` (`["cv", "--folds", "0"]`, see `command.command_argv`) on the shipped config."""
    return shlex.join([python, "-m", "melanoma_dist", command[0], "--config", JOB_CONFIG, *command[1:]])


def with_command(entrypoint: str, command: Sequence[str]) -> str:
    """`entrypoint` (a melanoma-dist command line) running `command` instead, its other options kept.

    `with_command("melanoma-dist cv --config /config/config.yaml", ["tune", "--nested"])` is
    `"melanoma-dist tune --config /config/config.yaml --nested"`.
    """
    tokens = shlex.split(entrypoint)
    argv = cli_argv(entrypoint)
    program = tokens[:len(tokens) - len(argv)]
    return shlex.join([*program, command[0], *argv[1:], *command[1:]])


def stage_working_dir(source: Path, cfg: Config, dest: Path, excludes: Sequence[str]) -> Path:
    """Copy `source` (minus `excludes`) to `dest` and write the resolved config into it; return dest.

    A snapshot: edits made to the repository while the job runs do not reach it.
    """
    if not (source / "melanoma_dist").is_dir():
        raise ValueError(f"working dir {source} holds no melanoma_dist/ package: pass --working-dir pointing to a "
                         f"melanoma-dist checkout")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*excludes), symlinks=True)
    (dest / JOB_CONFIG).write_text(f"# written by `melanoma-dist launch ray`; the config of this job\n{cfg.to_yaml()}")
    return dest


def build_runtime_env(working_dir: Path, excludes: Sequence[str], env: Sequence[str], pip: Sequence[str]) -> dict:
    """Runtime environment of the job: code, environment variables and optional extra pip packages."""
    env_vars = dict(DEFAULT_ENV)
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r} must look like KEY=VALUE")
        env_vars[key] = value
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(excludes), "env_vars": env_vars}
    if pip:
        # A per-job virtualenv on every node, layered over the image's packages.
        runtime_env["pip"] = {"packages": list(pip), "pip_check": False}
    return runtime_env


async def _print_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for_end(client, job_id: str, poll_s: float = 1.0):
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; return that status."""
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


def submit_job(cfg: Config, args: argparse.Namespace) -> int:
    """Submit the cross-validation (or the search) as a Ray job; follow it unless told not to; 0 when it succeeds."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from melanoma_dist.submit.command import command_argv

    check_cluster_paths(cfg)
    if cfg.distributed.address:
        logger.info("clearing distributed.address=%s: a Ray job joins the cluster it runs on", cfg.distributed.address)
        cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, address=""))
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no Ray cluster given: pass --address http://<head>:8265 (the dashboard, e.g. through "
                         "`ray dashboard cluster/aws-gpu.yaml` or `kubectl port-forward`) or set RAY_ADDRESS")
    source = Path(args.working_dir).resolve() if args.working_dir else repo_root()
    if not args.working_dir and not (source / "pyproject.toml").is_file():
        raise ValueError(f"melanoma_dist is not running from a checkout ({source}): pass --working-dir with the "
                         f"melanoma-dist sources to ship")
    excludes = list(DEFAULT_EXCLUDES) + list(args.excludes)
    entrypoint = build_entrypoint(args.python, command_argv(args))
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise ValueError(f"cannot reach the Ray dashboard at {address}: {e}. Check --address (the dashboard "
                         f"port, 8265 by default) and that the cluster runs with the dashboard") from None

    with tempfile.TemporaryDirectory(prefix="melanoma-job-") as tmp:
        staged = stage_working_dir(source, cfg, Path(tmp) / "job", excludes)
        runtime_env = build_runtime_env(staged, excludes, args.env, args.pip)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.job_id,
                                   metadata={"app": "melanoma-dist", "output_dir": cfg.output_dir})
    print(f"submitted Ray job {job_id} to {address}: {entrypoint}", flush=True)
    print(f"results will be in {cfg.output_dir} on the cluster's shared storage", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        if not args.no_follow:
            asyncio.run(_print_logs(client, job_id))
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Stop it with: "
              f"ray job stop --address {address} {job_id}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    if status == JobStatus.SUCCEEDED:
        files = "tune/ (trials.md, best.yaml) and the estimate's " + RESULT_FILES if args.tune else RESULT_FILES
        print(f"job {job_id} succeeded; results in {cfg.output_dir} ({files})")
        return 0
    print(f"job {job_id} {status.value}: {info.message or 'no message'}; logs: "
          f"ray job logs --address {address} {job_id}", file=sys.stderr)
    return 1

