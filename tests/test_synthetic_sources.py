"""Synthetic sources (reference §1.9–§1.10): prompt lines screened by the prompt check, drawn by the
text-to-image worker (a tiny FLUX checkpoint here), then edited like any source — subject-driven pairs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from manifests.schema import LIVE, REJECTED
from pipeline.recipe import parse_recipe
from stages.base import StageContext
from stages.edit import EditStage
from stages.instruct import InstructStage
from stages.source import SourceStage, plan_units

PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "synthetic_prompts.txt"
RECIPE = {
    "name": "synthetic",
    "input": {"kind": "samples", "n_generated": 0, "synthetic": {
        "paths": [str(PROMPTS)], "chunk_size": 4,
        "generator": {"model": "tiny:flux", "dtype": "float32", "steps": 2, "size": 64,
                      "suffix": ", Solid color background"}}},
    "source": {"min_side": 64, "work_short_side": 64},
    "instruct": {"tasks_per_source": 1, "target_mix": {"subject_driven": 1}},
    "edit": {"editors": {"kontext": {"backend": "diffusers", "model": "tiny:flux-kontext", "dtype": "float32",
                                     "steps": 2, "resolution": 64, "tasks": ["subject_driven"]}}},
}


def _sources(recipe, ctx) -> list[dict]:
    units = [u for u in plan_units(recipe.input) if u["kind"] == "prompts"]
    stage = SourceStage((recipe.input, recipe.source), ctx)
    return [row for table in stage(pa.Table.from_pylist(units)) for row in table.to_pylist()]


def test_prompts_are_screened_drawn_and_edited_into_subject_driven_pairs():
    recipe = parse_recipe(RECIPE)
    ctx = StageContext(seed=5, recipe_hash=recipe.hash(), run_dir=".")
    rows = _sources(recipe, ctx)
    lines = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == len(lines)
    by_prompt = {json.loads(r["source_meta"])["prompt"]: r for r in rows}
    assert by_prompt["translate this sentence into French"]["reason"] == "invalid_prompt"
    assert by_prompt["hi"]["status"] == REJECTED and "shorter than" in by_prompt["hi"]["message"]
    live = [r for r in rows if r["status"] == LIVE]
    assert len(live) == len(lines) - 2
    meta = json.loads(live[0]["source_meta"])
    assert meta["generator"]["model"] == "tiny:flux" and meta["generator"]["suffix"] == ", Solid color background"
    assert live[0]["source_uri"].startswith(f"{PROMPTS}#L") and (live[0]["width"], live[0]["height"]) == (64, 64)
    assert [r["src"] for r in live] == [r["src"] for r in _sources(recipe, ctx) if r["status"] == LIVE]  # seeded

    pairs = [p for r in live for p in InstructStage((recipe.instruct, recipe.edit), ctx).process_row(r)]
    assert {p["task"] for p in pairs} == {"subject_driven"}
    assert all(p["instruction_en"].startswith("Keep the same subject") and p["instruction_zh"] for p in pairs)
    edited = EditStage(recipe.edit, ctx).process(pairs)
    assert all(r["status"] == LIVE and r["edited"] for r in edited)
