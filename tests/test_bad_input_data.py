"""Bad input to the data commands (`ingest`, `folds`): each case ends in a clear error, a counted skip, or is accepted.

One table of cases (issue 10, "data integrity and bad input"), run through the real CLI with a
small YAML config in tmp_path (see `tests/bad_input.py` for the three outcomes). Every case
builds its inputs from a few generated 20x20 images; no model is trained.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from melanoma_dist.cli import main
from melanoma_dist.data.shards import MANIFEST, write_manifest
from melanoma_dist.inference.predict import collect_files
from tests.bad_input import assert_accepted, assert_clear_error, assert_unchanged, run_cli, snapshot
from tests.synthetic import write_class_folders

BASE = {"melanoma": 3, "other": 3}
"""Images per class of the folder source every case starts from."""

CSV_ROWS = [("m1", "1", "train"), ("m2", "1", "train"), ("m3", "1", "test"),
            ("o1", "0", "train"), ("o2", "0", "train"), ("o3", "0", "test")]


# ---------------------------------------------------------------- inputs

def _noise(mode: str = "RGB", size: int = 20, seed: int = 0) -> Image.Image:
    """A noise image in any Pillow mode (16-bit for `I;16`)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.frombytes("I;16", (size, size), rng.integers(500, 3000, (size, size)).astype("<u2").tobytes())
    bands = len(Image.new(mode, (1, 1)).getbands())
    shape = (size, size) if bands == 1 else (size, size, bands)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A small PNG whose header claims 20000x20000 px: Pillow refuses it as a decompression bomb."""
    data = bytearray(_png_bytes(_noise("L", 8)))
    ihdr = bytearray(data[12:29])  # chunk type and the 13 header bytes
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _palette_with_transparency() -> Image.Image:
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.paste(1, (10, 0, 20, 20))
    pal.info["transparency"] = 0
    return pal


def _folder(tmp: Path, name: str = "imgs", n: Mapping[str, int] = BASE, seed: int = 0) -> Path:
    return write_class_folders(tmp / name, dict(n), seed=seed)


def _folder_source(path: Path, **kw) -> dict:
    return {"kind": "folder", "path": str(path), "name": "imgs", "label_type": "melanoma", **kw}


def _config(tmp: Path, *sources: dict, **data) -> Path:
    """Write `tmp/config.yaml`: the sources, a dataset in `tmp/ds`, 16 px PNG, 2 folds."""
    cfg = {"data": {"sources": list(sources), "dataset_dir": str(tmp / "ds"), "label_scheme": "melanoma",
                    "image_size": 16, "encoding": "png", "rows_per_shard": 4, "ingest_workers": 1, **data},
           "folds": {"k": 2, "seed": 0}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _csv_dir(tmp: Path, rows=CSV_ROWS, extra_images: tuple[str, ...] = (), missing: tuple[str, ...] = ()) -> Path:
    """`tmp/isic/images/<id>.png` for each row's id (but `missing`) and each extra image; returns `tmp/isic`."""
    root = tmp / "isic"
    (root / "images").mkdir(parents=True, exist_ok=True)
    ids = [r[0] for r in rows if r[0] not in missing] + list(extra_images)
    for i, image_id in enumerate(ids):
        _noise(seed=100 + i).save(root / "images" / f"{image_id}.png")
    return root


def _csv_text(rows=CSV_ROWS, header: str = "image_id,melanoma,split") -> str:
    return header + "\n" + "".join(",".join(r) + "\n" for r in rows)


def _csv_source(csv_path: Path, **kw) -> dict:
    return {"kind": "csv", "path": str(csv_path), "name": "isic", "label_type": "melanoma",
            "label_column": "melanoma", **kw}


def _ingest(cfg: Path, *overrides: str) -> None:
    """Ingest a good dataset first (the state a later, failing command must not damage)."""
    assert main(["ingest", "--config", str(cfg), *[a for o in overrides for a in ("--set", o)]]) == 0


# ---------------------------------------------------------------- case builders

Build = Callable[[Path], list]


