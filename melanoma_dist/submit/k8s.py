"""The `k8s` target: render the KubeRay manifests of k8s/ for a config, then `kubectl apply` them.

    melanoma-dist launch k8s --overlay gpu --dry-run                  # print what would be applied
    melanoma-dist launch k8s --overlay gpu --config my.yaml --image REGISTRY/melanoma-dist:TAG
    melanoma-dist launch k8s --overlay cpu-dev --set train.epochs=1 --namespace ml
    melanoma-dist launch k8s --overlay cpu-dev --config configs/tune-cpu.yaml --set output_dir=/results/tune --tune

The manifests have one source, the files under k8s/: `kubectl kustomize
k8s/overlays/<overlay>` renders them. This module then only edits the rendered
objects, in ways the config decides:

- the ConfigMap `melanoma-config` gets the given config (`--config`, `--set`), after
  it validated and its paths were checked to lie on the mounted volumes;
- each worker Pod holds one fold: CPUs = workers_per_fold x cpus_per_worker, GPUs =
  workers_per_fold x gpus_per_worker; replicas = folds trained at once (a search's trials
  share the Pods: its folds are capped by the Pods, not by folds.k);
- the RayJob's entrypoint runs `cv` (with `--folds`) or, with `--tune`, `tune`;
- image, namespace, RayJob name and existing claims when asked.

Without --config/--set/--image/... the output is exactly `kubectl kustomize`'s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import posixpath
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import yaml

from melanoma_dist.config import Config, config_from_dict, load_config
from melanoma_dist.paths import is_uri
from melanoma_dist.submit.command import command_argv
from melanoma_dist.submit.jobs import repo_root, with_command

logger = logging.getLogger(__name__)

K8S_DIR = repo_root() / "k8s"
CONFIG_MAP, CONFIG_KEY = "melanoma-config", "config.yaml"
DATA_CLAIM, RESULTS_CLAIM = "melanoma-data", "melanoma-results"
GPU = "nvidia.com/gpu"
RAY_KINDS = ("RayJob", "RayCluster")


def overlay_path(overlay: str) -> Path:
    """A name under k8s/overlays, or a directory holding a kustomization.yaml."""
    for p in (K8S_DIR / "overlays" / overlay, Path(overlay)):
        if (p / "kustomization.yaml").is_file():
            return p
    names = sorted(d.name for d in (K8S_DIR / "overlays").glob("*") if d.is_dir())
    raise ValueError(f"no kustomize overlay {overlay!r}: use one of {names} (in {K8S_DIR / 'overlays'}) or a "
                     f"directory with a kustomization.yaml")


def render(overlay: Path, kubectl: str = "kubectl") -> list[dict]:
    """`kubectl kustomize overlay`, parsed into objects."""
    exe = shutil.which(kubectl)
    if exe is None:
        raise ValueError(f"{kubectl!r} not found: install kubectl (1.27+, kustomize built in) or pass --kubectl PATH")
    proc = subprocess.run([exe, "kustomize", str(overlay)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"`kubectl kustomize {overlay}` failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config, runtimeEnvYAML) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def to_yaml(objs: list[dict]) -> str:
    """Objects as one multi-document YAML stream."""
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False) for o in objs)


def cluster_spec(obj: dict) -> dict:
    """The RayClusterSpec of a RayJob (embedded) or a RayCluster."""
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(role, pod template) of a RayJob or RayCluster: head, each worker group, the submitter."""
    spec = cluster_spec(obj)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield "submitter", obj["spec"]["submitterPodTemplate"]


def ray_objects(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o.get("apiVersion") == "ray.io/v1" and o["kind"] in RAY_KINDS]


def config_map(objs: list[dict]) -> dict:
    for o in objs:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == CONFIG_MAP:
            return o
    raise ValueError(f"the rendered manifests have no ConfigMap {CONFIG_MAP!r} (key {CONFIG_KEY}): the overlay "
                     f"must generate it (see k8s/overlays/cpu-dev/kustomization.yaml)")


