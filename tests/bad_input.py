"""Harness of the bad-input tests (`tests/test_bad_input_*.py`).

Every bad input has one of three expected outcomes:

- a clear error: exit code 2, one `melanoma-dist CMD: error: ...` line on stderr that names
  the offending file or key, and no traceback;
- a counted skip: the command succeeds and the skip is counted, with its reason, where the
  user looks (the manifest, the log);
- accepted: the input is odd but valid.

Whatever the outcome, results written before the failing command (datasets, finished folds,
exports) must stay byte-identical: `snapshot` before, `assert_unchanged` after.
"""

from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest


@dataclass
class Outcome:
    """What a CLI call did: its exit code, its output and any exception that escaped `main`."""

    code: int | None
    out: str
    err: str
    escaped: str | None = None  # the traceback of an exception `main` did not turn into a message


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture) -> Outcome:
    """Run `melanoma-dist ARGV` in-process and capture what a user would see."""
    from melanoma_dist.cli import main

    capsys.readouterr()  # drop earlier output
    escaped = None
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit with 2 and a usage line
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the point is to catch what the CLI let through
        code, escaped = None, traceback.format_exc()
    cap = capsys.readouterr()
    return Outcome(code, cap.out, cap.err, escaped)


def assert_clear_error(outcome: Outcome, *needles: str) -> str:
    """Exit code 2 with one error line naming every needle (case-insensitive); returns the line."""
    assert outcome.escaped is None, f"an exception escaped the CLI:\n{outcome.escaped}"
    assert "Traceback" not in outcome.err, outcome.err
    assert outcome.code == 2, f"exit code {outcome.code}, stderr:\n{outcome.err}"
    lines = [ln for ln in outcome.err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, f"expected one error line, stderr:\n{outcome.err}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not named in: {lines[0]}"
    return lines[0]


def assert_accepted(outcome: Outcome) -> None:
    """The command succeeded."""
    assert outcome.escaped is None, f"an exception escaped the CLI:\n{outcome.escaped}"
    assert outcome.code == 0, f"exit code {outcome.code}, stderr:\n{outcome.err}"


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (a root may be a file), keyed by path."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def assert_unchanged(before: dict[str, str], *roots: Path) -> None:
    """The files under the roots are exactly those of `before`, byte for byte."""
    after = snapshot(*roots)
    assert after.keys() == before.keys(), (f"files appeared {sorted(after.keys() - before.keys())} or vanished "
                                           f"{sorted(before.keys() - after.keys())}")
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, f"files changed: {changed}"
