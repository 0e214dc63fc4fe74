"""`python -m pipeline refilter`: a finished run re-decided under another score policy, no model re-run.
A tighter policy gives a strict subset (decided first, packed later by the pack stage), the original policy
applied to that subset gives the original corpus back (same pairs, same member checksums), and a policy reading
a score the run never computed is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from manifests.inspect import Run
from manifests.ledger import read_ledger
from manifests.validate import validate
from pipeline.recipe import RecipeError
from pipeline.refilter import refilter
from pipeline.run import run
from tests.corpus import check_run, pairs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "pipeline" / "recipes" / "default-cpu.yaml"


def _recipe(tmp_path: Path, name: str, edit) -> str:
    recipe = yaml.safe_load(DEFAULT.read_text())
    edit(recipe["score"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _accepted(run_dir: Path) -> set[str]:
    ledger = read_ledger(run_dir).to_pydict()
    return {u for u, s in zip(ledger["unit_id"], ledger["status"]) if s == "accepted"}


def _tighter(score: dict) -> None:
    score["rules"][0]["min"] = 0.05  # change_global: drops the subtle global edits


def test_tighter_policy_gives_a_subset_and_the_original_policy_brings_it_back(default_run, ray_cluster, tmp_path):
    address = ray_cluster["address"]
    tight, back = tmp_path / "tight", tmp_path / "back"
    diff = refilter(str(default_run), _recipe(tmp_path, "tight", _tighter), str(tight), address, pack=False)
    assert json.loads((tight / "refilter.json").read_text()) == diff  # decided, not packed: no shard, no ledger
    assert not (tight / "ledger.parquet").exists() and not list(tight.glob("shards/*.tar"))
    run(None, str(tight), "pack", address)  # the pack, later, with the recipe the run dir records

    before, after = _accepted(default_run), _accepted(tight)
    assert after < before, "a tighter policy keeps a strict subset"
    assert diff["added"] == [] and sum(r["pairs"] for r in diff["removed"]) == len(before - after)
    assert {r["reason"] for r in diff["removed"]} == {"no_op_edit"}
    check_run(tight, "x2edit")
    problems, _ = validate(Run(tight, "x2edit"))
    assert problems == []
    assert json.loads((tight / "refilter.json").read_text()) == diff and (tight / "report.html").exists()

    # the original policy on the re-filtered run: every removed pair comes back, byte for byte
    diff = refilter(str(tight), str(DEFAULT), str(back), address)
    assert _accepted(back) == before and diff["removed"] == []
    assert pairs(back, "x2edit") == pairs(default_run, "x2edit")
    assert json.loads((back / "recipe.json").read_text())["hash"] == \
        json.loads((default_run / "recipe.json").read_text())["hash"]


def test_a_policy_on_a_score_the_run_did_not_compute_is_refused(default_run, tmp_path):
    def needs_judge(score: dict) -> None:
        score["per_task"]["subject_removal"].append({"score": "judge_sum", "min": 9, "reason": "judge_low"})
        score["rules"].append({"score": "aesthetic_edited", "min": 4.5, "reason": "low_aesthetic"})

    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="did not compute: aesthetic_edited, judge_sum"):
        refilter(str(default_run), _recipe(tmp_path, "judge", needs_judge), str(out))
    assert not out.exists()


def test_an_unfinished_run_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="not a finished run"):
        refilter(str(tmp_path / "nothing"), str(DEFAULT), str(tmp_path / "out"))