def mount_paths(objs: list[dict]) -> dict[str, str]:
    """Claim name -> mount path in the head container (where the cv driver runs)."""
    mounts: dict[str, str] = {}
    for obj in ray_objects(objs):
        pod = cluster_spec(obj)["headGroupSpec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for m in pod["containers"][0].get("volumeMounts", []):
            if m["name"] in claims:
                mounts[claims[m["name"]]] = m["mountPath"]
    return mounts


def _under(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_config_paths(cfg: Config, mounts: dict[str, str]) -> None:
    """Data and output paths of `cfg` must lie on the volumes the Pods mount (object-store URIs need none).

    Raises:
        ValueError: naming the key, its value, the volume it must be on and an example fix.
    """
    data, results = mounts.get(DATA_CLAIM), mounts.get(RESULTS_CLAIM)
    if data is None or results is None:
        raise ValueError(f"the head Pod must mount the claims {DATA_CLAIM} and {RESULTS_CLAIM}; it mounts {mounts}")
    checks = [("output_dir", cfg.output_dir, (results,)), ("data.dataset_dir", cfg.data.dataset_dir, (data, results))]
    checks += [(f"data.sources.{i}.path", s.path, (data, results)) for i, s in enumerate(cfg.data.sources)]
    for key, value, roots in checks:
        if not is_uri(value) and not any(_under(value, r) for r in roots):  # an object store needs no volume
            example = posixpath.join(roots[0], posixpath.basename(value.rstrip("/")) or "run")
            raise ValueError(f"{key}={value!r} is not on a volume of the Pods: it must be under "
                             f"{' or '.join(roots)}, e.g. --set {key}={example}")


def load_job_config(objs: list[dict], args: argparse.Namespace) -> tuple[Config, str | None]:
    """The validated config of the job, and the ConfigMap text to write (None: keep the overlay's file)."""
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        source = f"{args.config}" + (f" with --set {' '.join(args.overrides)}" if args.overrides else "")
    else:
        raw = yaml.safe_load(config_map(objs)["data"][CONFIG_KEY]) or {}
        cfg = config_from_dict(raw, args.overrides)
        source = f"the overlay's config.yaml with --set {' '.join(args.overrides)}" if args.overrides else ""
    if cfg.distributed.address:
        logger.info("clearing distributed.address=%s: the job joins the cluster KubeRay makes for it",
                    cfg.distributed.address)
        cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, address=""))
        source = source or "the overlay's config.yaml"
    if not source:
        return cfg, None
    return cfg, f"# rendered by `melanoma-dist launch k8s` from {source}\n{cfg.to_yaml()}"


def _worker_container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    return next((c for c in containers if c["name"] == "ray-worker"), containers[0])


def shape_workers(obj: dict, cfg: Config, parallel_folds: int | None, worker_memory: str | None,
                  folds_wanted: int | None) -> None:
    """Size every worker group of `obj` for the config: one fold per Pod.

    `folds_wanted` caps the Pods of a RayJob (no more Pods than folds to train); None for a
    search, whose trials train folds side by side.
    """
    d = cfg.distributed
    cpus, gpus = d.workers_per_fold * d.cpus_per_worker, d.workers_per_fold * d.gpus_per_worker
    for group in cluster_spec(obj).get("workerGroupSpecs", []):
        res = _worker_container(group["template"]).setdefault("resources", {})
        requests, limits = res.setdefault("requests", {}), res.setdefault("limits", {})
        requests["cpu"] = limits["cpu"] = str(cpus)
        if worker_memory:
            requests["memory"] = limits["memory"] = worker_memory
        requests.pop(GPU, None)
        if gpus:
            limits[GPU] = str(gpus)  # an extended resource: the request defaults to the limit
        else:
            limits.pop(GPU, None)
        if obj["kind"] == "RayJob":  # a fixed-size cluster: as many Pods as folds run at once
            n = parallel_folds or group["maxReplicas"]
            n = min(n, folds_wanted) if folds_wanted else n
            group["replicas"] = group["minReplicas"] = group["maxReplicas"] = n
        elif parallel_folds:  # autoscaling: only the ceiling moves
            group["maxReplicas"] = parallel_folds
            group["minReplicas"] = min(group["minReplicas"], parallel_folds)
            group["replicas"] = min(group.get("replicas", 0), parallel_folds)


