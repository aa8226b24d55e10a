"""Smoke test of benchmarks/: `run_all.py --smoke` runs every benchmark and writes numbers.

It checks that the benchmarks work, not how fast anything is (smoke sizes are tiny and
targets are never asserted). It starts real Ray and Horovod jobs; about 1-2 minutes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("bench_pipeline", "bench_feeding", "bench_horovod", "bench_ray", "bench_memory", "bench_scale", "scaling_model")

pytestmark = pytest.mark.integration


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_run_all_smoke_writes_numbers(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--smoke", "--out-dir", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"run_all.py --smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"run_all.py --smoke took {elapsed:.0f}s")

    for name in BENCHMARKS:
        doc = json.loads((out / f"{name}.json").read_text())
        assert doc["name"] == name and doc["smoke"] is True
        assert doc["env"]["cpu_count"] >= 1 and doc["env"]["versions"]["keras"]
        assert doc["summary"], f"{name}: empty summary"
        for row in doc["summary"]:
            values = [row[k] for k in ("ours", "baseline", "ratio") if row[k] is not None]
            assert values and all(_is_number(v) for v in values), f"{name}: row without numbers: {row}"
        assert doc["results"], f"{name}: no raw results"

    md = (out / "latest.md").read_text()
    assert "SMOKE" in md and all(f"{name}.json" in md for name in BENCHMARKS)
    assert "Failed to run" not in md
