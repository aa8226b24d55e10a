"""Duplicate audit: Hamming pairs against brute force, fold and train/test cases, real ingested data."""

import shutil

import numpy as np
import pytest

from melanoma_dist.report import plots
from melanoma_dist.report.audit import (ImageSet, audit_set, audit_train_test, hamming_pairs, phash_ints,
                                        read_images_by_id, read_pixels_by_id)
from tests.synthetic import make_dataset


def _set(phashes, groups, pixels, folds=None, name="s"):
    n = len(phashes)
    ids = np.array([f"img{i}" for i in range(n)], dtype=object)
    return ImageSet(name, ids, np.array(groups, dtype=object), np.array(["x"] * n, dtype=object),
                    np.array(pixels, dtype=object), np.asarray(phashes, dtype=np.uint64),
                    np.array([f"/p/{i}" for i in range(n)], dtype=object),
                    None if folds is None else np.asarray(folds))


def test_hamming_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 63, 40, dtype=np.uint64)
    # Plant near copies: flip 1..6 random bits.
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False))) for k in range(1, 7)]
    a = np.concatenate([base, base[:6] ^ np.array(flips, dtype=np.uint64)])
    i, j, d = hamming_pairs(a, max_bits=4)
    brute = {(x, y) for x in range(len(a)) for y in range(x + 1, len(a))
             if bin(int(a[x]) ^ int(a[y])).count("1") <= 4}
    assert set(zip(i.tolist(), j.tolist())) == brute and len(brute) == 4  # flips of 1..4 bits
    assert all(bin(int(a[x]) ^ int(a[y])).count("1") == dd for x, y, dd in zip(i, j, d))
    i2, j2, _ = hamming_pairs(a[:10], a, max_bits=0)  # cross-set: every image matches itself
    assert {(x, y) for x, y in zip(i2, j2)} >= {(k, k) for k in range(10)}


def test_phash_ints_rejects_bad_hash():
    assert phash_ints(["ffffffffffffffff", "0"]).tolist() == [2 ** 64 - 1, 0]
    with pytest.raises(ValueError, match="not a 64-bit hex hash"):
        phash_ints(["zz"])


def test_audit_set_finds_cross_fold_duplicates():
    h = [0x0F0F, 0x0F0F, 0x0F0E, 0xF0F0F0F0F0F0, 0xF0F0F0F0F0F1, 0x123456789ABC]
    s = _set(h, groups=["L1", "L1", "L2", "L3", "L4", "L5"],
             pixels=["p1", "p1", "p2", "p3", "p4", "p5"], folds=[0, 0, 1, 0, 1, 1])
    a = audit_set(s, max_bits=4)
    assert a["exact"] == {"sets": 1, "images": 2, "sets_with_several_groups": 0, "sets_across_folds": 0}
    # near pairs (pixels differ): (0,2), (1,2) L1-L2 across folds; (3,4) L3-L4 across folds.
    assert a["near"]["pairs"] == 3 and a["near"]["pairs_across_folds"] == 3
    assert a["near"]["pairs_different_groups"] == 3 and a["clean"] is False
    assert {(e["image_a"], e["image_b"]) for e in a["near"]["examples"]} == {("img0", "img2"), ("img1", "img2"),
                                                                            ("img3", "img4")}
    assert audit_set(s, max_bits=0)["clean"] is True  # stricter threshold: no near pairs left


def test_audit_train_test_flags_exact_and_near():
    train = _set([1, 2 ** 40, 2 ** 50], ["a", "b", "c"], ["p1", "p2", "p3"])
    test = _set([1, 2 ** 40 + 1, 2 ** 60 + 2 ** 61 + 2 ** 62 + 2 ** 63 + 7], ["t1", "t2", "t3"], ["p1", "q2", "q3"],
                name="test")
    a = audit_train_test(train, test, max_bits=4)
    assert a["exact_duplicates"] == 1 and a["near_duplicates"] == 1
    assert a["flagged_image_ids"] == ["img0", "img1"]


def test_audit_of_an_ingested_dataset_with_a_copied_image(tmp_path):
    data = make_dataset(tmp_path, n_per_class={"other": 6, "melanoma": 6})
    root = tmp_path / "images" / "other"
    shutil.copy(root / "img_other_000.png", root / "img_other_copy.png")  # an exact duplicate
    from melanoma_dist.data.ingest import ingest
    from melanoma_dist.data.folds import make_folds

    ingest(data, progress=False)
    make_folds(data.dataset_dir, 2, seed=42)
    s = ImageSet.from_dataset(data.dataset_dir, folds=(2, 42))
    a = audit_set(s)
    assert len(s) == 13 and a["exact"]["sets"] == 1 and a["exact"]["sets_across_folds"] == 0
    images = read_images_by_id(data.dataset_dir, ["img_other_copy", "img_melanoma_005"])
    assert set(images) == {"img_other_copy", "img_melanoma_005"} and images["img_other_copy"][:4] == b"\x89PNG"
    with pytest.raises(KeyError):
        read_images_by_id(data.dataset_dir, ["nope"])


def test_stored_pixels_read_alike_from_png_and_raw_datasets(tmp_path):
    """The reports' reader of stored images (near-duplicate figures) decodes as each dataset's manifest says."""
    ids = ["img_other_000", "img_melanoma_003"]
    png, raw = (read_pixels_by_id(make_dataset(tmp_path / enc, n_per_class={"other": 2, "melanoma": 4},
                                               encoding=enc).dataset_dir, ids) for enc in ("png", "raw"))
    for image_id in ids:
        assert png[image_id].shape == (16, 16, 3) and png[image_id].dtype == np.uint8
        np.testing.assert_array_equal(raw[image_id], png[image_id])
    assert plots.image_pairs(tmp_path / "pairs.png", [(raw[ids[0]], raw[ids[1]], "a | b")]).is_file()


def test_audit_cli(tmp_path, capsys):
    from melanoma_dist.cli import main

    data = make_dataset(tmp_path, n_per_class={"other": 5, "melanoma": 5})
    out = tmp_path / "audit.json"
    assert main(["audit", "--set", f"data.dataset_dir={data.dataset_dir}", "--set", "folds.k=2",
                 "--external", data.dataset_dir, "--near-dup-corr", "none", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "folds: clean" in text and "10 test images to remove" in text  # the set against itself
    import json

    a = json.loads(out.read_text())
    assert a["external"][0]["exact_duplicates"] == 10 and a["dataset"]["near"]["min_correlation"] is None
