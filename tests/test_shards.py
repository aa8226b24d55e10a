"""Tests for melanoma_dist.data.shards."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from melanoma_dist.data.shards import (
    COLUMNS, IMAGE, IMAGE_ID, LABEL, LIGHT_COLUMNS, MANIFEST, ROW_GROUP_ROWS, SCHEMA, SCHEMA_VERSION,
    load_manifest, locate, read_columns, read_images, row_offsets, shard_paths, write_manifest, write_shards)


def _rows(n: int) -> list[dict]:
    return [{"image_id": f"img{i:04d}", "source": "s", "image": f"bytes-{i}".encode(), "label": i % 2,
             "label_name": "ab"[i % 2], "group": f"g{i // 3}", "pixel_sha256": f"{i:064x}",
             "phash": f"{i:016x}", "path": f"/x/img{i:04d}.jpg"} for i in range(n)]


def _dataset(tmp_path, n=700, rows_per_shard=300):
    names = write_shards(iter(_rows(n)), tmp_path, rows_per_shard)
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "shards": names})
    return names


def test_schema_columns():
    assert COLUMNS == ("image_id", "source", "image", "label", "label_name", "group", "pixel_sha256", "phash", "path")
    assert SCHEMA.field(LABEL).type == pa.int32() and SCHEMA.field(IMAGE).type == pa.binary()
    assert IMAGE not in LIGHT_COLUMNS and len(LIGHT_COLUMNS) == len(COLUMNS) - 1


def test_write_shards_names_row_groups_and_determinism(tmp_path):
    names = write_shards(iter(_rows(700)), tmp_path / "a", 300)
    assert names == ["shard-00000-of-00003.parquet", "shard-00001-of-00003.parquet", "shard-00002-of-00003.parquet"]
    meta = pq.ParquetFile(tmp_path / "a" / names[0]).metadata
    assert meta.num_rows == 300
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [ROW_GROUP_ROWS, 44]
    assert pq.read_schema(tmp_path / "a" / names[0]).names == list(COLUMNS)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names  # no partial files left
    # Same rows from a Table: byte-identical files.
    names_b = write_shards(pa.Table.from_pylist(_rows(700), schema=SCHEMA), tmp_path / "b", 300)
    assert names_b == names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_streamed_tables_give_the_same_shards_as_one_table_and_rows(tmp_path):
    # 10 kB images: a shard spans several 1 MB Parquet pages, whose cuts would follow the tables' chunks.
    rows = [{**r, "image": b"x" * (10_000 + i % 7)} for i, r in enumerate(_rows(700))]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    # Pieces of 0 to 123 rows, columns in another order, a record batch: shards cut inside pieces and across them.
    pieces, start = [], 0
    for i, length in enumerate([123, 0, 45, 1, 200, 131, 200]):
        piece = table.slice(start, length)
        pieces.append(piece.to_batches()[0] if i == 3 else piece.select(list(reversed(COLUMNS))))
        start += length
    assert start == len(rows)
    for rows_per_shard, shard_bytes in ((100, None), (300, 2_000_000)):
        sizes = f"{rows_per_shard}-{shard_bytes}"
        names = write_shards(iter(pieces), tmp_path / "tables" / sizes, rows_per_shard, shard_bytes)
        assert len(names) > 3
        for other, source in (("table", table), ("rows", iter(rows))):
            assert write_shards(source, tmp_path / other / sizes, rows_per_shard, shard_bytes) == names
            for n in names:
                assert (tmp_path / "tables" / sizes / n).read_bytes() == (tmp_path / other / sizes / n).read_bytes()


SHARD_BYTES_CASES = [  # (image sizes, rows_per_shard, shard_bytes, rows of each shard)
    ([10] * 7, 3, None, [3, 3, 1]),
    ([10] * 7, 100, 25, [2, 2, 2, 1]),  # the third image would make 30 bytes
    ([10] * 7, 100, 30, [3, 3, 1]),  # exactly at the budget still fits
    ([10, 50, 10, 10, 10], 100, 25, [1, 1, 2, 1]),  # an image above the budget: a shard of its own
    ([10] * 7, 2, 1000, [2, 2, 2, 1]),  # rows bind before bytes
]


@pytest.mark.parametrize("sizes,rows_per_shard,shard_bytes,expected", SHARD_BYTES_CASES)
def test_shards_sized_by_bytes_and_rows(tmp_path, sizes, rows_per_shard, shard_bytes, expected):
    rows = [{**r, "image": b"x" * size} for r, size in zip(_rows(len(sizes)), sizes)]
    names = write_shards(iter(rows), tmp_path / "a", rows_per_shard, shard_bytes)
    assert [pq.ParquetFile(tmp_path / "a" / n).metadata.num_rows for n in names] == expected
    # From a Table: the same cuts, byte-identical files.
    assert write_shards(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "b", rows_per_shard, shard_bytes) == names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    # Readers find every global row from the row counts, whatever the shard sizes.
    write_manifest(tmp_path / "a", {"schema_version": SCHEMA_VERSION, "shards": names})
    offsets = row_offsets(shard_paths(tmp_path / "a"))
    assert offsets.tolist() == [0, *np.cumsum(expected).tolist()]
    for shard, local in locate(offsets, np.arange(len(sizes))[::-1]):
        images = read_images(tmp_path / "a" / names[shard], local.tolist())
        assert images == [rows[r]["image"] for r in local + offsets[shard]]


def test_locate_rejects_rows_outside_the_dataset():
    offsets = np.array([0, 3, 5])
    assert [(s, local.tolist()) for s, local in locate(offsets, [4, 0, 3, 1])] == [(0, [0, 1]), (1, [1, 0])]
    with pytest.raises(IndexError, match="row 5 is outside the dataset"):
        locate(offsets, [0, 5])


def test_write_shards_refuses_non_empty_dir_and_bad_rows(tmp_path):
    write_shards(_rows(3), tmp_path, 10)
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(_rows(3), tmp_path, 10)
    with pytest.raises(ValueError, match="do not fit the shard schema"):
        write_shards([{**_rows(1)[0], "label": "mel"}], tmp_path / "bad", 10)
    assert write_shards([], tmp_path / "empty", 10) == []


def test_read_columns_concatenates_in_order(tmp_path):
    _dataset(tmp_path)
    t = read_columns(tmp_path, [IMAGE_ID, LABEL])
    assert t.column_names == [IMAGE_ID, LABEL]
    assert t.column(IMAGE_ID).to_pylist() == [f"img{i:04d}" for i in range(700)]
    assert len(shard_paths(tmp_path)) == 3


def test_read_images_selected_rows_across_row_groups(tmp_path):
    names = _dataset(tmp_path)
    path = tmp_path / names[1]  # rows 300..599
    assert read_images(path, [299, 0, 256, 255]) == [b"bytes-599", b"bytes-300", b"bytes-556", b"bytes-555"]
    assert len(read_images(path)) == 300
    with pytest.raises(IndexError, match="row 300 is outside shard"):
        read_images(path, [300])


def test_missing_manifest_says_run_ingest(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no manifest.json in {tmp_path}: run `melanoma-dist ingest --config"):
        load_manifest(tmp_path)


def test_stale_schema_version_and_missing_shard(tmp_path):
    names = _dataset(tmp_path, n=10)
    (tmp_path / names[0]).unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000-of-00001.parquet listed in .* is missing: re-run"):
        shard_paths(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 0, "shards": names}))
    with pytest.raises(ValueError, match="schema_version 0 but this melanoma-dist reads version 1: re-run"):
        load_manifest(tmp_path)


def test_shard_missing_column_names_shard_and_column(tmp_path):
    table = pa.Table.from_pylist(_rows(5), schema=SCHEMA).drop_columns(["phash"])
    pq.write_table(table, tmp_path / "shard-00000-of-00001.parquet")
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "shards": ["shard-00000-of-00001.parquet"]})
    with pytest.raises(ValueError, match="shard .*shard-00000-of-00001.parquet has no column 'phash' .* re-run "
                                         "`melanoma-dist ingest"):
        read_columns(tmp_path, [IMAGE_ID, "phash"])
    with pytest.raises(ValueError, match="unknown shard column 'labels'; valid columns"):
        read_columns(tmp_path, ["labels"])
