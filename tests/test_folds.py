"""Stratified group folds: lesions and identical images never straddle a split."""

import numpy as np
import pytest

from melanoma_dist.data.folds import (assign_folds, check_leakage, load_folds, make_folds,
                                      merge_duplicate_groups)
from tests.synthetic import make_dataset


def _lesion_data(n=400, seed=0):
    """Lesions with 1-4 images each; a few images duplicated under another lesion id."""
    rng = np.random.default_rng(seed)
    groups, labels, hashes = [], [], []
    lesion = 0
    while len(groups) < n:
        k = int(rng.integers(1, 5))
        y = int(rng.random() < 0.2)
        for _ in range(k):
            groups.append(f"L{lesion}")
            labels.append(y)
            hashes.append(f"h{len(hashes)}")
        lesion += 1
    for i in range(0, 60, 6):  # image i+3 is a pixel copy of image i, filed under another lesion
        hashes[i + 3] = hashes[i]
    return np.array(labels), groups, hashes


def test_merge_duplicate_groups():
    keys = merge_duplicate_groups(["a", "b", "c", "d", "a"], ["h1", "h2", "h1", "h3", "h4"])
    assert keys[0] == keys[2] == keys[4]  # a and c share h1
    assert len({keys[0], keys[1], keys[3]}) == 3
    # Transitive: a~b through h1, b~c through h2.
    keys = merge_duplicate_groups(["a", "b", "b", "c"], ["h1", "h1", "h2", "h2"])
    assert len(set(keys)) == 1


@pytest.mark.parametrize("k,seed", [(2, 0), (5, 1), (5, 2)])
def test_no_leakage_and_stratified(k, seed):
    labels, groups, hashes = _lesion_data(seed=seed)
    folds = assign_folds(labels, groups, hashes, k, seed)
    assert check_leakage(folds, groups, hashes).clean
    assert set(folds) == set(range(k))
    rates = [labels[folds == f].mean() for f in range(k)]
    assert max(rates) - min(rates) < 0.1  # stratified: similar melanoma rate in every fold


def test_seeded():
    labels, groups, hashes = _lesion_data()
    a = assign_folds(labels, groups, hashes, 5, seed=7)
    assert np.array_equal(a, assign_folds(labels, groups, hashes, 5, seed=7))
    assert not np.array_equal(a, assign_folds(labels, groups, hashes, 5, seed=8))


def test_check_leakage_reports_leaks():
    report = check_leakage([0, 1, 1, 0], ["a", "a", "b", "c"], ["h1", "h2", "h3", "h3"])
    assert not report.clean
    assert report.groups_across_folds == ["a"] and report.hashes_across_folds == ["h3"]


def test_too_few_groups():
    with pytest.raises(ValueError, match="cannot make 5 folds from 2 lesion groups"):
        assign_folds([0, 1, 0], ["a", "b", "a"], ["1", "2", "3"], 5, 0)


def test_make_and_load_folds(tmp_path):
    cfg = make_dataset(tmp_path, k=3)
    summary = make_folds(cfg.dataset_dir, 3, seed=42)
    assert summary["leakage"]["clean"] and summary["num_images"] == 40
    assert sum(f["num_images"] for f in summary["folds"]) == 40
    assert all(f["counts"]["melanoma"] > 0 for f in summary["folds"])
    folds = load_folds(cfg.dataset_dir, 3, 42)
    assert len(folds) == 40 and set(folds) == {0, 1, 2}
    with pytest.raises(FileNotFoundError, match="melanoma-dist folds"):
        load_folds(cfg.dataset_dir, 4, 42)


def test_real_ham_lesions_stay_together(ham_subset, tmp_path):
    """Real HAM10000 lesions with several images: every lesion lands in exactly one fold."""
    from melanoma_dist.config import DataConfig, SourceConfig
    from melanoma_dist.data import shards
    from melanoma_dist.data.ingest import ingest

    cfg = DataConfig(sources=(SourceConfig(kind="ham10000", path=str(ham_subset)),),
                     dataset_dir=str(tmp_path / "ds"), label_scheme="ham7", image_size=16, ingest_workers=1)
    ingest(cfg, progress=False)
    summary = make_folds(cfg.dataset_dir, 3, seed=1)
    assert summary["leakage"]["clean"]
    table = shards.read_columns(cfg.dataset_dir, ["group"])
    groups = table["group"].to_pylist()
    folds = load_folds(cfg.dataset_dir, 3, 1)
    multi = {g for g in groups if groups.count(g) > 1}
    assert len(multi) >= 5  # the subset really has lesions with several images
    for g in multi:
        assert len({int(f) for f, gg in zip(folds, groups) if gg == g}) == 1
