"""What the learned scorers (filters/aesthetic.py, filters/similarity.py) share: one image encoder
(workers/vision_encoders.py) built on first score, so constructing the score stage loads nothing; pairs run in
batches whose source and edited images share one forward pass, halved on CUDA out-of-memory (a pair that still
runs out alone ends as `ItemFailed("oom")`); provenance names the model, the dtype and device it ran in, and its
load time apart from the work.

A scorer declares every score it writes (`names`) and each one's range (`ranges`): the score stage fails a row
whose score falls outside (NaN included), since that is a broken model or a bug, never a verdict on the pair.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from filters.vlm_judges import EditPair, Scored
from manifests.rejected import ItemFailed
from workers.model_lifecycle import TransformersPair, run_batched
from workers.vision_encoders import EncoderConfig

COSINE = (-1.0, 1.0)


class LearnedScorerConfig(EncoderConfig):
    batch_size: int = Field(16, ge=1)  # pairs per forward pass, which sees twice as many images


class LearnedScorer:
    backend: ClassVar[str]
    names: ClassVar[tuple[str, ...]]  # every score it writes
    ranges: ClassVar[dict[str, tuple[float, float]]]  # each score's [low, high]

    def __init__(self, cfg: LearnedScorerConfig, encoder: TransformersPair) -> None:
        """Loads nothing."""
        self.cfg, self.encoder = cfg, encoder

    def score(self, pairs: Sequence[EditPair]) -> list[Scored | ItemFailed]:
        return run_batched(self._score, list(pairs), self.cfg.batch_size)

    def _score(self, pairs: list[EditPair]) -> list[Scored]:
        raise NotImplementedError

    @staticmethod
    def both(encode, pairs: list[EditPair]) -> tuple:
        """`encode` over the sources and the edits of `pairs` in one call: (sources' output, edits' output)."""
        out = encode([p.source for p in pairs] + [p.edited for p in pairs])
        return out[:len(pairs)], out[len(pairs):]

    def provenance(self) -> dict:
        return {"scorer": self.backend, **self.encoder.provenance(), "load_seconds": self.encoder.load_seconds}
