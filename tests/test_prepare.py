"""A dataset is reused only when it was made the way the config asks; otherwise it is ingested again."""

import dataclasses

import pytest

from melanoma_dist.config import Config
from melanoma_dist.data.prepare import ensure_dataset
from tests.synthetic import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("prepare"))  # png, 16 px, no colour constancy


def test_same_settings_reuse_the_dataset(data):
    assert ensure_dataset(Config(data=data))["num_images"] == 40
    # A config without sources only points at a dataset: how it was made is not compared.
    assert ensure_dataset(Config(data=dataclasses.replace(data, sources=(), encoding="jpeg")))["image_size"] == 16


@pytest.mark.parametrize("change,key", [({"image_size": 32}, "image_size"), ({"label_scheme": "ham7"}, "label_scheme")])
def test_without_sources_other_settings_are_refused(data, change, key):
    with pytest.raises(ValueError, match=f"{key}: .* in the dataset, .* in the config.* no data.sources to ingest"):
        ensure_dataset(Config(data=dataclasses.replace(data, sources=(), **change)))


@pytest.mark.parametrize("change,key", [({"image_size": 32}, "image_size"),
                                        ({"color_constancy": "shades_of_gray"}, "color_constancy"),
                                        ({"resize": "pad"}, "resize"), ({"encoding": "jpeg"}, "encoding")])
def test_other_settings_are_ingested_again(tmp_path, caplog, change, key):
    """Changed in issue 10: a config with sources re-ingests a dataset made otherwise (it used to be refused)."""
    data = make_dataset(tmp_path, {"other": 4, "melanoma": 4})
    manifest = ensure_dataset(Config(data=dataclasses.replace(data, **change)))
    assert manifest[key] == change[key] and manifest["num_images"] == 8
    assert f"{key}: " in caplog.text and "ingesting again" in caplog.text
