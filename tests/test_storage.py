"""Object-store URIs (melanoma_dist.storage) against a real S3 API server: moto, on 127.0.0.1.

The fixture starts moto's server in a thread and points the standard AWS variables at it
(fake credentials, `AWS_ENDPOINT_URL`); the code under test finds it the way it finds a
real bucket. Tiny generated images (tests/synthetic.py) are ingested from a bucket and from
disk, and the two datasets are compared; a fold is trained reading its dataset from the bucket.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from melanoma_dist import storage
from melanoma_dist.config import ConfigError, DataConfig, SourceConfig, load_config
from melanoma_dist.data import shards
from melanoma_dist.data.folds import load_folds, make_folds
from melanoma_dist.data.ingest import NotADatasetError, ingest
from melanoma_dist.data.pipeline import RowIndex
from tests.synthetic import write_class_folders

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (launch/requirements.txt)")

FAKE_KEY = "AKIAMELANOMATESTKEY0"
FAKE_SECRET = "melanoma-test-secret-do-not-log-0123456789"
BUCKET = "derm"


@pytest.fixture(scope="module")
def s3():
    """`s3://derm`, served by moto on 127.0.0.1, with the standard AWS variables pointing at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    requests_log = logging.getLogger("werkzeug")  # the server logs every request at INFO: keep failures readable
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups on this host
        pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()
    requests_log.setLevel(level)


def _source(path: str) -> SourceConfig:
    return SourceConfig(kind="folder", path=path, name="synthetic", label_type="melanoma")


def _data(source: str, dataset_dir: str) -> DataConfig:
    return DataConfig(sources=(_source(source),), dataset_dir=dataset_dir, label_scheme="melanoma",
                      image_size=16, encoding="png", rows_per_shard=7, ingest_workers=1)


@pytest.fixture(scope="module")
def images(s3, tmp_path_factory) -> tuple[Path, str]:
    """The same generated class folders on disk and under `s3://derm/src/images`."""
    local = write_class_folders(tmp_path_factory.mktemp("src") / "images", {"other": 12, "melanoma": 8})
    fs, inner = storage.filesystem(f"{s3}/src/images")
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return local, f"{s3}/src/images"


@pytest.fixture(scope="module")
def datasets(s3, images, tmp_path_factory) -> dict[str, str]:
    """Three ingests of the same images: disk to disk, bucket to disk, bucket to bucket."""
    local_src, uri_src = images
    tmp = tmp_path_factory.mktemp("datasets")
    out = {"disk": str(tmp / "from-disk"), "bucket": str(tmp / "from-bucket"), "store": f"{s3}/datasets/synthetic"}
    ingest(_data(str(local_src), out["disk"]), progress=False)
    ingest(_data(uri_src, out["bucket"]), progress=False)
    # Two decoding processes: each builds its own S3 client from the environment it inherits.
    ingest(dataclasses.replace(_data(uri_src, out["store"]), ingest_workers=2), progress=False)
    return out


def test_uris_in_config_are_kept_and_credentials_refused():
    cfg = load_config(None, ["output_dir=s3://derm/runs", "data.dataset_dir=gs://derm/dataset"])
    assert (cfg.output_dir, cfg.data.dataset_dir) == ("s3://derm/runs", "gs://derm/dataset")
    from melanoma_dist.schedule.cv import absolute_paths  # what every node reads: URIs are not made local

    assert absolute_paths(cfg).output_dir == "s3://derm/runs"
    from melanoma_dist.submit import jobs, k8s  # an object store is storage every node and Pod shares

    jobs.check_cluster_paths(cfg)
    k8s.check_config_paths(cfg, {k8s.DATA_CLAIM: "/data", k8s.RESULTS_CLAIM: "/results"})
    with pytest.raises(ValueError, match="is relative"):
        jobs.check_cluster_paths(load_config(None, ["output_dir=s3://derm/runs", "data.dataset_dir=ds"]))
    for value, expected in [(f"s3://{FAKE_KEY}:{FAKE_SECRET}@derm/runs", "user or password"),
                            (f"s3://{FAKE_KEY}@derm/runs", "user or password"),
                            ("hdfs://derm/runs", "unknown scheme"), ("s3:///runs", "names no bucket")]:
        with pytest.raises(ConfigError, match=expected) as e:
            load_config(None, [f"output_dir={value}"])
        assert FAKE_SECRET not in str(e.value) and FAKE_KEY not in str(e.value)
    with pytest.raises(ValueError, match="user or password"):
        storage.filesystem(f"s3://{FAKE_KEY}:{FAKE_SECRET}@derm/x")


