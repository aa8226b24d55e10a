"""Bad input to the config and to the paths the commands write (issue 10: data integrity and bad input).

Every case runs the real CLI in-process (`tests.bad_input.run_cli`) and expects either a clear
error (exit code 2, one line naming the file or key, no traceback) or acceptance. Cases that
touch earlier results (an export, a dataset, a cv run) also check that those stay byte-identical.
Model cases corrupt a private copy of the session's tiny export (`exported_model`), never the
fixture itself.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from melanoma_dist.config import Config
from tests.bad_input import assert_accepted, assert_clear_error, run_cli, snapshot, assert_unchanged


class Ctx:
    """A case's workspace: tmp_path, plus on demand the session's tiny run and a private copy of its export.

    `{name}` in a case's needles is replaced by the attribute `name` (e.g. `{tmp}`, `{model}`).
    """

    def __init__(self, tmp: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self._request = request
        self._monkeypatch = monkeypatch

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    @functools.cached_property
    def run(self) -> Any:
        """The session's finished 2-fold run (read-only)."""
        return self._request.getfixturevalue("cv_result")

    @functools.cached_property
    def model(self) -> Path:
        """A copy of the session's export, free to corrupt."""
        return Path(shutil.copytree(self._request.getfixturevalue("exported_model"), self.tmp / "model"))

    @property
    def dataset(self) -> Path:
        return Path(self.run.data.dataset_dir)

    def file(self, name: str, text: str = "") -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def image(self) -> Path:
        """A tiny generated PNG to predict on."""
        from PIL import Image

        p = self.tmp / "lesion.png"
        Image.new("RGB", (32, 32), (150, 90, 70)).save(p)
        return p

    def edit_model_json(self, change: Callable[[dict], Any]) -> Path:
        """Replace the copied model.json by `change(spec)` (a value to dump, or the spec changed in place)."""
        path = self.model / "model.json"
        spec = json.loads(path.read_text())
        new = change(spec)
        path.write_text(json.dumps(spec if new is None else new))
        return self.model

    def read_only(self, d: Path | None = None) -> Path:
        """Make folder `d` (default `tmp/ro`) unwritable: mode 555, and as root, which ignores modes, a faked
        read-only mount."""
        d = d or self.tmp / "ro"
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o555)
        self._request.addfinalizer(lambda: d.chmod(0o755))  # so that pytest can clean tmp_path
        if os.geteuid() == 0:
            real = tempfile.TemporaryFile

            def temporary_file(*args: Any, dir: Any = None, **kwargs: Any) -> Any:  # noqa: A002 - tempfile's name
                if dir is not None and Path(dir).absolute().is_relative_to(d):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
                return real(*args, dir=dir, **kwargs)

            self._monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
        return d


@dataclass(frozen=True)
class Case:
    """One bad (or odd but valid) input: the command line, what the error names, what must not change."""

    id: str
    argv: Callable[[Ctx], list]
    needles: tuple[str, ...] | None
    """Strings the one error line must contain (`{attr}` from Ctx); None when the input is accepted."""
    keep: Callable[[Ctx], list[Path]] = field(default=lambda ctx: [])
    """Earlier results that must stay byte-identical."""


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _config(text: str, *overrides: str) -> Callable[[Ctx], list]:
    """`melanoma-dist config` on a YAML file holding `text`."""
    return lambda ctx: ["config", "--config", ctx.file("c.yaml", text), *_sets(*overrides)]


def _set(*overrides: str) -> Callable[[Ctx], list]:
    """`melanoma-dist config` with built-in defaults and overrides."""
    return lambda ctx: ["config", *_sets(*overrides)]


_SOURCE = "data:\n  sources:\n    - {kind: ham10000, path: /data/ham}\n"

