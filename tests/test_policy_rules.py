"""Policy rules with any_of (one rule that passes when either of several bounds holds), and the default
recipe's policy against the classical editors it schedules."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from filters.policy import Rule, decide, rules_for
from manifests.images import encode_jpeg, encode_mask
from manifests.schema import LIVE, empty_row
from pipeline.recipe import RecipeError, load_recipe, parse_recipe
from stages.base import StageContext
from stages.score import ScoreStage
from workers.classical import OPS
from workers.sample_images import generate_scene
from workers.segment_classical import find_subject

BACKGROUND = Rule.model_validate(yaml.safe_load("""
any_of: [{score: change_outside, min: 0.03}, {score: detail_change_outside, min: 0.3}]
reason: background_unchanged
"""))


def test_any_of_passes_when_either_bound_holds_and_names_both_values_when_none_does():
    assert decide({"change_outside": 0.2, "detail_change_outside": 0.0}, [BACKGROUND]) == (None, "")
    assert decide({"change_outside": 0.01, "detail_change_outside": 0.7}, [BACKGROUND]) == (None, "")
    reason, message = decide({"change_outside": 0.012, "detail_change_outside": 0.1}, [BACKGROUND])
    assert reason == "background_unchanged"
    assert message == "change_outside=0.0120 outside min=0.03 and detail_change_outside=0.1000 outside min=0.3"


def test_any_of_with_a_missing_score_rejects_even_if_the_other_bound_holds():
    reason, message = decide({"change_outside": 0.5}, [BACKGROUND])
    assert reason == "missing_score" and "'detail_change_outside'" in message


def test_a_per_task_rule_replaces_every_common_rule_that_shares_a_score():
    no_op = Rule(score="change_global", min=0.01, reason="no_op_edit")
    outside = Rule(score="change_outside", max=0.02, reason="edit_outside_mask")
    either = Rule.model_validate({"any_of": [{"score": "change_global", "min": 0.002},
                                             {"score": "detail_change_outside", "min": 0.3}], "reason": "no_op_edit"})
    assert rules_for("background_change", [no_op, outside], {"background_change": [either]}) == [outside, either]
    assert rules_for("subject_removal", [BACKGROUND, no_op], {"subject_removal": [outside]}) == [no_op, outside]
    assert rules_for("style_change", [BACKGROUND, no_op], {"subject_removal": [outside]}) == [BACKGROUND, no_op]


@pytest.mark.parametrize(("rule", "message"), [
    ({"any_of": [{"score": "a", "min": 1}, {"score": "b", "mn": 1}], "reason": "r"},
     "score.rules.0.any_of.1.mn: Extra inputs are not permitted"),
    ({"any_of": [{"score": "a", "min": 1}, {"score": "b"}], "reason": "r"},
     "score.rules.0.any_of.1: Value error, a bound on 'b' needs min, max or both"),
    ({"any_of": [{"score": "a", "min": 1}], "reason": "r"}, "score.rules.0.any_of: List should have at least 2"),
    ({"score": "a", "min": 1, "any_of": [{"score": "a", "min": 1}, {"score": "b", "min": 1}], "reason": "r"},
     "score.rules.0: Value error, a rule has either score/min/max or any_of"),
    ({"reason": "r"}, "score.rules.0: Value error, a rule needs score"),
    ({"score": "a", "reason": "r"}, "score.rules.0: Value error, a rule on 'a' needs min, max or both"),
])
def test_bad_rules_are_recipe_errors_naming_the_key(rule, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "x", "score": {"rules": [rule]}}, "r.yaml")
    assert f"r.yaml: {message}" in str(err.value)


def test_the_default_recipe_accepts_a_blurred_or_a_replaced_background():
    recipe = load_recipe("default-cpu")
    rules = rules_for("background_change", recipe.score.rules, recipe.score.per_task)
    common = {"exposure_edited": 0.5, "clipped_edited": 0.0, "change_inside": 0.005}
    blur = {**common, "change_global": 0.0098, "change_outside": 0.011, "detail_change_outside": 0.7}
    replace = {**common, "change_global": 0.2, "change_outside": 0.25, "detail_change_outside": 0.85}
    faint = {**common, "change_global": 0.005, "change_outside": 0.006, "detail_change_outside": 0.05}
    assert decide(blur, rules) == decide(replace, rules) == (None, "")
    assert decide(faint, rules)[0] == "background_unchanged"


@pytest.fixture(scope="module")
def scenes() -> list:
    """Generated scenes at the working size (short side 512) with the subjects segmentation finds."""
    return [(image, find_subject(image)) for image, _ in map(generate_scene, range(3))]


@pytest.mark.parametrize("name", sorted(OPS))
def test_the_default_policy_accepts_most_edits_of_every_classical_op(name, scenes):
    """An op the default recipe schedules needs a reasonable yield: one the policy always rejects (as it did
    background.blur, 0 of 16) only wastes its share of the task mix."""
    stage = ScoreStage(load_recipe("default-cpu").score, StageContext(seed=0, recipe_hash="h", run_dir="."))
    op, reasons = OPS[name], []
    for index, (image, subject) in enumerate(scenes):
        params = op.sample_params(np.random.default_rng(index), subject)
        if params is None:
            continue  # e.g. a recolour of a grey subject is never attempted
        out = op.apply(image, params, subject)
        row = {**empty_row(), "unit_id": f"u{index}", "status": LIVE, "task": op.task, "scores": json.dumps({}),
               "src": encode_jpeg(out.source), "edited": encode_jpeg(out.edited),
               "mask": None if out.mask is None else encode_mask(out.mask)}
        [row] = stage.process_row(row)
        reasons.append(row["reason"])
    assert reasons and reasons.count(None) >= len(reasons) / 2, reasons
