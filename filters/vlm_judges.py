"""VLM judges as scorers: ImgEdit-Judge and VIEScore turn (source, edited, instruction) pairs into scores.

    judge = ImgEditJudge(ImgEditJudgeConfig(vlm={"backend": "transformers", "model": "/models/ImgEdit_Judge"}))
    [scored] = judge.score([EditPair(src, edited, "Remove the mug", "把杯子删掉")])
    scored.scores   # {"judge_instruction": 4.0, "judge_naturalness": 5.0, "judge_sum": 9.0, "judge_objects_match": 1.0}
    scored.missing  # {}, or each score the judge could not give → the Rejected that says why

Recipe blocks (stages/score.py `scorers:`; `vlm:` is a workers/vlm.py block):

    judge:
      backend: imgedit_judge
      reply: text        # the fine-tuned checkpoint's four lines; json: a general VLM with structured output
      language: en       # the rubric's language and the instruction's (instruction_en or instruction_zh)
      vlm: {backend: transformers, model: /models/ImgEdit/ImgEdit_Judge}
    viescore:
      backend: viescore
      vlm: {backend: openai, base_url: http://127.0.0.1:8000/v1, api_key_env: VLM_API_KEY,
            model: Qwen/Qwen2.5-VL-72B-Instruct}

ImgEdit-Judge (reference-code.md §0): two 1–5 scores, instruction following and naturalness, summed as the data
scripts and the training loader read them (`sum(score_7b)`), and an objects-match flag (0/1).
VIEScore (§5, task "tie"): SC = min(editing_success, over_editing), PQ = min(naturalness, artifacts), both 0–10,
O = sqrt(SC · PQ); the raw sub-scores are stored too, and the SC sum, which the loader's threshold on the 72B
judge's `score` reads (§3.8: sum ≥ 18).

Never guessed: where the reference draws a random score for a reply it cannot parse (§5), a judge here leaves
the scores that reply would have given absent, with the VLM's reason (vlm_unparseable, vlm_schema_mismatch,
vlm_truncated, vlm_refused, …). A score out of its range never gets here: the prompt's schema or line pattern
bounds it, so the parser rejects it. `ItemFailed` (out of memory alone) is passed on: an error, not a verdict.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from manifests.config import Strict
from manifests.rejected import ItemFailed, Rejected
from workers.vlm import Vlm, VlmAnswer, VlmConfig, VlmRequest, build_vlm
from workers.vlm_prompts import Language, render

Item = VlmAnswer | Rejected | ItemFailed


@dataclass(frozen=True)
class EditPair:
    source: np.ndarray  # RGB uint8 (H, W, 3)
    edited: np.ndarray
    instruction_en: str | None
    instruction_zh: str | None

    def instruction(self, language: Language) -> str | None:
        return self.instruction_en if language == "en" else self.instruction_zh


@dataclass(frozen=True)
class Scored:
    scores: dict[str, float]
    missing: dict[str, Rejected]  # each score the judge could not give → why


class ImgEditJudgeConfig(Strict):
    backend: Literal["imgedit_judge"] = "imgedit_judge"
    vlm: VlmConfig
    # text: the four plain lines the fine-tuned checkpoint was trained to write (a JSON grammar would push it off
    # its training distribution); json: the same rubric for a general VLM on a structured-output backend.
    reply: Literal["text", "json"] = "text"
    language: Language = "en"  # the rubric's language, and which instruction the judge reads
    max_new_tokens: int = Field(256, ge=1)  # §0 qwenvl_score; the reply is ~40 tokens


class VieScoreConfig(Strict):
    backend: Literal["viescore"] = "viescore"
    vlm: VlmConfig  # both prompts answer in JSON: a backend with structured output keeps them parseable
    language: Language = "en"
    max_new_tokens: int = Field(512, ge=1)  # §5: the qwen25vl backbone's limit


class _VlmJudge:
    """What both judges share: the VLM built on first use (constructing a stage loads nothing), the templates
    that asked, and the provenance."""

    backend: ClassVar[str]
    names: ClassVar[tuple[str, ...]]  # every score it writes
    ranges: ClassVar[dict[str, tuple[float, float]]]  # each score's [low, high], as the prompts' schemas bound them

    def __init__(self, cfg: ImgEditJudgeConfig | VieScoreConfig) -> None:
        self.cfg = cfg
        self.templates: dict[str, str] = {}  # template_id → sha256 of those rendered so far

    @cached_property
    def vlm(self) -> Vlm:
        return build_vlm(self.cfg.vlm)

    def _ask(self, requests: list[VlmRequest]) -> list[Item]:
        self.templates.update((r.prompt.template_id, r.prompt.sha256) for r in requests)
        return self.vlm.ask(requests)

    def provenance(self) -> dict:
        return {"scorer": self.backend, "templates": dict(sorted(self.templates.items())), **self.vlm.provenance()}


class ImgEditJudge(_VlmJudge):
    backend = "imgedit_judge"
    Config = ImgEditJudgeConfig
    names = ("judge_instruction", "judge_naturalness", "judge_sum", "judge_objects_match")
    ranges = {"judge_instruction": (1.0, 5.0), "judge_naturalness": (1.0, 5.0), "judge_sum": (2.0, 10.0),
              "judge_objects_match": (0.0, 1.0)}

    def score(self, pairs: Sequence[EditPair]) -> list[Scored | ItemFailed]:
        cfg = self.cfg
        prompts = [render(f"judge_imgedit_{cfg.reply}", cfg.language, instruction=p.instruction(cfg.language))
                   for p in pairs]
        requests = [VlmRequest([p.source, p.edited], prompt, cfg.max_new_tokens) for p, prompt in zip(pairs, prompts)]
        return [self._scored(item) for item in self._ask(requests)]

    def _scored(self, item: Item) -> Scored | ItemFailed:
        if isinstance(item, ItemFailed):
            return item
        if isinstance(item, Rejected):
            return Scored({}, dict.fromkeys(self.names, item))
        first, second = item.parsed["instruction_following"], item.parsed["naturalness"]
        return Scored({"judge_instruction": float(first), "judge_naturalness": float(second),
                       "judge_sum": float(first + second),
                       "judge_objects_match": float(item.parsed["objects_match"])}, {})


_SC = ("viescore_editing_success", "viescore_over_editing", "viescore_sc", "viescore_sc_sum")
_PQ = ("viescore_naturalness", "viescore_artifacts", "viescore_pq")


class VieScore(_VlmJudge):
    backend = "viescore"
    Config = VieScoreConfig
    names = (*_SC, *_PQ, "viescore_o")
    ranges = {**dict.fromkeys(names, (0.0, 10.0)), "viescore_sc_sum": (0.0, 20.0)}

    def score(self, pairs: Sequence[EditPair]) -> list[Scored | ItemFailed]:
        """One ask for both prompts of every pair: SC sees both images, PQ the edited one only (§5)."""
        cfg = self.cfg
        sc = [VlmRequest([p.source, p.edited], render("viescore_sc", cfg.language,
                                                      instruction=p.instruction(cfg.language)), cfg.max_new_tokens)
              for p in pairs]
        pq = [VlmRequest([p.edited], render("viescore_pq", cfg.language), cfg.max_new_tokens) for p in pairs]
        items = self._ask(sc + pq)
        return [self._scored(s, q) for s, q in zip(items[:len(pairs)], items[len(pairs):])]

    @staticmethod
    def _scored(sc: Item, pq: Item) -> Scored | ItemFailed:
        if isinstance(sc, ItemFailed) or isinstance(pq, ItemFailed):
            return sc if isinstance(sc, ItemFailed) else pq
        scores: dict[str, float] = {}
        missing: dict[str, Rejected] = {}
        if isinstance(sc, Rejected):
            missing |= dict.fromkeys(_SC, sc)
        else:
            success, over = sc.parsed["editing_success"], sc.parsed["over_editing"]
            scores |= dict(zip(_SC, map(float, (success, over, min(success, over), success + over))))
        if isinstance(pq, Rejected):
            missing |= dict.fromkeys(_PQ, pq)
        else:
            natural, artifacts = pq.parsed["naturalness"], pq.parsed["artifacts"]
            scores |= dict(zip(_PQ, map(float, (natural, artifacts, min(natural, artifacts)))))
        if missing:  # O needs both halves; the SC prompt's reason first, as it is asked first
            missing["viescore_o"] = missing.get("viescore_sc") or missing["viescore_pq"]
        else:
            scores["viescore_o"] = math.sqrt(scores["viescore_sc"] * scores["viescore_pq"])
        return Scored(scores, missing)