def test_ingest_from_bucket_equals_ingest_from_disk(datasets, images):
    local_src, uri_src = images
    disk, bucket = shards.load_manifest(datasets["disk"]), shards.load_manifest(datasets["bucket"])
    # What differs: the recorded source paths (the URI) and the fingerprint of the files (paths, mtimes).
    assert bucket["sources"][0]["path"] == uri_src and disk["sources"][0]["path"] == str(local_src)
    assert bucket["fingerprint"]["sources"][0]["path"] == uri_src
    assert bucket["fingerprint"]["sources"][0]["files"]["count"] == disk["fingerprint"]["sources"][0]["files"]["count"]
    assert bucket["fingerprint"]["settings"] == disk["fingerprint"]["settings"]
    for m in (disk, bucket):
        del m["sources"][0]["path"], m["fingerprint"]
    assert bucket == disk and disk["num_images"] == 20 and disk["num_shards"] == 3
    # The shards: every column alike but `path`, which holds each image's URI.
    for a, b in zip(shards.shard_paths(datasets["disk"]), shards.shard_paths(datasets["bucket"])):
        ta, tb = pq.read_table(a), pq.read_table(b)
        assert ta.drop_columns([shards.PATH]).equals(tb.drop_columns([shards.PATH]))
        assert [p.replace(str(local_src), uri_src) for p in ta[shards.PATH].to_pylist()] == tb[shards.PATH].to_pylist()


