"""Every Horovod rank validates, predicts and saves the same model, but draws its own dropout masks.

Real Horovod: one `horovod.run(np=2, use_gloo=True)` job (worker body
`tests/hvd_workers.py:run_agreement`) trains a Conv-BatchNorm-Dropout CNN for an
epoch, each rank on its own (differently distributed) images. Issue 11.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

pytest.importorskip("horovod.tensorflow", reason="Horovod is not installed")
import keras  # noqa: E402

from tests import hvd_workers  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """Results of run_agreement on 2 Gloo ranks, and the directory of rank 0's saved model."""
    out = tmp_path_factory.mktemp("agree")
    return hvd_workers.run_two_ranks(hvd_workers.run_agreement, str(out)), out


def test_ranks_hold_identical_weights_and_batchnorm_statistics(job: tuple[list[dict[str, Any]], Path]) -> None:
    r0, r1 = job[0]
    assert len(r0["bn_stats"]) == 2  # moving mean and variance of the one trainable BatchNorm
    for a, b in zip(r0["bn_stats"], r1["bn_stats"]):
        np.testing.assert_array_equal(a, b)
    assert np.abs(r0["bn_stats"][0]).max() > 1e-3  # the statistics moved during the epoch
    assert len(r0["weights"]) == len(r1["weights"])
    for a, b in zip(r0["weights"], r1["weights"]):
        np.testing.assert_array_equal(a, b)


def test_out_of_fold_predictions_are_rank0_saved_models(job: tuple[list[dict[str, Any]], Path]) -> None:
    (r0, r1), out = job
    _, _, val_x, _ = hvd_workers.agreement_data(0)
    np.testing.assert_array_equal(r0["rows"], np.arange(hvd_workers.VAL_ROWS))
    np.testing.assert_array_equal(r0["probs"], r1["probs"])
    saved = keras.models.load_model(out / "model.keras", compile=False)
    # Rows of both ranks (odd rows were predicted by rank 1), reproduced by the one saved model.
    np.testing.assert_allclose(saved.predict(val_x, verbose=0)[:, 0], r0["probs"][:, 1], rtol=0, atol=1e-6)


def test_keras_validation_inside_fit_sees_synced_statistics(job: tuple[list[dict[str, Any]], Path]) -> None:
    (r0, r1), _ = job
    # Same validation images on both ranks, no metric averaging: equal only if one model validated.
    assert r0["keras_val_loss"] == r1["keras_val_loss"]


def test_val_roc_auc_is_of_the_pooled_fold_not_a_mean_over_ranks(job: tuple[list[dict[str, Any]], Path]) -> None:
    (r0, r1), _ = job
    *_, val_y = hvd_workers.agreement_data(0)
    p = r0["probs"][:, 1]
    pooled = roc_auc_score(val_y, p)
    per_rank_mean = np.mean([roc_auc_score(val_y[r::2], p[r::2]) for r in (0, 1)])
    assert abs(pooled - per_rank_mean) > 1e-3  # the data tell the two apart
    for r in (r0, r1):
        assert r["history"]["val_roc_auc"] == [pytest.approx(pooled, abs=1e-12)]
        assert [k for k in r["history"] if "auc" in k.lower()] == ["val_roc_auc"]  # no other AUC
        assert "not the AUC of the pooled predictions" in r.get("auc_error", "")


def test_dropout_masks_differ_between_ranks_and_repeat_with_the_seed(
        job: tuple[list[dict[str, Any]], Path]) -> None:
    (r0, r1), _ = job
    for r in (r0, r1):
        first, again = r["dropout"]
        np.testing.assert_array_equal(first, again)  # same seed, same rank: same masks
        assert set(np.unique(first)) <= {0.0, 2.0} and 0 < (first == 0).sum() < first.size
    assert not np.array_equal(r0["dropout"][0], r1["dropout"][0])
