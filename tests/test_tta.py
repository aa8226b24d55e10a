"""Test-time augmentation views: the right number, all distinct, identity first, the 8 symmetries of a square."""

import numpy as np
import pytest

from melanoma_dist.inference.tta import tta_mode, view_names, views


@pytest.mark.parametrize("mode,count", [("none", 1), ("flip", 2), ("dihedral", 8)])
def test_views(mode, count):
    x = np.random.default_rng(0).random((3, 5, 5, 3)).astype(np.float32)  # no symmetry
    out = views(x, mode)
    assert len(out) == len(view_names(mode)) == count
    assert all(v.shape == x.shape and v.flags["C_CONTIGUOUS"] for v in out)
    np.testing.assert_array_equal(out[0], x)
    flat = {v.tobytes() for v in out}
    assert len(flat) == count  # distinct views
    if mode == "dihedral":  # closed under the mirror and the quarter turn: the group of the square
        assert {v[:, :, ::-1].tobytes() for v in out} == flat
        assert {np.rot90(v, 1, axes=(1, 2)).tobytes() for v in out} == flat


def test_modes_and_legacy_bools():
    assert tta_mode(True) == "flip" and tta_mode(False) == "none" and tta_mode(None) == "none"
    assert tta_mode("dihedral") == "dihedral"
    with pytest.raises(ValueError, match="must be one of"):
        tta_mode("rotate")
