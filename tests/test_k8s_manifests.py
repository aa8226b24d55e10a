"""Offline checks of the Kubernetes manifests (k8s/), the image definitions and `melanoma-dist launch k8s`.

Every overlay is rendered with `kubectl kustomize` (skipped without kubectl). Core
objects are validated by kubernetes-validate (strict); KubeRay objects by our compact
schemas (k8s/schema/) and their pod templates by Kubernetes' PodTemplateSpec schema.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import stat
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from melanoma_dist.cli import build_parser, main
from melanoma_dist.config import config_from_dict
from melanoma_dist.submit import k8s

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("cpu-dev", "gpu", "gpu-interactive")
K8S_VERSION = "1.32.0"  # the kubectl of launch/, and a version kubernetes-validate bundles
UID = 1000
EXPECTED_KINDS = {
    "cpu-dev": ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayJob"],
    "gpu": ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayJob"],
    "gpu-interactive": ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayCluster"],
}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl not installed (needed for `kubectl kustomize`)")


def ray_pin() -> str:
    text = (ROOT / "launch" / "requirements.txt").read_text()
    return re.search(r"^ray\[[^\]]*\]==([\d.]+)$", text, re.M).group(1)


def package_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def image_tag(variant: str) -> str:
    return f"registry.example.com/melanoma-dist:{package_version()}-ray{ray_pin()}-{variant}"


def ray_validator(kind: str) -> jsonschema.Draft202012Validator:
    schemas = {p.name: json.loads(p.read_text()) for p in (ROOT / "k8s" / "schema").glob("*.schema.json")}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return jsonschema.Draft202012Validator(schemas[f"{kind.lower()}.schema.json"], registry=registry)


def validate_objects(objs: list[dict]) -> dict[str, int]:
    """Validate every object; return how many of each check passed (raises on the first failure)."""
    import kubernetes_validate

    counts = {"core": 0, "ray": 0, "pod_templates": 0}
    for obj in objs:
        if obj["apiVersion"] == "ray.io/v1":
            ray_validator(obj["kind"]).validate(obj)
            counts["ray"] += 1
            for role, template in k8s.pod_templates(obj):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{obj['metadata']['name']}-{role.split()[-1]}"}, "template": template}
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
                counts["pod_templates"] += 1
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            counts["core"] += 1
    return counts


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (needed for `kubectl kustomize`)")
    return {name: k8s.render(ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}


def containers(obj: dict):
    for role, template in k8s.pod_templates(obj):
        for c in template["spec"]["containers"]:
            yield role, template, c


# ------------------------------------------------------------------ rendering and schemas

def test_overlays_render_the_expected_objects(rendered):
    for name, objs in rendered.items():
        assert sorted(o["kind"] for o in objs) == sorted(EXPECTED_KINDS[name]), name


def test_every_object_validates(rendered):
    totals = {"core": 0, "ray": 0, "pod_templates": 0}
    for objs in rendered.values():
        for key, n in validate_objects(objs).items():
            totals[key] += n
    # 3 overlays x (ConfigMap + 2 PVCs); 3 KubeRay objects; head + workers (+ submitter for RayJobs).
    assert totals == {"core": 9, "ray": 3, "pod_templates": 8}


def test_schema_rejects_what_kuberay_rejects(rendered):
    job = next(o for o in rendered["gpu"] if o["kind"] == "RayJob")
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo of shutdownAfterJobFinishes
    errors = sorted(e.message for e in ray_validator("RayJob").iter_errors(bad))
    assert len(errors) == 2, errors


# ------------------------------------------------------------------ the job: entrypoint and config

def test_entrypoint_is_a_command_our_cli_accepts(rendered):
    for name in ("cpu-dev", "gpu"):
        job = next(o for o in rendered[name] if o["kind"] == "RayJob")
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "melanoma-dist"
        args = build_parser().parse_args(argv[1:])
        assert args.command == "cv"
        head = k8s.cluster_spec(job)["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volume = next(v for v in head["volumes"] if v["name"] == mounts[str(args.config.parent)])
        assert volume["configMap"]["name"] == k8s.CONFIG_MAP and args.config.name == k8s.CONFIG_KEY


def test_config_in_the_configmap_validates_and_lives_on_the_volumes(rendered):
    for name, objs in rendered.items():
        cfg = config_from_dict(yaml.safe_load(k8s.config_map(objs)["data"][k8s.CONFIG_KEY]))
        k8s.check_config_paths(cfg, k8s.mount_paths(objs))
        assert cfg.distributed.address == ""
        if name.startswith("gpu"):
            assert cfg.distributed.gpus_per_worker == 1 and cfg.train.mixed_precision
        else:
            assert cfg.distributed.gpus_per_worker == 0 and cfg.distributed.workers_per_fold == 1


def test_worker_pods_are_shaped_for_the_config(rendered):
    for name, objs in rendered.items():
        d = config_from_dict(yaml.safe_load(k8s.config_map(objs)["data"][k8s.CONFIG_KEY])).distributed
        for obj in k8s.ray_objects(objs):
            for group in k8s.cluster_spec(obj)["workerGroupSpecs"]:
                res = group["template"]["spec"]["containers"][0]["resources"]
                assert res["limits"]["cpu"] == str(d.workers_per_fold * d.cpus_per_worker), name
                assert int(res["limits"].get(k8s.GPU, 0)) == d.workers_per_fold * d.gpus_per_worker, name
                assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_launcher_leaves_consistent_overlays_unchanged(rendered):
    args = build_parser().parse_args(["launch", "k8s"])
    for objs in rendered.values():
        assert k8s.customize(objs, args)[0] == objs


# ------------------------------------------------------------------ KubeRay conventions and secure defaults

def test_kuberay_conventions(rendered):
    for name, objs in rendered.items():
        for obj in k8s.ray_objects(objs):
            spec = k8s.cluster_spec(obj)
            assert spec["rayVersion"] == ray_pin(), name
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert not spec["headGroupSpec"].get("enableIngress", False)
            assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
            images = set()
            for role, template, c in containers(obj):
                images.add(c["image"])
                assert all("name" in p for p in c.get("ports", [])), (name, role)
                if role.startswith("worker"):
                    assert c["name"] == "ray-worker"
                    assert "ray stop" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
                if role != "submitter":
                    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
                    vol = next(v for v in template["spec"]["volumes"] if v["name"] == shm["name"])
                    assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"]
            variant = "gpu" if name.startswith("gpu") else "cpu"
            assert images == {image_tag(variant)}, name  # one image, tagged with the pinned Ray
        claims = {o["metadata"]["name"]: o["spec"]["accessModes"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
        assert claims[k8s.RESULTS_CLAIM] == ["ReadWriteMany"]
    gpu_job = next(o for o in rendered["gpu"] if o["kind"] == "RayJob")
    worker = k8s.cluster_spec(gpu_job)["workerGroupSpecs"][0]["template"]["spec"]
    assert next(v for v in worker["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "8Gi"


def test_secure_defaults(rendered):
    for name, objs in rendered.items():
        assert not [o for o in objs if o["kind"] in ("Secret", "Ingress")]
        assert all(o["spec"].get("type", "ClusterIP") == "ClusterIP" for o in objs if o["kind"] == "Service")
        for obj in k8s.ray_objects(objs):
            for role, template, c in containers(obj):
                pod = template["spec"]["securityContext"]
                where = (name, role, c["name"])
                assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID, where
                assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), where
                for env in c.get("env", []):
                    assert not re.search(r"password|secret|token|key", env["name"], re.I) or "valueFrom" in env
            autoscaler = k8s.cluster_spec(obj).get("autoscalerOptions")
            if autoscaler:
                assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
                assert {"requests", "limits"} <= set(autoscaler["resources"])


# ------------------------------------------------------------------ the image definitions

def test_dockerfiles_install_like_setup_sh():
    setup = (ROOT / "launch" / "setup.sh").read_text()
    py = re.search(r"PY=\$\{PYTHON:-python(3\.\d+)\}", setup).group(1)
    cpu, gpu = (ROOT / "Dockerfile").read_text(), (ROOT / "Dockerfile.gpu").read_text()
    assert re.search(rf"^FROM python:{re.escape(py)}-slim$", cpu, re.M)
    assert re.search(r"^RUN bash launch/setup\.sh", cpu, re.M)
    assert re.search(r"^RUN GPU=1 .*bash launch/setup\.sh", gpu, re.M)
    assert f"python{py}" in gpu and "HOROVOD_GPU_OPERATIONS=NCCL" in gpu
    for text, variant in ((cpu, "cpu"), (gpu, "gpu")):
        assert f"USER {UID}:{UID}" in text and f"--uid {UID}" in text
        assert image_tag(variant) in text  # the tag it documents is the one the manifests use
        assert re.search(r"apt-get install[^&]*\bwget\b", text)  # KubeRay's probes run wget
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)  # else setup.sh would reuse the host's .venv
    docs = (ROOT / "docs" / "run-on-your-cluster.md").read_text()
    assert image_tag("cpu") in docs and image_tag("gpu") in docs


# ------------------------------------------------------------------ `melanoma-dist launch k8s`

def _dry_run(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["launch", "k8s", "--dry-run", *argv])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d] if code == 0 else [], err


@needs_kubectl
def test_launch_k8s_renders_a_given_config(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "k8s" / "overlays" / "gpu" / "config.yaml").read_text())
    cfg["distributed"].update(workers_per_fold=4, cpus_per_worker=2, gpus_per_worker=1)
    cfg["output_dir"] = "/results/my-run"
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    code, objs, err = _dry_run(capsys, "--overlay", "gpu", "--config", str(tmp_path / "my.yaml"),
                               "--set", "folds.k=3", "--parallel-folds", "5", "--image", "reg.local/md:1",
                               "--namespace", "ml", "--folds", "0,2")
    assert code == 0, err
    validate_objects(objs)
    text = k8s.config_map(objs)["data"][k8s.CONFIG_KEY]
    assert config_from_dict(yaml.safe_load(text)).output_dir == "/results/my-run"
    job = next(o for o in objs if o["kind"] == "RayJob")
    group = k8s.cluster_spec(job)["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (limits["cpu"], limits[k8s.GPU]) == ("8", "4")
    assert group["replicas"] == group["maxReplicas"] == 2  # 2 folds wanted: no more Pods than that
    assert build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:]).folds == "0,2"
    assert {c["image"] for _, _, c in containers(job)} == {"reg.local/md:1"}
    assert {o["metadata"]["namespace"] for o in objs} == {"ml"}


@needs_kubectl
def test_launch_k8s_runs_a_search_with_tune(capsys):
    code, objs, err = _dry_run(capsys, "--overlay", "cpu-dev", "--tune", "--nested", "--parallel-folds", "6",
                               "--set", "folds.k=3", "--set", "tune.space.train.learning_rate=loguniform(1e-4, 1e-2)")
    assert code == 0, err
    validate_objects(objs)
    job = next(o for o in objs if o["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert (argv[0], args.command, str(args.config), args.nested) == ("melanoma-dist", "tune", "/config/config.yaml",
                                                                      True)
    # Trials share the Pods: six Pods for two 3-fold trials at once, not capped at folds.k as for `cv`.
    assert k8s.cluster_spec(job)["workerGroupSpecs"][0]["replicas"] == 6
    cfg = config_from_dict(yaml.safe_load(k8s.config_map(objs)["data"][k8s.CONFIG_KEY]))
    assert "train.learning_rate" in cfg.tune.space


@needs_kubectl
def test_launch_k8s_uses_existing_claims(capsys):
    code, objs, err = _dry_run(capsys, "--overlay", "cpu-dev", "--data-claim", "ham-data",
                               "--results-claim", "team-results")
    assert code == 0, err
    assert [o for o in objs if o["kind"] == "PersistentVolumeClaim"] == []
    job = next(o for o in objs if o["kind"] == "RayJob")
    claims = {v["persistentVolumeClaim"]["claimName"] for _, t in k8s.pod_templates(job)
              for v in t["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    assert claims == {"ham-data", "team-results"}


INVALID_CASES = [
    # (arguments, words the error must contain)
    (["--set", "output_dir=runs/x"], ["output_dir='runs/x'", "/results"]),
    (["--set", "data.dataset_dir=/tmp/ds"], ["data.dataset_dir", "/data"]),
    (["--set", "train.epochz=3"], ["unknown config key train.epochz"]),
    (["--overlay", "nope"], ["no kustomize overlay 'nope'", "cpu-dev"]),
    (["--overlay", "gpu-interactive", "--folds", "0"], ["--folds", "RayJob"]),
    (["--no-follow"], ["--no-follow is an option of the ray target"]),
    (["--kubectl", "no-such-kubectl"], ["'no-such-kubectl' not found"]),
    (["--overlay", "gpu-interactive", "--tune"], ["--tune", "RayJob"]),
    (["--nested"], ["--nested", "add --tune"]),
    (["--tune", "--folds", "0"], ["--folds", "--tune"]),
]


@needs_kubectl
@pytest.mark.parametrize("argv,words", INVALID_CASES)
def test_launch_k8s_rejects(capsys, argv, words):
    code, _, err = _dry_run(capsys, *argv)
    assert code == 2
    for w in words:
        assert w in err


@needs_kubectl
def test_launch_k8s_applies_with_kubectl(tmp_path, capsys):
    # A stand-in kubectl: `kustomize` goes to the real one, `apply -f -` records what it got.
    fake = tmp_path / "kubectl"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = kustomize ]; then exec {shutil.which("kubectl")} "$@"; fi\n'
                    f'echo "$@" > {tmp_path}/args; cat > {tmp_path}/applied.yaml\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    code = main(["launch", "k8s", "--overlay", "gpu", "--kubectl", str(fake)])
    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "args").read_text().split() == ["apply", "-f", "-"]
    applied = [d for d in yaml.safe_load_all((tmp_path / "applied.yaml").read_text()) if d]
    assert sorted(o["kind"] for o in applied) == sorted(EXPECTED_KINDS["gpu"])
    assert "kubectl get rayjob melanoma-cv -w" in out and "/results/cv-gpu" in out
