"""DINO and CLIP similarities as scorers, computed as the reference computes them (reference-code.md §1.9),
which gates on them per task (§1.9 style transfer: DINO or CLIP-I > 0.95 rejects, CLIP-T < 0.2 rejects; §1.10
subject-driven: DINO < 0.8, CLIP-I < 0.65, CLIP-T < 0.23 reject). The models: workers/vision_encoders.py.

    dino: {backend: dino, model: facebook/dinov2-giant, batch_size: 16}
    clip: {backend: clip, model: openai/clip-vit-large-patch14, batch_size: 16}

- `dino`: (cos + 1) / 2 of the source's and the edit's mean-pooled DINOv2 tokens, in [0, 1].
- `clip_i`: the cosine of CLIP's image embeddings of the source and the edit, in [-1, 1].
- `clip_t`: the cosine of CLIP's embeddings of the English instruction (cut at 77 tokens) and the edit, in
  [-1, 1]; absent, with the reason `no_instruction`, for a pair without one (its other scores are still given).
"""
from __future__ import annotations

from typing import Literal

from filters.learned import COSINE, LearnedScorer, LearnedScorerConfig
from filters.vlm_judges import EditPair, Scored
from manifests.rejected import Rejected
from workers.vision_encoders import ClipEncoder, Dinov2Encoder

NO_INSTRUCTION = Rejected("no_instruction", "the pair has no English instruction for clip_t")


def cosines(a, b) -> list[float]:
    """Row-wise cosines of unit rows, clamped: rounding may carry a dot product of equal rows past 1."""
    return (a * b).sum(-1).clamp(*COSINE).tolist()


class DinoConfig(LearnedScorerConfig):
    backend: Literal["dino"] = "dino"


class DinoScorer(LearnedScorer):
    backend = "dino"
    Config = DinoConfig
    names = ("dino",)
    ranges = {"dino": (0.0, 1.0)}

    def __init__(self, cfg: DinoConfig) -> None:
        super().__init__(cfg, Dinov2Encoder(cfg.model, cfg.revision, cfg.dtype, cfg.device))

    def _score(self, pairs: list[EditPair]) -> list[Scored]:
        sources, edits = self.both(self.encoder.image_features, pairs)
        return [Scored({"dino": (cos + 1) / 2}, {}) for cos in cosines(sources, edits)]


class ClipConfig(LearnedScorerConfig):
    backend: Literal["clip"] = "clip"


class ClipScorer(LearnedScorer):
    backend = "clip"
    Config = ClipConfig
    names = ("clip_i", "clip_t")
    ranges = {"clip_i": COSINE, "clip_t": COSINE}

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__(cfg, ClipEncoder(cfg.model, cfg.revision, cfg.dtype, cfg.device))

    def _score(self, pairs: list[EditPair]) -> list[Scored]:
        sources, edits = self.both(self.encoder.image_features, pairs)
        told = [i for i, p in enumerate(pairs) if p.instruction_en and p.instruction_en.strip()]
        clip_t: dict[int, float] = {}
        if told:
            texts = self.encoder.text_features([pairs[i].instruction_en for i in told])
            clip_t = dict(zip(told, cosines(texts, edits[told])))
        return [Scored({"clip_i": cos, "clip_t": clip_t[i]}, {}) if i in clip_t else
                Scored({"clip_i": cos}, {"clip_t": NO_INSTRUCTION}) for i, cos in enumerate(cosines(sources, edits))]
