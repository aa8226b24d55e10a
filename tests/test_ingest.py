"""Tests for melanoma_dist.data.ingest, on small subsets of the real HAM10000 and ISIC 2017 data."""

import io
import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from melanoma_dist.config import DataConfig, SourceConfig
from melanoma_dist.data import ingest as ingest_module
from melanoma_dist.data.ingest import ingest
from melanoma_dist.data.shards import COLUMNS, MANIFEST, load_manifest, read_columns, read_images, shard_paths
from melanoma_dist.data.sources import MISSING_IMAGE
from tests.synthetic import write_class_folders


def _ham(path, **kw) -> SourceConfig:
    return SourceConfig(kind="ham10000", path=str(path), name=kw.pop("name", "ham"), **kw)


def _isic(csv_path, **kw) -> SourceConfig:
    kw = {"name": "isic2017", "label_column": "melanoma", "label_type": "melanoma", **kw}
    return SourceConfig(kind="csv", path=str(csv_path), **kw)


def _data(tmp_path, *sources, **kw) -> DataConfig:
    kw = {"image_size": 32, "rows_per_shard": 16, "ingest_workers": 2, **kw}
    return DataConfig(sources=tuple(sources), dataset_dir=str(tmp_path / kw.pop("name", "ds")), **kw)


def test_ham_subset_counts_and_manifest(ham_subset, tmp_path, read_csv):
    cfg = _data(tmp_path, _ham(ham_subset), label_scheme="ham7")
    manifest = ingest(cfg, progress=False)
    _, rows = read_csv(ham_subset / "HAM10000_metadata.csv")
    dx_counts = Counter(r["dx"] for r in rows)

    assert manifest == load_manifest(cfg.dataset_dir)
    assert manifest["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert manifest["counts"] == {dx: dx_counts[dx] for dx in manifest["class_names"]} == {dx: 6 for dx in dx_counts}
    assert manifest["num_images"] == 42 and manifest["num_skipped"] == 0 and manifest["skipped"] == []
    assert manifest["num_shards"] == 3 and manifest["shards"][-1] == "shard-00002-of-00003.parquet"
    assert manifest["columns"] == list(COLUMNS)
    assert {k: manifest[k] for k in ("schema_version", "label_scheme", "image_size", "resize", "encoding",
                                     "rows_per_shard")} == {
        "schema_version": 1, "label_scheme": "ham7", "image_size": 32, "resize": "crop", "encoding": "jpeg",
        "rows_per_shard": 16}
    assert manifest["sources"] == [{"name": "ham", "kind": "ham10000", "path": str(ham_subset), "label_type": "dx",
                                    "num_images": 42, "num_skipped": 0, "num_unlabelled": 0,
                                    "unlabelled_sample": []}]
    assert manifest["num_unlabelled"] == 0 and manifest["fingerprint"]["sources"][0]["files"]["count"] == 43

    t = read_columns(cfg.dataset_dir, ["image_id", "label", "label_name", "group", "source"]).to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert [r["image_id"] for r in t] == sorted(by_id)
    for r in t:
        assert r["label_name"] == by_id[r["image_id"]]["dx"] == manifest["class_names"][r["label"]]
        assert r["group"] == by_id[r["image_id"]]["lesion_id"] and r["source"] == "ham"
    assert len({r["group"] for r in t}) == 28  # 14 lesions with 2 images, 14 with 1
    image = Image.open(io.BytesIO(read_images(shard_paths(cfg.dataset_dir)[0], [0])[0]))
    assert (image.format, image.size, image.mode) == ("JPEG", (32, 32), "RGB")


def test_ingest_is_deterministic_whatever_the_workers(ham_subset, tmp_path):
    a = _data(tmp_path, _ham(ham_subset), name="a", ingest_workers=1)
    b = _data(tmp_path, _ham(ham_subset), name="b", ingest_workers=2)
    ingest(a, progress=False)
    ingest(b, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and MANIFEST in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _write_image(path, im: Image.Image, fmt: str):
    im.save(path, format=fmt)


def test_large_images_give_shards_of_fewer_rows(ham_subset, tmp_path):
    # Shards are sized by bytes too: at 128 px, 40 KB of images is a few rows per shard.
    cfg = _data(tmp_path, _ham(ham_subset), image_size=128, shard_bytes=40_000)
    manifest = ingest(cfg, progress=False)
    sizes = [[len(b) for b in read_images(p)] for p in shard_paths(cfg.dataset_dir)]
    assert manifest["shard_bytes"] == 40_000 and manifest["num_shards"] == len(sizes) > 42 // 16 + 1
    assert sum(map(len, sizes)) == read_columns(cfg.dataset_dir, ["image_id"]).num_rows == 42
    assert all(len(s) <= 16 and (sum(s) <= 40_000 or len(s) == 1) for s in sizes)
    # Each shard is as full as the budget allows: the next shard's first image did not fit.
    assert all(sum(a) + b[0] > 40_000 or len(a) == 16 for a, b in zip(sizes, sizes[1:]))


def test_bad_inputs_are_skipped_or_converted(tmp_path, real_jpeg):
    root = tmp_path / "folder"
    (root / "melanoma").mkdir(parents=True)
    (root / "other").mkdir()
    good = root / "other"
    shutil.copy(real_jpeg, good / "real.jpg")
    (good / "zero.jpg").write_bytes(b"")
    (good / "text.jpg").write_text("this is not an image\n")
    data = real_jpeg.read_bytes()
    (root / "melanoma" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _write_image(root / "melanoma" / "tiny.png", Image.new("RGB", (5, 5)), "PNG")
    _write_image(good / "gray.png", Image.new("L", (20, 20), 100), "PNG")
    rgba = Image.new("RGBA", (20, 20), (0, 255, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 20))
    _write_image(root / "melanoma" / "rgba.png", rgba, "PNG")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.paste(1, (10, 0, 20, 20))
    pal.info["transparency"] = 0
    _write_image(good / "palette.png", pal, "PNG")
    _write_image(good / "cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG")
    g16 = np.tile(np.linspace(500, 2500, 20), (20, 1)).astype("<u2")
    _write_image(good / "gray16.png", Image.frombytes("I;16", (20, 20), g16.tobytes()), "PNG")

    cfg = _data(tmp_path, SourceConfig(kind="folder", path=str(root), name="bad", label_type="melanoma"),
                encoding="png", image_size=20)
    manifest = ingest(cfg, progress=False)

    reasons = {s["image_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"zero", "text", "truncated", "tiny"}
    assert reasons["zero"] == "empty file (0 bytes)"
    assert reasons["text"].startswith("not an image")
    assert reasons["truncated"].startswith("corrupt or truncated image")
    assert reasons["tiny"].startswith("image is 5x5 px")
    assert all(s["source"] == "bad" and s["path"].startswith(str(root)) for s in manifest["skipped"])
    assert manifest["num_skipped"] == 4 and manifest["sources"][0]["num_skipped"] == 4
    assert manifest["counts"] == {"other": 5, "melanoma": 1}

    t = read_columns(cfg.dataset_dir, ["image_id", "label_name"]).to_pylist()
    ids = [r["image_id"] for r in t]
    images = dict(zip(ids, read_images(shard_paths(cfg.dataset_dir)[0])))
    px = {k: np.asarray(Image.open(io.BytesIO(v))).astype(int) for k, v in images.items()}
    assert {k: v.shape for k, v in px.items()} == {k: (20, 20, 3) for k in ids}
    assert px["gray"][10, 10].tolist() == [100, 100, 100]
    assert px["rgba"][10, 2].tolist() == [255, 0, 0] and px["rgba"][10, 17].tolist() == [0, 0, 0]
    assert px["palette"][10, 2].tolist() == [0, 0, 0] and px["palette"][10, 17].tolist() == [0, 255, 0]
    assert np.abs(px["cmyk"][10, 10] - [255, 0, 0]).max() <= 8
    assert px["gray16"][10, 0].tolist() == [0, 0, 0] and px["gray16"][10, 19].tolist() == [255, 255, 255]


def test_raw_encoding_stores_the_png_pixels_and_hashes(tmp_path):
    """`encoding: raw` keeps exactly the pixels PNG keeps, with the same hashes (duplicate detection)."""
    root = write_class_folders(tmp_path / "images", {"other": 3, "melanoma": 2}, size=24)
    source = SourceConfig(kind="folder", path=str(root), name="synthetic", label_type="melanoma")
    stored = {}
    for encoding in ("png", "raw"):
        cfg = _data(tmp_path, source, name=encoding, encoding=encoding, image_size=16, rows_per_shard=2,
                    ingest_workers=1)
        assert ingest(cfg, progress=False)["encoding"] == encoding
        stored[encoding] = read_columns(cfg.dataset_dir, ["image_id", "image", "pixel_sha256", "phash"]).to_pydict()
    png, raw = stored["png"], stored["raw"]
    assert raw["image_id"] == png["image_id"] and len(raw["image_id"]) == 5
    assert raw["pixel_sha256"] == png["pixel_sha256"] and raw["phash"] == png["phash"]
    assert {len(b) for b in raw["image"]} == {16 * 16 * 3}
    # Raw pixels are stored without zstd: raw shards are for readers with no CPU to spare.
    meta = pq.ParquetFile(shard_paths(tmp_path / "raw")[0]).metadata.row_group(0)
    assert meta.column(COLUMNS.index("image")).compression == "UNCOMPRESSED"
    for png_bytes, raw_bytes in zip(png["image"], raw["image"]):
        pixels = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))
        np.testing.assert_array_equal(np.frombuffer(raw_bytes, np.uint8).reshape(16, 16, 3), pixels)


def test_multi_source_melanoma_scheme(ham_subset, isic_subset, tmp_path, read_csv):
    cfg = _data(tmp_path, _ham(ham_subset), _isic(isic_subset), label_scheme="melanoma")
    manifest = ingest(cfg, progress=False)
    assert manifest["num_images"] == 42 + 12
    assert manifest["counts"] == {"other": 36 + 6, "melanoma": 6 + 6}
    assert [(s["name"], s["num_images"]) for s in manifest["sources"]] == [("ham", 42), ("isic2017", 12)]
    t = read_columns(cfg.dataset_dir, ["image_id", "source", "label", "group"]).to_pylist()
    assert [r["source"] for r in t] == ["ham"] * 42 + ["isic2017"] * 12
    _, isic_rows = read_csv(isic_subset)
    isic = {r["image_id"]: int(r["melanoma"]) for r in isic_rows}
    assert {r["image_id"]: r["label"] for r in t if r["source"] == "isic2017"} == isic
    assert all(r["group"] == r["image_id"] for r in t if r["source"] == "isic2017")


def test_source_that_cannot_provide_scheme(isic_subset, tmp_path):
    cfg = _data(tmp_path, _isic(isic_subset), label_scheme="ham7")
    with pytest.raises(ValueError, match="source 'isic2017' has melanoma 0/1 labels and cannot provide label "
                                         "scheme 'ham7'; use label_scheme: melanoma"):
        ingest(cfg, progress=False)
    assert not (tmp_path / "ds").exists()


def test_unknown_label_names_file_and_line(isic_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(isic_subset)
    rows[4] = {**rows[4], "melanoma": "maybe"}
    csv_path = write_csv(tmp_path / "bad_label.csv", header, rows)
    cfg = _data(tmp_path, _isic(csv_path, image_dir=f"{isic_subset.parent}/{{split}}"))
    with pytest.raises(ValueError, match=rf"{csv_path} line 6: unknown melanoma label 'maybe'; valid values: 0, 1"):
        ingest(cfg, progress=False)


def test_missing_label_column_names_it(isic_subset, tmp_path):
    cfg = _data(tmp_path, _isic(isic_subset, label_column="target"))
    with pytest.raises(ValueError, match="labels.csv: missing column 'target'; columns found"):
        ingest(cfg, progress=False)


def test_missing_image_row_is_skipped_not_fatal(isic_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(isic_subset)
    csv_path = write_csv(tmp_path / "extra_row.csv", header, rows + [{**rows[0], "image_id": "ISIC_9999999"}])
    manifest = ingest(_data(tmp_path, _isic(csv_path, image_dir=f"{isic_subset.parent}/{{split}}")), progress=False)
    assert manifest["num_images"] == 12
    assert [(s["image_id"], s["reason"]) for s in manifest["skipped"]] == [("ISIC_9999999", MISSING_IMAGE)]


def test_duplicate_ids_across_sources(ham_subset, tmp_path):
    cfg = _data(tmp_path, _ham(ham_subset, name="one"), _ham(ham_subset, name="two"))
    with pytest.raises(ValueError, match=r"image id 'ISIC_\d+' is in both source 'one' and source 'two' "
                                         r"\(42 ids shared\)"):
        ingest(cfg, progress=False)
    cfg = _data(tmp_path, _ham(ham_subset), _ham(ham_subset))
    with pytest.raises(ValueError, match="two data.sources are named 'ham'"):
        ingest(cfg, progress=False)


def test_no_image_survives_lists_reasons(tmp_path):
    (tmp_path / "src" / "mel").mkdir(parents=True)
    (tmp_path / "src" / "mel" / "a.jpg").write_bytes(b"")
    (tmp_path / "src" / "mel" / "b.jpg").write_bytes(b"")
    cfg = _data(tmp_path, SourceConfig(kind="folder", path=str(tmp_path / "src")))
    with pytest.raises(ValueError, match=r"no image could be ingested; skipped: "
                                         r"\{'empty file \(0 bytes\)': 2\} \(first: .*a.jpg\)"):
        ingest(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary directory left


def test_replaces_dataset_but_never_other_folders(ham_subset, isic_subset, tmp_path, monkeypatch):
    cfg = _data(tmp_path, _isic(isic_subset))
    ingest(cfg, progress=False)
    (tmp_path / "ds" / "folds").mkdir()
    (tmp_path / "ds" / "folds" / "k5-seed42.json").write_text("{}")  # folds of the old dataset
    (tmp_path / "ds" / "NOTES.txt").write_text("keep me")  # not ours: stays
    ingest(_data(tmp_path, _isic(isic_subset, splits=("test",))), progress=False)
    assert load_manifest(tmp_path / "ds")["num_images"] == 4 and not (tmp_path / "ds" / "folds").exists()
    assert (tmp_path / "ds" / "NOTES.txt").read_text() == "keep me"

    # Interrupted ingest: the previous dataset stays, no temporary directory is left.
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ingest_module, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        ingest(_data(tmp_path, _ham(ham_subset)), progress=False)
    assert load_manifest(tmp_path / "ds")["num_images"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not a melanoma-dist dataset"):
        ingest(_data(tmp_path, _isic(isic_subset), name="notes"), progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_progress_logging(isic_subset, tmp_path, caplog):
    caplog.set_level("INFO", logger="melanoma_dist")
    ingest(_data(tmp_path, _isic(isic_subset), ingest_workers=1), progress=True)
    assert any("ingest: 12/12 images" in m and "images/s" in m for m in caplog.messages)
    assert json.loads((tmp_path / "ds" / MANIFEST).read_text())["num_images"] == 12