CONFIG_CASES = [
    # Already handled before issue 10; listed so the table documents them.
    Case("yaml-syntax", _config("train: {epochs: [\n"), ("c.yaml", "not valid YAML")),
    Case("yaml-top-level-list", _config("- 1\n- 2\n"), ("c.yaml", "mapping at the top level")),
    Case("config-file-missing", lambda ctx: ["config", "--config", ctx.tmp / "nope.yaml"],
         ("nope.yaml", "does not exist")),
    Case("unknown-key-in-file", _config("train:\n  epochz: 3\n"),
         ("c.yaml", "unknown config key train.epochz", "valid keys of train")),
    Case("unknown-section", _set("nope.x=1"), ("unknown config key nope",)),
    Case("wrong-type-int", _config("train:\n  epochs: three\n"), ("c.yaml", "train.epochs must be an integer")),
    Case("wrong-type-float", _set("train.learning_rate=fast"), ("train.learning_rate must be a number",)),
    Case("wrong-type-bool", _set("train.jit_compile=maybe"), ("train.jit_compile must be true or false",)),
    Case("bad-mixed-precision", _set("train.mixed_precision=maybe"), ("train.mixed_precision must be one of", "bf16")),
    Case("bad-choice", _set("data.label_scheme=cats"), ("data.label_scheme must be one of",)),
    Case("out-of-range", _config("model:\n  dropout: 1.5\n"), ("c.yaml", "model.dropout must be in [0, 1)")),
    Case("list-index-out-of-range", _config(_SOURCE, "data.sources.3.path=x"), ("index '3' out of range",)),
    Case("float-as-string-accepted", _set("train.learning_rate=1e-3"), None),
    # Item 9: a key or section given twice.
    Case("duplicate-key", _config("train:\n  epochs: 3\n  seed: 1\n  epochs: 5\n"),
         ("c.yaml", "'epochs' is given twice", "lines 2 and 4")),
    Case("duplicate-section", _config("train:\n  epochs: 3\nmodel:\n  dropout: 0.1\ntrain:\n  seed: 1\n"),
         ("c.yaml", "'train' is given twice", "lines 1 and 5")),
    Case("duplicate-key-in-list-item", _config("data:\n  sources:\n    - {kind: folder, path: a, path: b}\n"),
         ("c.yaml", "'path' is given twice", "line 3")),
    Case("yaml-merge-key-accepted",
         _config("data:\n  sources:\n    - &ham {kind: ham10000, path: /a}\n    - <<: *ham\n      path: /b\n"), None),
    # Item 10: non-finite and out-of-range numbers (every numeric field: see test_every_numeric_field_is_checked).
    Case("learning-rate-inf", _set("train.learning_rate=.inf"), ("train.learning_rate must be a finite number",)),
    Case("learning-rate-nan", _set("train.learning_rate=.nan"), ("train.learning_rate must be a finite number",)),
    Case("learning-rate-overflow", _set("train.learning_rate=1e999"), ("train.learning_rate must be a finite number",)),
    Case("train-seed-negative", _set("train.seed=-1"), ("train.seed must be in [0, 2147483647]",)),
    Case("folds-seed-too-big", _set("folds.seed=99999999999"), ("folds.seed must be in [0, 2147483647]",)),
    Case("reduce-lr-patience-negative", _set("train.reduce_lr_patience=-1"),
         ("train.reduce_lr_patience must be >= 0",)),
    # Item 11: empty paths would mean the current directory.
    Case("output-dir-empty", _set("output_dir="), ("output_dir is empty",)),
    Case("output-dir-null-in-file", _config("output_dir:\n"), ("c.yaml", "output_dir is empty")),
    Case("dataset-dir-empty", _set("data.dataset_dir=''"), ("data.dataset_dir is empty",)),
    Case("dataset-dir-blank", _config("data:\n  dataset_dir: '  '\n"), ("c.yaml", "data.dataset_dir is empty")),
    Case("source-path-empty", _set("data.sources=[{kind: folder, path: ''}]"), ("data.sources[].path is empty",)),
    # Item 13a: an unknown key in an override is named, with the valid keys of its section.
    Case("override-unknown-list-key", _set("data.sourcez.0.path=x"),
         ("unknown config key data.sourcez", "valid keys of data", "'sources'")),
    Case("override-unknown-key-in-list-item", _config(_SOURCE, "data.sources.0.pathz=x"),
         ("unknown config key data.sources.0.pathz", "'path'")),
    Case("override-into-a-value", _set("train.epochs.x=1"), ("train.epochs is not a section",)),
]


def _train(ctx: Ctx, *overrides: str) -> list:
    """`melanoma-dist train` on a dataset that does not exist yet (the checks come before any ingest)."""
    return ["train", "--fold", "0", *_sets(f"data.dataset_dir={ctx.tmp / 'ds'}", f"output_dir={ctx.tmp / 'out'}",
                                           *overrides)]


def _ingest(ctx: Ctx, dataset_dir: Path) -> list:
    return ["ingest", *_sets(f"data.dataset_dir={dataset_dir}", f"data.sources=[{{kind: folder, path: '{ctx.tmp}'}}]")]


def _predict(ctx: Ctx, *extra: Any) -> list:
    return ["predict", ctx.model, ctx.image(), *extra]


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF  # inside the first entry's compressed data: the zip opens, its checksum fails
    p.write_bytes(bytes(data))


def _then(change: Callable[[Ctx], Any], argv: Callable[[Ctx], list]) -> Callable[[Ctx], list]:
    """Change the workspace (a file, the model), then build the command line."""
    return lambda ctx: (change(ctx), argv(ctx))[1]


