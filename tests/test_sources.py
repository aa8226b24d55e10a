"""Tests for melanoma_dist.data.sources."""

import shutil
from pathlib import Path

import pytest

from melanoma_dist.config import SourceConfig
from melanoma_dist.data.sources import MISSING_IMAGE, read_source


def test_ham10000_layout(ham_subset, read_csv):
    records, skipped = read_source(SourceConfig(kind="ham10000", path=str(ham_subset), name="ham"))
    _, rows = read_csv(ham_subset / "HAM10000_metadata.csv")
    assert skipped == []
    assert len(records) == len(rows) == 42
    assert [r.image_id for r in records] == sorted(r["image_id"] for r in rows)
    lesion = {r["image_id"]: r["lesion_id"] for r in rows}
    dx = {r["image_id"]: r["dx"] for r in rows}
    for r in records:
        assert (r.group, r.raw_label, r.label_type, r.source) == (lesion[r.image_id], dx[r.image_id], "dx", "ham")
        assert Path(r.path) == ham_subset / "images" / f"{r.image_id}.jpg"
        assert "HAM10000_metadata.csv line " in r.where


def test_ham10000_images_in_part_folders_and_missing_image(ham_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(ham_subset / "HAM10000_metadata.csv")
    part = tmp_path / "HAM10000_images_part_2"
    part.mkdir()
    for r in rows[:3]:
        (part / f"{r['image_id']}.jpg").symlink_to(ham_subset / "images" / f"{r['image_id']}.jpg")
    write_csv(tmp_path / "HAM10000_metadata.csv", header, rows[:4])
    records, skipped = read_source(SourceConfig(kind="ham10000", path=str(tmp_path)))
    assert sorted(r.image_id for r in records) == sorted(r["image_id"] for r in rows[:3])
    assert [(s.image_id, s.reason, s.source) for s in skipped] == [(rows[3]["image_id"], MISSING_IMAGE, tmp_path.name)]


def test_ham10000_missing_column_names_it(ham_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(ham_subset / "HAM10000_metadata.csv")
    header = [h for h in header if h != "dx"]
    write_csv(tmp_path / "HAM10000_metadata.csv", header, [{h: r[h] for h in header} for r in rows])
    with pytest.raises(ValueError, match=r"HAM10000_metadata.csv: missing column 'dx'; columns found: \['lesion_id'"):
        read_source(SourceConfig(kind="ham10000", path=str(tmp_path)))


def test_missing_root_or_csv_names_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv not found; expected .*/images/<image_id>.jpg"):
        read_source(SourceConfig(kind="ham10000", path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"labels.csv not found; expected a CSV file with columns 'image_id'"):
        read_source(SourceConfig(kind="csv", path=str(tmp_path / "labels.csv")))
    with pytest.raises(FileNotFoundError, match="is not a directory; expected .*/<class>/<image files>"):
        read_source(SourceConfig(kind="folder", path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        read_source(SourceConfig(kind="folder", path=str(tmp_path)))


def test_folder_layout_ids_and_collisions(tmp_path):
    for rel in ("mel/a.jpg", "mel/b.jpg", "nv/b.jpg", "nv/c.jpg", "nv/c.png", "nv/notes.txt", "nv/.DS_Store"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "loose.jpg").write_bytes(b"x")  # not in a class folder: ignored
    records, skipped = read_source(SourceConfig(kind="folder", path=str(tmp_path), name="f"))
    assert skipped == []
    got = [(r.image_id, r.raw_label, Path(r.path).name) for r in records]
    assert got == [("a", "mel", "a.jpg"), ("mel/b", "mel", "b.jpg"), ("notes", "nv", "notes.txt"),
                   ("nv/b", "nv", "b.jpg"), ("nv/c.jpg", "nv", "c.jpg"), ("nv/c.png", "nv", "c.png")]
    assert all(r.group == r.image_id for r in records)


def test_csv_split_filter_and_groups(isic_subset, read_csv):
    src = SourceConfig(kind="csv", path=str(isic_subset), label_column="melanoma", label_type="melanoma",
                       splits=("test", "validation"), group_column="image_id")
    records, skipped = read_source(src)
    _, rows = read_csv(isic_subset)
    expected = sorted(r["image_id"] for r in rows if r["split"] in ("test", "validation"))
    assert skipped == [] and [r.image_id for r in records] == expected
    assert len(records) == 8
    for r in records:
        assert Path(r.path).parent.name in ("test", "validation") and r.raw_label in ("0", "1")


def test_csv_image_dir_template_path_column_and_missing_image(isic_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(isic_subset)
    rows = [r for r in rows if r["split"] == "train"]
    shutil.copytree(isic_subset.parent / "train", tmp_path / "imgs" / "train", symlinks=True)
    rows.append({**rows[0], "image_id": "ISIC_missing"})
    csv_path = write_csv(tmp_path / "meta" / "labels.csv", header, rows)

    src = SourceConfig(kind="csv", path=str(csv_path), label_column="melanoma", label_type="melanoma",
                       image_dir="../imgs/{split}")
    records, skipped = read_source(src)
    assert len(records) == 4
    assert [(s.image_id, s.reason) for s in skipped] == [("ISIC_missing", MISSING_IMAGE)]
    assert skipped[0].path.endswith("imgs/train/ISIC_missing.jpg")

    header2 = header + ["file"]
    rows2 = [{**r, "file": f"../imgs/train/{r['image_id']}.jpg"} for r in rows]
    csv2 = write_csv(tmp_path / "meta" / "paths.csv", header2, rows2)
    records2, skipped2 = read_source(SourceConfig(kind="csv", path=str(csv2), path_column="file",
                                                  label_column="melanoma", label_type="melanoma"))
    assert [r.path for r in records2] == [r.path for r in records]
    assert len(skipped2) == 1


def test_csv_empty_label_names_file_and_line(isic_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(isic_subset)
    rows[2] = {**rows[2], "melanoma": ""}
    csv_path = write_csv(tmp_path / "labels.csv", header, rows)
    (tmp_path / "images").symlink_to(isic_subset.parent / "train")
    with pytest.raises(ValueError, match=rf"{csv_path} line 4: empty 'melanoma' cell"):
        read_source(SourceConfig(kind="csv", path=str(csv_path), label_column="melanoma", label_type="melanoma"))


def test_csv_missing_label_column_names_it(isic_subset):
    with pytest.raises(ValueError, match=r"missing column 'label'; columns found: \['image_id', 'split', 'melanoma'"):
        read_source(SourceConfig(kind="csv", path=str(isic_subset), label_type="melanoma"))


def test_csv_duplicate_id_names_both_lines(isic_subset, tmp_path, read_csv, write_csv):
    header, rows = read_csv(isic_subset)
    csv_path = write_csv(tmp_path / "labels.csv", header, rows + rows[:1])
    for split in ("train", "validation", "test"):
        (tmp_path / split).symlink_to(isic_subset.parent / split)
    with pytest.raises(ValueError, match=r"appears twice \(.*labels.csv line 2 and .*labels.csv line 14\)"):
        read_source(SourceConfig(kind="csv", path=str(csv_path), label_column="melanoma", label_type="melanoma"))
