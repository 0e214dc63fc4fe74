"""What the driver checks before it creates or starts anything: inputs (paths, globs, brace patterns) and
whether a per-stage job may start; and what the report calls a task's target. No Ray cluster needed."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from manifests.inputs import plan_inputs
from manifests.ledger import LEDGER_COLUMNS
from pipeline.recipe import parse_recipe
from pipeline.report import build_report
from stages.instruct import target_shares, task_weights

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipeline", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=120)


def test_a_wrong_input_path_is_one_line_and_leaves_no_run_dir(tmp_path):
    recipe = tmp_path / "mine.yaml"
    missing = tmp_path / "data" / "shards-{000000..000003}.tar"
    recipe.write_text(f"name: mine\ninput:\n  kind: webdataset\n  paths: ['{missing}']\n")
    run_dir = tmp_path / "run"
    done = _cli("--recipe", str(recipe), "--run-dir", str(run_dir))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {recipe}: input.paths: no .tar files found for input path "
        f"'{tmp_path / 'data' / 'shards-000000.tar'}' (from '{missing}')"]
    assert "Traceback" not in done.stderr and not run_dir.exists()


def test_a_stage_without_its_predecessor_is_refused_before_ray_starts(tmp_path):
    run_dir = tmp_path / "run"
    done = _cli("--recipe", "default-cpu", "--stage", "pack", "--run-dir", str(run_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == ("error: stage 'pack' cannot start: stage 'score' has not finished (it has not run); "
                           f"run first: python -m pipeline run --recipe default-cpu --stage score --run-dir {run_dir}\n")
    assert "Ray:" not in done.stdout and not run_dir.exists()


def test_without_a_recipe_the_run_dir_must_record_one(tmp_path):
    """`--recipe` may be left out to go on with a run dir's own recipe (tests/test_refilter.py packs that way);
    a run dir that records none is refused in one line, before Ray starts or anything is written."""
    run_dir = tmp_path / "run"
    done = _cli("--stage", "pack", "--run-dir", str(run_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Ray:" not in done.stdout
    assert done.stderr == f"error: --recipe is needed: {run_dir} records no recipe (recipe.json) to go on with\n"
    assert not run_dir.exists()


def _tar(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tarfile.open(path, "w").close()
    return str(path)


def test_brace_patterns_globs_and_paths_are_all_accepted(tmp_path):
    tars = [_tar(tmp_path / "a" / f"shards-{i:06d}.tar") for i in range(3)]
    other = _tar(tmp_path / "b" / "x.tar")
    braces = str(tmp_path / "a" / "shards-{000000..000002}.tar")
    units = plan_inputs("webdataset", [braces, str(tmp_path / "b" / "*.tar"), tars[1]], chunk_size=4)
    assert [u.uri for u in units] == tars + [other]  # a tar named twice is read once
    assert [u.index for u in units] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"input path '.*shards-000003.tar' \(from '.*\{000000..000003\}.tar'\)"):
        plan_inputs("webdataset", [str(tmp_path / "a" / "shards-{000000..000003}.tar")], chunk_size=4)


def test_the_report_target_is_the_requested_share_not_the_attempt_weight():
    data = yaml.safe_load((ROOT / "pipeline" / "recipes" / "default-cpu.yaml").read_text())
    data["instruct"]["expected_yield"] = {"background_change": 0.5}
    recipe = parse_recipe(data)
    covered = frozenset(recipe.edit.routes())
    targets, weights = target_shares(recipe.instruct, covered), task_weights(recipe.instruct, covered)
    assert targets == dict.fromkeys(recipe.instruct.target_mix, 1 / len(recipe.instruct.target_mix))
    assert weights["background_change"] == 2 * weights["style_change"]  # tried twice as often: yield 0.5
    ledger = pa.Table.from_pylist(
        [{**dict.fromkeys(LEDGER_COLUMNS), "unit_id": f"u{i}", "sample_id": f"s{i}", "pair_id": f"u{i}",
          "status": "accepted", "task": task, "warnings": []} for i, task in enumerate(sorted(targets))])
    report = build_report(recipe, ledger, [], covered, targets, weights, [{"wall_s": 1.0}])
    per_task = report["accepted_per_task"]
    assert {t: v["target_share"] for t, v in per_task.items()} == {t: round(v, 4) for t, v in targets.items()}
    assert per_task["background_change"]["attempt_share"] == round(weights["background_change"] / sum(weights.values()), 4)


def test_a_run_dir_in_a_missing_bucket_is_refused_in_one_line_and_nothing_is_written_locally(tmp_path, s3_server):
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--recipe", "default-cpu", "--run-dir",
                           "s3://no-such-bucket/run"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "bucket 'no-such-bucket' does not exist" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no ./s3:/no-such-bucket/run