def use_claim(objs: list[dict], old: str, new: str) -> list[dict]:
    """Mount the existing claim `new` where `old` was mounted, and drop the PVC `old`."""
    for obj in ray_objects(objs):
        for _, template in pod_templates(obj):
            for v in template["spec"].get("volumes", []):
                if v.get("persistentVolumeClaim", {}).get("claimName") == old:
                    v["persistentVolumeClaim"]["claimName"] = new
    return [o for o in objs if not (o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == old)]


def customize(objs: list[dict], args: argparse.Namespace) -> tuple[list[dict], Config]:
    """The rendered objects edited for the job's config and the options; and that config."""
    objs = copy.deepcopy(objs)
    cfg, text = load_job_config(objs, args)
    check_config_paths(cfg, mount_paths(objs))
    if text is not None:
        config_map(objs)["data"][CONFIG_KEY] = text
    folds = [int(f) for f in args.folds.split(",")] if args.folds else list(range(cfg.folds.k))
    jobs = [o for o in ray_objects(objs) if o["kind"] == "RayJob"]
    if (args.folds or args.job_name or args.tune) and not jobs:
        raise ValueError("--folds, --tune and --job-name apply to a RayJob; this overlay renders none (submit jobs to its "
                         "cluster with `melanoma-dist launch ray`)")
    for obj in ray_objects(objs):
        shape_workers(obj, cfg, args.parallel_folds, args.worker_memory, None if args.tune else len(folds))
        if args.image:
            for _, template in pod_templates(obj):
                for c in template["spec"]["containers"]:
                    c["image"] = args.image
    for job in jobs:
        if args.folds or args.tune:
            job["spec"]["entrypoint"] = with_command(job["spec"]["entrypoint"], command_argv(args))
        if args.job_name:
            job["metadata"]["name"] = args.job_name
    if args.data_claim:
        objs = use_claim(objs, DATA_CLAIM, args.data_claim)
    if args.results_claim:
        objs = use_claim(objs, RESULTS_CLAIM, args.results_claim)
    if args.namespace:
        for o in objs:
            o["metadata"]["namespace"] = args.namespace
    return objs, cfg


def launch_k8s(args: argparse.Namespace) -> int:
    """Render, check and apply (or print, with --dry-run) the manifests; return kubectl's exit code."""
    overlay = overlay_path(args.overlay)
    objs, cfg = customize(render(overlay, args.kubectl), args)
    text = to_yaml(objs)
    if args.dry_run:
        print(text, end="")
        return 0
    cmd = [shutil.which(args.kubectl) or args.kubectl, "apply", "-f", "-"]
    logger.info("applying %d objects from %s: %s", len(objs), overlay, " ".join(cmd))
    proc = subprocess.run(cmd, input=text, text=True)
    if proc.returncode != 0:
        print(f"melanoma-dist launch k8s: `kubectl apply` failed (exit {proc.returncode}); inspect the manifests "
              f"with --dry-run", file=sys.stderr)
        return proc.returncode
    ns = f" -n {args.namespace}" if args.namespace else ""
    results = args.results_claim or RESULTS_CLAIM
    for obj in ray_objects(objs):
        name = obj["metadata"]["name"]
        if obj["kind"] == "RayJob":
            print(f"RayJob {name} applied. Follow it:\n  kubectl get rayjob {name}{ns} -w\n"
                  f"  kubectl logs{ns} -f job/{name}        # the submitter: the job's driver output\n"
                  f"(a finished RayJob is not re-run by `apply`: `kubectl delete rayjob {name}{ns}` first, "
                  f"or pass --job-name)")
        else:
            print(f"RayCluster {name} applied. Reach its dashboard / Jobs API locally:\n"
                  f"  kubectl port-forward{ns} svc/{name}-head-svc 8265:8265\n"
                  f"  melanoma-dist launch ray --address http://127.0.0.1:8265 --config FILE")
    print(f"results: {cfg.output_dir} on the claim {results}")
    return 0
