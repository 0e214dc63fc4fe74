"""Score stage: compute every score, store it, and let the per-task policy decide.

The heuristic scores (filters/heuristics.py) always run, row by row. Model scorers are named blocks chosen by
`backend:` (filters/vlm_judges.py: imgedit_judge, viescore; filters/aesthetic.py: aesthetic_v2_5;
filters/similarity.py: dino, clip; filters/pyiqa_scorer.py: pyiqa), each asked once per batch over the batch's
live rows:

    score:
      scorers:
        judge: {backend: imgedit_judge, reply: text, vlm: {backend: transformers, model: /models/ImgEdit_Judge}}
      rules: [{score: judge_sum, min: 4, reason: judge_low_score}]
      per_task:
        subject_removal: [{score: judge_sum, min: 9, reason: judge_low_score}]

A judge that cannot score a pair leaves those scores absent and says why in the row's warnings
("vlm_truncated: judge: …"), so the ledger explains an unjudged pair whether or not it was accepted. Only the
policy ends the row: when a rule needs a score a judge could not give, the ledger reason is the judge's own
(vlm_truncated, vlm_unparseable, …), which says what to fix, rather than the policy's generic missing_score.
A row the policy rejects keeps its images and records why each absent score is absent (provenance
`absent_scores`), so `python -m pipeline refilter` can re-decide it under another policy without any model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Union

from pydantic import Field, field_validator

from filters.aesthetic import AestheticScorer
from filters.heuristics import EDIT_SCORES, IMAGE_SCORES, edit_scores, image_scores
from filters.policy import Rule, decide, rules_for
from filters.pyiqa_scorer import PyiqaScorer
from filters.similarity import ClipScorer, DinoScorer
from filters.vlm_judges import EditPair, ImgEditJudge, Scored, VieScore
from manifests.config import Strict
from manifests.images import decode_mask
from manifests.rejected import ItemFailed, Rejected
from manifests.schema import FAILED, REJECTED
from manifests.taxonomy import task_by_name
from stages.base import Stage, decode_own, end_row

SCORERS = {cls.backend: cls for cls in (ImgEditJudge, VieScore, AestheticScorer, DinoScorer, ClipScorer,
                                         PyiqaScorer)}
ScorerConfig = Annotated[Union[tuple(cls.Config for cls in SCORERS.values())], Field(discriminator="backend")]
Scorer = ImgEditJudge | VieScore | AestheticScorer | DinoScorer | ClipScorer | PyiqaScorer


class ScoreConfig(Strict):
    scorers: dict[str, ScorerConfig] = {}  # model scorers by name, beside the heuristics (always on)
    rules: list[Rule] = []  # applied to every task
    per_task: dict[str, list[Rule]] = {}  # extra rules per task; one sharing a score with a common rule replaces it

    @field_validator("scorers")
    @classmethod
    def _one_per_backend(cls, v: dict[str, ScorerConfig]):
        """A backend writes fixed score names (judge_sum, viescore_o, …): a second block would overwrite them."""
        seen: dict[str, str] = {}
        for name, cfg in v.items():
            if cfg.backend in seen:
                raise ValueError(f"scorers {seen[cfg.backend]!r} and {name!r} both use backend {cfg.backend!r}, "
                                 f"whose scores ({', '.join(SCORERS[cfg.backend].names)}) one would overwrite")
            seen[cfg.backend] = name
        return v

    @field_validator("per_task")
    @classmethod
    def _tasks(cls, v: dict[str, list[Rule]]):
        for name in v:
            task_by_name(name)
        return v


@dataclass
class _Scoring:
    """A live row on its way through the scorers."""

    row: dict
    pair: EditPair
    scores: dict[str, float]
    missing: dict[str, tuple[str, Rejected]] = field(default_factory=dict)  # score → (scorer, why it is absent)


class ScoreStage(Stage):
    name = "score"
    requires = ("src", "edited", "task")
    adds = ("scores", "thresholds")

    def __init__(self, cfg: ScoreConfig, ctx):
        super().__init__(cfg, ctx)
        self.scorers: dict[str, Scorer] = {name: SCORERS[c.backend](c) for name, c in cfg.scorers.items()}  # lazy

    def process_row(self, row: dict) -> list[dict]:
        """One row through the batched path (tests and callers that score a single pair)."""
        return self.process([row])

    def process(self, rows: list[dict]) -> list[dict]:
        ended, live = [], []
        for row in rows:
            try:
                live.append(self._measure(row))
            except Exception as e:  # this row's images: ended with a reason or an error class, the batch goes on
                ended.append(self._end(row, e))
        for name, scorer in self.scorers.items():
            kept = []
            for s, result in zip(live, self._score(scorer, [s.pair for s in live])):
                if isinstance(result, Scored):
                    s.scores |= result.scores
                    s.missing |= {score: (name, why) for score, why in result.missing.items()}
                    kept.append(s)
                else:
                    ended.append(self._end(self._row(s), result))
            live = kept
        provenance = {name: scorer.provenance() for name, scorer in self.scorers.items()}  # what answered
        return ended + [self._decide(s, provenance) for s in live]

    def _measure(self, row: dict) -> _Scoring:
        src, edited = decode_own(row["src"]), decode_own(row["edited"])
        mask = decode_mask(row["mask"]) if row["mask"] is not None else None
        scores = {**json.loads(row["scores"] or "{}"), **image_scores(src, SIDES[0]),
                  **image_scores(edited, SIDES[1]), **edit_scores(src, edited, mask)}
        return _Scoring(row, EditPair(src, edited, row["instruction_en"], row["instruction_zh"]), scores)

    def _score(self, scorer: Scorer, pairs: list[EditPair]) -> list[Scored | Exception]:
        """One batched call; when it raises, the pairs one by one, so that a bad pair (an instruction that is
        missing) ends its own row only. A model or service that is down then ends every row with its error."""
        if not pairs:
            return []
        try:
            return [in_range(scorer, result) for result in scorer.score(pairs)]
        except Exception as e:  # returned, then recorded in the ledger as its row's end
            if len(pairs) == 1:
                return [e]
            return [result for pair in pairs for result in self._score(scorer, [pair])]

    def _end(self, row: dict, error: Exception) -> dict:
        if isinstance(error, Rejected):
            return end_row(row, REJECTED, self.name, error.reason, error.message)
        if isinstance(error, ItemFailed):  # out of memory alone: an error of the system, not of the pair
            return end_row(row, FAILED, self.name, error.reason, error.message)
        return self.fail(row, error)

    def _row(self, s: _Scoring) -> dict:
        """The row with what was measured: its scores, and why any judge's score is absent."""
        row = {**s.row, "scores": json.dumps(s.scores)}
        if s.missing:  # once per failed request, though it left several scores absent
            why = dict.fromkeys(f"{r.reason}: {scorer}: {r.message}" for scorer, r in s.missing.values())
            row["warnings"] = [*(s.row["warnings"] or []), *why]
        return row

    def _decide(self, s: _Scoring, judges: dict[str, dict]) -> dict:
        row = self._row(s)
        absent = {score: {"scorer": scorer, "reason": why.reason, "message": why.message}
                  for score, (scorer, why) in sorted(s.missing.items())}
        if judges or absent:
            provenance = json.loads(s.row["provenance"] or "{}")
            row["provenance"] = json.dumps({**provenance, **({"score": judges} if judges else {}),
                                            **({ABSENT_KEY: absent} if absent else {})})
        return policy_verdict(row, rules_for(s.row["task"], self.cfg.rules, self.cfg.per_task), absent)


