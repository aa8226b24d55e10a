"""`melanoma-dist launch ray`: the job it builds, and a real submission to a 2-node Ray cluster.

The integration test starts a Ray head (with the dashboard, which serves the Jobs API)
and a second raylet with the `ray start` CLI on 127.0.0.1, submits a tiny 2-fold CV
through `melanoma-dist launch ray`, and checks the results. The cluster is stopped by
signalling exactly the processes it started (their process groups, their descendants
and anything carrying this test's marker variable): `ray stop` would also stop every
other Ray of this user on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from melanoma_dist.cli import build_parser
from melanoma_dist.config import load_config
from melanoma_dist.submit import jobs
from melanoma_dist.submit.command import command_argv
from tests.synthetic import make_dataset, tiny_run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ the job, without a cluster

def _launch_args(*argv: str):
    return build_parser().parse_args(["launch", "ray", *argv])


def test_entrypoint_is_a_command_our_cli_accepts():
    entrypoint = jobs.build_entrypoint("python", command_argv(_launch_args("--folds", "0,1")))
    args = build_parser().parse_args(jobs.cli_argv(entrypoint))
    assert (args.command, str(args.config), args.folds) == ("cv", jobs.JOB_CONFIG, "0,1")
    entrypoint = jobs.build_entrypoint("python", command_argv(_launch_args("--tune", "--nested")))
    args = build_parser().parse_args(jobs.cli_argv(entrypoint))
    assert (args.command, str(args.config), args.nested, args.resume) == ("tune", jobs.JOB_CONFIG, True, False)
    assert jobs.with_command("melanoma-dist cv --config /config/config.yaml", ["tune", "--nested"]) == \
        "melanoma-dist tune --config /config/config.yaml --nested"
    assert jobs.with_command("python -m melanoma_dist cv --config c.yaml", ["cv", "--folds", "2"]) == \
        "python -m melanoma_dist cv --config c.yaml --folds 2"
    assert jobs.cli_argv("melanoma-dist cv --config /config/config.yaml") == ["cv", "--config",
                                                                             "/config/config.yaml"]
    with pytest.raises(ValueError, match="not a melanoma-dist command"):
        jobs.cli_argv("python train.py")


def test_staged_working_dir_holds_code_and_config_but_no_venv(tmp_path):
    cfg = load_config(None, ["output_dir=/mnt/shared/out", "data.dataset_dir=/mnt/shared/ds"])
    staged = jobs.stage_working_dir(ROOT, cfg, tmp_path / "job", jobs.DEFAULT_EXCLUDES)
    assert (staged / "melanoma_dist" / "cli.py").is_file() and (staged / "pyproject.toml").is_file()
    assert not any((staged / d).exists() for d in (".venv", "runs", ".git"))
    assert not list(staged.rglob("__pycache__"))
    assert load_config(staged / jobs.JOB_CONFIG) == cfg
    env = jobs.build_runtime_env(staged, jobs.DEFAULT_EXCLUDES, ["A=1", "B=x=y"], [])
    assert env["env_vars"]["A"] == "1" and env["env_vars"]["B"] == "x=y" and "pip" not in env
    with pytest.raises(ValueError, match="KEY=VALUE"):
        jobs.build_runtime_env(staged, (), ["nope"], [])


@pytest.mark.parametrize("override,key", [("output_dir=runs/x", "output_dir"),
                                          ("data.dataset_dir=ds", "data.dataset_dir")])
def test_relative_paths_are_refused(override, key):
    cfg = load_config(None, ["output_dir=/shared/o", "data.dataset_dir=/shared/d", override])
    with pytest.raises(ValueError, match=f"{key}=.* is relative.*--set {key}=/mnt/shared/"):
        jobs.check_cluster_paths(cfg)


def test_no_address_is_an_error(monkeypatch, capsys, tmp_path):
    from melanoma_dist.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["launch", "ray", "--set", f"output_dir={tmp_path}", "--set", f"data.dataset_dir={tmp_path}"]) == 2
    assert "pass --address http://<head>:8265" in capsys.readouterr().err


# ------------------------------------------------------------------ a real 2-node cluster

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _our_processes(pgids: set[int], marker: str) -> list:
    """Processes this fixture started: in its process groups, carrying its marker, or below those."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) in pgids or p.environ().get("MELANOMA_DIST_TEST_CLUSTER") == marker:
                found[p.pid] = p
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def _stop(pgids: set[int], marker: str) -> None:
    import psutil

    procs = _our_processes(pgids, marker)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (dashboard on) and a second raylet, 2 CPUs each, on 127.0.0.1; yields (dashboard URL, env)."""
    temp = Path(tempfile.mkdtemp(prefix="mdray-"))  # short: Ray's socket paths must stay < 108 chars
    marker = uuid.uuid4().hex
    gcs, dashboard, client, agent_head, agent_worker = _free_ports(5)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The venv first on PATH: the job's `python` is then the one with the stack, as on a cluster image.
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
            "MELANOMA_DIST_TEST_CLUSTER": marker}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    commands = [
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         # Not the default 52365: other Ray instances on this machine may hold it.
         f"--dashboard-agent-listen-port={agent_head}", f"--temp-dir={temp}", *common],
        # Its own temp dir, as a second machine would have: runtime-env agents unpack a job's working_dir
        # under it, and one in a shared directory would replace the driver's current directory.
        [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent_worker}",
         f"--temp-dir={temp / 'w'}", *common],
    ]
    pgids: set[int] = set()
    try:
        for i, cmd in enumerate(commands):
            log = temp / f"ray-start-{i}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                pgids.add(proc.pid)  # a new session: its daemons keep this process group
                if proc.wait(timeout=180) != 0:
                    pytest.fail(f"`{shlex.join(cmd)}` failed:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop(pgids, marker)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _tiny_cv_config(tmp_path: Path, **sections: dict) -> Path:
    """A tiny `cv` config file (`synthetic.tiny_run`, one epoch, no retries); each keyword updates a section."""
    data = make_dataset(tmp_path, image_size=16, k=2)
    raw = tiny_run(data, tmp_path / "cv", pipeline={"batch_size": 8, "shuffle_buffer": 64},
                   train={"epochs": 1, "warmup_epochs": 0}, distributed={"max_retries": 0}, **sections)
    raw["data"] = json.loads(json.dumps(dataclasses.asdict(data)))  # with its sources: the job ingests on demand
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.integration
def test_cv_through_the_jobs_api(ray_cluster, tmp_path):
    address, env = ray_cluster
    config = _tiny_cv_config(tmp_path)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "melanoma_dist", "launch", "ray", "--address", address,
                           "--config", str(config)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    took = time.time() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "submitted Ray job" in out and "succeeded" in out
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert summary["folds_finished"] == [0, 1] and summary["num_oof_predictions"] == 40
    # Both folds ran on this cluster, through Horovod groups placed by Ray.
    nodes = {json.loads((tmp_path / "cv" / f"fold-{f}" / "metrics.json").read_text())["node_id"] for f in (0, 1)}
    assert nodes and all(nodes)
    print(f"\nJobs API cross-validation: {took:.0f}s (submit to SUCCEEDED), folds ran on {len(nodes)} node(s)")


@pytest.mark.integration
def test_search_through_the_jobs_api(ray_cluster, tmp_path):
    address, env = ray_cluster
    config = _tiny_cv_config(tmp_path, tune={"space": {"train.learning_rate": "grid([0.01])"},
                                             "search_algorithm": "grid", "num_samples": 1, "scheduler": "none",
                                             "estimate": "holdout", "outer_k": 3})
    proc = subprocess.run([sys.executable, "-m", "melanoma_dist", "launch", "ray", "--address", address,
                           "--config", str(config), "--tune"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "succeeded" in out and "tune/" in out
    run = tmp_path / "cv"
    best = load_config(run / "tune" / "best.yaml")
    assert best.train.learning_rate == pytest.approx(0.01)
    assert (run / "tune" / "trials.csv").is_file()
    # The held-out outer fold scored the chosen config: a `cv` result in output_dir itself.
    assert json.loads((run / "cv_summary.json").read_text())["folds_finished"]


@pytest.mark.integration
def test_a_failing_job_exits_non_zero(ray_cluster, tmp_path):
    address, env = ray_cluster
    # The dataset exists nowhere on the cluster and there is nothing to ingest: cv fails in the driver.
    proc = subprocess.run([sys.executable, "-m", "melanoma_dist", "launch", "ray", "--address", address,
                           "--no-follow", "--set", f"data.dataset_dir={tmp_path}/none",
                           "--set", f"output_dir={tmp_path}/out"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stderr and "ray job logs" in proc.stderr
