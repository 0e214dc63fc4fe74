"""One finished small run per test session for the shard CLI and report tests (pytest plugin: test modules
register it with `pytest_plugins = ["tests.conftest_cli"]`). Tests must not modify it: copy it first."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "small-cpu.yaml"


@pytest.fixture(scope="session")
def small_run(ray_cluster, tmp_path_factory) -> Path:
    """The small recipe run the way users run it (`python -m pipeline run`), on the session's cluster."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--recipe", str(RECIPE), "--run-dir", str(run_dir),
                           "--address", ray_cluster["address"]], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert done.returncode == 0, f"pipeline run failed:\n{done.stderr[-3000:]}"
    return run_dir


@pytest.fixture(scope="session")
def expected_gallery(small_run):
    """count(per_group, **only): units the report's gallery must show, worked out from the ledger alone: per
    (task, decision, reason) the pairs, capped at per_group; `only` keeps groups with these task/decision/reason."""
    ledger = pq.read_table(small_run / "ledger.parquet", columns=["pair_id", "task", "status", "reason"]).to_pylist()
    groups = Counter((r["task"], r["status"], r["reason"]) for r in ledger if r["pair_id"] is not None)

    def count(per_group: int, **only: str) -> int:
        keep = lambda g: all(dict(zip(("task", "decision", "reason"), g))[k] == v for k, v in only.items())  # noqa: E731
        return sum(min(n, per_group) for g, n in groups.items() if keep(g))

    return count