class ScoreOutOfRange(ValueError):
    """A score outside its scorer's declared range, or not finite: a broken model or a bug, never a verdict
    on the pair, so its row fails with this error class instead of being judged on the value."""


def in_range(scorer: Scorer, result: Scored | ItemFailed) -> Scored | ItemFailed | ScoreOutOfRange:
    if isinstance(result, Scored):
        for score, value in result.scores.items():
            low, high = scorer.ranges[score]
            if not (math.isfinite(value) and low <= value <= high):
                return ScoreOutOfRange(f"{scorer.backend} gave {score}={value}, outside [{low}, {high}]")
    return result


SIDES = ("src", "edited")
# the scores every scored row has (the region ones: every region edit), whatever scorers a recipe names
HEURISTIC_SCORES = frozenset([*(f"{name}_{side}" for side in SIDES for name in IMAGE_SCORES), *EDIT_SCORES])
ABSENT_KEY = "absent_scores"  # provenance: score → {scorer, reason, message} for each score a scorer could not give


def policy_verdict(row: dict, rules: list[Rule], absent: dict[str, dict]) -> dict:
    """The row, its scores measured, with the policy's verdict: the rules recorded, and the row live or
    rejected by the first rule that fails. A rejected row keeps its images, so `refilter` can accept it under a
    looser policy; the score stage and refilter decide through `verdict`."""
    row = {**row, "thresholds": thresholds_json(rules)}
    reason, message = verdict(json.loads(row["scores"] or "{}"), rules, absent)
    if reason is None:
        return row
    return end_row(row, REJECTED, ScoreStage.name, reason, message, keep_images=True)


def thresholds_json(rules: list[Rule]) -> str:
    """The rules a row was judged by, as its `thresholds` column records them."""
    return json.dumps([r.model_dump(exclude_none=True) for r in rules])


def verdict(scores: dict[str, float], rules: list[Rule], absent: dict[str, dict]) -> tuple[str | None, str]:
    """`decide`, with the scorer's own reason for a score it could not give (`absent`).

    When a rule needs a score a scorer could not give, the ledger reason is the scorer's own (vlm_truncated,
    …), which says what to fix, rather than the policy's generic missing_score. `decide` reports the first rule
    with an absent score, and in it the first absent score by name: the same one is looked up here; a misspelt
    or never computed score stays missing_score."""
    reason, message = decide(scores, rules)
    if reason == "missing_score":
        rule = next(r for r in rules if r.scores - scores.keys())
        score = min(rule.scores - scores.keys())
        if score in absent:
            why = absent[score]
            reason, message = why["reason"], f"{why['scorer']} could not give {score}: {why['message']}"
    return reason, message
