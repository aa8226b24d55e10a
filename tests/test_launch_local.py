"""`melanoma-dist launch local`: which command runs, with which options (the commands themselves are tested
on a real Ray in test_cv.py and test_tune.py)."""

from __future__ import annotations

import pytest

from melanoma_dist import cli


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple[str, object, object]] = []
    for name in ("cv", "tune"):
        monkeypatch.setattr(cli, f"cmd_{name}", lambda cfg, args, name=name: seen.append((name, cfg, args)) or 0)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    return seen


@pytest.mark.parametrize("argv,command,nested,folds", [
    ([], "cv", False, None),
    (["--folds", "0,2"], "cv", False, "0,2"),
    (["--tune"], "tune", False, None),
    (["--tune", "--nested"], "tune", True, None),
])
def test_local_target_runs_the_chosen_command_on_an_embedded_ray(calls, argv, command, nested, folds):
    assert cli.main(["launch", "local", "--set", "distributed.address=10.0.0.2:6379", *argv]) == 0
    [(name, cfg, args)] = calls
    assert (name, args.nested, args.folds, args.resume) == (command, nested, folds, False)
    # "Local" starts its own Ray: no configured or environment address reaches the command.
    assert cfg.distributed.address == "" and args.address is None


@pytest.mark.parametrize("argv,words", [
    (["--nested"], "add --tune"),
    (["--tune", "--folds", "1"], "--folds selects folds of `cv`"),
    (["--tune", "--smoke-test"], "drop --tune"),
])
def test_inconsistent_options_are_refused(calls, capsys, argv, words):
    assert cli.main(["launch", "local", *argv]) == 2
    assert words in capsys.readouterr().err and calls == []
