"""End to end on a real local Ray cluster: fused run, resume after SIGKILL of the driver and of a stage
actor, and the same stages as separate `ray job submit` jobs — all must give the same corpus."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manifests.inputs import make_sample_id
from pipeline.run import run
from workers.sample_images import list_samples
from tests.corpus import check_run, pairs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "tests" / "recipes" / "small-cpu.yaml")
PREFIX = "small"


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """One uninterrupted fused run of the small recipe, the yardstick of the other tests."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    report = run(RECIPE, str(run_dir), address=ray_cluster["address"])
    return {"dir": run_dir, "report": report, "pairs": pairs(run_dir, PREFIX)}


def test_fused_run_builds_a_consistent_corpus(reference):
    counts = check_run(reference["dir"], PREFIX)
    report = reference["report"]
    assert counts["accepted"] == report["accepted"] == len(reference["pairs"]) > 10
    assert len({task for task, _ in reference["pairs"].values()}) >= 5
    funnel = {f["stage"]: f for f in report["funnel"]}
    inputs = {make_sample_id("samples", name) for name in list_samples(10)}
    assert set(_ledger_samples(reference["dir"])) == inputs  # every input sample has a terminal state
    assert funnel["source"]["in"] == len(inputs)
    for f in report["funnel"]:  # the counts add up at every stage
        ended = sum(f["rejected"].values()) + sum(f["failed"].values())
        if f["stage"] != "instruct":  # where one sample becomes several pairs
            assert f["in"] == f["out"] + ended, f
    assert funnel["pack"]["out"] == report["accepted"]
    assert "text_change" in report["tasks_not_covered"]
    assert (reference["dir"] / "report.md").read_text().startswith("# Run report")
    recorded = json.loads((reference["dir"] / "recipe.json").read_text())
    assert recorded["hash"] == report["recipe_hash"]


def _ledger_samples(run_dir: Path) -> list[str]:
    from manifests.ledger import read_ledger

    return read_ledger(run_dir).column("sample_id").to_pylist()


def test_rerun_on_a_finished_run_changes_nothing(reference, ray_cluster):
    before = {p: p.stat().st_mtime_ns for p in (reference["dir"] / "shards").iterdir()}
    run(RECIPE, str(reference["dir"]), address=ray_cluster["address"])
    after = {p: p.stat().st_mtime_ns for p in (reference["dir"] / "shards").iterdir()}
    assert before == after
    assert pairs(reference["dir"], PREFIX) == reference["pairs"]


def _driver(run_dir: Path, address: str, stage: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "run", "--recipe", RECIPE, "--run-dir", str(run_dir),
           "--address", address]
    return cmd + (["--stage", stage] if stage else [])


def test_sigkill_of_the_driver_then_rerun_gives_the_same_corpus(reference, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_driver(run_dir, ray_cluster["address"]), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    score_dir = run_dir / "stages" / "score"
    deadline = time.time() + 240
    while time.time() < deadline and not list(score_dir.glob("frag-*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the test recipe longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "ledger.parquet").exists()
    committed_before = len(list(score_dir.glob("frag-*.parquet")))
    assert committed_before >= 1
    time.sleep(2)  # let Ray reap the dead driver's actors
    run(RECIPE, str(run_dir), address=ray_cluster["address"])
    check_run(run_dir, PREFIX)
    assert pairs(run_dir, PREFIX) == reference["pairs"]


def _kill_one_actor(address: str, stage_class: str, done: threading.Event, killed: list) -> None:
    from ray.util.state import list_actors

    while not done.is_set() and not killed:  # the address: another cluster may run on the machine
        for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True,
                                 raise_on_missing_output=False):
            if stage_class in (actor.get("repr_name") or "") + (actor.get("class_name") or "") and actor.get("pid"):
                os.kill(actor["pid"], signal.SIGKILL)
                killed.append(actor["pid"])
                return
        time.sleep(0.2)


def test_killing_a_stage_actor_mid_run_loses_nothing(reference, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_actor, args=(ray_cluster["address"], "EditStage", done, killed))
    killer.start()
    try:
        run(RECIPE, str(run_dir), address=ray_cluster["address"])
    finally:
        done.set()
        killer.join()
    assert killed, "no edit-stage actor was found to kill"
    check_run(run_dir, PREFIX)
    assert pairs(run_dir, PREFIX) == reference["pairs"]


def test_stages_as_separate_ray_jobs_give_the_fused_corpus(reference, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for stage in ("source", "instruct", "edit", "score", "pack"):
        result = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster["dashboard"],
             "--working-dir", str(ROOT), "--", sys.executable, "-m", "pipeline", "run", "--recipe", RECIPE,
             "--stage", stage, "--run-dir", str(run_dir)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
        assert list((run_dir / "stages" / stage).glob("frag-*.parquet")) or stage == "pack"
    check_run(run_dir, PREFIX)
    assert pairs(run_dir, PREFIX) == reference["pairs"]
    # byte-identical shards: the pack plan and the tar writer are deterministic
    for tar in sorted((reference["dir"] / "shards").glob("*.tar")):
        assert (run_dir / "shards" / tar.name).read_bytes() == tar.read_bytes()


def test_a_stage_refuses_to_start_before_its_predecessor_finished_the_plan(reference, ray_cluster, tmp_path):
    """The README's per-stage loop after a job that died: the next stage must not go ahead on what the dead
    one committed, or the corpus's ledger silently lacks the units it never reached."""
    from manifests.fragments import COMPLETE_NAME, read_units
    from manifests.ledger import read_ledger
    from pipeline.stage_state import StageNotReady

    run_dir = tmp_path / "run"
    address = ray_cluster["address"]
    with pytest.raises(StageNotReady, match=r"stage 'instruct' cannot start: stage 'source' has not finished"):
        run(RECIPE, str(run_dir), "instruct", address)
    for stage in ("source", "instruct"):
        run(RECIPE, str(run_dir), stage, address)
    instruct = run_dir / "stages" / "instruct"
    # What a killed instruct job leaves: some fragments, no completion record.
    (instruct / COMPLETE_NAME).unlink()
    lost = sorted(instruct.glob("frag-*.parquet"))[0]
    lost_samples = set(pq.read_table(lost, columns=["sample_id"]).column("sample_id").to_pylist())
    lost.unlink()  # a sample with a pair in it is unfinished, even if its other pairs are in other fragments
    with pytest.raises(StageNotReady) as refused:
        run(RECIPE, str(run_dir), "edit", address)
    total = read_units(run_dir / "stages" / "source").num_rows
    assert (f"stage 'edit' cannot start: stage 'instruct' has not finished ({len(lost_samples)} of the {total} "
            "units of stage 'source' are not committed by it); run first: python -m pipeline run --recipe "
            f"{RECIPE} --stage instruct --run-dir {run_dir}") == str(refused.value)
    assert not (run_dir / "stages" / "edit").exists()
    with pytest.raises(StageNotReady, match="stage 'pack' cannot start: stage 'score' has not finished"):
        run(RECIPE, str(run_dir), "pack", address)

    for stage in ("instruct", "edit", "score", "pack"):  # rerunning the stage that died completes the plan
        run(RECIPE, str(run_dir), stage, address)
    check_run(run_dir, PREFIX)
    ledger = read_ledger(run_dir)
    assert sorted(ledger.column("unit_id").to_pylist()) == sorted(read_units(instruct).column("unit_id").to_pylist())
    assert lost_samples <= set(ledger.column("sample_id").to_pylist())
    assert pairs(run_dir, PREFIX) == reference["pairs"]
