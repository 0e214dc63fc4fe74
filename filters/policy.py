"""Per-task threshold policies: stored scores → accept, or reject with a reason code.

Score once, decide later: a policy only reads scores, so a finished run can be re-filtered with a new
policy without recomputing any model.
"""
from __future__ import annotations

from manifests.config import Strict


class Rule(Strict):
    score: str
    min: float | None = None
    max: float | None = None
    reason: str  # reason code written to the ledger when the rule fails

    def check(self, scores: dict[str, float]) -> bool:
        value = scores[self.score]
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def rules_for(task: str, rules: list[Rule], per_task: dict[str, list[Rule]]) -> list[Rule]:
    """The rules that apply to a task: the common ones, with a per-task rule on the same score replacing."""
    specific = per_task.get(task, [])
    overridden = {r.score for r in specific}
    return [r for r in rules if r.score not in overridden] + list(specific)


def decide(scores: dict[str, float], rules: list[Rule]) -> tuple[str | None, str]:
    """(None, "") when every rule passes, else (reason code, message) for the first rule that fails.

    A rule on a score that was not computed rejects: a policy that cannot judge must not accept."""
    for rule in rules:
        if rule.score not in scores:
            return "missing_score", f"policy needs score {rule.score!r}, which was not computed"
        if not rule.check(scores):
            bounds = " ".join(f"{k}={v}" for k, v in (("min", rule.min), ("max", rule.max)) if v is not None)
            return rule.reason, f"{rule.score}={scores[rule.score]:.4f} outside {bounds}"
    return None, ""
