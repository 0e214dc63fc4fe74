"""Hostile inputs through the whole pipeline: every sample ends with a reason in the ledger, the run
finishes, and nothing is written outside the run dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from manifests.inputs import plan_inputs
from manifests.ledger import read_ledger
from pipeline.run import run
from tests.badinputs import (FIXTURE_MAX_MEMBER_BYTES, FOLDER_WARNINGS, TAR_WARNINGS, build_bad_folder,
                             build_bad_tar, expected_by_sample_id)
from tests.corpus import check_run

from manifests.inputs import make_sample_id


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _recipe(tmp_path: Path, kind: str, paths: list[str]) -> str:
    recipe = {"name": f"bad-{kind}", "commit_rows": 8,
              "input": {"kind": kind, "paths": paths, "max_member_bytes": FIXTURE_MAX_MEMBER_BYTES},
              "instruct": {"tasks_per_source": 1},
              "resources": {"colocate": ["instruct", "edit", "score"]},  # the StageGroup path
              "pack": {"prefix": "bad", "shard_size": 16}}
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _check(run_dir: Path, expected: dict[str, str], warnings: dict[str, str]) -> None:
    ledger = {r["sample_id"]: r for r in read_ledger(run_dir).to_pylist()}
    for sample_id, outcome in expected.items():
        assert sample_id in ledger, f"sample {sample_id} has no ledger row"
        row = ledger[sample_id]
        if outcome == "ok":
            assert row["stage"] != "source", f"{sample_id}: {row['reason']} {row['message']}"
        else:
            assert (row["status"], row["stage"], row["reason"]) == ("rejected", "source", outcome), row
    for sample_id, prefix in warnings.items():
        assert any(w.startswith(prefix) for w in ledger[sample_id]["warnings"]), ledger[sample_id]["warnings"]
    check_run(run_dir, "bad")


@pytest.mark.parametrize("kind", ["webdataset", "folder"])
def test_hostile_inputs_each_get_a_reason(kind, ray_cluster, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if kind == "webdataset":
        outcomes = build_bad_tar(inputs / "bad.tar")
        data = (inputs / "bad.tar").read_bytes()
        (inputs / "cut.tar").write_bytes(data[: len(data) // 2])  # a tar truncated mid-member
        paths = [str(inputs / "bad.tar"), str(inputs / "cut.tar")]
        warn_labels = TAR_WARNINGS
    else:
        outcomes = build_bad_folder(inputs / "folder")
        paths = [str(inputs / "folder")]
        warn_labels = FOLDER_WARNINGS
    uri = plan_inputs(kind, paths, 16)[0].uri
    expected = expected_by_sample_id(uri, outcomes)
    if kind == "webdataset":
        expected[make_sample_id(str(inputs / "cut.tar"), "__tar__")] = "corrupt_tar"
    warnings = {make_sample_id(uri, label): prefix for label, prefix in warn_labels.items()}

    before, cwd_before = _listing(tmp_path), _listing(Path.cwd())
    run_dir = tmp_path / "run"
    run(_recipe(tmp_path, kind, paths), str(run_dir), address=ray_cluster["address"])
    created = _listing(tmp_path) - before
    assert all(p.startswith("run") or p == f"{kind}.yaml" for p in created), sorted(created)[:10]
    hostile = ("escape", "evil", "passwd", "inside", "bad_json", "fifo")  # names the fixtures' members carry
    assert not [p for p in _listing(Path.cwd()) - cwd_before if any(h in p for h in hostile)]
    assert not os.path.exists(inputs.parent / "escape.jpg") and not Path("/abs/evil.jpg").exists()
    _check(run_dir, expected, warnings)
