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
    rows = [r for p in range(40) for r in stage.process_row(source_row(scene, p))]
    assert {r["editor"].split(":")[0] for r in rows} == {"main", "spare"}
    assert rows == [r for p in range(40) for r in stage.process_row(source_row(scene, p))]  # a rerun: same pairs
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
    tasks = {r["task"] for p in range(10) for r in stage.process_row(source_row(scene, p))}
    assert tasks == {"style_change", "tone_transformation"}


def test_an_editor_error_on_one_pair_fails_that_pair_only():
    stage = InstructStage((InstructConfig(tasks_per_source=2), EditConfig()), CTX)
    scene, _ = generate_scene(1)
    rows = stage.process_row(source_row(scene, 0))
    broken = {**rows[0], "op": "no.such_op"}
    done = {r["unit_id"]: r for r in EditStage(EditConfig(), CTX).process([broken, rows[1]])}
    assert done[rows[0]["unit_id"]]["status"] == "failed" and "no.such_op" in done[rows[0]["unit_id"]]["message"]
    assert done[rows[1]["unit_id"]]["status"] == LIVE
    assert REJECTED not in {r["status"] for r in done.values()}


def test_an_instruction_following_editor_gets_template_instructions_and_its_rejections_are_ledger_reasons(
        monkeypatch):
    from tests.http_fixture import ApiServer, Reply

    monkeypatch.setenv("X2E_TEST_KEY", "sk-test")
    with ApiServer() as server:
        edit_cfg = EditConfig(editors={"classical": {"backend": "classical"},
                                       "gpt": {"backend": "api", "base_url": server.url, "model": "gpt-image-1",
                                               "api_key_env": "X2E_TEST_KEY", "tasks": ["style_change",
                                                                                         "material_change"]}},
                              route={"style_change": {"gpt": 1}, "material_change": {"gpt": 1},
                                     "tone_transformation": {"classical": 1}})
        stage = InstructStage((InstructConfig(tasks_per_source=3), edit_cfg), CTX)
        scene, _ = generate_scene(4)
        rows = stage.process_row(source_row(scene, 0))
        by_task = {r["task"]: r for r in rows}
        assert set(by_task) == {"style_change", "material_change", "tone_transformation"}
        style = by_task["style_change"]
        assert style["editor"] == f"gpt:{style['op']}" and style["op"].startswith("style_change.")
        assert json.loads(style["params"])["style"] in style["instruction_en"]  # the slot, in both languages
        assert style["instruction_zh"] and style["instruction_zh"] != style["instruction_en"]
        assert "object" in by_task["material_change"]["instruction_en"]  # names the subject the image has

        server.replies = [Reply(echo_image=True), Reply(400, {"error": {"message": "refused by the safety system"}})]
        done = {r["task"]: r for r in EditStage(edit_cfg, CTX).process(rows)}
    assert done["tone_transformation"]["status"] == LIVE  # the classical editor's pair, in its own batch
    edited = [done[t] for t in ("style_change", "material_change")]
    assert sorted(r["status"] for r in edited) == [LIVE, REJECTED]
    rejected = next(r for r in edited if r["status"] == REJECTED)
    assert rejected["reason"] == "api_bad_request" and "safety" in rejected["message"] and rejected["stage"] == "edit"
    live = next(r for r in edited if r["status"] == LIVE)
    assert json.loads(live["provenance"])["edit"]["model"] == "gpt-image-1"


def test_a_key_pasted_into_a_recipe_is_never_echoed_in_its_errors():
    editor = {"backend": "api", "base_url": "https://api.example.com/v1", "model": "m", "tasks": ["style_change"],
              "api_key_env": "sk-proj-SECRET123"}
    no_backend = {k: v for k, v in editor.items() if k != "backend"}  # the error quotes the whole block
    for edit in ({"editors": {"gpt": editor}}, {"editors": {"gpt": no_backend}}):
        with pytest.raises(RecipeError, match="api_key_env|backend") as error:
            parse_recipe({"name": "x", "edit": edit}, "r.yaml")
        assert "SECRET123" not in str(error.value)


def test_every_shipped_recipe_validates_and_routes_only_to_configured_editors():
    from pipeline.recipe import BUILTIN_DIR, load_recipe

    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    assert {"default-cpu", "tiny-models", "x2edit-gpu"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        routes = recipe.edit.routes()
        assert set(recipe.instruct.target_mix) <= set(routes), name  # every target task has an editor
        assert {e for weights in routes.values() for e in weights} <= set(recipe.edit.editors), name