def with_file(rel: str, write: Callable[[Path], None]) -> Build:
    """`ingest` of the base folder source plus one file at `imgs/<rel>` made by `write(path)`."""
    def build(tmp: Path) -> list:
        root = _folder(tmp)
        (root / rel).parent.mkdir(exist_ok=True)
        write(root / rel)
        return ["ingest", "--config", _config(tmp, _folder_source(root))]
    return build


def write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def write_image(im: Image.Image, fmt: str = "PNG") -> Callable[[Path], None]:
    return lambda p: im.save(p, format=fmt)


def csv_ingest(text: str | None = None, encoding: str = "utf-8", extra_images: tuple[str, ...] = (),
               missing: tuple[str, ...] = (), **source) -> Build:
    """`ingest` of a CSV source: images in `isic/images/`, `isic/labels.csv` holding `text` (default: CSV_ROWS)."""
    def build(tmp: Path) -> list:
        root = _csv_dir(tmp, extra_images=extra_images, missing=missing)
        csv_path = root / "labels.csv"
        csv_path.write_bytes((_csv_text() if text is None else text).encode(encoding))
        return ["ingest", "--config", _config(tmp, _csv_source(csv_path, **source))]
    return build


def ham_ingest(rows: list[tuple[str, str, str]], extra_images: tuple[str, ...] = ()) -> Build:
    """`ingest` of a HAM10000-layout source (`HAM10000_metadata.csv` + `images/<id>.jpg`)."""
    def build(tmp: Path) -> list:
        root = tmp / "ham"
        (root / "images").mkdir(parents=True)
        for i, image_id in enumerate([r[1] for r in rows] + list(extra_images)):
            _noise(seed=200 + i).save(root / "images" / f"{image_id}.jpg", quality=90)
        (root / "HAM10000_metadata.csv").write_text(_csv_text(rows, "lesion_id,image_id,dx"))
        return ["ingest", "--config", _config(tmp, {"kind": "ham10000", "path": str(root), "name": "ham"})]
    return build


HAM_ROWS = [("L1", "h1", "mel"), ("L2", "h2", "mel"), ("L3", "h3", "nv"), ("L4", "h4", "nv")]


def after_ingest(command: str, change: Callable[[Path], list] | None = None) -> Build:
    """Ingest the base folder source into `tmp/ds`, run `change(tmp)` (extra CLI arguments), then `command`."""
    def build(tmp: Path) -> list:
        cfg = _config(tmp, _folder_source(_folder(tmp)))
        _ingest(cfg)
        extra = change(tmp) if change else []
        return [command, "--config", cfg, *extra]
    return build


def other_folder(tmp: Path) -> list:
    """A second image folder, configured by an override: the source the config now means."""
    other = _folder(tmp, "other_imgs", {"melanoma": 4, "other": 4}, seed=7)
    return ["--set", f"data.sources.0.path={other}"]


def add_image(tmp: Path) -> list:
    _noise(seed=99).save(tmp / "imgs" / "melanoma" / "new.png")
    return []


def drop_fingerprint(tmp: Path) -> list:
    """Rewrite the manifest as a melanoma-dist from before the fingerprint wrote it."""
    manifest = json.loads((tmp / "ds" / MANIFEST).read_text())
    manifest.pop("fingerprint", None)
    write_manifest(tmp / "ds", manifest)
    return []


def drop_fingerprint_and_move(tmp: Path) -> list:
    return drop_fingerprint(tmp) + other_folder(tmp)


def dataset_only(**data) -> Callable[[Path], list]:
    """A config that only points at the dataset (no sources), with other settings."""
    def change(tmp: Path) -> list:
        return ["--set", "data.sources=[]"] + [a for k, v in data.items() for a in ("--set", f"data.{k}={v}")]
    return change


def add_notes(tmp: Path) -> list:
    (tmp / "ds" / "NOTES.txt").write_text("my notes\n")
    (tmp / "ds" / "plots").mkdir()
    (tmp / "ds" / "plots" / "counts.png").write_bytes(b"not ours")
    return other_folder(tmp)


def damage(rel: str, how: Callable[[bytes], bytes]) -> Callable[[Path], list]:
    def change(tmp: Path) -> list:
        path = tmp / "ds" / rel
        path.write_bytes(how(path.read_bytes()))
        return []
    return change


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def foreign_folder(tmp: Path) -> list:
    (tmp / "ds").mkdir()
    (tmp / "ds" / "NOTES.txt").write_text("my notes\n")
    return ["ingest", "--config", _config(tmp, _folder_source(_folder(tmp)))]