def test_csv_source_in_bucket_scans_like_on_disk(s3, images, tmp_path):
    """A label CSV read from the bucket, its images found by listing prefixes; an unlabelled image reported."""
    import shutil

    from melanoma_dist.data.sources import scan_source

    root = Path(shutil.copytree(images[0], tmp_path / "csv-source"))
    files = sorted(root.rglob("*.png"))
    (root / "labels.csv").write_text("image_id,label,split\n" + "".join(
        f"{f.stem},{int(f.parent.name == 'melanoma')},{f.parent.name}\n" for f in files[1:]))
    fs, inner = storage.filesystem(f"{s3}/csv-source")
    pafs.copy_files(str(root), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    scans = [scan_source(SourceConfig(kind="csv", path=f"{base}/labels.csv", name="csv", label_type="melanoma",
                                      image_dir="{split}")) for base in (str(root), f"{s3}/csv-source")]
    local, remote = ([(r.image_id, r.raw_label, r.group, r.path.replace(base, "ROOT")) for r in scan.records]
                     for scan, base in zip(scans, (str(root), f"{s3}/csv-source")))
    assert remote == local and all(r.path.startswith(f"{s3}/csv-source/") for r in scans[1].records)
    assert len(local) == len(files) - 1
    assert scans[1].unlabelled == [str(files[0]).replace(str(root), f"{s3}/csv-source")]


def test_dataset_in_bucket_has_the_bytes_of_the_same_dataset_on_disk(datasets):
    store, bucket = datasets["store"], datasets["bucket"]
    assert storage.read_bytes(shards.manifest_path(store)) == Path(bucket, shards.MANIFEST).read_bytes()
    names = shards.load_manifest(store)["shards"]
    assert shards.shard_paths(store) == [f"{store}/{n}" for n in names]
    for name in names:
        assert storage.read_bytes(f"{store}/{name}") == Path(bucket, name).read_bytes()
    # Readers: light columns, images by row, folds written and read in the bucket.
    index = RowIndex.load(store)
    assert list(index.image_ids) == list(RowIndex.load(bucket).image_ids)
    assert shards.read_images(index.shard_paths[1], [0, 6]) == shards.read_images(Path(bucket, names[1]), [0, 6])
    summary = make_folds(store, 2, seed=42)
    assert summary == make_folds(bucket, 2, seed=42)
    assert (load_folds(store, 2, 42) == load_folds(bucket, 2, 42)).all()
    assert storage.is_file(f"{store}/folds/k2-seed42.json")


def test_store_dataset_replaced_whole_and_only_over_a_dataset(s3, images, tmp_path):
    _, uri_src = images
    target = f"{s3}/datasets/replaced"
    ingest(_data(uri_src, target), progress=False)
    make_folds(target, 2, seed=42)
    storage.write_bytes(f"{target}/notes.txt", b"mine")
    ingest(dataclasses.replace(_data(uri_src, target), rows_per_shard=10), progress=False)
    names = {n for n, _ in storage.listdir(target)}
    assert names == {"manifest.json", "notes.txt", "shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"}
    storage.write_bytes(f"{s3}/not-a-dataset/data.csv", b"x")
    with pytest.raises(NotADatasetError, match="not a melanoma-dist dataset"):
        ingest(_data(uri_src, f"{s3}/not-a-dataset"), progress=False)


def test_train_one_fold_with_dataset_and_results_in_the_bucket(s3, datasets, tmp_path, caplog, capsys):
    import yaml

    from melanoma_dist.cli import main
    from tests.synthetic import tiny_run

    store, out = datasets["store"], f"{s3}/runs/one"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run(_data("unused", store), out, train={"epochs": 1})))
    with caplog.at_level(logging.DEBUG):
        assert main(["train", "--config", str(config), "--fold", "0"]) == 0
        metrics = json.loads(storage.read_bytes(f"{out}/fold-0/metrics.json"))
        assert metrics["num_samples"] == int((load_folds(store, 2, 42) == 0).sum()) and metrics["epochs_run"] == 1
        # A second run with more epochs resumes from the checkpoint uploaded after epoch 1.
        assert main(["train", "--config", str(config), "--fold", "0", "--set", "train.epochs=2"]) == 0
    metrics = json.loads(storage.read_bytes(f"{out}/fold-0/metrics.json"))
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs_run"] == 2
    assert storage.read_bytes(f"{out}/fold-0/history.csv").decode().count("\n") == 3  # header + 2 epochs
    names = {n for n, _ in storage.listdir(f"{out}/fold-0")}
    assert {"model.keras", "predictions.csv", "metrics.json", "history.csv", "resume"} <= names
    assert not Path("s3:").exists()  # no URI taken for a local path (`Path("s3://b")` is `s3:/b`)
    # No credential in the logs, the printed output, the results or the dataset.
    written = [storage.read_bytes(f"{out}/fold-0/{n}").decode() for n in ("metrics.json", "predictions.csv")]
    texts = [caplog.text, *capsys.readouterr(), storage.read_bytes(shards.manifest_path(store)).decode(), *written]
    assert not [t for t in texts if FAKE_SECRET in t or FAKE_KEY in t]


@pytest.fixture(scope="module")
def cv_in_bucket(s3, datasets) -> dict:
    """A finished 2-fold `run_cv` with `output_dir` in the bucket, on a local Ray; with the cv config."""
    ray = pytest.importorskip("ray")
    from melanoma_dist.config import config_from_dict
    from melanoma_dist.schedule.cv import run_cv
    from tests.synthetic import tiny_run

    out = f"{s3}/runs/cv"
    cfg = config_from_dict(tiny_run(_data("unused", datasets["store"]), out, train={"epochs": 1}))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            mp.setenv(key, "1")  # the two folds share 2 cores fairly
        # address="local": a Ray of its own (never one running here already); its workers inherit the AWS variables.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            summary = run_cv(cfg)
        finally:
            ray.shutdown()
    return {"out": out, "cfg": cfg, "summary": summary}


