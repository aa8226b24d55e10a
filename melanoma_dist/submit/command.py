"""Options of `melanoma-dist launch` and the dispatch to its three targets.

A launch runs `melanoma-dist cv`, or with `--tune` the hyperparameter search
`melanoma-dist tune` (`--nested` for nested CV), on the chosen target.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable, Mapping

from melanoma_dist.config import Config

logger = logging.getLogger(__name__)

TARGETS = ("local", "ray", "k8s")
Command = Callable[[Config, argparse.Namespace], int]
"""A CLI command (`cli.cmd_cv`, `cli.cmd_tune`): the config and its parsed options in, the exit code out."""

# Which target each target-specific option belongs to (checked in cmd_launch).
_OPTION_TARGETS: dict[str, tuple[str, ...]] = {
    "folds": ("local", "ray", "k8s"),
    "smoke_test": ("local",),
    "address": ("ray",), "working_dir": ("ray",), "excludes": ("ray",), "env": ("ray",), "pip": ("ray",),
    "python": ("ray",), "job_id": ("ray",), "no_follow": ("ray",), "no_wait": ("ray",),
    "overlay": ("k8s",), "image": ("k8s",), "namespace": ("k8s",), "job_name": ("k8s",),
    "parallel_folds": ("k8s",), "worker_memory": ("k8s",), "data_claim": ("k8s",), "results_claim": ("k8s",),
    "dry_run": ("k8s",), "kubectl": ("k8s",),
}


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `launch` options to its subparser (next to --config, --set, --verbose)."""
    p.add_argument("target", choices=TARGETS,
                   help="local: embedded Ray here; ray: an existing Ray cluster (Jobs API); "
                        "k8s: KubeRay manifests applied with kubectl")
    p.add_argument("--folds", help="comma-separated folds to run (default: all; not with --tune)")
    p.add_argument("--tune", action="store_true",
                   help="run the hyperparameter search (`melanoma-dist tune`, the config's `tune:` section) "
                        "instead of `cv`")
    p.add_argument("--nested", action="store_true", help="with --tune: nested CV (a search in every outer fold)")
    p.add_argument("--smoke-test", action="store_true",
                   help="local: a tiny generated dataset and model, 2 folds, 1 epoch (about a minute)")

    ray = p.add_argument_group("ray target (Ray Jobs API)")
    ray.add_argument("--address", help="dashboard address of the cluster, e.g. http://127.0.0.1:8265 "
                                       "(default: RAY_ADDRESS)")
    ray.add_argument("--working-dir", help="code shipped with the job (default: this repository); "
                                           ".venv, runs, .git and caches are left out")
    ray.add_argument("--exclude", dest="excludes", action="append", default=[], metavar="PATTERN",
                     help="also leave out files matching PATTERN (repeatable)")
    ray.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable of the job and its workers (repeatable)")
    ray.add_argument("--pip", action="append", default=[], metavar="REQ",
                     help="extra pip requirement installed for the job (repeatable). By default none: the "
                          "cluster must already have the pinned stack (Horovod is compiled, see launch/setup.sh)")
    ray.add_argument("--python", default="python",
                     help="interpreter of the entrypoint on the cluster (default: `python` on the head's PATH)")
    ray.add_argument("--job-id", help="submission id (default: generated)")
    ray.add_argument("--no-follow", action="store_true", help="do not stream the logs; still wait for the end")
    ray.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")

    k8s = p.add_argument_group("k8s target (KubeRay; manifests from k8s/)")
    k8s.add_argument("--overlay", default="cpu-dev",
                     help="kustomize overlay: a name under k8s/overlays (cpu-dev, gpu, gpu-interactive) or a "
                          "directory (default: cpu-dev)")
    k8s.add_argument("--image", help="image of every Ray container (default: the overlay's)")
    k8s.add_argument("--namespace", "-n", help="namespace of every object (default: kubectl's current one)")
    k8s.add_argument("--job-name", help="name of the RayJob (default: the manifest's, melanoma-cv)")
    k8s.add_argument("--parallel-folds", type=int,
                     help="worker Pods, each training one fold at a time (default: the overlay's, at most folds.k)")
    k8s.add_argument("--worker-memory", help="memory of each worker Pod, e.g. 48Gi (default: the overlay's)")
    k8s.add_argument("--data-claim", help="use this existing PersistentVolumeClaim for /data instead of creating one")
    k8s.add_argument("--results-claim",
                     help="use this existing PersistentVolumeClaim for /results instead of creating one")
    k8s.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
    k8s.add_argument("--kubectl", default="kubectl", help="kubectl binary (default: kubectl on PATH)")


def _check_options(args: argparse.Namespace, parser_defaults: dict) -> None:
    for dest, targets in _OPTION_TARGETS.items():
        if args.target not in targets and getattr(args, dest, None) != parser_defaults.get(dest):
            flag = "--" + dest.replace("_", "-").replace("excludes", "exclude")
            raise ValueError(f"{flag} is an option of the {' and '.join(targets)} target(s), not of "
                             f"{args.target}; see `melanoma-dist launch --help`")


def _check_command(args: argparse.Namespace) -> None:
    if args.nested and not args.tune:
        raise ValueError("--nested is an option of the search: add --tune")
    if args.tune and args.folds:
        raise ValueError("--folds selects folds of `cv`; a search (--tune) runs every fold of every trial")
    if args.tune and args.smoke_test:
        raise ValueError("--smoke-test runs a tiny `cv`; drop --tune (tests/test_tune.py has tiny searches)")


def command_argv(args: argparse.Namespace) -> list[str]:
    """The job's `melanoma-dist` command and its options, without `--config`: `["cv", "--folds", "0,1"]`,
    `["tune", "--nested"]`."""
    if args.tune:
        return ["tune"] + (["--nested"] if args.nested else [])
    return ["cv"] + (["--folds", args.folds] if args.folds else [])


def cmd_launch(cfg: Config, args: argparse.Namespace, commands: Mapping[str, Command]) -> int:
    """Run `melanoma-dist cv` (or `tune`, with `--tune`) on the chosen target; return the process exit code.

    `commands` maps `cv` and `tune` to the CLI's commands (`cli.cmd_cv`, `cli.cmd_tune`), run in
    this process by the `local` target: passed in, so that this package does not import the CLI
    that imports it.
    """
    defaults = {dest: None for dest in _OPTION_TARGETS} | {
        "smoke_test": False, "no_follow": False, "no_wait": False, "dry_run": False, "excludes": [], "env": [],
        "pip": [], "python": "python", "overlay": "cpu-dev", "kubectl": "kubectl"}
    _check_options(args, defaults)
    _check_command(args)
    if args.target == "local":
        from melanoma_dist.submit.local import run_local

        return run_local(cfg, args, commands[command_argv(args)[0]])
    if args.target == "ray":
        from melanoma_dist.submit.jobs import submit_job

        return submit_job(cfg, args)
    from melanoma_dist.submit.k8s import launch_k8s

    return launch_k8s(args)
