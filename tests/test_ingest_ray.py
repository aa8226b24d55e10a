"""Tests for melanoma_dist.data.ingest_ray: ingest with Ray Data on a simulated 2-node cluster."""

import logging

import pytest

from melanoma_dist.config import DataConfig, SourceConfig
from melanoma_dist.data.ingest import ingest
from melanoma_dist.data.ingest_ray import use_ray
from melanoma_dist.data.shards import MANIFEST
from tests.synthetic import write_class_folders

ENGINE_CASES = [  # (engine, address, RAY_ADDRESS, expected)
    ("local", "host:6379", "host:6379", False),
    ("ray", "", "", True),
    ("auto", "host:6379", "", True),
    ("auto", "", "host:6379", True),
    ("auto", "", "", False),  # no cluster to run on (and this process joined no Ray)
]


@pytest.mark.parametrize("engine,address,env,expected", ENGINE_CASES)
def test_use_ray(monkeypatch, engine, address, env, expected):
    monkeypatch.setenv("RAY_ADDRESS", env)
    assert use_ray(engine, address) is expected


def _source(tmp_path) -> DataConfig:
    root = write_class_folders(tmp_path / "images", {"other": 18, "melanoma": 12})
    (root / "melanoma" / "img_melanoma_bad.png").write_bytes(b"not a png")
    return DataConfig(sources=(SourceConfig(kind="folder", path=str(root), name="synthetic", label_type="melanoma"),),
                      label_scheme="melanoma", image_size=16, encoding="png", rows_per_shard=7, ingest_workers=1)


def test_ray_data_ingest_equals_local_ingest_and_uses_both_nodes(tmp_path, caplog):
    ray = pytest.importorskip("ray")
    from tests.clusters import simulated_cluster

    cfg = _source(tmp_path)
    local = DataConfig(**{**vars(cfg), "dataset_dir": str(tmp_path / "local"), "ingest_engine": "local"})
    on_ray = DataConfig(**{**vars(cfg), "dataset_dir": str(tmp_path / "ray")})  # auto: an address is given
    m_local = ingest(local, progress=False)
    with simulated_cluster(cpus_per_node=1) as (c, nodes):
        with caplog.at_level(logging.INFO, logger="melanoma_dist.data.ingest_ray"):
            m_ray = ingest(on_ray, progress=False, address=c.address)
        assert not ray.is_initialized()  # ingest joined the cluster, so it left it again

    files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert MANIFEST in files and len(files) == 1 + 5  # 30 images in shards of 7
    for name in files:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert m_ray == m_local and m_ray["num_images"] == 30 and m_ray["num_skipped"] == 1
    assert m_ray["skipped"][0]["path"].endswith("img_melanoma_bad.png")
    assert m_ray["skipped"][0]["reason"] == "not an image (unrecognised format)"

    per_node = [r.getMessage() for r in caplog.records if "images prepared per node" in r.getMessage()]
    assert len(per_node) == 1
    for node in nodes:  # the head has no CPU: both nodes prepared images
        assert f"node {node.node_id[:8]}: " in per_node[0], per_node[0]
