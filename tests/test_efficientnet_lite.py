"""EfficientNet-Lite: the Keras port reproduces the original weights' logits; the loader refuses misfits."""

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from melanoma_dist.model import efficientnet_lite as lite
from melanoma_dist.model.pretrained import (WeightsError, convert_state_dict, pretrained_weights,
                                            weights_file)
from melanoma_dist.model.pth_reader import PthFormatError, read_legacy_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "efficientnet_lite_reference.npz"
VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_reproduces_reference_logits(variant, reference):
    # Logits of timm's tf_efficientnet_lite with the same state dict (tests/fixtures/make_*.py).
    model = lite.efficientnet_lite(variant, 96, include_top=True)
    convert_state_dict(read_legacy_state_dict(weights_file(variant)), model)
    logits = model.predict(reference["images"].astype("float32") / 255.0, verbose=0)
    want = reference[variant]
    assert np.abs(want).max() > 5  # real logits, not an all-zero fixture
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    assert (logits.argmax(1) == want.argmax(1)).all()


def test_a_port_that_computes_something_else_fails(reference):
    # Same shapes, but one depthwise kernel mirrored (a wrong layout transpose would do
    # the same): it loads fine and computes something else.
    state = read_legacy_state_dict(weights_file("efficientnet_lite0"))
    state["_blocks.5._depthwise_conv.weight"] = state["_blocks.5._depthwise_conv.weight"][:, :, ::-1, :]
    model = lite.efficientnet_lite("efficientnet_lite0", 96, include_top=True)
    convert_state_dict(state, model)
    logits = model.predict(reference["images"].astype("float32") / 255.0, verbose=0)
    assert np.abs(logits - reference["efficientnet_lite0"]).max() > 1e-2


def test_loader_refuses_misfits():
    state = read_legacy_state_dict(weights_file("efficientnet_lite0"))
    with pytest.raises(WeightsError, match="layers without weights"):  # lite1 has 5 more blocks
        convert_state_dict(state, lite.efficientnet_lite("efficientnet_lite1", 64))
    bad = dict(state)
    bad["_conv_head.weight"] = bad["_conv_head.weight"][:, :300]
    with pytest.raises(WeightsError, match="head_conv"):
        convert_state_dict(bad, lite.efficientnet_lite("efficientnet_lite0", 64))
    with pytest.raises(WeightsError, match="unexpected tensor"):
        convert_state_dict({**state, "_extra.weight": np.zeros(1)}, lite.efficientnet_lite("efficientnet_lite0", 64))


def test_stage_plans_match_the_variants():
    assert [s.repeats for s in lite.stage_plan("efficientnet_lite0")] == [1, 2, 2, 3, 3, 4, 1]
    assert [s.repeats for s in lite.stage_plan("efficientnet_lite1")] == [1, 3, 3, 4, 4, 5, 1]
    assert [s.filters for s in lite.stage_plan("efficientnet_lite2")] == [16, 24, 48, 88, 120, 208, 352]
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        lite.stage_plan("efficientnet_lite9")


def test_converted_weights_are_cached_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("MELANOMA_DIST_CACHE", str(tmp_path))
    path = pretrained_weights("efficientnet_lite0")
    assert path.parent == tmp_path and path.name.endswith(".weights.h5")
    mtime = path.stat().st_mtime_ns
    assert pretrained_weights("efficientnet_lite0") == path and path.stat().st_mtime_ns == mtime  # reused
    backbone = lite.efficientnet_lite("efficientnet_lite0", 48)  # any input size
    backbone.load_weights(path)
    stem = read_legacy_state_dict(weights_file("efficientnet_lite0"))["_conv_stem.weight"]
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").get_weights()[0], stem.transpose(2, 3, 1, 0))


def test_pth_reader_refuses_what_it_cannot_read(tmp_path):
    zipped = tmp_path / "new.pth"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(PthFormatError, match="zip-format"):
        read_legacy_state_dict(zipped)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(weights_file("efficientnet_lite0").read_bytes()[:100_000])
    with pytest.raises(PthFormatError, match="truncated|unreadable"):
        read_legacy_state_dict(truncated)
    evil = tmp_path / "evil.pth"  # a pickle that would call os.system when loaded by plain pickle
    with evil.open("wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(obj, f)
        f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(PthFormatError, match="refusing to load os.system"):
        read_legacy_state_dict(evil)
