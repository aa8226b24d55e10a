"""Hardening of the fold scheduler (issue 11): which errors are retried, hung groups,
leaked placement groups, GPU placement, and `gpus_per_worker` at config load.

The Ray tests run real Horovod groups (through `run_horovod_group`) on one
simulated 2-node cluster of 2 CPUs and 2 fake GPUs per node (Ray only counts the
GPUs and sets CUDA_VISIBLE_DEVICES, so no GPU is needed). Their rank bodies are
tiny functions of this module: no TensorFlow, so a group starts in seconds.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from melanoma_dist.config import ConfigError, config_from_dict, load_config
from melanoma_dist.schedule.cv import FoldFailed, is_healable, run_fold_with_retries
from melanoma_dist.schedule.horovod_group import (GroupHung, GroupSpec, PlacementTimeout, placement_strategy,
                                                  run_horovod_group)

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

GPU_ENV = ("CUDA_VISIBLE_DEVICES", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", "HOROVOD_RANK",
           "HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")


# ------------------------------------------------------------------ rank bodies (run in the Ray workers)

def _bad_config(cfg: dict, fold: int, attempt: int) -> None:
    raise ValueError(f"the dataset holds 16px images but data.image_size is 17 (attempt {attempt})")


def _rank1_dies_on_first_attempt(cfg: dict, fold: int, attempt: int) -> dict:
    if attempt == 1 and os.environ["HOROVOD_RANK"] == "1":
        os._exit(1)  # the process dies, as on an OOM kill or a segfault
    return {"attempt": attempt}


def _hang(*_args: object) -> None:
    time.sleep(3600)


def _env(*_args: object) -> dict:
    return {"node": ray.get_runtime_context().get_node_id(), "own_gpu": str(ray.get_gpu_ids()[0]),
            **{k: os.environ.get(k) for k in GPU_ENV}}


def _pins_own_gpu(rank: dict) -> bool:
    """Pinning visible GPU #local_rank (as `init_worker` does) picks the GPU Ray gave this rank."""
    return rank["CUDA_VISIBLE_DEVICES"].split(",")[int(rank["HOROVOD_LOCAL_RANK"])] == rank["own_gpu"]


# ------------------------------------------------------------------ without Ray

@pytest.mark.parametrize("gpus,workers,nodes,expected", [
    (1, 2, [{"CPU": 2, "GPU": 2}, {"CPU": 2, "GPU": 2}], "STRICT_PACK"),  # the fold fits one node
    (1, 4, [{"CPU": 4, "GPU": 2}, {"CPU": 4, "GPU": 2}], "PACK"),  # it does not: as few nodes as possible
    (0, 2, [{"CPU": 1}, {"CPU": 1}], "PACK"),
    (0, 2, [{"CPU": 1}, {"CPU": 8}], "STRICT_PACK"),
    (0, 1, [], "PACK"),  # no node yet (an autoscaler will add one)
])
def test_placement_strategy(gpus, workers, nodes, expected):
    assert placement_strategy(GroupSpec(workers, 1, gpus), nodes) == expected


HEALABLE_CASES = [
    (ValueError("data.image_size is 17"), False),
    (FileNotFoundError("no shard in /data"), False),
    (KeyError("label"), False),
    (GroupHung("no progress"), True),
    (PlacementTimeout("not placed"), True),
    (RuntimeError("Horovod has been shut down. This was caused by an exception on one of the ranks"), True),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer"), True),
]


@pytest.mark.parametrize("error,expected", HEALABLE_CASES)
def test_is_healable(error, expected):
    assert is_healable(error) is expected


def test_is_healable_ray_errors():
    from ray.exceptions import ActorDiedError, NodeDiedError, ObjectLostError, RayTaskError, WorkerCrashedError

    assert all(is_healable(e) for e in (ActorDiedError(), WorkerCrashedError(), NodeDiedError("n"),
                                        ObjectLostError("00" * 28, "owner", "call site")))
    # What a rank raised reaches the driver wrapped in a RayTaskError: its cause decides.
    wrapped = RayTaskError("fn", "traceback", ValueError("bad shape"))
    assert not is_healable(wrapped)
    assert is_healable(RayTaskError("fn", "traceback", RuntimeError("Horovod has been shut down")))