@pytest.mark.integration
def test_cv_with_results_in_the_bucket(cv_in_bucket):
    """`run_cv` on a local Ray: each fold pushes its folder, the driver its aggregates; a re-run reads them back."""
    import ray

    from melanoma_dist.schedule.cv import run_cv

    out = cv_in_bucket["out"]
    assert cv_in_bucket["summary"]["folds_finished"] == [0, 1]
    first = [storage.info(f"{out}/fold-{f}/metrics.json").mtime for f in (0, 1)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_cv(cv_in_bucket["cfg"])  # the driver finds both results in the bucket
    finally:
        ray.shutdown()
    assert summary["folds_finished"] == [0, 1] and summary["folds_missing"] == []
    assert [storage.info(f"{out}/fold-{f}/metrics.json").mtime for f in (0, 1)] == first  # not retrained
    names = {n for n, _ in storage.listdir(out)}
    assert {"config.yaml", "run_manifest.json", "cv_summary.json", "cv_folds.csv", "oof_predictions.csv",
            "fold-0", "fold-1"} <= names
    assert json.loads(storage.read_bytes(f"{out}/cv_summary.json"))["folds_finished"] == [0, 1]
    assert FAKE_SECRET not in storage.read_bytes(f"{out}/run_manifest.json").decode()


@pytest.mark.integration
def test_report_export_evaluate_predict_on_a_result_in_the_bucket(cv_in_bucket, datasets, images, tmp_path, capsys,
                                                                  monkeypatch):
    """The evidence commands read a result in the bucket and write there; the report is that of a local copy."""
    from melanoma_dist.cli import main

    out = cv_in_bucket["out"]
    local = tmp_path / "cv"  # the same result on disk
    fs, inner = storage.filesystem(out)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    for result in (out, str(local)):
        assert main(["report", result, "--n-boot", "50"]) == 0
    assert f"report: {out}/report/report.html" in capsys.readouterr().out
    assert {"report.html", "report.json", "figures"} <= {n for n, _ in storage.listdir(f"{out}/report")}
    assert storage.is_file(f"{out}/model_card.md") and storage.is_file(f"{out}/report/figures/roc.png")
    remote, disk = (json.loads(storage.read_bytes(f"{r}/report/report.json")) for r in (out, local))
    assert remote["provenance"].pop("result_dir") == out and disk["provenance"].pop("result_dir") == str(local)
    for key in ("generated", "elapsed_s"):  # when, and how long
        del remote[key], disk[key]
    assert remote == disk

    assert main(["export", out, "--n-boot", "20"]) == 0
    # Again, with --out naming that export inside the result: replaced, its old objects downloaded once (one mirror).
    pulled, pull = [], storage.FolderMirror.pull
    monkeypatch.setattr(storage.FolderMirror, "pull", lambda self, **kw: (pulled.append(self.uri), pull(self, **kw)))
    assert main(["export", out, "--out", f"{out}/export", "--n-boot", "20"]) == 0
    assert pulled == [out]
    monkeypatch.undo()
    spec = json.loads(storage.read_bytes(f"{out}/export/model.json"))
    assert spec["provenance"]["result_dir"] == out and spec["members"] == ["folds/fold-0.keras", "folds/fold-1.keras"]
    assert {"fold-0.keras", "fold-1.keras"} == {n for n, _ in storage.listdir(f"{out}/export/folds")}
    assert not [n for n, _ in storage.listdir(out) if n.startswith(".")]  # no export's build folder went up

    # The training set as the "external" test set: a model in the bucket, a dataset in the bucket.
    assert main(["evaluate", f"{out}/export", datasets["store"], "--n-boot", "20"]) == 0
    ev = json.loads(storage.read_bytes(f"{out}/export/evaluations/synthetic/evaluation.json"))
    assert ev["model_dir"] == f"{out}/export" and ev["dataset_dir"] == datasets["store"]
    assert ev["audit_vs_training"]["flagged"] == ev["metrics"]["all"]["num_samples"] == 20  # all seen in training
    assert "synthetic" in storage.read_bytes(f"{out}/export/model_card.md").decode()
    assert main(["report", out, "--n-boot", "50"]) == 0  # the report lists the evaluation found in the bucket
    assert len(json.loads(storage.read_bytes(f"{out}/report/report.json"))["external_evaluations"]) == 1

    image = next(images[0].rglob("*.png"))
    assert main(["predict", f"{out}/export", str(image), "--json", str(tmp_path / "p.json")]) == 0
    scored = json.loads((tmp_path / "p.json").read_text())
    assert scored["model_dir"] == f"{out}/export" and scored["predictions"][0]["ok"]


def test_mirrored_folder_pushes_what_was_written_also_after_an_error(s3, tmp_path, monkeypatch, caplog):
    uri = f"{s3}/mirrored/run"
    for name, data in (("kept.txt", b"old"), ("gone.txt", b"x"), ("fold-0/resume/ckpt.bin", b"ckpt"),
                       ("fold-0/model.keras", b"model")):
        storage.write_bytes(f"{uri}/{name}", data)
    with pytest.raises(RuntimeError, match="boom"):
        with storage.mirrored(uri, pull_skip=("resume", "*.keras")) as m:
            copy = m.local
            assert copy.name == "run" and sorted(p.name for p in copy.rglob("*") if p.is_file()) == [
                "gone.txt", "kept.txt"]  # neither the checkpoint nor the model came down
            (copy / "report").mkdir()
            (copy / "report" / "report.json").write_text("{}")
            (copy / "gone.txt").unlink()
            assert m.name_of(copy / "report" / "report.json") == f"{uri}/report/report.json"
            raise RuntimeError("boom")
    assert not copy.exists()  # the temporary copy is removed
    assert storage.read_bytes(f"{uri}/report/report.json") == b"{}"  # written before the error: kept
    assert not storage.is_file(f"{uri}/gone.txt")  # deleted here: deleted there
    assert [storage.read_bytes(f"{uri}/{n}") for n in ("kept.txt", "fold-0/resume/ckpt.bin", "fold-0/model.keras")
            ] == [b"old", b"ckpt", b"model"]  # unchanged or not pulled: left as they were

    # A failing upload after an error is logged; the error raised is the body's.
    def fail(self, last=()):
        raise OSError("bucket unreachable")

    monkeypatch.setattr(storage.FolderMirror, "push", fail)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="boom"):
        with storage.mirrored(uri):
            raise RuntimeError("boom")
    assert "could not upload" in caplog.text and "bucket unreachable" in caplog.text
    with storage.mirrored(tmp_path) as m:  # a local folder is worked in directly
        assert m.local == tmp_path and m.name_of(tmp_path / "a") == tmp_path / "a"


