"""Aesthetic Predictor V2.5 as a scorer (reference-code.md §1.11; the model: workers/vision_encoders.py): the
source's and the edit's aesthetic score and their difference, which the reference gates on (§1.3: the
inpainted image ≥ 5; §1.8: a |Δ| < 0.02 means nothing was edited).

    aesthetic:
      backend: aesthetic_v2_5
      model: google/siglip-so400m-patch14-384       # SigLIP vision tower and processor (384², patch 14)
      head: /models/aesthetic_predictor_v2_5.pth    # discus0434's head; omitted: head.safetensors in model's folder
      dtype: bfloat16
      batch_size: 16

The score is an unclamped regression output, conventionally read on a 1–10 scale (5.5+ is "great"), so its
declared range is the real line: the range check then catches only a NaN.
"""
from __future__ import annotations

import math
from typing import Literal

from filters.learned import LearnedScorer, LearnedScorerConfig
from filters.vlm_judges import EditPair, Scored
from workers.vision_encoders import AestheticModel, AestheticPredictor

UNBOUNDED = (-math.inf, math.inf)


class AestheticConfig(AestheticModel, LearnedScorerConfig):
    backend: Literal["aesthetic_v2_5"] = "aesthetic_v2_5"


class AestheticScorer(LearnedScorer):
    backend = "aesthetic_v2_5"
    Config = AestheticConfig
    names = ("aesthetic_src", "aesthetic_edited", "aesthetic_delta")
    ranges = dict.fromkeys(names, UNBOUNDED)

    def __init__(self, cfg: AestheticConfig) -> None:
        super().__init__(cfg, AestheticPredictor(cfg))

    def _score(self, pairs: list[EditPair]) -> list[Scored]:
        sources, edits = self.both(self.encoder.predict, pairs)
        return [Scored({"aesthetic_src": src, "aesthetic_edited": edited, "aesthetic_delta": edited - src}, {})
                for src, edited in zip(sources, edits)]
