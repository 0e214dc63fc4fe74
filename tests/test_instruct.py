"""The instruct stage: deterministic task balancing, eligibility, bilingual instructions from the templates."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np

from manifests.mix import smooth_wrr
from manifests.schema import REJECTED
from stages.base import StageContext
from stages.edit import EditConfig
from stages.instruct import InstructConfig, InstructStage, preference, task_weights
from workers.classical import TASKS_COVERED
from workers.rule_instructor import render, templates
from tests.corpus import source_row
from workers.sample_images import generate_scene

SUBJECT_TASKS = {"subject_removal", "subject_addition", "background_change", "color_change"}


def test_consecutive_positions_follow_the_target_mix():
    weights = task_weights(InstructConfig(target_mix={"style_change": 2, "camera_movement": 1, "low_level": 1}),
                           TASKS_COVERED)
    sequence = smooth_wrr(weights, 1009)
    firsts = Counter(preference(sequence, p, 1)[0] for p in range(400))
    assert abs(firsts["style_change"] - 200) <= 2 and abs(firsts["low_level"] - 100) <= 2
    assert preference(sequence, 5, 3) == preference(sequence, 5, 3)  # a pure function of the position
    assert sorted(preference(sequence, 5, 3)) == sorted(weights)  # every task, each once


def test_a_sample_gets_k_distinct_feasible_tasks_and_honest_instructions():
    stage = InstructStage((InstructConfig(tasks_per_source=3), EditConfig()),
                          StageContext(seed=1, recipe_hash="h", run_dir="."))
    scene, _ = generate_scene(4)
    rows = stage.process_row(source_row(scene, 7))
    assert len(rows) == 3 and len({r["task"] for r in rows}) == 3
    assert all(r["fanout"] == 3 and r["unit_id"] == r["pair_id"] and "." not in r["pair_id"] for r in rows)
    for r in rows:
        assert r["instruction_en"] and r["instruction_zh"] and r["instruction_en"] != r["instruction_zh"]
        if r["task"] not in SUBJECT_TASKS:  # a global op's text is one of its templates filled with its params
            params = json.loads(r["params"])
            variants = {render(r["op"], params, None, v) for v in range(len(templates()["ops"][r["op"]]))}
            assert (r["instruction_en"], r["instruction_zh"]) in variants
    assert rows == stage.process_row(source_row(scene, 7))  # deterministic: a rerun makes the same pairs

    flat = np.full((512, 512, 3), 120, np.uint8)  # no subject: region tasks pass to the next in line
    flat_rows = stage.process_row(source_row(flat, 7))
    assert flat_rows and not {r["task"] for r in flat_rows} & SUBJECT_TASKS


def test_no_feasible_task_is_a_ledger_reason():
    stage = InstructStage((InstructConfig(target_mix={"subject_removal": 1}), EditConfig()),
                          StageContext(seed=1, recipe_hash="h", run_dir="."))
    [row] = stage.process_row(source_row(np.full((512, 512, 3), 120, np.uint8), 0))
    assert (row["status"], row["reason"]) == (REJECTED, "no_eligible_task") and row["src"] is None


def test_every_op_renders_in_both_languages_for_any_parameters():
    from workers.classical import OPS
    from workers.segment_classical import find_subject

    subject = find_subject(generate_scene(4)[0])
    rng = np.random.default_rng(0)
    for name, op in OPS.items():
        for _ in range(20):
            params = op.sample_params(rng, subject)
            if params is None:
                continue
            for variant in range(len(templates()["ops"][name])):
                en, zh = render(name, params, subject if op.needs_subject else None, variant)
                assert "{" not in en + zh and not re.search("[A-Za-z]", zh), (name, zh)  # every word translated
