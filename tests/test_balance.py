"""Closed-loop task balancing: the weight rule (manifests/balance.py), its effect on a simulated run with
uneven unknown yields, and a closed-loop fused run through Ray that a resumed run reproduces pair for pair."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bench.balance_sim import simulate
from manifests.balance import Outcomes, closed_loop_weights
from pipeline.run import run
from tests.corpus import check_run, pairs

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"a": 0.5, "b": 0.25, "c": 0.25}


def test_without_outcomes_the_weights_are_the_open_loop_ones():
    weights, yields = closed_loop_weights(TARGETS, Outcomes(), {"b": 0.5}, 100)
    assert yields == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert weights["a"] / weights["c"] == pytest.approx(2) and weights["b"] / weights["c"] == pytest.approx(2)


def test_a_task_behind_target_gets_more_attempts_corrected_for_its_yield():
    outcomes = Outcomes(attempted={"a": 100, "b": 100, "c": 100}, accepted={"a": 90, "b": 20, "c": 45})
    weights, yields = closed_loop_weights(TARGETS, outcomes, {}, 300)
    assert yields["b"] < yields["c"] < yields["a"]
    assert max(weights, key=weights.get) == "b"  # furthest behind and hardest to make
    # 300 attempts split by the weights and accepted at the estimated yields bring every share nearer its target.
    total = sum(weights.values())
    after = {t: outcomes.accepted[t] + 300 * weights[t] / total * yields[t] for t in TARGETS}
    now = {t: outcomes.accepted[t] / sum(outcomes.accepted.values()) for t in TARGETS}
    then = {t: after[t] / sum(after.values()) for t in TARGETS}
    assert max(abs(then[t] - TARGETS[t]) for t in TARGETS) < 0.5 * max(abs(now[t] - TARGETS[t]) for t in TARGETS)
    assert (weights, yields) == closed_loop_weights(TARGETS, outcomes, {}, 300)  # a pure function


def test_on_a_simulated_run_the_loop_keeps_every_task_within_two_points_of_target():
    open_loop, _ = simulate(closed=False, samples=4000, window=200, k=2, seed=0)
    closed_loop, _ = simulate(closed=True, samples=4000, window=200, k=2, seed=0)
    assert closed_loop < 2.0 < open_loop


def test_a_closed_loop_run_records_its_windows_and_a_resumed_run_makes_the_same_pairs(ray_cluster, tmp_path):
    data = yaml.safe_load((ROOT / "tests" / "recipes" / "small-cpu.yaml").read_text())
    data["instruct"]["balance"] = {"mode": "closed_loop", "window": 3}
    recipe = tmp_path / "closed.yaml"
    recipe.write_text(yaml.safe_dump(data))
    first = tmp_path / "first"
    report = run(str(recipe), str(first), address=ray_cluster["address"])
    check_run(first, "small")
    windows = json.loads((first / "balance.json").read_text())
    assert len(windows) == len(report["balance"]) >= 3 and windows[0]["units"] == [0, 1, 2]
    assert windows[0]["yield_estimates"] != windows[-1]["yield_estimates"]  # learnt from the earlier windows

    # A run killed after its first window: the later windows' committed rows are gone; the rerun recomputes
    # their weights from the same committed outcomes and makes the same pairs.
    second = tmp_path / "second"
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("shards", "ledger.parquet", "balance.json",
                                                                   "COMPLETE.json"))
    score = second / "stages" / "score"
    for fragment in score.glob("frag-*.parquet"):
        positions = pq.read_table(fragment, columns=["position"]).column("position").to_pylist()
        if max(positions) >= 3 * 1_000_000:  # any row of a unit after the first window
            fragment.unlink()
    run(str(recipe), str(second), address=ray_cluster["address"])
    assert pairs(second, "small") == pairs(first, "small")
    assert json.loads((second / "balance.json").read_text()) == windows
