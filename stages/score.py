"""Score stage: compute every score, store it, and let the per-task policy decide."""
from __future__ import annotations

import json

from pydantic import field_validator

from filters.heuristics import edit_scores, image_scores
from filters.policy import Rule, decide, rules_for
from manifests.config import Strict
from manifests.images import decode_mask
from manifests.schema import REJECTED
from manifests.taxonomy import task_by_name
from stages.base import Stage, decode_own, end_row


class ScoreConfig(Strict):
    rules: list[Rule] = []  # applied to every task
    per_task: dict[str, list[Rule]] = {}  # extra rules per task; one sharing a score with a common rule replaces it

    @field_validator("per_task")
    @classmethod
    def _tasks(cls, v: dict[str, list[Rule]]):
        for name in v:
            task_by_name(name)
        return v


class ScoreStage(Stage):
    name = "score"
    requires = ("src", "edited", "task")
    adds = ("scores", "thresholds")

    def process_row(self, row: dict) -> list[dict]:
        src = decode_own(row["src"])
        edited = decode_own(row["edited"])
        mask = decode_mask(row["mask"]) if row["mask"] is not None else None
        scores = {**json.loads(row["scores"] or "{}"), **image_scores(src, "src"),
                  **image_scores(edited, "edited"), **edit_scores(src, edited, mask)}
        rules = rules_for(row["task"], self.cfg.rules, self.cfg.per_task)
        row = {**row, "scores": json.dumps(scores),
               "thresholds": json.dumps([r.model_dump(exclude_none=True) for r in rules])}
        reason, message = decide(scores, rules)
        if reason is not None:
            return [end_row(row, REJECTED, self.name, reason, message)]
        return [row]