def stale_temp(tmp: Path) -> list:
    """What a SIGKILL mid-ingest leaves: a hidden temporary folder beside the dataset."""
    stale = tmp / ".ds.ingest-0badc0de"
    stale.mkdir()
    (stale / "shard-00000.partial").write_bytes(b"half a shard")
    return ["ingest", "--config", _config(tmp, _folder_source(_folder(tmp)))]


def broken_link(target: str) -> Callable[[Path], None]:
    """A symlink to `target` (relative to the link's folder; the link itself for a loop)."""
    return lambda p: p.symlink_to(p.name if target == "self" else target)


def csv_row_to_dangling_link(tmp: Path) -> list:
    """A CSV row whose image is a symlink to a file that is gone."""
    argv = csv_ingest(missing=("o3",))(tmp)
    (tmp / "isic" / "images" / "o3.png").symlink_to("deleted.png")
    return argv


# ---------------------------------------------------------------- checks of accepted cases

@dataclass
class Ran:
    """An accepted command: its folder, the dataset's manifest, the log, the dataset files before it."""

    tmp: Path
    manifest: dict
    log: str
    before: dict[str, str] | None


def images(n: int) -> Callable[[Ran], None]:
    def check(r: Ran) -> None:
        assert r.manifest["num_images"] == n, r.manifest["counts"]
    return check


def from_other_folder(r: Ran) -> None:
    assert r.manifest["num_images"] == 8
    assert r.manifest["sources"][0]["path"] == str(r.tmp / "other_imgs")
    shards = sorted(p.name for p in (r.tmp / "ds").glob("shard-*"))
    assert shards == sorted(r.manifest["shards"])  # no shard of the old dataset is left


def reingested_from_other_folder(r: Ran) -> None:
    """`folds` noticed the new source path, said so, and ingested it."""
    from_other_folder(r)
    assert "ingesting again" in r.log and "path" in r.log and str(r.tmp / "other_imgs") in r.log


def reingested_with_new_image(r: Ran) -> None:
    assert r.manifest["num_images"] == 7 and r.manifest["counts"]["melanoma"] == 4
    assert "ingesting again" in r.log and "files" in r.log


def reused(r: Ran) -> None:
    assert r.before is not None
    assert_unchanged({p: h for p, h in r.before.items() if "/folds/" not in p},
                     *[p for p in (r.tmp / "ds").iterdir() if p.name != "folds"])
    assert "ingesting again" not in r.log


def reused_without_fingerprint(r: Ran) -> None:
    reused(r)
    assert "no fingerprint" in r.log


def notes_kept(r: Ran) -> None:
    from_other_folder(r)
    assert (r.tmp / "ds" / "NOTES.txt").read_text() == "my notes\n"
    assert (r.tmp / "ds" / "plots" / "counts.png").read_bytes() == b"not ours"


def stale_temp_removed(r: Ran) -> None:
    assert not (r.tmp / ".ds.ingest-0badc0de").exists()
    assert ".ds.ingest-0badc0de" in r.log and "interrupted" in r.log
    assert not [p.name for p in r.tmp.iterdir() if p.name.startswith(".ds.")]


def unlabelled(n: int, *names: str) -> Callable[[Ran], None]:
    def check(r: Ran) -> None:
        src = r.manifest["sources"][0]
        assert (src["num_unlabelled"], r.manifest["num_unlabelled"]) == (n, n)
        assert sorted(Path(p).name for p in src["unlabelled_sample"]) == sorted(names)
        assert f"{n} image file" in r.log and all(name in r.log for name in names)
    return check


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    """One bad input: how to make it and what must come of it.

    `error` lists what the error line must name (outcome: clear error); otherwise the command
    must succeed with exactly the `skips` (reason prefix -> count) in manifest.json (outcome:
    counted skip, or accepted when there are none), and pass `check`.
    """

    id: str
    build: Build
    error: tuple[str, ...] = ()
    skips: Mapping[str, int] = field(default_factory=dict)
    check: Callable[[Ran], None] | None = None


