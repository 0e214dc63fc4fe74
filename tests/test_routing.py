"""Routing tasks to editors: the recipe's `edit.editors` / `edit.route`, the instruct stage's deterministic
choice of an editor per pair, and the edit stage's dispatch to it."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from manifests.schema import LIVE, REJECTED
from pipeline.recipe import RecipeError, parse_recipe
from stages.base import StageContext
from stages.edit import EditConfig, EditStage, editor_order
from stages.instruct import InstructConfig, InstructStage
from workers.classical import TASKS_COVERED
from tests.corpus import source_row
from workers.sample_images import generate_scene

CTX = StageContext(seed=3, recipe_hash="h", run_dir=".")
TWO = {"editors": {"main": {"backend": "classical"}, "spare": {"backend": "classical"}},
       "route": {"style_change": {"main": 3, "spare": 1}, "tone_transformation": {"spare": 1}}}


def test_without_a_route_every_covered_task_goes_to_the_editors_that_cover_it():
    assert EditConfig().routes() == {task: {"classical": 1.0} for task in TASKS_COVERED}
    assert EditConfig(**TWO).routes() == TWO["route"]


@pytest.mark.parametrize("edit, message", [
    ({"route": {"style_change": {"kontext": 1}}}, "route.style_change: no editor named 'kontext'"),
    ({"route": {"text_change": {"classical": 1}}}, "route.text_change: editor 'classical' does not cover"),
    ({"route": {"style_change": {"classical": 0}}}, "route.style_change: needs at least one editor"),
    ({"route": {"no_such_task": {"classical": 1}}}, "unknown task 'no_such_task'"),
    ({"editors": {"a:b": {"backend": "classical"}}}, "editor name 'a:b'"),
    ({"editors": {"x": {"backend": "no_such_backend"}}}, "edit.editors.x"),
    ({"editors": {}}, "at least one editor"),
])
def test_bad_routes_are_errors_naming_the_key(edit, message):
    with pytest.raises(RecipeError, match="r.yaml: edit") as error:
        parse_recipe({"name": "x", "edit": edit}, "r.yaml")
    assert message in str(error.value)


def test_editors_are_drawn_in_proportion_to_their_weights():
    firsts = Counter(editor_order({"main": 3, "spare": 1}, np.random.default_rng(seed))[0] for seed in range(4000))
    assert 0.72 < firsts["main"] / 4000 < 0.78
    assert editor_order({"a": 1, "b": 0.5}, np.random.default_rng(1)) in (["a", "b"], ["b", "a"])  # each once


def test_pairs_are_routed_by_weight_deterministically_and_dispatched_to_their_editor():
    cfg = (InstructConfig(tasks_per_source=1, target_mix={"style_change": 1}), EditConfig(**TWO))
    stage = InstructStage(cfg, CTX)
    scene, _ = generate_scene(2)
    rows = [r for p in range(40) for r in stage.processsource_row(source_row(scene, p))]
    assert {r["editor"].split(":")[0] for r in rows} == {"main", "spare"}
    assert rows == [r for p in range(40) for r in stage.processsource_row(source_row(scene, p))]  # a rerun: same pairs
    assert all(r["task"] == "style_change" for r in rows)

    edit = EditStage(EditConfig(**TWO), CTX)
    done = edit.process(rows[:6])
    assert sorted(r["unit_id"] for r in done) == sorted(r["unit_id"] for r in rows[:6])
    for row in done:
        provenance = json.loads(row["provenance"])["edit"]
        assert row["status"] == LIVE and row["edited"]
        assert provenance["editor"] == row["editor"].split(":")[0] and provenance["worker"] == "classical"


def test_the_instruct_stage_draws_only_routed_tasks():
    cfg = (InstructConfig(tasks_per_source=3), EditConfig(**TWO))
    stage = InstructStage(cfg, CTX)
    scene, _ = generate_scene(5)
    tasks = {r["task"] for p in range(10) for r in stage.processsource_row(source_row(scene, p))}
    assert tasks == {"style_change", "tone_transformation"}


def test_an_editor_error_on_one_pair_fails_that_pair_only():
    stage = InstructStage((InstructConfig(tasks_per_source=2), EditConfig()), CTX)
    scene, _ = generate_scene(1)
    rows = stage.processsource_row(source_row(scene, 0))
    broken = {**rows[0], "op": "no.such_op"}
    done = {r["unit_id"]: r for r in EditStage(EditConfig(), CTX).process([broken, rows[1]])}
    assert done[rows[0]["unit_id"]]["status"] == "failed" and "no.such_op" in done[rows[0]["unit_id"]]["message"]
    assert done[rows[1]["unit_id"]]["status"] == LIVE
    assert REJECTED not in {r["status"] for r in done.values()}
