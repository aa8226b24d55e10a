"""Shared pytest fixtures."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted pretrained weights go to a session temp dir, not the user's ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("weights-cache")
    os.environ["MELANOMA_DIST_CACHE"] = str(path)  # inherited by Horovod and Ray workers too
    return path


@pytest.fixture(scope="session", autouse=True)
def ray_dashboard_patience() -> None:
    """Ray's dashboard gets 60 s to start and each of its modules 30 s; on 2 busy cores that is not enough.

    Tests that find actors through `ray.util.state` need the dashboard, and a slow start
    fails `ray.init` / `ray start` outright. Inherited by every Ray started from a test.
    """
    import os

    os.environ.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "180")
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")


# ============================================================================
# Ingest-stage fixtures (labels, sources, images, shards, ingest tests).
# Small subsets of the real data in ../shared/data, built in tmp (never in the repo).
# ============================================================================

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAM_META = SHARED_DATA / "ham10000" / "HAM10000_metadata.csv"
ISIC_LABELS = SHARED_DATA / "isic2017" / "labels.csv"


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    """Write rows (dicts) under `header` to a CSV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def read_csv():
    """`read_csv(path) -> (header, rows)`."""
    return read_csv_rows


@pytest.fixture(scope="session")
def write_csv():
    """`write_csv(path, header, rows) -> path`."""
    return write_csv_rows


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder, or skip."""
    if not HAM_META.is_file() or not ISIC_LABELS.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (needs ham10000/ and isic2017/, see its README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ham_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HAM10000-layout folder with 42 real images: all 7 classes, lesions with 1 and 2 images.

    Per diagnosis: the first 2 lesions with several images (2 images each) and the first 2
    single-image lesions, in metadata order. Images are symlinked.
    """
    header, rows = read_csv_rows(HAM_META)
    by_lesion: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_lesion[row["lesion_id"]].append(row)
    picked: list[dict[str, str]] = []
    for dx in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"):
        lesions = [imgs for imgs in by_lesion.values() if imgs[0]["dx"] == dx]
        multi = [imgs[:2] for imgs in lesions if len(imgs) >= 2][:2]
        single = [imgs for imgs in lesions if len(imgs) == 1][:2]
        picked += [r for imgs in multi + single for r in imgs]
    root = tmp_path_factory.mktemp("ham_subset")
    (root / "images").mkdir()
    for r in picked:
        name = f"{r['image_id']}.jpg"
        (root / "images" / name).symlink_to(shared_data / "ham10000" / "images" / name)
    write_csv_rows(root / "HAM10000_metadata.csv", header, picked)
    return root


@pytest.fixture(scope="session")
def isic_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ISIC2017-layout CSV (`labels.csv` + `<split>/<id>.jpg`) with 12 real images.

    Per split (train, validation, test): the first 2 melanomas and the first 2 others.
    Returns the CSV path.
    """
    header, rows = read_csv_rows(ISIC_LABELS)
    picked = []
    for split in ("train", "validation", "test"):
        for label in ("1", "0"):
            picked += [r for r in rows if r["split"] == split and r["melanoma"] == label][:2]
    root = tmp_path_factory.mktemp("isic_subset")
    for r in picked:
        (root / r["split"]).mkdir(exist_ok=True)
        name = f"{r['image_id']}.jpg"
        (root / r["split"] / name).symlink_to(shared_data / "isic2017" / r["split"] / name)
    return write_csv_rows(root / "labels.csv", header, picked)


@pytest.fixture(scope="session")
def real_jpeg(shared_data: Path) -> Path:
    """One real HAM10000 JPEG."""
    return shared_data / "ham10000" / "images" / "ISIC_0024306.jpg"

# ============================================================================
# End of ingest-stage fixtures.
# ============================================================================


# ============================================================================
# Evidence-stage fixtures (report, export, evaluate, predict tests).
# One tiny real cross-validation run per session (see tests/cv_result.py).
# ============================================================================

@pytest.fixture(scope="session")
def cv_result(tmp_path_factory: pytest.TempPathFactory):
    """A finished 2-fold run on generated images (`tests.cv_result.CVRun`); treat it as read-only."""
    pytest.importorskip("ray")
    from tests.cv_result import make_cv_result

    return make_cv_result(tmp_path_factory.mktemp("cv_result"))


@pytest.fixture(scope="session")
def exported_model(cv_result, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `cv_result` run exported as a model directory (no TTA); treat it as read-only."""
    from melanoma_dist.inference.export import export_model

    return export_model(cv_result.result_dir, tmp_path_factory.mktemp("export") / "model", n_boot=200)

# ============================================================================
# End of evidence-stage fixtures.
# ============================================================================
