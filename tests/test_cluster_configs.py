"""Offline checks of the Ray cluster-launcher configs in cluster/.

Each file is validated against the cluster-config schema that ships inside the
`ray` package, then prepared (defaults merged) and validated again by Ray's own
`validate_config`, as `ray up` would.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def ray_pin() -> str:
    text = (ROOT / "launch" / "requirements.txt").read_text()
    return re.search(r"^ray\[[^\]]*\]==([\d.]+)$", text, re.M).group(1)


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def test_there_are_a_cloud_and_an_onprem_config():
    assert {p.name for p in CONFIGS} >= {"aws-gpu.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validates_against_rays_schema(path):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_top_level_key_is_commented(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_]+:", line):
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            assert above.startswith("#"), f"{path.name}: top-level key {line.split(':')[0]!r} has no comment"


def test_aws_gpu_cluster():
    c = load("aws-gpu.yaml")
    types = c["available_node_types"]
    head, workers = types[c["head_node_type"]], [t for n, t in types.items() if n != c["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head drives, folds train on GPU workers
    gpu = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)  # autoscaled, to zero
    assert c["max_workers"] >= max(t["max_workers"] for t in gpu)
    # Our image, tagged with the pinned Ray; the setup only checks it (the image ran launch/setup.sh).
    assert c["docker"]["image"].endswith(f"-ray{ray_pin()}-gpu")
    assert f"ray.__version__ == '{ray_pin()}'" in " ".join(c["setup_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(c["head_start_ray_commands"])


def test_onprem_cluster_builds_the_stack_with_setup_sh():
    c = load("onprem.yaml")
    assert c["provider"]["type"] == "local"
    assert c["max_workers"] == len(c["provider"]["worker_ips"])
    assert any("bash launch/setup.sh" in cmd for cmd in c["setup_commands"])
    assert {".venv", "runs", ".git"} <= set(c["rsync_exclude"])
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        assert ".venv/bin/activate" in cmd  # jobs then run the venv's `python`


def test_readme_explains_both():
    text = (ROOT / "cluster" / "README.md").read_text()
    for word in ("aws-gpu.yaml", "onprem.yaml", "ray up", "melanoma-dist launch ray", "ray down"):
        assert word in text