def test_mirror_pulls_only_objects_changed_since_its_last_pull(s3, tmp_path, monkeypatch):
    uri = f"{s3}/mirrored/pulls"
    for name in ("history.csv", "metrics.json"):
        storage.write_bytes(f"{uri}/fold-0/{name}", b"epoch 1")
    copied = []
    copy_files = storage.pafs.copy_files
    monkeypatch.setattr(storage.pafs, "copy_files",
                        lambda src, dst, **kw: (copied.append(dst), copy_files(src, dst, **kw)))
    mirror = storage.FolderMirror(uri, tmp_path / "pulls")
    mirror.pull()
    assert len(copied) == 2
    mirror.pull()
    assert len(copied) == 2  # nothing changed: nothing downloaded
    storage.write_bytes(f"{uri}/fold-0/history.csv", b"epoch 1\nepoch 2")
    (mirror.local / "fold-0" / "metrics.json").unlink()
    mirror.pull()
    assert sorted(Path(p).name for p in copied[2:]) == ["history.csv", "metrics.json"]  # changed there, gone here
    assert (mirror.local / "fold-0" / "history.csv").read_bytes() == b"epoch 1\nepoch 2"


@pytest.mark.integration
def test_tune_with_results_in_the_bucket_resumes_from_it(s3, datasets, tmp_path, capsys):
    """A search (2 trials, a held-out outer fold) whose every file is in the bucket; restored from it; reported."""
    ray = pytest.importorskip("ray")
    import yaml

    from melanoma_dist.cli import main
    from melanoma_dist.tune.results import read_trials
    from tests.synthetic import tiny_run

    out = f"{s3}/runs/search"
    raw = tiny_run(_data("unused", datasets["store"]), out, train={"epochs": 1, "warmup_epochs": 0}, tune={
        "space": {"train.learning_rate": "grid([0.02, 0.05])"}, "search_algorithm": "grid", "num_samples": 1,
        "scheduler": "none", "folds_in_parallel": 1, "estimate": "holdout", "outer_k": 3})
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            mp.setenv(key, "1")
        # A Ray of its own (the command joins it), whose workers inherit the AWS variables: the trials
        # write to the bucket themselves.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            assert main(["tune", "--config", str(config)]) == 0
            assert f"results in {out}/tune " in capsys.readouterr().out
            rows = read_trials(f"{out}/tune")  # the reader takes the URI
            assert sorted(float(r["train.learning_rate"]) for r in rows) == [0.02, 0.05]
            assert all(r["state"] == "finished" and int(r["folds_finished"]) == 2 for r in rows)
            fold_written = {(r["trial_id"], f): storage.info(f"{out}/tune/trials/{r['trial_id']}/fold-{f}/metrics.json"
                                                              ).mtime for r in rows for f in (0, 1)}
            # Restored from the bucket: no trial is run again, no fold retrained.
            assert main(["tune", "--config", str(config), "--resume"]) == 0
        finally:
            ray.shutdown()
    assert [r["trial_id"] for r in read_trials(f"{out}/tune")] == [r["trial_id"] for r in rows]
    assert {k: storage.info(f"{out}/tune/trials/{k[0]}/fold-{k[1]}/metrics.json").mtime
            for k in fold_written} == fold_written

    summary = json.loads(storage.read_bytes(f"{out}/tune/tune_summary.json"))
    assert summary["num_trials"] == 2 and summary["chosen"]["best_trial"] in {r["trial_id"] for r in rows}
    assert summary["outer_folds"][0]["outer_score"] is not None  # the chosen config scored on outer fold 0
    assert {"trials.csv", "trials.md", "best.yaml", "outer-0"} <= {n for n, _ in storage.listdir(f"{out}/tune")}
    assert {"search.json", "experiment", "dataset"} <= {n for n, _ in storage.listdir(f"{out}/tune/outer-0")}
    for r in rows:  # each trial is a cross-validation result in the bucket
        assert {"config.yaml", "params.json", "cv_summary.json", "oof_predictions.csv", "fold-0", "fold-1"} <= {
            n for n, _ in storage.listdir(f"{out}/tune/trials/{r['trial_id']}")}
    assert storage.is_file(f"{out}/fold-0/metrics.json") and not storage.is_dir(f"{out}/fold-1")
    fs, inner = storage.filesystem(out)
    found = [i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
    assert [p for p in found if p.endswith("tuner.pkl")]  # Ray Tune's own state, what --resume restored
    assert not [p for p in found if FAKE_SECRET.encode() in storage.read_bytes(f"s3://{p}")]  # no credential stored

    assert main(["report", out, "--n-boot", "20"]) == 0
    report = json.loads(storage.read_bytes(f"{out}/report/report.json"))
    assert len(report["tune"]["trials"]) == 2 and report["tune"]["summary"]["estimate"] == "holdout"


def test_source_listing_in_a_bucket_stats_by_folder_and_sees_changes(s3, images, tmp_path):
    from melanoma_dist.data.fingerprint import file_listing

    local, uri = images
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png"))[:3]
    paths = [f"{uri}/{n}" for n in names] + [f"{uri}/other/missing.png"]
    stats = storage.stat_objects(paths)
    for n, path in zip(names, paths):
        assert stats[path][0] == (local / n).stat().st_size == storage.info(path).size
    assert stats[paths[-1]] is None
    # Rewriting one object (another size) changes the listing that decides whether a dataset is stale.
    before = file_listing(paths)
    copy = f"{s3}/copy/images"
    fs, inner = storage.filesystem(copy)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    moved = [p.replace(uri, copy) for p in paths]
    unchanged = file_listing(moved)
    storage.write_bytes(moved[0], b"not the same image")
    changed = file_listing(moved)
    assert before["count"] == unchanged["count"] == changed["count"] == 4
    assert unchanged["bytes"] == before["bytes"] and changed["bytes"] != unchanged["bytes"]
    assert changed["sha256"] != unchanged["sha256"]