_MODEL = lambda ctx: [ctx.model]  # noqa: E731 - the export must stay byte-identical
_RUN = lambda ctx: [ctx.run.result_dir]  # noqa: E731
_DATASET = lambda ctx: [ctx.dataset]  # noqa: E731

PATH_CASES = [
    # Item 12: an output or dataset folder that is a file.
    Case("output-dir-is-a-file", lambda ctx: _train(ctx, f"output_dir={ctx.file('out-file')}"),
         ("{tmp}/out-file", "output_dir is a file")),
    Case("output-dir-under-a-file",
         lambda ctx: ["cv", "--set", f"output_dir={ctx.file('f')}/run", "--set", f"data.dataset_dir={ctx.tmp}/ds"],
         ("{tmp}/f", "is a file", "output_dir")),
    Case("dataset-dir-is-a-file-ingest", lambda ctx: _ingest(ctx, ctx.file("ds-file")),
         ("{tmp}/ds-file", "data.dataset_dir is a file")),
    Case("dataset-dir-is-a-file-train", lambda ctx: _train(ctx, f"data.dataset_dir={ctx.file('ds-file')}"),
         ("{tmp}/ds-file", "data.dataset_dir is a file")),
    Case("dataset-dir-is-a-file-folds",
         lambda ctx: ["folds", "--set", f"data.dataset_dir={ctx.file('ds-file')}"],
         ("{tmp}/ds-file", "data.dataset_dir is a file")),
    Case("audit-dataset-is-a-file", lambda ctx: ["audit", "--dataset", ctx.file("ds-file")], ("{tmp}/ds-file",)),
    Case("export-out-is-a-file", lambda ctx: ["export", ctx.run.result_dir, "--out", ctx.file("m"), "--n-boot", "20"],
         ("{tmp}/m", "--out is a file"), keep=_RUN),
    Case("report-default-out-is-a-file",
         _then(lambda ctx: ctx.file("res/report"), lambda ctx: ["report", ctx.tmp / "res", "--n-boot", "20"]),
         ("{tmp}/res/report", "default --out is a file")),
    Case("report-out-is-a-file", lambda ctx: ["report", ctx.run.result_dir, "--out", ctx.file("r"), "--n-boot", "20"],
         ("{tmp}/r", "--out is a file"), keep=_RUN),
    Case("evaluate-out-is-a-file",
         lambda ctx: ["evaluate", ctx.model, ctx.dataset, "--out", ctx.file("ev"), "--n-boot", "20"],
         ("{tmp}/ev", "--out is a file"), keep=lambda ctx: [ctx.model, ctx.dataset]),
    # Item 12: read-only output folders, found before the work starts.
    Case("output-dir-read-only", lambda ctx: _train(ctx, f"output_dir={ctx.read_only()}/run"),
         ("{tmp}/ro", "output_dir", "cannot be written")),
    Case("dataset-dir-read-only-ingest", lambda ctx: _ingest(ctx, ctx.read_only() / "ds"),
         ("{tmp}/ro", "data.dataset_dir", "cannot be written")),
    Case("export-out-read-only",
         lambda ctx: ["export", ctx.run.result_dir, "--out", ctx.read_only() / "m", "--n-boot", "20"],
         ("{tmp}/ro", "--out", "cannot be written"), keep=_RUN),
    Case("evaluate-model-dir-read-only",
         lambda ctx: ["evaluate", ctx.read_only(ctx.model), ctx.dataset, "--out", ctx.tmp / "ev", "--n-boot", "20"],
         ("{tmp}/model", "MODEL", "cannot be written"), keep=lambda ctx: [ctx.model, ctx.dataset]),
    Case("predict-csv-read-only", lambda ctx: _predict(ctx, "--csv", ctx.read_only() / "p.csv"),
         ("{tmp}/ro", "--csv", "cannot be written"), keep=_MODEL),
    Case("audit-json-read-only",
         lambda ctx: ["audit", "--dataset", ctx.dataset, "--json", ctx.read_only() / "a.json"],
         ("{tmp}/ro", "--json", "cannot be written"), keep=_DATASET),
    # Item 12: a --json file that is a folder, found before predicting (not after the table).
    Case("predict-json-is-a-folder", lambda ctx: _predict(ctx, "--json", ctx.tmp),
         ("{tmp}", "--json is a folder"), keep=_MODEL),
    Case("audit-json-is-a-folder", lambda ctx: ["audit", "--dataset", ctx.dataset, "--json", ctx.tmp],
         ("{tmp}", "--json is a folder"), keep=_DATASET),
    Case("predict-json-in-new-folder-accepted", lambda ctx: _predict(ctx, "--json", ctx.tmp / "new" / "p.json"),
         None, keep=_MODEL),
    # Item 12: a model.json of the wrong shape, and corrupt member files.
    Case("model-json-is-a-list", _then(lambda ctx: ctx.edit_model_json(lambda s: [s]), _predict),
         ("{model}/model.json", "must hold a JSON object, got a list"), keep=_MODEL),
    Case("threshold-not-a-number",
         _then(lambda ctx: ctx.edit_model_json(lambda s: s["operating_point"].update(threshold="high")), _predict),
         ("{model}/model.json", "operating_point.threshold must be a number in [0, 1]", "'high'"), keep=_MODEL),
    Case("threshold-nan",
         _then(lambda ctx: ctx.edit_model_json(lambda s: s["operating_point"].update(threshold=float("nan"))),
               _predict), ("{model}/model.json", "operating_point.threshold"), keep=_MODEL),
    Case("temperature-not-a-number",
         _then(lambda ctx: ctx.edit_model_json(lambda s: s["calibration"].update(temperature="warm")), _predict),
         ("{model}/model.json", "calibration.temperature must be a finite number > 0"), keep=_MODEL),
    Case("temperature-zero",
         _then(lambda ctx: ctx.edit_model_json(lambda s: s["calibration"].update(temperature=0)), _predict),
         ("{model}/model.json", "calibration.temperature"), keep=_MODEL),
    Case("decision-index-out-of-range",
         _then(lambda ctx: ctx.edit_model_json(lambda s: s.update(decision_index=5)), _predict),
         ("{model}/model.json", "decision_index must be an index of class_names"), keep=_MODEL),
    Case("member-truncated", _then(lambda ctx: _truncate(ctx.model / "folds" / "fold-0.keras"), _predict),
         ("{model}/folds/fold-0.keras", "is corrupt"), keep=_MODEL),
    Case("member-bit-flip", _then(lambda ctx: _flip_byte(ctx.model / "folds" / "fold-1.keras"), _predict),
         ("{model}/folds/fold-1.keras", "is corrupt", "checksum"), keep=_MODEL),
    Case("member-corrupt-evaluate",
         _then(lambda ctx: _truncate(ctx.model / "folds" / "fold-0.keras"),
               lambda ctx: ["evaluate", ctx.model, ctx.dataset, "--n-boot", "20"]),
         ("{model}/folds/fold-0.keras", "is corrupt"), keep=lambda ctx: [ctx.model, ctx.dataset]),
]