@pytest.mark.parametrize("overrides,message", [
    (["distributed.gpus_per_worker=2"], "distributed.gpus_per_worker must be 0 or 1, got 2: each Horovod rank "
                                        "uses one GPU"),
    (["distributed.gpus_per_worker=4", "distributed.workers_per_fold=2"], "distributed.workers_per_fold=8"),
    (["distributed.progress_timeout_s=-1"], "distributed.progress_timeout_s must be >= 0"),
    (["distributed.stall_shutdown_s=-5"], "distributed.stall_shutdown_s must be >= 0"),
])
def test_distributed_config_rejects(overrides, message):
    with pytest.raises(ConfigError, match="distributed") as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_stall_check_env():
    assert GroupSpec(1, stall_shutdown_s=600).worker_env()["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "600"
    assert GroupSpec(1, stall_shutdown_s=30).worker_env()["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "30"
    assert "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS" not in GroupSpec(1, stall_shutdown_s=0).worker_env()


# ------------------------------------------------------------------ on a 2-node cluster

@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def free(cluster):
    """Assert, after the test, that every resource the test used is free again."""
    before = ray.available_resources()
    yield
    deadline = time.time() + 30
    while ray.available_resources() != before and time.time() < deadline:
        time.sleep(0.5)  # Ray updates its resource view every few hundred ms
    assert ray.available_resources() == before
    pgs = ray.util.placement_group_table().values()
    assert all(pg["state"] == "REMOVED" for pg in pgs), [(pg["name"], pg["state"]) for pg in pgs]


def fold_config(tmp_path, **distributed):
    return config_from_dict({"output_dir": str(tmp_path / "run"),
                             "distributed": {"workers_per_fold": 2, "cpus_per_worker": 1, "max_retries": 2,
                                             **distributed}})


@pytest.mark.integration
def test_deterministic_error_fails_at_once(free, tmp_path, caplog):
    with pytest.raises(FoldFailed, match="not retried.*ValueError: the dataset holds 16px images but "
                                         "data.image_size is 17 \\(attempt 1\\)"):
        run_fold_with_retries(fold_config(tmp_path), 0, worker=_bad_config)
    assert "attempt 2" not in caplog.text


@pytest.mark.integration
def test_killed_worker_is_retried(free, tmp_path):
    assert run_fold_with_retries(fold_config(tmp_path), 0, worker=_rank1_dies_on_first_attempt) == {"attempt": 2}


@pytest.mark.integration
def test_hung_group_is_torn_down_retried_then_failed(free, tmp_path):
    start = time.time()
    with pytest.raises(FoldFailed, match=r"fold 0 failed 2 time\(s\) \(distributed.max_retries=1\); last error: "
                                         r"GroupHung: .*fold-0-attempt-2 made no progress for 3s .*"
                                         r"raise distributed.progress_timeout_s"):
        run_fold_with_retries(fold_config(tmp_path, progress_timeout_s=3, max_retries=1), 0, worker=_hang)
    # Two attempts of (start a group, 3 s without progress, tear down); without the timeout: forever.
    assert time.time() - start < 120


@pytest.mark.integration
def test_ctrl_c_releases_the_group(free):
    def interrupt() -> float:  # Ctrl-C reaches the driver while it waits for the ranks
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_horovod_group(_hang, [], GroupSpec(2, name="ctrl-c"), progress=interrupt)


@pytest.mark.integration
def test_stop_event_ends_a_running_fold(free, tmp_path):
    stop = threading.Event()
    threading.Timer(8, stop.set).start()
    with pytest.raises(FoldFailed, match="not retried.*GroupCancelled: stopped by the driver"):
        run_fold_with_retries(fold_config(tmp_path), 0, worker=_hang, stop=stop)


@pytest.mark.integration
def test_placement_timeout_removes_the_pending_group(free):
    with pytest.raises(PlacementTimeout, match="were not placed within 2s"):
        run_horovod_group(_env, [], GroupSpec(1, cpus_per_worker=3, queue_timeout_s=2, name="too-big"))


@pytest.mark.integration
def test_gpu_ranks_of_a_node_see_its_gpus(free):
    ranks = run_horovod_group(_env, [], GroupSpec(2, 1, 1, name="one-node"))
    # STRICT_PACK: the fold fits one node, so both ranks are there and see both of its GPUs.
    assert ranks[0]["node"] == ranks[1]["node"]
    assert [sorted(r["CUDA_VISIBLE_DEVICES"].split(",")) for r in ranks] == [["0", "1"], ["0", "1"]]
    assert [(r["HOROVOD_LOCAL_RANK"], r["HOROVOD_LOCAL_SIZE"]) for r in ranks] == [("0", "2"), ("1", "2")]
    assert all(_pins_own_gpu(r) for r in ranks)
    assert ranks[0]["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "1800"


@pytest.mark.integration
def test_gpu_fold_larger_than_a_node_packs_two_nodes(free):
    ranks = run_horovod_group(_env, [], GroupSpec(4, 1, 1, name="two-nodes"))
    by_node: dict[str, list[dict]] = {}
    for r in ranks:
        by_node.setdefault(r["node"], []).append(r)
    assert len(by_node) == 2
    for node_ranks in by_node.values():  # per node: 2 ranks, local ranks 0 and 1, each seeing both GPUs
        assert sorted(r["HOROVOD_LOCAL_RANK"] for r in node_ranks) == ["0", "1"]
        assert all(sorted(r["CUDA_VISIBLE_DEVICES"].split(",")) == ["0", "1"] for r in node_ranks)
        assert all(_pins_own_gpu(r) for r in node_ranks)
