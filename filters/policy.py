"""Per-task threshold policies: stored scores → accept, or reject with a reason code.

Score once, decide later: a policy only reads scores, so a finished run can be re-filtered with a new
policy without recomputing any model.

A rule is one bound on one score, `{score: change_global, min: 0.01, reason: no_op_edit}`, or passes when
any of several bounds holds, `{any_of: [{score: change_outside, min: 0.03}, {score: detail_change_outside,
min: 0.3}], reason: background_unchanged}`: one edit can show in different scores (a new backdrop moves
pixel values, a blur removes detail), and the rule accepts either.
"""
from __future__ import annotations

from functools import cached_property

from pydantic import Field, model_validator

from manifests.config import Strict


class Bound(Strict):
    score: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self):
        if self.min is None and self.max is None:
            raise ValueError(f"a bound on {self.score!r} needs min, max or both")
        return self

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self, value: float) -> str:
        bounds = " ".join(f"{k}={v}" for k, v in (("min", self.min), ("max", self.max)) if v is not None)
        return f"{self.score}={value:.4f} outside {bounds}"


class Rule(Strict):
    score: str | None = None  # a plain rule: score with min and/or max
    min: float | None = None
    max: float | None = None
    any_of: list[Bound] | None = Field(None, min_length=2)  # or: passes when one of these holds
    reason: str  # reason code written to the ledger when the rule fails

    @model_validator(mode="after")
    def _one_form(self):
        if self.any_of is not None:
            if (self.score, self.min, self.max) != (None, None, None):
                raise ValueError("a rule has either score/min/max or any_of; put min/max inside each any_of entry")
        elif self.score is None:
            raise ValueError("a rule needs score (with min and/or max) or any_of")
        elif self.min is None and self.max is None:
            raise ValueError(f"a rule on {self.score!r} needs min, max or both")
        return self

    @cached_property  # the rule is frozen; a policy asks for its bounds once per row it judges
    def bounds(self) -> list[Bound]:
        return self.any_of or [Bound(score=self.score, min=self.min, max=self.max)]

    @cached_property
    def scores(self) -> set[str]:
        return {b.score for b in self.bounds}


def rules_for(task: str, rules: list[Rule], per_task: dict[str, list[Rule]]) -> list[Rule]:
    """The rules that apply to a task: the common ones, with those replaced that share a score with a
    per-task rule. A rule is keyed by the scores it names, so an any_of rule replaces (and is replaced by)
    every rule on any of its scores: the task's rule then is the whole judgement of those scores."""
    specific = per_task.get(task, [])
    overridden = set().union(*(r.scores for r in specific))
    return [r for r in rules if not r.scores & overridden] + list(specific)


def decide(scores: dict[str, float], rules: list[Rule]) -> tuple[str | None, str]:
    """(None, "") when every rule passes, else (reason code, message) for the first rule that fails.

    A rule on a score that was not computed rejects, even an any_of rule whose other bound holds: a policy
    that cannot judge must not accept, and a misspelt score must not pass unnoticed."""
    for rule in rules:
        missing = sorted(rule.scores - scores.keys())
        if missing:
            return "missing_score", f"policy needs score {missing[0]!r}, which was not computed"
        if not any(b.holds(scores[b.score]) for b in rule.bounds):
            return rule.reason, " and ".join(b.describe(scores[b.score]) for b in rule.bounds)
    return None, ""
