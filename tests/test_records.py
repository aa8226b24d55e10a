"""Tests for melanoma_dist.data.records: a source's listing as Arrow columns."""

import hashlib
import os

import pytest

from melanoma_dist.data.fingerprint import file_listing
from melanoma_dist.data.records import CHUNK_ROWS, MERGED_FOLDERS, RecordBuilder, SourceRecord, first_repeat, shared_ids

ADDED = [  # image id, path, raw label, group, line
    ("b", "/data/mel/b.jpg", "mel", "b", 3),
    ("a", "/data/nv/a.jpg", "nv", "lesion_1", 2),
    ("c\udcff", "/data/nv/c\udcff.jpg", "nv", "c\udcff", 4),  # a file name that is not UTF-8
    ("\udcc0", "/data/nv/\udcc0.jpg", "nv", "\udcc0", 6),  # sorts after "é" as a string, before as raw bytes
    ("\u00e9", "/data/nv/\u00e9.jpg", "nv", "\u00e9", 7),
    ("d", "d.png", "mel", "d", 0),  # a bare file name: no folder
    ("e", "s3://bucket/ham/images/e.jpg", "nv", "lesion_1", 5),
]


def _records(rows=ADDED, label_file="labels.csv"):
    builder = RecordBuilder()
    for row in rows:
        builder.add(*row)
    return builder.build(source="src", label_type="dx", label_file=label_file)


def test_records_give_back_what_was_added_sorted_by_image_id():
    records = _records()
    expected = sorted((SourceRecord(image_id=i, path=p, raw_label=label, label_type="dx", group=g, source="src",
                                    where=f"labels.csv line {line}" if line else p)
                       for i, p, label, g, line in ADDED), key=lambda r: r.image_id)
    assert list(records) == expected
    assert [records[i] for i in range(len(records))] == expected and records[-1] == expected[-1]
    assert list(records.paths()) == [r.path for r in expected]
    assert sorted(records.folders) == ["", "/data/mel/", "/data/nv/", "s3://bucket/ham/images/"]
    assert list(records.sorted_paths()) == sorted(p for _, p, _, _, _ in ADDED)
    with pytest.raises(IndexError):
        records[len(ADDED)]


def test_records_span_several_chunks_and_store_a_folder_once():
    rows = [(f"ISIC_{i:07d}", f"/data/{'mel' if i % 3 else 'nv'}/ISIC_{i:07d}.jpg", "mel", f"ISIC_{i:07d}", 0)
            for i in range(CHUNK_ROWS * 2 + 5, 0, -1)]
    records = _records(rows)
    assert len(records) == len(rows) and sorted(records.folders) == ["/data/mel/", "/data/nv/"]
    assert [r.image_id for r in records] == sorted(r[0] for r in rows)
    assert list(records.paths()) == [r[1] for r in sorted(rows)]
    assert records.table.column("group").null_count == len(rows)  # the group is the id: not stored
    assert first_repeat(records) is None


def test_repeated_and_shared_ids_are_found():
    records = _records(ADDED + [("a", "/data/mel/a2.jpg", "mel", "a", 9)])
    i, j = first_repeat(records)
    assert {records[i].where, records[j].where} == {"labels.csv line 2", "labels.csv line 9"}
    other = _records([("x", "/o/x.jpg", "nv", "x", 1), ("e", "/o/e.jpg", "nv", "e", 2)])
    assert shared_ids(_records(), [_records([("z", "/z.jpg", "nv", "z", 1)]), other]) == ("e", 1, 1)
    assert shared_ids(_records(), [_records([("x", "/o/x.jpg", "nv", "x", 1)])]) is None
    one, two = _records([("a", "/1/a.jpg", "nv", "a", 1)]), _records([("b", "/2/b.jpg", "nv", "b", 1)])
    assert shared_ids(_records(), [two, one]) == ("a", 1, 2)  # every shared id counted, the first one's owner named


def test_file_listing_hashes_the_sorted_lines_of_path_size_and_mtime(tmp_path):
    files = [tmp_path / name for name in ("b.jpg", "a.jpg", "a.jpg.bak")]
    for i, f in enumerate(files):
        f.write_bytes(b"x" * (i + 1))
    missing = str(tmp_path / "gone.jpg")
    paths = [str(f) for f in files] + [missing, str(files[0])]  # a repeat counts once
    lines = []
    for p in sorted({os.path.abspath(p) for p in paths}):
        st = os.stat(p) if os.path.exists(p) else None
        lines.append(f"{p}\t-" if st is None else f"{p}\t{st.st_size}\t{st.st_mtime_ns}")
    assert file_listing(paths) == {"count": 4, "bytes": 6,
                                   "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def test_sorted_paths_merges_folders_in_the_strings_order():
    # "/a/b0.jpg" sorts after "/a/b/x.jpg" ("0" > "/"), though folder "/a/" sorts before "/a/b/".
    rows = [("b0", "/a/b0.jpg", "nv", "b0", 0), ("x", "/a/b/x.jpg", "nv", "x", 0), ("y", "/a/b.jpg", "nv", "y", 0),
            ("z", "/a/b/x.jpg", "nv", "z", 0), ("w", "w.jpg", "nv", "w", 0)]
    records = _records(rows)
    assert list(records.sorted_paths()) == sorted(r[1] for r in rows)
    assert list(records.sorted_paths(lambda f: f or "/cwd/")) == sorted(r[1] if r[1][0] == "/" else "/cwd/" + r[1]
                                                                          for r in rows)


def test_sorted_paths_of_many_folders():
    rows = [(f"i{n}", f"/p/{n % (MERGED_FOLDERS + 7)}/{'x' if n % 2 else 'y'}{n}.jpg", "nv", f"i{n}", 0)
            for n in range(400)]
    assert list(_records(rows).sorted_paths()) == sorted(r[1] for r in rows)