CASES = [
    # Image files: already handled, kept working.
    Case("zero-byte-image", with_file("other/zero.png", write_bytes(b"")), skips={"empty file (0 bytes)": 1}),
    Case("text-file-as-image", with_file("other/notes.jpg", write_bytes(b"not an image\n")),
         skips={"not an image": 1}),
    Case("truncated-image", with_file("melanoma/cut.png", lambda p: p.write_bytes(half(_png_bytes(_noise(size=64))))),
         skips={"corrupt or truncated image": 1}),
    Case("decompression-bomb", with_file("other/bomb.png", write_bytes(_bomb_png())),
         skips={"decompression bomb": 1}),
    Case("image-smaller-than-8px", with_file("other/tiny.png", write_image(_noise(size=4))),
         skips={"image is 4x4 px": 1}),
    Case("mode-RGBA", with_file("other/rgba.png", write_image(_noise("RGBA"))), check=images(7)),
    Case("mode-L", with_file("other/gray.png", write_image(_noise("L"))), check=images(7)),
    Case("mode-CMYK-jpeg", with_file("other/cmyk.jpg", write_image(_noise("CMYK"), "JPEG")), check=images(7)),
    Case("mode-16-bit", with_file("other/deep.png", write_image(_noise("I;16"))), check=images(7)),
    Case("mode-P-transparent", with_file("other/pal.png", write_image(_palette_with_transparency())),
         check=images(7)),
    # Labels and columns: already handled, kept working.
    Case("folder-unknown-class", with_file("benign/x.png", write_image(_noise())), error=("'benign'", "imgs/benign")),
    Case("csv-missing-label-column", csv_ingest(label_column="target"), error=("labels.csv", "missing column 'target'")),
    Case("csv-missing-group-column", csv_ingest(group_column="lesion"), error=("labels.csv", "'lesion'")),
    Case("csv-unknown-label", csv_ingest(_csv_text(CSV_ROWS[:2] + [("o1", "maybe", "train")] + CSV_ROWS[4:])),
         error=("labels.csv line 4", "'maybe'")),
    Case("csv-empty-label", csv_ingest(_csv_text(CSV_ROWS[:5] + [("o3", "", "test")])),
         error=("labels.csv line 7", "empty 'melanoma' cell")),
    Case("csv-duplicate-id", csv_ingest(_csv_text(CSV_ROWS + CSV_ROWS[:1])), error=("'m1' appears twice",)),
    Case("csv-missing-image-file", csv_ingest(missing=("o3",)), skips={"image file not found": 1}),
    Case("missing-source-folder", lambda tmp: ["ingest", "--config", _config(tmp, _folder_source(tmp / "nope"))],
         error=("nope", "is not a directory")),
    # 2: a changed source is noticed, and ingested again where the command ingests on demand.
    Case("source-path-changed-folds-reingests", after_ingest("folds", other_folder), check=reingested_from_other_folder),
    Case("source-file-added-folds-reingests", after_ingest("folds", add_image), check=reingested_with_new_image),
    Case("same-source-folds-reuses", after_ingest("folds"), check=reused),
    Case("no-fingerprint-same-source-reuses", after_ingest("folds", drop_fingerprint), check=reused_without_fingerprint),
    Case("no-fingerprint-path-changed-reingests", after_ingest("folds", drop_fingerprint_and_move),
         check=reingested_from_other_folder),
    Case("dataset-only-config-other-size", after_ingest("folds", dataset_only(image_size=32)),
         error=("image_size", "data.sources")),
    # 3: foreign files are never deleted.
    Case("foreign-folder-refused", foreign_folder, error=("ds", "not a melanoma-dist dataset")),
    Case("reingest-keeps-foreign-files", after_ingest("ingest", add_notes), check=notes_kept),
    # 4: a temporary folder of an interrupted ingest is cleaned by the next one.
    Case("stale-temp-folder-cleaned", stale_temp, check=stale_temp_removed),
    # 6: broken symlinks are counted.
    Case("dangling-symlink", with_file("melanoma/gone.png", broken_link("nowhere.png")),
         skips={"dangling symbolic link": 1}),
    Case("symlink-loop", with_file("other/loop.png", broken_link("self")), skips={"symbolic link loop": 1}),
    Case("csv-row-to-dangling-symlink", csv_row_to_dangling_link, skips={"dangling symbolic link": 1}),
    # 7: images that no label row names are counted and named.
    Case("csv-unlabelled-images", csv_ingest(extra_images=("x1", "x2")), check=unlabelled(2, "x1.png", "x2.png")),
    Case("ham-unlabelled-images", ham_ingest(HAM_ROWS, extra_images=("h9",)), check=unlabelled(1, "h9.jpg")),
    Case("folder-loose-image", with_file("loose.png", write_image(_noise())), check=unlabelled(1, "loose.png")),
    # 8: an empty split cell is a counted skip, not a silent drop.
    Case("csv-empty-split-cell", csv_ingest(_csv_text(CSV_ROWS[:2] + [("m3", "1", "")] + CSV_ROWS[3:]),
                                            splits=["train", "test"]),
         skips={"empty 'split' cell": 1}),
    # 12: unreadable CSV, shards and manifest are named.
    Case("csv-latin1", csv_ingest(_csv_text(CSV_ROWS) + "o4,0,tr\u00e9ning\n", encoding="latin-1"),
         error=("labels.csv", "not UTF-8")),
    Case("truncated-shard", after_ingest("folds", damage("shard-00001-of-00002.parquet", half)),
         error=("shard-00001-of-00002.parquet", "damaged or truncated", "melanoma-dist ingest")),
    Case("zero-byte-shard", after_ingest("folds", damage("shard-00000-of-00002.parquet", lambda d: b"")),
         error=("shard-00000-of-00002.parquet", "damaged or truncated")),
    Case("truncated-manifest", after_ingest("folds", damage(MANIFEST, half)),
         error=(MANIFEST, "damaged or truncated", "melanoma-dist ingest")),
    Case("manifest-not-a-mapping", after_ingest("folds", damage(MANIFEST, lambda d: b"[]\n")),
         error=(MANIFEST, "damaged")),
    Case("ingest-replaces-damaged-manifest", after_ingest("ingest", damage(MANIFEST, half)), check=images(6)),
    # 13b: a CSV without rows says so.
    Case("csv-header-only", csv_ingest("image_id,melanoma,split\n"), error=("labels.csv", "no rows")),
    Case("ham-header-only", ham_ingest([]), error=("HAM10000_metadata.csv", "no rows")),
    Case("csv-empty-file", csv_ingest(""), error=("labels.csv is empty",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="melanoma_dist")
    argv = case.build(tmp_path)
    ds = tmp_path / "ds"
    before = snapshot(ds) if ds.exists() else None
    caplog.clear()
    outcome = run_cli(argv, capsys)
    if case.error:
        assert_clear_error(outcome, *case.error)
        if before is None:
            assert not ds.exists()
        else:
            assert_unchanged(before, ds)  # the failing command left the existing dataset alone
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds.")]
        return
    assert_accepted(outcome)
    manifest = json.loads((ds / MANIFEST).read_text())
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert manifest["num_skipped"] == len(reasons) == sum(case.skips.values()), reasons
    for prefix, n in case.skips.items():
        assert sum(r.startswith(prefix) for r in reasons) == n, reasons
        assert prefix in caplog.text  # the log says why too
    if case.check:
        case.check(Ran(tmp_path, manifest, caplog.text, before))


def test_predict_reports_broken_links(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """`predict DIR` keeps broken symlinks (each gets an error row) and warns about them by name."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _noise().save(photos / "a.png")
    (photos / "gone.png").symlink_to("nowhere.png")
    (photos / "loop.png").symlink_to("loop.png")
    (photos / ".hidden.png").symlink_to("nowhere.png")
    caplog.set_level(logging.WARNING, logger="melanoma_dist")
    assert collect_files([photos]) == [photos / "a.png", photos / "gone.png", photos / "loop.png"]
    assert "2 broken symbolic links" in caplog.text
    assert "gone.png" in caplog.text and "loop.png" in caplog.text

    from melanoma_dist.data.images import BadImageError, load_rgb

    for name, reason in (("gone.png", "dangling symbolic link"), ("loop.png", "symbolic link loop")):
        with pytest.raises(BadImageError, match=reason):
            load_rgb(photos / name)
    assert os.path.islink(photos / "gone.png")