@pytest.mark.parametrize("case", CONFIG_CASES + PATH_CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    ctx = Ctx(tmp_path, request, monkeypatch)
    argv = case.argv(ctx)
    kept = case.keep(ctx)
    before = snapshot(*kept)
    outcome = run_cli(argv, capsys)
    if case.needles is None:
        assert_accepted(outcome)
    else:
        assert_clear_error(outcome, *[n.format_map(ctx) for n in case.needles])
        assert "P(" not in outcome.out, "the work ran before the error"  # predict printed no table
    assert_unchanged(before, *kept)


def _numeric_keys(tp: type = Config, prefix: str = "") -> list[tuple[str, type]]:
    """Every int and float field of the config, as (dotted key, type)."""
    out = []
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        key, ftp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(ftp):
            out += _numeric_keys(ftp, f"{key}.")
        elif ftp in (int, float) or typing.get_args(ftp) == (int, ...):
            out.append((key, ftp))
    return out


NUMERIC_KEYS = _numeric_keys()


@pytest.mark.parametrize("key,tp", NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_every_numeric_field_is_checked(key: str, tp: type, capsys: pytest.CaptureFixture) -> None:
    """A huge negative value (and, for floats, infinity) is rejected at load, naming the key."""
    bad = "[-1000000000000]" if tp not in (int, float) else "-1000000000000"
    assert_clear_error(run_cli(["config", "--set", f"{key}={bad}"], capsys), key)
    if tp is float:
        assert_clear_error(run_cli(["config", "--set", f"{key}=.inf"], capsys), key, "finite")


def test_os_error_during_the_work_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """A folder that turns read-only mid-command (errno 30) gives one line naming the file."""
    from melanoma_dist import cli

    def read_only_mid_run(cfg: Config, args: Any) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "fold-0" / "model.keras"))

    monkeypatch.setitem(cli.COMMANDS, "config", (read_only_mid_run, "test"))
    line = assert_clear_error(run_cli(["config"], capsys), "fold-0/model.keras", "Read-only file system")
    assert "Errno" not in line


def test_programming_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Only input errors become one line: a bug still shows its traceback."""
    from melanoma_dist import cli

    def buggy(cfg: Config, args: Any) -> int:
        return {}["missing"]

    monkeypatch.setitem(cli.COMMANDS, "config", (buggy, "test"))
    assert "KeyError" in (run_cli(["config"], capsys).escaped or "")
